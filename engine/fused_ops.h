// The two elementwise pieces of a Llama block that cost many small LibTorch ops each: RMSNorm and
// the rotary embedding. On CPU float32 tensors each is one pass of plain C++ (one allocation, no
// dispatch per step); anything else (other devices and dtypes) runs the same math as LibTorch ops.
// At the demo model's size (8 tokens, d_model 128) dispatch, not arithmetic, is what a forward
// costs: these two replace ~90 of ~300 ops per forward.
#ifndef REMOTELENS_ENGINE_FUSED_OPS_H_
#define REMOTELENS_ENGINE_FUSED_OPS_H_

#include <ATen/core/Tensor.h>

namespace remotelens {

// x * rsqrt(mean(x^2, -1) + eps) * weight, with the statistics in float32 whatever x's dtype;
// x [..., d], weight [d]; the result has x's dtype.
at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps);

// Rotate-half rotary embedding (Hugging Face layout: dimension i of a head pairs with i + d/2):
// x * cos + rotate_half(x) * sin, where rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2]).
// x [batch, pos, heads, d_head] (any strides); cos, sin [batch or 1, pos, 1, d_head].
// The result is [batch, pos, heads, d_head] laid out head-major (a transpose of a contiguous
// [batch, heads, pos, d_head]) on the fused path, which is the layout attention reads.
at::Tensor Rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

}  // namespace remotelens

#endif  // REMOTELENS_ENGINE_FUSED_OPS_H_
