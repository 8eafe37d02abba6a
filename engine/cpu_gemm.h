// Matrix products for the forward pass. CPU float32 products go straight to oneDNN's sgemm, which
// picks its kernels from the running CPU's instruction set at run time; everything else (other
// devices, other dtypes, builds without oneDNN) goes through LibTorch.
//
// Why: LibTorch's CPU matmul calls the system BLAS. Debian's OpenBLAS 0.3.21 recognises CPUs by
// model number and runs unknown ones on its SSE3 "Prescott" kernels; on the Xeon these servers
// run on, that made an 8-token demo forward 3-5x slower per product than oneDNN, and oneDNN's
// sgemm matches or beats LibTorch's oneDNN inner product at large sizes without a second,
// blocked copy of the weights. See docs/decisions.md.
//
//   at::Tensor y = Linear(x, w);                        // == at::linear(x, w)
//   at::Tensor s = BatchedMatmul(q, k.transpose(-1, -2), 0.125);  // == at::matmul(q, kT) * 0.125
#ifndef REMOTELENS_ENGINE_CPU_GEMM_H_
#define REMOTELENS_ENGINE_CPU_GEMM_H_

#include <ATen/core/Tensor.h>

namespace remotelens {

// x @ w^T over the last dimension: x [..., K], w [N, K] -> [..., N], like at::linear(x, w).
// `onednn` false always takes LibTorch's path (benchmarks compare the two in one run).
at::Tensor Linear(const at::Tensor& x, const at::Tensor& w, bool onednn = true);

// alpha * (a @ b) for a [..., M, K] and b [..., K, N] with the same leading dimensions (no
// broadcasting), like at::matmul(a, b) * alpha. Inputs may be strided views (transposes,
// narrowed caches) as long as each matrix has a unit stride along one of its two dimensions.
at::Tensor BatchedMatmul(const at::Tensor& a, const at::Tensor& b, double alpha = 1.0,
                         bool onednn = true);

// Whether products on CPU float32 tensors use oneDNN in this build.
bool CpuGemmUsesOneDnn();

}  // namespace remotelens

#endif  // REMOTELENS_ENGINE_CPU_GEMM_H_
