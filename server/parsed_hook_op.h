// A hook op parsed once (request_builder's ParseHookOp): its engine form with values decoded,
// plus what can only be resolved per run. Sessions keep their persistent hooks in this form, so a
// run neither re-parses nor re-decodes them.
#ifndef REMOTELENS_SERVER_PARSED_HOOK_OP_H_
#define REMOTELENS_SERVER_PARSED_HOOK_OP_H_

#include <optional>
#include <string>

#include "engine/hook_plan.h"

namespace remotelens {

struct ParsedHookOp {
  // Complete except: a patch_from_cache op (kind kSet, value filled per run from `patch`), and a
  // client callback (kind kCallback, callback attached per run).
  InterventionOp op;
  struct Patch {
    std::string cache_handle;
    std::string source_hook;  // the hook to read in the cache (default: op's own)
  };
  std::optional<Patch> patch;
};

}  // namespace remotelens

#endif  // REMOTELENS_SERVER_PARSED_HOOK_OP_H_
