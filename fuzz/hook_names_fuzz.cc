// Fuzzes ParseHookName, the parser every hook name from the wire goes through.
// Invariant: a name that parses prints back (HookName) to a name that parses to the same id.
#include <cstddef>
#include <cstdint>

#include "engine/hook_names.h"
#include "fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const int64_t n_layers = 1 + data[0] % 40;  // the first byte picks the model depth
  absl::string_view name(reinterpret_cast<const char*>(data + 1), size - 1);
  absl::StatusOr<remotelens::HookId> id = remotelens::ParseHookName(name, n_layers);
  if (!id.ok()) {
    FUZZ_CHECK(absl::IsInvalidArgument(id.status()));
    return 0;
  }
  FUZZ_CHECK(id->layer < n_layers);
  absl::StatusOr<remotelens::HookId> again =
      remotelens::ParseHookName(remotelens::HookName(*id), n_layers);
  FUZZ_CHECK(again.ok() && again->layer == id->layer && again->site == id->site);
  const int index = remotelens::HookIndex(*id, n_layers);
  FUZZ_CHECK(index >= 0 && index < remotelens::NumHookIds(n_layers));
  return 0;
}
