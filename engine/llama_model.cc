#include "engine/llama_model.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/InferenceMode.h>
#include <torch/version.h>

#include <cmath>
#include <limits>
#include <map>
#include <optional>
#include <tuple>
#include <utility>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/cpu_gemm.h"
#include "engine/fused_ops.h"
#include "engine/status_macros.h"

namespace remotelens {
namespace {

constexpr double kPi = 3.14159265358979323846;

// Applies the plan's ops at one hook point; free when nothing is registered there.
inline absl::Status Hook(HookPlan* plan, int64_t layer, HookSite site, at::Tensor& activation) {
  if (plan == nullptr) return absl::OkStatus();
  const HookId id{static_cast<int>(layer), site};
  if (!plan->Has(id)) return absl::OkStatus();
  return plan->Apply(id, activation);
}

inline bool Hooked(const HookPlan* plan, int64_t layer, HookSite site) {
  return plan != nullptr && plan->Has({static_cast<int>(layer), site});
}

// RMSNorm in float32 (as the reference does, whatever the model dtype), with hook_scale =
// sqrt(mean(x^2) + eps) [batch, pos, 1] and hook_normalized = x / scale [batch, pos, d_model].
absl::StatusOr<at::Tensor> HookedRmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps,
                                         HookPlan* plan, int64_t layer, HookSite scale_site,
                                         HookSite normalized_site, bool fused) {
  if (!Hooked(plan, layer, scale_site) && !Hooked(plan, layer, normalized_site)) {
    return RmsNorm(x, weight, eps, fused);
  }
  const at::Tensor x32 = x.to(at::kFloat);
  const at::Tensor mean_square = x32.pow(2).mean(-1, /*keepdim=*/true);  // [batch, pos, 1]
  const at::Tensor scale32 = (mean_square + eps).sqrt();  // [batch, pos, 1]
  at::Tensor scale = scale32.to(x.scalar_type());
  const at::Tensor scale_before = scale;
  RETURN_IF_ERROR(Hook(plan, layer, scale_site, scale));
  // Divide by the float32 scale unless a hook replaced it.
  const at::Tensor divisor = scale.is_same(scale_before) ? scale32 : scale.to(at::kFloat);
  at::Tensor normalized = (x32 / divisor).to(x.scalar_type());  // [batch, pos, d_model]
  RETURN_IF_ERROR(Hook(plan, layer, normalized_site, normalized));
  return normalized * weight;
}

absl::Status CheckTokens(const at::Tensor& tokens, const LlamaConfig& config) {
  if (!tokens.defined() || tokens.dim() != 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tokens must be a 2-D [batch, pos] tensor, got ",
        tokens.defined() ? absl::StrCat(tokens.dim(), " dimensions") : std::string("none")));
  }
  if (tokens.scalar_type() != at::kLong && tokens.scalar_type() != at::kInt) {
    return absl::InvalidArgumentError(absl::StrCat("tokens must be int64 or int32, got ",
                                                   c10::toString(tokens.scalar_type())));
  }
  if (tokens.size(0) == 0 || tokens.size(1) == 0) {
    return absl::InvalidArgumentError("tokens must have at least one row and one position");
  }
  // One reduction on the common path; the offending position is looked up only on error.
  const auto [min_id, max_id] = at::aminmax(tokens);
  if (min_id.item<int64_t>() < 0 || max_id.item<int64_t>() >= config.d_vocab) {
    const at::Tensor bad = (tokens < 0).logical_or(tokens >= config.d_vocab).nonzero();
    const at::Tensor where = bad[0].cpu();
    const int64_t row = where[0].item<int64_t>(), pos = where[1].item<int64_t>();
    return absl::InvalidArgumentError(absl::StrCat(
        "token id ", tokens[row][pos].item<int64_t>(), " at [", row, ", ", pos,
        "] is outside the vocabulary; vocab size is ", config.d_vocab, " (valid ids 0..",
        config.d_vocab - 1, ")"));
  }
  return absl::OkStatus();
}

// ------------------------------------------------------------------------------------------------
// The forward's units, as in the paper: positions and masks (once per forward), attention, MLP,
// block. Which kernels run is decided in one place, Kernels.

// What one forward knows about its positions: shared by every block.
struct Positions {
  int64_t batch = 0, pos = 0, past = 0;
  // No padding and no cached prefix: plain causal attention, positions 0..pos-1 in every row.
  bool simple = true;
  at::Tensor full_mask;          // [batch, past + pos] int64 on CPU; undefined when simple
  at::Tensor position_ids;       // [batch, pos]; undefined when simple
  at::Tensor additive_mask_cpu;  // [batch, 1, pos, past + pos]; undefined when simple
};

