// Status propagation helpers. Abseil 20220623 (Debian) ships no status macros, so the two the
// codebase needs are defined once here.
//
//   absl::StatusOr<Weights> LoadAll(const std::string& dir) {
//     RETURN_IF_ERROR(CheckDir(dir));
//     ASSIGN_OR_RETURN(LlamaConfig config, ReadConfig(dir));
//     ...
//   }
#ifndef REMOTELENS_ENGINE_STATUS_MACROS_H_
#define REMOTELENS_ENGINE_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define REMOTELENS_STATUS_CONCAT_INNER(a, b) a##b
#define REMOTELENS_STATUS_CONCAT(a, b) REMOTELENS_STATUS_CONCAT_INNER(a, b)

// Returns the status from the enclosing function when `expr` is not OK.
#define RETURN_IF_ERROR(expr)                                  \
  do {                                                         \
    ::absl::Status remotelens_status_ = (expr);                \
    if (!remotelens_status_.ok()) return remotelens_status_;   \
  } while (0)

// `lhs` = value of the StatusOr `rexpr`, or returns its status from the enclosing function.
#define ASSIGN_OR_RETURN(lhs, rexpr) \
  REMOTELENS_ASSIGN_OR_RETURN_IMPL(REMOTELENS_STATUS_CONCAT(statusor_, __COUNTER__), lhs, rexpr)

#define REMOTELENS_ASSIGN_OR_RETURN_IMPL(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                                     \
  if (!statusor.ok()) return std::move(statusor).status();     \
  lhs = std::move(statusor).value()

#endif  // REMOTELENS_ENGINE_STATUS_MACROS_H_
