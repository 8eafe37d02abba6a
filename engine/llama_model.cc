#include "engine/llama_model.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <torch/version.h>

#include <cmath>
#include <map>
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
                                         HookSite normalized_site) {
  if (!Hooked(plan, layer, scale_site) && !Hooked(plan, layer, normalized_site)) {
    return RmsNorm(x, weight, eps);
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

}  // namespace

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
  c10::InferenceMode inference_mode;
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

  // Attention mask over all key positions, and rotary position ids. The common case (no
  // padding, no cache) needs neither a gathered rotary table nor a per-row mask.
  at::Tensor new_mask;  // [batch, pos] in {0, 1}, int64
  if (input.attention_mask.defined()) {
    const at::Tensor& m = input.attention_mask;
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
  const bool past_padded = kv != nullptr && past > 0 && !(kv->mask_ != 0).all().item<bool>();
  const bool simple = !padded && !past_padded && past == 0;
  at::Tensor full_mask;     // [batch, past + pos] int64 on CPU; undefined when simple
  at::Tensor position_ids;  // [batch, pos]; undefined when simple
  if (kv != nullptr || !simple) {
    const at::Tensor now = new_mask.defined() ? new_mask : at::ones({batch, pos}, at::kLong);
    full_mask = past > 0 ? at::cat({kv->mask_, now}, 1) : now;
    position_ids = (full_mask.cumsum(1) - 1).clamp_min(0).narrow(1, past, pos);
  }
  // Additive mask [batch|1, 1, pos, past + pos]: causal, and padding keys hidden. A query may
  // always see itself, so padding rows stay finite instead of becoming NaN.
  at::Tensor additive_mask_cpu;  // undefined when simple: built on the device directly
  if (!simple) {
    const at::Tensor q_index = at::arange(past, past + pos, at::kLong).unsqueeze(1);  // [pos, 1]
    const at::Tensor k_index = at::arange(past + pos, at::kLong).unsqueeze(0);        // [1, keys]
    const at::Tensor allowed = (k_index <= q_index)
                                   .unsqueeze(0)
                                   .logical_and(full_mask.unsqueeze(1) != 0)
                                   .logical_or((k_index == q_index).unsqueeze(0));    // [batch, pos, keys]
    additive_mask_cpu = at::zeros(allowed.sizes(), at::kFloat)
                            .masked_fill_(allowed.logical_not(), -std::numeric_limits<float>::infinity())
                            .unsqueeze(1);
  }

  const int64_t H = c.n_heads, Hkv = c.n_kv_heads, dh = c.d_head, group = H / Hkv;
  const double inv_sqrt_dh = 1.0 / std::sqrt(static_cast<double>(dh));
  const at::ScalarType dtype = weights_.embed.scalar_type();
  const bool onednn = options_.onednn_gemm;
  at::Tensor mask, cos, sin;  // on the current block's device
  at::Device mask_device(at::kCPU);
  bool mask_ready = false;

  if (kv != nullptr && kv->keys_.empty()) {
    kv->keys_.resize(n_layers);
    kv->values_.resize(n_layers);
  }

  for (int64_t layer = start; layer < stop; ++layer) {
    const LayerWeights& w = weights_.layers[layer];
    const at::Device device = w.w_qkv.device();
    if (x.device() != device) x = x.to(device);
    if (!mask_ready || mask_device != device) {
      mask = simple ? at::full({1, 1, pos, pos}, -std::numeric_limits<float>::infinity(),
                               at::TensorOptions().dtype(dtype).device(device))
                          .triu_(1)
                    : additive_mask_cpu.to(device, dtype);
      if (simple) {
        cos = rope_cos_[layer].narrow(0, 0, pos).view({1, pos, 1, dh}).to(dtype);
        sin = rope_sin_[layer].narrow(0, 0, pos).view({1, pos, 1, dh}).to(dtype);
      } else {
        const at::Tensor ids = position_ids.reshape({-1}).to(device);
        cos = rope_cos_[layer].index_select(0, ids).view({batch, pos, 1, dh}).to(dtype);
        sin = rope_sin_[layer].index_select(0, ids).view({batch, pos, 1, dh}).to(dtype);
      }
      mask_device = device;
      mask_ready = true;
    }

    RETURN_IF_ERROR(Hook(plan, layer, HookSite::kResidPre, x));

    // ---- attention ----
    ASSIGN_OR_RETURN(at::Tensor h, HookedRmsNorm(x, w.ln1, c.rms_norm_eps, plan, layer,
                                                 HookSite::kLn1Scale, HookSite::kLn1Normalized));
    const at::Tensor qkv = Linear(h, w.w_qkv, onednn);  // [batch, pos, (H + 2 Hkv) d_head]
    at::Tensor q = qkv.narrow(-1, 0, H * dh).view({batch, pos, H, dh});
    at::Tensor k = qkv.narrow(-1, H * dh, Hkv * dh).view({batch, pos, Hkv, dh});
    at::Tensor v = qkv.narrow(-1, (H + Hkv) * dh, Hkv * dh).view({batch, pos, Hkv, dh});
    RETURN_IF_ERROR(Hook(plan, layer, HookSite::kAttnQ, q));
    RETURN_IF_ERROR(Hook(plan, layer, HookSite::kAttnK, k));
    RETURN_IF_ERROR(Hook(plan, layer, HookSite::kAttnV, v));
    q = Rotary(q, cos, sin);  // [batch, pos, H, d_head]
    k = Rotary(k, cos, sin);  // [batch, pos, Hkv, d_head]
    RETURN_IF_ERROR(Hook(plan, layer, HookSite::kAttnRotQ, q));
    RETURN_IF_ERROR(Hook(plan, layer, HookSite::kAttnRotK, k));

    at::Tensor keys = k.transpose(1, 2);    // [batch, Hkv, pos, d_head]
    at::Tensor values = v.transpose(1, 2);  // [batch, Hkv, pos, d_head]
    if (kv != nullptr) {
      at::Tensor& kc = kv->keys_[layer];
      at::Tensor& vc = kv->values_[layer];
      const int64_t need = past + pos;
      if (!kc.defined() || kc.size(2) < need) {
        const int64_t capacity =
            std::min(c.n_ctx, std::max<int64_t>(need, kc.defined() ? 2 * kc.size(2) : 2 * need));
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
      keys = kc.narrow(2, 0, need);
      values = vc.narrow(2, 0, need);
    }
    const int64_t n_keys = keys.size(2);

    at::Tensor z;  // [batch, pos, H, d_head]
    const bool want_pattern =
        Hooked(plan, layer, HookSite::kAttnScores) || Hooked(plan, layer, HookSite::kAttnPattern);
    if (!want_pattern && onednn && q.device().is_cpu()) {
      // CPU float32: one fused pass; undefined for other dtypes, which take the paths below.
      z = FusedAttention(q.transpose(1, 2).contiguous(), keys, values, mask, inv_sqrt_dh);
    }
#if TORCH_VERSION_MAJOR >= 2
    if (!want_pattern && !z.defined()) {
      // Fused attention: the pattern is never materialised.
      const at::Tensor k_all = keys.unsqueeze(2).expand({batch, Hkv, group, n_keys, dh}).reshape({batch, H, n_keys, dh});
      const at::Tensor v_all = values.unsqueeze(2).expand({batch, Hkv, group, n_keys, dh}).reshape({batch, H, n_keys, dh});
      // Without padding or a cache prefix the mask is plain causal: say so instead of passing
      // it, which lets CUDA pick its flash kernel (an explicit mask rules that one out).
      z = (simple ? at::scaled_dot_product_attention(q.transpose(1, 2), k_all, v_all, {}, 0.0,
                                                     /*is_causal=*/true)
                  : at::scaled_dot_product_attention(q.transpose(1, 2), k_all, v_all, mask))
              .transpose(1, 2);
    }
#endif
    if (!z.defined()) {
      // Grouped-query attention without copying keys/values per query head: the `group` query
      // heads sharing a key/value head are stacked along the query axis of one matmul.
      const at::Tensor q_grouped = q.transpose(1, 2).contiguous().view({batch, Hkv, group * pos, dh});
      at::Tensor scores = BatchedMatmul(q_grouped, keys.transpose(-1, -2), inv_sqrt_dh, onednn)
                              .view({batch, H, pos, n_keys})
                              .add_(mask);  // [batch, H, query_pos, key_pos]
      RETURN_IF_ERROR(Hook(plan, layer, HookSite::kAttnScores, scores));
      at::Tensor pattern = at::softmax(scores, -1, at::kFloat).to(dtype);
      RETURN_IF_ERROR(Hook(plan, layer, HookSite::kAttnPattern, pattern));
      z = BatchedMatmul(pattern.reshape({batch, Hkv, group * pos, n_keys}), values, 1.0, onednn)
              .view({batch, H, pos, dh})
              .transpose(1, 2);
    }
    RETURN_IF_ERROR(Hook(plan, layer, HookSite::kAttnZ, z));
    at::Tensor attn_out;  // [batch, pos, d_model]
    if (Hooked(plan, layer, HookSite::kAttnResult)) {
      // Per-head outputs: result[b, p, h] = z[b, p, h] @ W_O[:, h]^T.
      const at::Tensor w_o_heads = w.w_o.view({c.d_model, H, dh}).permute({1, 2, 0});  // [H, d_head, d_model]
      const at::Tensor z_heads = z.permute({2, 0, 1, 3}).reshape({H, batch * pos, dh});
      at::Tensor result = BatchedMatmul(z_heads, w_o_heads, 1.0, onednn).view({H, batch, pos, c.d_model}).permute({1, 2, 0, 3});
      RETURN_IF_ERROR(Hook(plan, layer, HookSite::kAttnResult, result));
      attn_out = result.sum(2);
    } else {
      attn_out = Linear(z.reshape({batch, pos, H * dh}), w.w_o, onednn);
    }
    RETURN_IF_ERROR(Hook(plan, layer, HookSite::kAttnOut, attn_out));
    at::Tensor resid_mid = x + attn_out;
    RETURN_IF_ERROR(Hook(plan, layer, HookSite::kResidMid, resid_mid));

    // ---- MLP (SwiGLU) ----
    ASSIGN_OR_RETURN(at::Tensor h2, HookedRmsNorm(resid_mid, w.ln2, c.rms_norm_eps, plan, layer,
                                                  HookSite::kLn2Scale, HookSite::kLn2Normalized));
    const at::Tensor gate_up = Linear(h2, w.w_gate_up, onednn);  // [batch, pos, 2 d_mlp]
    at::Tensor pre = gate_up.narrow(-1, 0, c.d_mlp);
    at::Tensor pre_linear = gate_up.narrow(-1, c.d_mlp, c.d_mlp);
    RETURN_IF_ERROR(Hook(plan, layer, HookSite::kMlpPre, pre));
    RETURN_IF_ERROR(Hook(plan, layer, HookSite::kMlpPreLinear, pre_linear));
    at::Tensor post = at::silu(pre).mul_(pre_linear);  // [batch, pos, d_mlp]
    RETURN_IF_ERROR(Hook(plan, layer, HookSite::kMlpPost, post));
    at::Tensor mlp_out = Linear(post, w.w_down, onednn);  // [batch, pos, d_model]
    RETURN_IF_ERROR(Hook(plan, layer, HookSite::kMlpOut, mlp_out));
    x = resid_mid + mlp_out;
    RETURN_IF_ERROR(Hook(plan, layer, HookSite::kResidPost, x));
  }

  if (kv != nullptr) {
    kv->mask_ = full_mask;
    kv->length_ = past + pos;
  }
  // TransformerLens: with stop_at_layer given (even == n_layers) the result is the residual.
  if (input.stop_at_layer.has_value()) return x;

  if (x.device() != weights_.unembed.device()) x = x.to(weights_.unembed.device());
  ASSIGN_OR_RETURN(at::Tensor final_normed,
                   HookedRmsNorm(x, weights_.ln_final, c.rms_norm_eps, plan, -1,
                                 HookSite::kLnFinalScale, HookSite::kLnFinalNormalized));
  return Linear(final_normed, weights_.unembed, options_.onednn_gemm);  // [batch, pos, d_vocab]
}

at::Tensor LlamaModel::Lens(const at::Tensor& residual) const {
  const at::Tensor x = residual.to(weights_.unembed.device(), weights_.ln_final.scalar_type());
  return Linear(RmsNorm(x, weights_.ln_final, config_.rms_norm_eps), weights_.unembed,
                options_.onednn_gemm);  // [..., d_vocab]
}

}  // namespace remotelens