// `attention_mask` ([batch, pos] of 0/1, may be undefined) for the new positions, `past_mask`
// ([batch, past]) for the cached ones. `with_cache`: a key/value cache takes this forward's
// mask, so it is built even when simple.
absl::StatusOr<Positions> PreparePositions(const at::Tensor& attention_mask,
                                           const at::Tensor& past_mask, int64_t batch, int64_t pos,
                                           int64_t past, bool with_cache) {
  Positions p;
  p.batch = batch;
  p.pos = pos;
  p.past = past;
  at::Tensor new_mask;  // [batch, pos] in {0, 1}, int64
  if (attention_mask.defined()) {
    const at::Tensor& m = attention_mask;
    if (m.dim() != 2 || m.size(0) != batch || m.size(1) != pos) {
      return absl::InvalidArgumentError(absl::StrCat(
          "attention_mask must be [batch, pos] = [", batch, ", ", pos, "], got [",
          absl::StrJoin(m.sizes(), ", "), "]"));
    }
    new_mask = m.to(at::kCPU, at::kLong);
    if ((new_mask != 0).logical_and(new_mask != 1).any().item<bool>()) {
      return absl::InvalidArgumentError("attention_mask values must be 0 or 1");
    }
    if ((new_mask.sum(1) == 0).any().item<bool>() && past == 0) {
      return absl::InvalidArgumentError("attention_mask has a row with no real token");
    }
  }
  const bool padded = new_mask.defined() && !(new_mask != 0).all().item<bool>();
  const bool past_padded = past > 0 && !(past_mask != 0).all().item<bool>();
  p.simple = !padded && !past_padded && past == 0;
  if (with_cache || !p.simple) {
    const at::Tensor now = new_mask.defined() ? new_mask : at::ones({batch, pos}, at::kLong);
    p.full_mask = past > 0 ? at::cat({past_mask, now}, 1) : now;
    p.position_ids = (p.full_mask.cumsum(1) - 1).clamp_min(0).narrow(1, past, pos);
  }
  // Additive mask: causal, and padding keys hidden. A query may always see itself, so padding
  // rows stay finite instead of becoming NaN.
  if (!p.simple) {
    const at::Tensor q_index = at::arange(past, past + pos, at::kLong).unsqueeze(1);  // [pos, 1]
    const at::Tensor k_index = at::arange(past + pos, at::kLong).unsqueeze(0);        // [1, keys]
    const at::Tensor allowed = (k_index <= q_index)
                                   .unsqueeze(0)
                                   .logical_and(p.full_mask.unsqueeze(1) != 0)
                                   .logical_or((k_index == q_index).unsqueeze(0));    // [batch, pos, keys]
    p.additive_mask_cpu =
        at::zeros(allowed.sizes(), at::kFloat)
            .masked_fill_(allowed.logical_not(), -std::numeric_limits<float>::infinity())
            .unsqueeze(1);
  }
  return p;
}

// The mask and rotary tables of one forward on one device (blocks may span several).
struct BlockInputs {
  at::Device device = at::Device(at::kCPU);
  at::Tensor mask;      // additive, [batch|1, 1, pos, past + pos]
  at::Tensor cos, sin;  // [batch|1, pos, 1, d_head]
};

BlockInputs PrepareBlockInputs(const Positions& p, const at::Device& device, at::ScalarType dtype,
                               const at::Tensor& rope_cos, const at::Tensor& rope_sin) {
  BlockInputs in;
  in.device = device;
  const int64_t dh = rope_cos.size(1);
  if (p.simple) {
    in.mask = at::full({1, 1, p.pos, p.pos}, -std::numeric_limits<float>::infinity(),
                       at::TensorOptions().dtype(dtype).device(device))
                  .triu_(1);
    in.cos = rope_cos.narrow(0, 0, p.pos).view({1, p.pos, 1, dh}).to(dtype);
    in.sin = rope_sin.narrow(0, 0, p.pos).view({1, p.pos, 1, dh}).to(dtype);
  } else {
    in.mask = p.additive_mask_cpu.to(device, dtype);
    const at::Tensor ids = p.position_ids.reshape({-1}).to(device);
    in.cos = rope_cos.index_select(0, ids).view({p.batch, p.pos, 1, dh}).to(dtype);
    in.sin = rope_sin.index_select(0, ids).view({p.batch, p.pos, 1, dh}).to(dtype);
  }
  return in;
}

// The kernels a forward uses. Today every forward is inference: oneDNN's sgemm for CPU float32
// products and the fused CPU attention. A differentiable forward (gradients, issue 9) will
// choose ATen's autograd-aware ops here, and nowhere else.
struct Kernels {
  bool onednn = true;
  bool differentiable = false;  // ATen's autograd-aware ops only

  bool fused() const { return onednn && !differentiable; }
  // oneDNN products have an autograd wrapper (cpu_gemm.h), so they serve both paths.
  at::Tensor Linear(const at::Tensor& x, const at::Tensor& w) const {
    return remotelens::Linear(x, w, onednn);
  }
  at::Tensor BatchedMatmul(const at::Tensor& a, const at::Tensor& b, double alpha) const {
    return remotelens::BatchedMatmul(a, b, alpha, fused());
  }
  at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& w, double eps) const {
    return remotelens::RmsNorm(x, w, eps, !differentiable);
  }
  at::Tensor Rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) const {
    return remotelens::Rotary(x, cos, sin, !differentiable);
  }
  // silu(gate) * up; in place on the fresh silu output unless autograd needs that output.
  at::Tensor SwiGlu(const at::Tensor& gate, const at::Tensor& up) const {
    return differentiable ? at::silu(gate) * up : at::silu(gate).mul_(up);
  }
};

// One block's slots in a key/value cache: appended to, then read in full.
struct LayerKvCache {
  at::Tensor* keys = nullptr;    // [batch, n_kv_heads, capacity, d_head]
  at::Tensor* values = nullptr;
};

