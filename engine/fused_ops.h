// The pieces of a Llama block that cost many small LibTorch ops each: RMSNorm, the rotary
// embedding and (when nobody hooks the scores or pattern) attention. On CPU float32 tensors each
// is one pass of plain C++ and oneDNN sgemm calls (one allocation, no dispatch per step); other
// devices and dtypes run the same math as LibTorch ops. At the demo model's size (8 tokens,
// d_model 128) dispatch, not arithmetic, is what a forward costs.
#ifndef REMOTELENS_ENGINE_FUSED_OPS_H_
#define REMOTELENS_ENGINE_FUSED_OPS_H_

#include <ATen/core/Tensor.h>

namespace remotelens {

// x * rsqrt(mean(x^2, -1) + eps) * weight, with the statistics in float32 whatever x's dtype;
// x [..., d], weight [d]; the result has x's dtype.
// fused = false: always the LibTorch ops (differentiable).
at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps, bool fused = true);

// Rotate-half rotary embedding (Hugging Face layout: dimension i of a head pairs with i + d/2):
// x * cos + rotate_half(x) * sin, where rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2]).
// x [batch, pos, heads, d_head] (any strides); cos, sin [batch or 1, pos, 1, d_head].
// The result is [batch, pos, heads, d_head] laid out head-major (a transpose of a contiguous
// [batch, heads, pos, d_head]) on the fused path, which is the layout attention reads.
at::Tensor Rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                  bool fused = true);

// Grouped-query attention, softmax(q k^T * scale + mask) v, in three LibTorch-free steps around
// one softmax call (no per-head views, transposes or copies). q [batch, H, pos, d_head] contiguous; keys, values
// [batch, Hkv, n_keys, d_head] with unit stride along d_head (views of a cache are fine), query
// head h reading key/value head h / (H / Hkv); mask additive [batch or 1, 1, pos, n_keys].
// Returns z [batch, pos, H, d_head] contiguous, or an undefined tensor when the inputs are not
// all CPU float32 of those shapes or the build has no oneDNN: the caller then runs its LibTorch
// path.
at::Tensor FusedAttention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                          const at::Tensor& mask, double scale);

}  // namespace remotelens

#endif  // REMOTELENS_ENGINE_FUSED_OPS_H_
