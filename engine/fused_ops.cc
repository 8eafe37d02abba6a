#include "engine/fused_ops.h"

#include <ATen/ATen.h>

#include <cmath>

namespace remotelens {
namespace {

bool CpuFloat(const at::Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.layout() == at::kStrided &&
         !t.requires_grad();
}

// Sum of squares with eight partial sums, which the compiler keeps in one vector register.
float SumOfSquares(const float* x, int64_t n) {
  float partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) partial[j] += x[i + j] * x[i + j];
  }
  float sum = 0;
  for (; i < n; ++i) sum += x[i] * x[i];
  for (float p : partial) sum += p;
  return sum;
}

}  // namespace

at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t d = x.dim() > 0 ? x.size(-1) : 0;
  if (CpuFloat(x) && CpuFloat(weight) && weight.dim() == 1 && weight.size(0) == d && d > 0) {
    const at::Tensor xc = x.contiguous();
    const at::Tensor wc = weight.contiguous();
    at::Tensor out = at::empty(x.sizes(), x.options());
    const float* px = xc.data_ptr<float>();
    const float* pw = wc.data_ptr<float>();
    float* po = out.data_ptr<float>();
    const int64_t rows = x.numel() / d;
    const float epsf = static_cast<float>(eps);
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = px + r * d;
      float* orow = po + r * d;
      const float inv = 1.0f / std::sqrt(SumOfSquares(xr, d) / static_cast<float>(d) + epsf);
      for (int64_t i = 0; i < d; ++i) orow[i] = xr[i] * inv * pw[i];
    }
    return out;
  }
  const at::Tensor x32 = x.to(at::kFloat);
  return (x32 * at::rsqrt(x32.pow(2).mean(-1, /*keepdim=*/true) + eps)).to(x.scalar_type()) * weight;
}

at::Tensor Rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const bool shapes_ok = x.dim() == 4 && cos.dim() == 4 && sin.sizes() == cos.sizes() &&
                         (cos.size(0) == 1 || cos.size(0) == x.size(0)) &&
                         cos.size(1) == x.size(1) && cos.size(2) == 1 && cos.size(3) == x.size(3) &&
                         x.size(3) % 2 == 0;
  if (shapes_ok && CpuFloat(x) && CpuFloat(cos) && CpuFloat(sin)) {
    const int64_t batch = x.size(0), pos = x.size(1), heads = x.size(2), dh = x.size(3);
    const int64_t half = dh / 2;
    at::Tensor out = at::empty({batch, heads, pos, dh}, x.options());
    // Unit strides along d_head (views of a fused projection have them; others are copied).
    const at::Tensor xs = x.stride(3) == 1 ? x : x.contiguous();
    const at::Tensor cs = cos.contiguous(), ss = sin.contiguous();
    const float* px = xs.data_ptr<float>();
    const float* pc = cs.data_ptr<float>();
    const float* ps = ss.data_ptr<float>();
    float* po = out.data_ptr<float>();
    const int64_t xb = xs.stride(0), xp = xs.stride(1), xh = xs.stride(2);
    const int64_t cb = cs.size(0) == 1 ? 0 : pos * dh;  // cos and sin: [batch or 1, pos, 1, dh]
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t h = 0; h < heads; ++h) {
        for (int64_t p = 0; p < pos; ++p) {
          const float* xr = px + b * xb + p * xp + h * xh;
          const float* c = pc + b * cb + p * dh;
          const float* s = ps + b * cb + p * dh;
          float* o = po + ((b * heads + h) * pos + p) * dh;
          for (int64_t i = 0; i < half; ++i) o[i] = xr[i] * c[i] - xr[i + half] * s[i];
          for (int64_t i = half; i < dh; ++i) o[i] = xr[i] * c[i] + xr[i - half] * s[i];
        }
      }
    }
    return out.transpose(1, 2);
  }
  const int64_t half = x.size(-1) / 2;
  const at::Tensor rotated = at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos + rotated * sin;
}

}  // namespace remotelens