// Appends this forward's keys and values ([batch, Hkv, pos, d_head]) after `past` cached ones
// and returns all of them; capacity grows by doubling up to n_ctx.
std::pair<at::Tensor, at::Tensor> AppendToCache(const LayerKvCache& cache, const at::Tensor& keys,
                                                const at::Tensor& values, int64_t past,
                                                int64_t n_ctx) {
  at::Tensor& kc = *cache.keys;
  at::Tensor& vc = *cache.values;
  const int64_t pos = keys.size(2), need = past + pos;
  if (!kc.defined() || kc.size(2) < need) {
    const int64_t capacity =
        std::min(n_ctx, std::max<int64_t>(need, kc.defined() ? 2 * kc.size(2) : 2 * need));
    const int64_t batch = keys.size(0), Hkv = keys.size(1), dh = keys.size(3);
    at::Tensor nk = at::empty({batch, Hkv, capacity, dh}, keys.options());
    at::Tensor nv = at::empty({batch, Hkv, capacity, dh}, values.options());
    if (past > 0) {
      nk.narrow(2, 0, past).copy_(kc.narrow(2, 0, past));
      nv.narrow(2, 0, past).copy_(vc.narrow(2, 0, past));
    }
    kc = nk;
    vc = nv;
  }
  kc.narrow(2, past, pos).copy_(keys);
  vc.narrow(2, past, pos).copy_(values);
  return {kc.narrow(2, 0, need), vc.narrow(2, 0, need)};
}

// Per-head copies of the residual stream that feed queries, keys and values, as TransformerLens
// builds them with use_attn_in (hook_attn_in) and use_split_qkv_input (hook_q/k/v_input):
// resid_pre repeated along a head dimension, [batch, pos, heads, d_model], then ln1 per copy.
// Undefined members read the block's shared normalised input. A copy the hooks left untouched
// equals that shared input, so it takes the shared path (the copies cost nothing beyond the
// hooks' own reads); a replaced copy, or any copy in a differentiable forward (its gradient
// must flow through it), is normalised and projected per head.
struct HeadInputs {
  at::Tensor q;  // [batch, pos, n_heads, d_model]
  at::Tensor k;  // [batch, pos, n_kv_heads, d_model]
  at::Tensor v;  // [batch, pos, n_kv_heads, d_model]
  bool any() const { return q.defined() || k.defined() || v.defined(); }
};

absl::StatusOr<HeadInputs> PerHeadInputs(const at::Tensor& resid_pre, const LlamaConfig& c,
                                         const Kernels& kernels, HookPlan* plan, int64_t layer) {
  HeadInputs out;
  const bool attn_in = Hooked(plan, layer, HookSite::kAttnIn);
  const bool split = Hooked(plan, layer, HookSite::kQInput) ||
                     Hooked(plan, layer, HookSite::kKInput) || Hooked(plan, layer, HookSite::kVInput);
  if (!attn_in && !split) return out;
  const int64_t batch = resid_pre.size(0), pos = resid_pre.size(1);
  // A view: nothing is copied unless a hook caches or replaces it.
  auto repeated = [&](int64_t heads) {
    return resid_pre.unsqueeze(2).expand({batch, pos, heads, c.d_model});
  };
  if (attn_in) {
    at::Tensor copies = repeated(c.n_heads);
    const at::Tensor before = copies;
    RETURN_IF_ERROR(Hook(plan, layer, HookSite::kAttnIn, copies));
    if (!copies.is_same(before) || kernels.differentiable) {
      // Keys and values of grouped-query attention read the first n_kv_heads copies, as the
      // TransformerLens 4 bridge does (TransformerLens 3 refuses use_attn_in with GQA).
      out.q = copies;
      out.k = copies.narrow(2, 0, c.n_kv_heads);
      out.v = out.k;
    }
  }
  if (!split) return out;
  // use_split_qkv_input (any of the three requested): each input is a fresh copy of resid_pre
  // (TransformerLens 3's transformer_block.py), whatever hook_attn_in did.
  const std::tuple<HookSite, int64_t, at::Tensor*> inputs[] = {
      {HookSite::kQInput, c.n_heads, &out.q},
      {HookSite::kKInput, c.n_kv_heads, &out.k},
      {HookSite::kVInput, c.n_kv_heads, &out.v}};
  for (const auto& [site, heads, slot] : inputs) {
    if (!Hooked(plan, layer, site)) {
      *slot = at::Tensor();
      continue;
    }
    at::Tensor copies = repeated(heads);
    const at::Tensor before = copies;
    RETURN_IF_ERROR(Hook(plan, layer, site, copies));
    *slot = (!copies.is_same(before) || kernels.differentiable) ? copies : at::Tensor();
  }
  return out;
}

