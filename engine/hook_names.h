// Hook points: TransformerLens names on the wire and in Python, typed ids inside the engine.
// A name is parsed once at the boundary; the forward pass only ever sees HookId.
//
//   ASSIGN_OR_RETURN(HookId id, ParseHookName("blocks.3.attn.hook_z", config.n_layers));
//   HookName(id);  // "blocks.3.attn.hook_z"
//   ParseHookName("blocks.3.attn.hook_zz", 32);
//     // InvalidArgument: unknown hook name "blocks.3.attn.hook_zz"; did you mean
//     // "blocks.3.attn.hook_z", ...
#ifndef REMOTELENS_ENGINE_HOOK_NAMES_H_
#define REMOTELENS_ENGINE_HOOK_NAMES_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/llama_config.h"

namespace remotelens {

// Every hook site, in the order the forward pass reaches them. Shapes are TransformerLens's.
enum class HookSite : uint8_t {
  kEmbed,              // hook_embed                    [batch, pos, d_model]
  kResidPre,           // blocks.L.hook_resid_pre       [batch, pos, d_model]
  kLn1Scale,           // blocks.L.ln1.hook_scale       [batch, pos, 1]  sqrt(mean(x^2) + eps)
  kLn1Normalized,      // blocks.L.ln1.hook_normalized  [batch, pos, d_model]  x / scale
  kAttnIn,             // blocks.L.hook_attn_in         [batch, pos, n_heads, d_model]  opt-in
  kQInput,             // blocks.L.hook_q_input         [batch, pos, n_heads, d_model]  opt-in
  kKInput,             // blocks.L.hook_k_input         [batch, pos, n_kv_heads, d_model]  opt-in
  kVInput,             // blocks.L.hook_v_input         [batch, pos, n_kv_heads, d_model]  opt-in
  kAttnQ,              // blocks.L.attn.hook_q          [batch, pos, n_heads, d_head]  pre-rotary
  kAttnK,              // blocks.L.attn.hook_k          [batch, pos, n_kv_heads, d_head]
  kAttnV,              // blocks.L.attn.hook_v          [batch, pos, n_kv_heads, d_head]
  kAttnRotQ,           // blocks.L.attn.hook_rot_q      [batch, pos, n_heads, d_head]
  kAttnRotK,           // blocks.L.attn.hook_rot_k      [batch, pos, n_kv_heads, d_head]
  kAttnScores,         // blocks.L.attn.hook_attn_scores [batch, n_heads, query_pos, key_pos]
  kAttnPattern,        // blocks.L.attn.hook_pattern    [batch, n_heads, query_pos, key_pos]
  kAttnZ,              // blocks.L.attn.hook_z          [batch, pos, n_heads, d_head]
  kAttnResult,         // blocks.L.attn.hook_result     [batch, pos, n_heads, d_model]  opt-in
  kAttnOut,            // blocks.L.hook_attn_out        [batch, pos, d_model]
  kResidMid,           // blocks.L.hook_resid_mid       [batch, pos, d_model]
  kMlpIn,              // blocks.L.hook_mlp_in          [batch, pos, d_model]  opt-in
  kLn2Scale,           // blocks.L.ln2.hook_scale       [batch, pos, 1]
  kLn2Normalized,      // blocks.L.ln2.hook_normalized  [batch, pos, d_model]
  kMlpPre,             // blocks.L.mlp.hook_pre         [batch, pos, d_mlp]  gate, before SiLU
  kMlpPreLinear,       // blocks.L.mlp.hook_pre_linear  [batch, pos, d_mlp]  up
  kMlpPost,            // blocks.L.mlp.hook_post        [batch, pos, d_mlp]  SiLU(gate) * up
  kMlpOut,             // blocks.L.hook_mlp_out         [batch, pos, d_model]
  kResidPost,          // blocks.L.hook_resid_post      [batch, pos, d_model]
  kLnFinalScale,       // ln_final.hook_scale           [batch, pos, 1]
  kLnFinalNormalized,  // ln_final.hook_normalized      [batch, pos, d_model]
  kUnembedIn,          // unembed.hook_in               [batch, pos, d_model]  ln_final's output
  kUnembedOut,         // unembed.hook_out              [batch, pos, d_vocab]  the logits
};

inline constexpr int kNumHookSites = static_cast<int>(HookSite::kUnembedOut) + 1;

// A hook point. `layer` is -1 for the sites outside the blocks (hook_embed, ln_final.*).
struct HookId {
  int layer = -1;
  HookSite site = HookSite::kEmbed;

  friend bool operator==(HookId a, HookId b) { return a.layer == b.layer && a.site == b.site; }
  friend bool operator!=(HookId a, HookId b) { return !(a == b); }
};

bool IsBlockSite(HookSite site);

// Parses a TransformerLens hook name for a model of `n_layers` blocks. Unknown names and layers
// out of range are InvalidArgument, with up to three closest valid names suggested.
absl::StatusOr<HookId> ParseHookName(absl::string_view name, int64_t n_layers);

// The TransformerLens name of `id`.
std::string HookName(HookId id);

// Every hook point of a model, in forward order.
std::vector<HookId> AllHookIds(int64_t n_layers);

// A dense index in [0, NumHookIds(n_layers)), in forward order, for flat per-hook tables.
int HookIndex(HookId id, int64_t n_layers);
int NumHookIds(int64_t n_layers);

// TransformerLens shape of the activation at `id`; -1 stands for batch, pos and key_pos, which
// depend on the input.
std::vector<int64_t> HookShape(HookId id, const LlamaConfig& config);

// Which dimension of the activation indexes positions (query positions for attention scores and
// patterns) and which indexes heads (-1: none). Selectors in hook ops use these.
int PosDim(HookSite site);
int HeadDim(HookSite site);

// TransformerLens's words for each dimension of HookShape, e.g. {"batch", "pos", "head_index",
// "d_head"}; "kv_head_index" for key/value heads, "query_pos"/"key_pos" for attention patterns,
// "1" for the norms' scale.
std::vector<std::string> HookDims(HookSite site);

// The hook points whose site satisfies `pred`, for error messages: "hook_embed,
// blocks.L.hook_resid_pre, ..." in forward order, with "L" for the layer.
std::string SiteNames(bool (*pred)(HookSite));

// The TransformerLens HookedTransformer flag that must be on for the hook point to fire there
// ("use_attn_result", "use_attn_in", "use_split_qkv_input", "use_hook_mlp_in"); empty for the
// hook points TransformerLens always runs. The engine computes them only when requested.
absl::string_view EnablingFlag(HookSite site);

// The TransformerLens 4 (TransformerBridge, Llama architecture) names of `id`, in the bridge's
// order; empty when the bridge has none. ln_final.hook_in is an alias of the last block's
// hook_resid_post, so it appears among that hook's names.
std::vector<std::string> HookAliases(HookId id, int64_t n_layers);

}  // namespace remotelens

#endif  // REMOTELENS_ENGINE_HOOK_NAMES_H_
