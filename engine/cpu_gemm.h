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
// With several intra-op threads, 8-256 rows are computed as column chunks the threads share.
// `onednn` false always takes LibTorch's path (benchmarks compare the two in one run). When x
// requires grad (a differentiable forward; w never does), up to 32 rows go through oneDNN inside
// an autograd function whose backward is grad @ w; more rows take LibTorch's path.
at::Tensor Linear(const at::Tensor& x, const at::Tensor& w, bool onednn = true);

// alpha * (a @ b) for a [..., M, K] and b [..., K, N] with the same leading dimensions (no
// broadcasting), like at::matmul(a, b) * alpha. Inputs may be strided views (transposes,
// narrowed caches) as long as each matrix has a unit stride along one of its two dimensions.
at::Tensor BatchedMatmul(const at::Tensor& a, const at::Tensor& b, double alpha = 1.0,
                         bool onednn = true);

// Whether products on CPU float32 tensors use oneDNN in this build.
bool CpuGemmUsesOneDnn();

// Row-major C[M, N] = alpha * op(A)[M, K] op(B)[K, N] + beta * C on raw float32 buffers, where
// op is 'N' (as stored, leading dimension lda/ldb >= columns) or 'T' (stored transposed), for
// fused kernels that own their buffers. False (nothing computed) when this build has no oneDNN.
bool Sgemm(char trans_a, char trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* a,
           int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

}  // namespace remotelens

#endif  // REMOTELENS_ENGINE_CPU_GEMM_H_