// Queries, keys or values ([batch, pos, heads, d_head]) from per-head residual copies
// [batch, pos, heads, d_model]: each copy through ln1, then its own head's rows of the projection
// `w_rows` [heads * d_head, d_model].
at::Tensor PerHeadProjection(const at::Tensor& copies, const at::Tensor& ln_weight, double eps,
                             const at::Tensor& w_rows, const Kernels& kernels) {
  const int64_t batch = copies.size(0), pos = copies.size(1), heads = copies.size(2);
  const int64_t d_model = copies.size(3), dh = w_rows.size(0) / heads;
  const at::Tensor normed = kernels.RmsNorm(copies.contiguous(), ln_weight, eps);  // [batch, pos, heads, d_model]
  const at::Tensor rows = normed.permute({2, 0, 1, 3}).reshape({heads, batch * pos, d_model});
  const at::Tensor w_heads = w_rows.view({heads, dh, d_model}).transpose(1, 2);  // [heads, d_model, d_head]
  return kernels.BatchedMatmul(rows, w_heads, 1.0)
      .view({heads, batch, pos, dh})
      .permute({1, 2, 0, 3})
      .contiguous();
}

// Grouped-query attention of one block, from the normalised residual `h` [batch, pos, d_model]
// to hook_attn_out [batch, pos, d_model], with its hook points attn_in, q/k/v_input (which read
// `resid_pre`), q, k, v, rot_q, rot_k, scores, pattern, z and result.
absl::StatusOr<at::Tensor> Attention(const at::Tensor& resid_pre, const at::Tensor& h,
                                     const LayerWeights& w, const LlamaConfig& c,
                                     const Positions& p, const BlockInputs& in,
                                     const LayerKvCache* kv, const Kernels& kernels,
                                     HookPlan* plan, int64_t layer) {
  const int64_t batch = p.batch, pos = p.pos;
  const int64_t H = c.n_heads, Hkv = c.n_kv_heads, dh = c.d_head, group = H / Hkv;
  const double inv_sqrt_dh = 1.0 / std::sqrt(static_cast<double>(dh));
  ASSIGN_OR_RETURN(const HeadInputs head_inputs, PerHeadInputs(resid_pre, c, kernels, plan, layer));
  at::Tensor q, k, v;
  if (!head_inputs.any()) {
    const at::Tensor qkv = kernels.Linear(h, w.w_qkv);  // [batch, pos, (H + 2 Hkv) d_head]
    q = qkv.narrow(-1, 0, H * dh).view({batch, pos, H, dh});
    k = qkv.narrow(-1, H * dh, Hkv * dh).view({batch, pos, Hkv, dh});
    v = qkv.narrow(-1, (H + Hkv) * dh, Hkv * dh).view({batch, pos, Hkv, dh});
  } else {
    // w_qkv rows: queries [0, H), keys [H, H + Hkv), values [H + Hkv, H + 2 Hkv) heads.
    auto project = [&](const at::Tensor& copies, int64_t first_head, int64_t heads) {
      const at::Tensor rows = w.w_qkv.narrow(0, first_head * dh, heads * dh);
      return copies.defined()
                 ? PerHeadProjection(copies, w.ln1, c.rms_norm_eps, rows, kernels)
                 : kernels.Linear(h, rows).view({batch, pos, heads, dh});
    };
    q = project(head_inputs.q, 0, H);
    k = project(head_inputs.k, H, Hkv);
    v = project(head_inputs.v, H + Hkv, Hkv);
  }
  RETURN_IF_ERROR(Hook(plan, layer, HookSite::kAttnQ, q));
  RETURN_IF_ERROR(Hook(plan, layer, HookSite::kAttnK, k));
  RETURN_IF_ERROR(Hook(plan, layer, HookSite::kAttnV, v));
  q = kernels.Rotary(q, in.cos, in.sin);  // [batch, pos, H, d_head]
  k = kernels.Rotary(k, in.cos, in.sin);  // [batch, pos, Hkv, d_head]
  RETURN_IF_ERROR(Hook(plan, layer, HookSite::kAttnRotQ, q));
  RETURN_IF_ERROR(Hook(plan, layer, HookSite::kAttnRotK, k));

  at::Tensor keys = k.transpose(1, 2);    // [batch, Hkv, pos, d_head]
  at::Tensor values = v.transpose(1, 2);  // [batch, Hkv, pos, d_head]
  if (kv != nullptr) std::tie(keys, values) = AppendToCache(*kv, keys, values, p.past, c.n_ctx);
  const int64_t n_keys = keys.size(2);

  at::Tensor z;  // [batch, pos, H, d_head]
  const bool want_pattern =
      Hooked(plan, layer, HookSite::kAttnScores) || Hooked(plan, layer, HookSite::kAttnPattern);
  if (!want_pattern && kernels.fused() && q.device().is_cpu()) {
    // CPU float32: one fused pass; undefined for other dtypes, which take the paths below.
    z = FusedAttention(q.transpose(1, 2).contiguous(), keys, values, in.mask, inv_sqrt_dh);
  }
#if TORCH_VERSION_MAJOR >= 2
  if (!want_pattern && !z.defined()) {
    // Fused attention: the pattern is never materialised.
    const at::Tensor k_all = keys.unsqueeze(2).expand({batch, Hkv, group, n_keys, dh}).reshape({batch, H, n_keys, dh});
    const at::Tensor v_all = values.unsqueeze(2).expand({batch, Hkv, group, n_keys, dh}).reshape({batch, H, n_keys, dh});
    // Without padding or a cache prefix the mask is plain causal: say so instead of passing
    // it, which lets CUDA pick its flash kernel (an explicit mask rules that one out).
    z = (p.simple ? at::scaled_dot_product_attention(q.transpose(1, 2), k_all, v_all, {}, 0.0,
                                                     /*is_causal=*/true)
                  : at::scaled_dot_product_attention(q.transpose(1, 2), k_all, v_all, in.mask))
            .transpose(1, 2);
  }
#endif
  if (!z.defined()) {
    // Without copying keys/values per query head: the `group` query heads sharing a key/value
    // head are stacked along the query axis of one matmul.
    const at::Tensor q_grouped = q.transpose(1, 2).contiguous().view({batch, Hkv, group * pos, dh});
    at::Tensor scores = kernels.BatchedMatmul(q_grouped, keys.transpose(-1, -2), inv_sqrt_dh)
                            .view({batch, H, pos, n_keys})
                            .add_(in.mask);  // [batch, H, query_pos, key_pos]
    RETURN_IF_ERROR(Hook(plan, layer, HookSite::kAttnScores, scores));
    at::Tensor pattern = at::softmax(scores, -1, at::kFloat).to(scores.scalar_type());
    RETURN_IF_ERROR(Hook(plan, layer, HookSite::kAttnPattern, pattern));
    z = kernels.BatchedMatmul(pattern.reshape({batch, Hkv, group * pos, n_keys}), values, 1.0)
            .view({batch, H, pos, dh})
            .transpose(1, 2);
  }
  RETURN_IF_ERROR(Hook(plan, layer, HookSite::kAttnZ, z));
  at::Tensor attn_out;  // [batch, pos, d_model]
  if (Hooked(plan, layer, HookSite::kAttnResult)) {
    // Per-head outputs: result[b, p, h] = z[b, p, h] @ W_O[:, h]^T.
    const at::Tensor w_o_heads = w.w_o.view({c.d_model, H, dh}).permute({1, 2, 0});  // [H, d_head, d_model]
    const at::Tensor z_heads = z.permute({2, 0, 1, 3}).reshape({H, batch * pos, dh});
    at::Tensor result = kernels.BatchedMatmul(z_heads, w_o_heads, 1.0)
                            .view({H, batch, pos, c.d_model})
                            .permute({1, 2, 0, 3});
    RETURN_IF_ERROR(Hook(plan, layer, HookSite::kAttnResult, result));
    attn_out = result.sum(2);
  } else {
    attn_out = kernels.Linear(z.reshape({batch, pos, H * dh}), w.w_o);
  }
  return attn_out;
}

