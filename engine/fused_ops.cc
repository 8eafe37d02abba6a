#include "engine/fused_ops.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "engine/cpu_gemm.h"

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

at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps, bool fused) {
  const int64_t d = x.dim() > 0 ? x.size(-1) : 0;
  if (fused && CpuFloat(x) && CpuFloat(weight) && weight.dim() == 1 && weight.size(0) == d && d > 0) {
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

at::Tensor Rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool fused) {
  const bool shapes_ok = x.dim() == 4 && cos.dim() == 4 && sin.sizes() == cos.sizes() &&
                         (cos.size(0) == 1 || cos.size(0) == x.size(0)) &&
                         cos.size(1) == x.size(1) && cos.size(2) == 1 && cos.size(3) == x.size(3) &&
                         x.size(3) % 2 == 0;
  if (fused && shapes_ok && CpuFloat(x) && CpuFloat(cos) && CpuFloat(sin)) {
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

at::Tensor FusedAttention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                          const at::Tensor& mask, double scale) {
  if (!CpuGemmUsesOneDnn() || q.dim() != 4 || keys.dim() != 4 || values.dim() != 4 || mask.dim() != 4) {
    return {};
  }
  if (!CpuFloat(q) || !CpuFloat(keys) || !CpuFloat(values) || !CpuFloat(mask)) return {};
  const int64_t batch = q.size(0), H = q.size(1), pos = q.size(2), dh = q.size(3);
  const int64_t Hkv = keys.size(1), n_keys = keys.size(2);
  if (!q.is_contiguous() || Hkv == 0 || H % Hkv != 0 || keys.sizes() != values.sizes() ||
      keys.size(0) != batch || keys.size(3) != dh || keys.stride(3) != 1 || values.stride(3) != 1 ||
      (mask.size(0) != 1 && mask.size(0) != batch) || mask.size(1) != 1 || mask.size(2) != pos ||
      mask.size(3) != n_keys || q.numel() == 0 || n_keys == 0) {
    return {};
  }
  const int64_t group = H / Hkv, rows = group * pos;  // the query heads of one key/value head
  const at::Tensor m = mask.contiguous();
  at::Tensor z = at::empty({batch, pos, H, dh}, q.options());
  // Scores of every (row, key/value head) block, then one vectorised softmax over all of them.
  at::Tensor scores = at::empty({batch * Hkv, rows, n_keys}, q.options());
  const float* pq = q.data_ptr<float>();
  const float* pk = keys.data_ptr<float>();
  const float* pv = values.data_ptr<float>();
  const float* pm = m.data_ptr<float>();
  float* ps = scores.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    const float* mask_b = pm + (m.size(0) == 1 ? 0 : b) * pos * n_keys;
    for (int64_t kvh = 0; kvh < Hkv; ++kvh) {
      // Query heads kvh*group .. +group are consecutive rows of q: [group * pos, dh].
      const float* qg = pq + (b * H + kvh * group) * pos * dh;
      const float* k = pk + b * keys.stride(0) + kvh * keys.stride(1);
      float* block = ps + (b * Hkv + kvh) * rows * n_keys;
      Sgemm('N', 'T', rows, n_keys, dh, static_cast<float>(scale), qg, dh, k, keys.stride(2), 0.0f,
            block, n_keys);
      for (int64_t r = 0; r < rows; ++r) {
        float* row = block + r * n_keys;
        const float* mask_row = mask_b + (r % pos) * n_keys;
        for (int64_t j = 0; j < n_keys; ++j) row[j] += mask_row[j];
      }
    }
  }
  const at::Tensor pattern = at::_softmax(scores, -1, /*half_to_float=*/false);
  const float* pp = pattern.data_ptr<float>();
  float* pz = z.data_ptr<float>();
  std::vector<float> zg(rows * dh);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t kvh = 0; kvh < Hkv; ++kvh) {
      const float* v = pv + b * values.stride(0) + kvh * values.stride(1);
      Sgemm('N', 'N', rows, dh, n_keys, 1.0f, pp + (b * Hkv + kvh) * rows * n_keys, n_keys, v,
            values.stride(2), 0.0f, zg.data(), dh);
      // Row g * pos + p of zg is query head kvh * group + g at position p.
      for (int64_t g = 0; g < group; ++g) {
        for (int64_t p = 0; p < pos; ++p) {
          std::copy_n(zg.data() + (g * pos + p) * dh, dh, pz + ((b * pos + p) * H + kvh * group + g) * dh);
        }
      }
    }
  }
  return z;
}

}  // namespace remotelens