// SwiGLU MLP of one block, from the normalised residual to hook_mlp_out, with its hook points
// pre (gate), pre_linear (up) and post.
absl::StatusOr<at::Tensor> Mlp(const at::Tensor& h, const LayerWeights& w, const LlamaConfig& c,
                               const Kernels& kernels, HookPlan* plan, int64_t layer) {
  const at::Tensor gate_up = kernels.Linear(h, w.w_gate_up);  // [batch, pos, 2 d_mlp]
  at::Tensor pre = gate_up.narrow(-1, 0, c.d_mlp);
  at::Tensor pre_linear = gate_up.narrow(-1, c.d_mlp, c.d_mlp);
  RETURN_IF_ERROR(Hook(plan, layer, HookSite::kMlpPre, pre));
  RETURN_IF_ERROR(Hook(plan, layer, HookSite::kMlpPreLinear, pre_linear));
  at::Tensor post = kernels.SwiGlu(pre, pre_linear);  // [batch, pos, d_mlp]
  RETURN_IF_ERROR(Hook(plan, layer, HookSite::kMlpPost, post));
  return kernels.Linear(post, w.w_down);  // [batch, pos, d_model]
}

// One transformer block: hook_resid_pre in, hook_resid_post out.
absl::StatusOr<at::Tensor> Block(at::Tensor x, const LayerWeights& w, const LlamaConfig& c,
                                 const Positions& p, const BlockInputs& in,
                                 const LayerKvCache* kv, const Kernels& kernels, HookPlan* plan,
                                 int64_t layer) {
  RETURN_IF_ERROR(Hook(plan, layer, HookSite::kResidPre, x));
  ASSIGN_OR_RETURN(at::Tensor h, HookedRmsNorm(x, w.ln1, c.rms_norm_eps, plan, layer,
                                               HookSite::kLn1Scale, HookSite::kLn1Normalized,
                                               !kernels.differentiable));
  ASSIGN_OR_RETURN(at::Tensor attn_out, Attention(x, h, w, c, p, in, kv, kernels, plan, layer));
  RETURN_IF_ERROR(Hook(plan, layer, HookSite::kAttnOut, attn_out));
  at::Tensor resid_mid = x + attn_out;
  RETURN_IF_ERROR(Hook(plan, layer, HookSite::kResidMid, resid_mid));
  // hook_mlp_in: what ln2 reads; an edit here leaves the residual stream (resid_mid) alone.
  at::Tensor mlp_in = resid_mid;
  RETURN_IF_ERROR(Hook(plan, layer, HookSite::kMlpIn, mlp_in));
  ASSIGN_OR_RETURN(at::Tensor h2, HookedRmsNorm(mlp_in, w.ln2, c.rms_norm_eps, plan, layer,
                                                HookSite::kLn2Scale, HookSite::kLn2Normalized,
                                                !kernels.differentiable));
  ASSIGN_OR_RETURN(at::Tensor mlp_out, Mlp(h2, w, c, kernels, plan, layer));
  RETURN_IF_ERROR(Hook(plan, layer, HookSite::kMlpOut, mlp_out));
  at::Tensor resid_post = resid_mid + mlp_out;
  RETURN_IF_ERROR(Hook(plan, layer, HookSite::kResidPost, resid_post));
  return resid_post;
}

}  // namespace

absl::StatusOr<KvCache> KvCache::Stack(const std::vector<const KvCache*>& parts) {
  if (parts.empty()) return absl::InvalidArgumentError("KvCache::Stack needs at least one cache");
  int64_t longest = 0;
  for (const KvCache* part : parts) {
    if (part->length_ == 0 || part->keys_.size() != parts[0]->keys_.size()) {
      return absl::InvalidArgumentError("KvCache::Stack: caches must be filled, by one model");
    }
    longest = std::max(longest, part->length_);
  }
  KvCache out;
  out.length_ = longest;
  auto pad = [longest](const at::Tensor& t, int64_t length, int64_t dim) {
    // t's first `length` entries along `dim`, behind zeros up to `longest`.
    const at::Tensor used = t.narrow(dim, 0, length);
    if (length == longest) return used;
    std::vector<int64_t> shape = used.sizes().vec();
    shape[dim] = longest - length;
    return at::cat({at::zeros(shape, used.options()), used}, dim);
  };
  std::vector<at::Tensor> masks;
  for (const KvCache* part : parts) masks.push_back(pad(part->mask_, part->length_, 1));
  out.mask_ = at::cat(masks, 0);
  for (size_t layer = 0; layer < parts[0]->keys_.size(); ++layer) {
    if (!parts[0]->keys_[layer].defined()) {
      out.keys_.emplace_back();
      out.values_.emplace_back();
      continue;
    }
    std::vector<at::Tensor> keys, values;
    for (const KvCache* part : parts) {
      keys.push_back(pad(part->keys_[layer], part->length_, 2));
      values.push_back(pad(part->values_[layer], part->length_, 2));
    }
    out.keys_.push_back(at::cat(keys, 0));
    out.values_.push_back(at::cat(values, 0));
  }
  return out;
}

absl::StatusOr<KvCache> KvCache::SelectRows(const std::vector<int64_t>& rows) const {
  if (rows.empty() || length_ == 0) {
    return absl::InvalidArgumentError("KvCache::SelectRows needs a filled cache and some rows");
  }
  for (int64_t r : rows) {
    if (r < 0 || r >= mask_.size(0)) {
      return absl::InvalidArgumentError(absl::StrCat("KvCache::SelectRows: row ", r, " of ", mask_.size(0)));
    }
  }
  const at::Tensor index = at::tensor(rows, at::kLong);
  const at::Tensor mask = mask_.index_select(0, index);
  // Leading positions that no selected row uses.
  const at::Tensor used = (mask != 0).any(0);  // [length]
  const int64_t first = used.to(at::kLong).argmax().item<int64_t>();
  KvCache out;
  out.length_ = length_ - first;
  out.mask_ = mask.narrow(1, first, out.length_).contiguous();
  for (size_t layer = 0; layer < keys_.size(); ++layer) {
    if (!keys_[layer].defined()) {
      out.keys_.emplace_back();
      out.values_.emplace_back();
      continue;
    }
    const at::Tensor device_index = index.to(keys_[layer].device());
    out.keys_.push_back(keys_[layer].narrow(2, first, out.length_).index_select(0, device_index));
    out.values_.push_back(values_[layer].narrow(2, first, out.length_).index_select(0, device_index));
  }
  return out;
}

at::Tensor RopeInverseFrequencies(const LlamaConfig& config) {
  const int64_t half = config.d_head / 2;
  std::vector<double> inv(half);
  const RopeScaling& rs = config.rope_scaling;
  const double low_freq_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor;
  const double high_freq_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor;
  for (int64_t i = 0; i < half; ++i) {
    // Computed in float32 like the official reference, so long positions round the same way.
    float freq = 1.0f / static_cast<float>(std::pow(config.rope_theta, 2.0 * i / config.d_head));
    if (rs.type == RopeScaling::Type::kLlama3) {
      const double wavelen = 2 * kPi / freq;
      if (wavelen > low_freq_wavelen) {
        freq = static_cast<float>(freq / rs.factor);
      } else if (wavelen >= high_freq_wavelen) {
        const double smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) /
                              (rs.high_freq_factor - rs.low_freq_factor);
        freq = static_cast<float>((1 - smooth) * freq / rs.factor + smooth * freq);
      }
    }
    inv[i] = freq;
  }
  return at::tensor(inv, at::kDouble);
}

LlamaModel::LlamaModel(LlamaConfig config, LlamaWeights weights, LoadOptions options)
    : config_(std::move(config)), weights_(std::move(weights)), options_(std::move(options)) {}

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Create(LlamaConfig config,
                                                               LlamaWeights weights,
                                                               LoadOptions options) {
  if (static_cast<int64_t>(weights.layers.size()) != config.n_layers) {
    return absl::InvalidArgumentError(absl::StrCat("weights hold ", weights.layers.size(),
                                                   " layers; config says ", config.n_layers));
  }
  std::unique_ptr<LlamaModel> model(
      new LlamaModel(std::move(config), std::move(weights), std::move(options)));
  const LlamaConfig& c = model->config_;
  // angles [n_ctx, d_head / 2] in float32; duplicated for the two rotate-half halves.
  const at::Tensor inv_freq = RopeInverseFrequencies(c).to(at::kFloat);
  const at::Tensor positions = at::arange(c.n_ctx, at::kFloat);
  const at::Tensor angles = at::outer(positions, inv_freq);
  const at::Tensor emb = at::cat({angles, angles}, -1);  // [n_ctx, d_head]
  const at::Tensor cos = emb.cos(), sin = emb.sin();
  std::map<std::string, std::pair<at::Tensor, at::Tensor>> per_device;
  for (int64_t layer = 0; layer < c.n_layers; ++layer) {
    const at::Device device = model->weights_.layers[layer].w_qkv.device();
    auto it = per_device.find(device.str());
    if (it == per_device.end()) {
      it = per_device.emplace(device.str(), std::make_pair(cos.to(device), sin.to(device))).first;
    }
    model->rope_cos_.push_back(it->second.first);
    model->rope_sin_.push_back(it->second.second);
  }
  return model;
}

absl::StatusOr<at::Tensor> LlamaModel::Forward(const ForwardInput& input, HookPlan* plan,
                                               KvCache* kv_cache) const {
  if (input.differentiable && kv_cache != nullptr) {
    return absl::InvalidArgumentError("a differentiable forward cannot use a key/value cache");
  }
  if (!input.differentiable && plan != nullptr && plan->has_backward()) {
    return absl::InvalidArgumentError(
        "backward hooks and gradient caches need a differentiable forward (a gradient request)");
  }
  std::optional<c10::InferenceMode> inference_mode;
  std::optional<at::AutoGradMode> grad_mode;
  if (input.differentiable) {
    grad_mode.emplace(true);
  } else {
    inference_mode.emplace();
  }
  try {
    absl::StatusOr<at::Tensor> logits = ForwardImpl(input, plan, kv_cache);
    // Cache copies still in flight (CUDA -> pinned host) land before the caller reads them.
    if (logits.ok() && plan != nullptr) RETURN_IF_ERROR(plan->FlushCache());
    return logits;
  } catch (const c10::Error& e) {
    const std::string what = e.what_without_backtrace();
    if (absl::StrContains(what, "out of memory") || absl::StrContains(what, "can't allocate")) {
      // Name what did not fit: the request's shape and hooks, then the allocator's own words.
      const at::Tensor& shaped = input.tokens.defined() ? input.tokens : input.residual;
      const std::string shape = shaped.defined() && shaped.dim() >= 2
                                    ? absl::StrCat(shaped.size(0), " rows x ", shaped.size(1), " positions")
                                    : std::string("this request");
      return absl::ResourceExhaustedError(absl::StrCat(
          "device out of memory during the forward of ", shape,
          kv_cache != nullptr ? absl::StrCat(" (after ", kv_cache->length(), " cached positions)") : "",
          plan != nullptr && !plan->empty() ? " with hooks" : "", " in ",
          c10::toString(weights_.embed.scalar_type()), " on ", weights_.embed.device().str(),
          "; send fewer rows or positions, or cache fewer or narrower activations: ", what));
    }
    return absl::InternalError(absl::StrCat("forward failed: ", what));
  }
}

absl::Status LlamaModel::Backward(const at::Tensor& output, const at::Tensor& output_grad,
                                  HookPlan* plan) const {
  if (!output.defined() || !output.requires_grad()) {
    return absl::FailedPreconditionError(
        "no graph to back-propagate through: run the forward with differentiable set");
  }
  if (!output_grad.defined() || output_grad.sizes() != output.sizes() ||
      !at::isFloatingType(output_grad.scalar_type())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the output gradient must be a floating tensor of the output's shape [",
        absl::StrJoin(output.sizes(), ", "), "], got ",
        output_grad.defined() ? absl::StrCat(c10::toString(output_grad.scalar_type()), " [",
                                             absl::StrJoin(output_grad.sizes(), ", "), "]")
                              : std::string("none")));
  }
  try {
    at::AutoGradMode grad_mode(true);
    output.backward(output_grad.to(output.device(), output.scalar_type()));
  } catch (const c10::Error& e) {
    const std::string what = e.what_without_backtrace();
    if (absl::StrContains(what, "out of memory") || absl::StrContains(what, "can't allocate")) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "device out of memory during the backward pass; send fewer rows or positions: ", what));
    }
    return absl::InternalError(absl::StrCat("backward failed: ", what));
  }
  if (plan != nullptr) RETURN_IF_ERROR(plan->backward_status());
  return absl::OkStatus();
}

absl::StatusOr<at::Tensor> LlamaModel::ForwardImpl(const ForwardInput& input, HookPlan* plan,
                                                   KvCache* kv) const {
  const LlamaConfig& c = config_;
  const int64_t n_layers = c.n_layers;
  int64_t start = input.start_at_layer < 0 ? input.start_at_layer + n_layers : input.start_at_layer;
  int64_t stop = input.stop_at_layer.value_or(n_layers);
  if (stop < 0) stop += n_layers;
  if (start < 0 || start > n_layers || stop < start || stop > n_layers) {
    return absl::InvalidArgumentError(absl::StrCat(
        "start_at_layer ", input.start_at_layer, " / stop_at_layer ",
        input.stop_at_layer.has_value() ? std::to_string(*input.stop_at_layer) : "none",
        " do not select a range of blocks; the model has ", n_layers,
        " (valid: 0 <= start <= stop <= n_layers, negatives count from n_layers)"));
  }
  if (kv != nullptr && (start != 0 || stop != n_layers)) {
    return absl::InvalidArgumentError("a key/value cache needs the full model (no start/stop_at_layer)");
  }

  // The residual stream entering block `start`.
  at::Tensor x;  // [batch, pos, d_model]
  if (start == 0) {
    RETURN_IF_ERROR(CheckTokens(input.tokens, c));
    x = at::embedding(weights_.embed, input.tokens.to(weights_.embed.device(), at::kLong));
    if (input.differentiable) x.requires_grad_(true);  // the graph starts here
    RETURN_IF_ERROR(Hook(plan, -1, HookSite::kEmbed, x));
  } else {
    const at::Tensor& r = input.residual;
    if (!r.defined() || r.dim() != 3 || r.size(2) != c.d_model || !at::isFloatingType(r.scalar_type())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "start_at_layer ", start, " needs the residual stream as input: a floating [batch, pos, ",
          c.d_model, "] tensor"));
    }
    // start == n_layers runs no block: the residual goes straight to the final norm.
    const at::Device device = start < n_layers ? weights_.layers[start].w_qkv.device()
                                               : weights_.unembed.device();
    x = r.to(device, weights_.embed.scalar_type());
    if (input.differentiable) x = x.detach().requires_grad_(true);
  }
  const int64_t batch = x.size(0), pos = x.size(1);
  const int64_t past = kv != nullptr ? kv->length_ : 0;
  if (past + pos > c.n_ctx) {
    return absl::OutOfRangeError(absl::StrCat("sequence of ", past + pos,
                                              " positions exceeds the model's maximum of ", c.n_ctx,
                                              " (max_position_embeddings)"));
  }
  if (kv != nullptr && past > 0 && kv->mask_.size(0) != batch) {
    return absl::InvalidArgumentError(absl::StrCat("batch of ", batch, " rows does not match the ",
                                                   kv->mask_.size(0), " rows in the key/value cache"));
  }

  ASSIGN_OR_RETURN(const Positions positions,
                   PreparePositions(input.attention_mask, kv != nullptr ? kv->mask_ : at::Tensor(),
                                    batch, pos, past, kv != nullptr));
  const at::ScalarType dtype = weights_.embed.scalar_type();
  Kernels kernels;
  kernels.onednn = options_.onednn_gemm;
  kernels.differentiable = input.differentiable;
  std::optional<BlockInputs> inputs;  // for the device of the current block

  if (kv != nullptr && kv->keys_.empty()) {
    kv->keys_.resize(n_layers);
    kv->values_.resize(n_layers);
  }

  for (int64_t layer = start; layer < stop; ++layer) {
    const LayerWeights& w = weights_.layers[layer];
    const at::Device device = w.w_qkv.device();
    if (x.device() != device) x = x.to(device);
    if (!inputs || inputs->device != device) {
      inputs = PrepareBlockInputs(positions, device, dtype, rope_cos_[layer], rope_sin_[layer]);
    }
    LayerKvCache layer_kv;
    if (kv != nullptr) layer_kv = {&kv->keys_[layer], &kv->values_[layer]};
    ASSIGN_OR_RETURN(x, Block(std::move(x), w, c, positions, *inputs,
                              kv != nullptr ? &layer_kv : nullptr, kernels, plan, layer));
  }

  if (kv != nullptr) {
    kv->mask_ = positions.full_mask;
    kv->length_ = past + pos;
  }
  // TransformerLens: with stop_at_layer given (even == n_layers) the result is the residual.
  if (input.stop_at_layer.has_value()) return x;

  if (x.device() != weights_.unembed.device()) x = x.to(weights_.unembed.device());
  ASSIGN_OR_RETURN(at::Tensor final_normed,
                   HookedRmsNorm(x, weights_.ln_final, c.rms_norm_eps, plan, -1,
                                 HookSite::kLnFinalScale, HookSite::kLnFinalNormalized,
                                 !kernels.differentiable));
  RETURN_IF_ERROR(Hook(plan, -1, HookSite::kUnembedIn, final_normed));
  at::Tensor logits = kernels.Linear(final_normed, weights_.unembed);  // [batch, pos, d_vocab]
  RETURN_IF_ERROR(Hook(plan, -1, HookSite::kUnembedOut, logits));
  return logits;
}

at::Tensor LlamaModel::Lens(const at::Tensor& residual) const {
  const at::Tensor x = residual.to(weights_.unembed.device(), weights_.ln_final.scalar_type());
  return Linear(RmsNorm(x, weights_.ln_final, config_.rms_norm_eps), weights_.unembed,
                options_.onednn_gemm);  // [..., d_vocab]
}

}  // namespace remotelens
