#include "engine/cpu_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <algorithm>
#include <optional>
#include <vector>

#ifdef REMOTELENS_HAVE_DNNL
#include <dnnl.h>
#include <torch/csrc/autograd/custom_function.h>
#endif

namespace remotelens {
namespace {

#ifdef REMOTELENS_HAVE_DNNL

// How sgemm reads a [rows, cols] matrix stored with the given strides: row-major as is ('N'), or
// as the row-major transpose of a [cols, rows] matrix ('T'); ld is the stride between stored rows.
struct Operand {
  char trans;
  int64_t ld;
};

std::optional<Operand> Describe(int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride) {
  // A dimension of size one has no meaningful stride.
  if (col_stride == 1 || cols == 1) {
    const int64_t ld = rows == 1 ? cols : row_stride;
    if (ld >= cols) return Operand{'N', ld};
  }
  if (row_stride == 1 || rows == 1) {
    const int64_t ld = cols == 1 ? rows : col_stride;
    if (ld >= rows) return Operand{'T', ld};
  }
  return std::nullopt;
}

bool Eligible(const at::Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.layout() == at::kStrided &&
         !t.requires_grad();
}

// out[M, N] (row stride ldc) = alpha * a @ b for one pair of matrices given by pointer and strides.
void Gemm(const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t b_rs, int64_t b_cs,
          float* out, int64_t M, int64_t N, int64_t K, float alpha, int64_t ldc) {
  const std::optional<Operand> pa = Describe(M, K, a_rs, a_cs);
  const std::optional<Operand> pb = Describe(K, N, b_rs, b_cs);
  TORCH_INTERNAL_ASSERT(pa.has_value() && pb.has_value(), "operands were not made sgemm-readable");
  Sgemm(pa->trans, pb->trans, M, N, K, alpha, a, pa->ld, b, pb->ld, 0.0f, out, ldc);
}

void Gemm(const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t b_rs, int64_t b_cs,
          float* out, int64_t M, int64_t N, int64_t K, float alpha) {
  Gemm(a, a_rs, a_cs, b, b_rs, b_cs, out, M, N, K, alpha, N);
}

// Products of kChunkedMinRows to kChunkedMaxRows rows on more than one intra-op thread run as
// chunks of kColumnsPerChunk output columns (weight rows) that the threads take in turn, each
// chunk one single-threaded sgemm, instead of one sgemm that oneDNN splits between the threads
// in fixed shares. A thread that the OS takes away for a moment (gRPC and the clients' work share
// the cores of a CPU server) then delays only its current chunk, not every product. On the
// 2-core VM (bench/ab_forward.py) the ~100M model's 1x16 forward got 8-13% faster, 8x16 to 1x256
// 2-6%; at 512 rows oneDNN's own split was 5% faster, and below 8 rows (decode steps of one or
// a few rows, bound by reading the weights) nothing was gained. See docs/decisions.md.
constexpr int64_t kColumnsPerChunk = 256;
constexpr int64_t kChunkedMinRows = 8;
constexpr int64_t kChunkedMaxRows = 256;

// out[M, N] = a[M, K] @ b[K, N] (b given by pointer and strides) in column chunks over `threads`
// threads.
void ChunkedGemm(const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t b_rs,
                 int64_t b_cs, float* out, int64_t M, int64_t N, int64_t K, int64_t threads) {
  const int64_t chunks = (N + kColumnsPerChunk - 1) / kColumnsPerChunk;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
      const int64_t first = c * kColumnsPerChunk, columns = std::min(kColumnsPerChunk, N - first);
      Gemm(a, a_rs, a_cs, b + first * b_cs, b_rs, b_cs, out + first, M, columns, K, 1.0f, N);
    }
  });
}

// Threads to chunk an [M, K] x [K, N] product over; 1 leaves it to oneDNN (outside the row range,
// one chunk, one thread, or already inside a parallel region).
int64_t ChunkThreads(int64_t M, int64_t N) {
  if (M < kChunkedMinRows || M > kChunkedMaxRows || at::in_parallel_region()) return 1;
  return std::min<int64_t>(at::get_num_threads(), (N + kColumnsPerChunk - 1) / kColumnsPerChunk);
}

// `t` itself when sgemm can read its last two dimensions, else a contiguous copy.
at::Tensor Readable(const at::Tensor& t) {
  const int64_t d = t.dim();
  return Describe(t.size(d - 2), t.size(d - 1), t.stride(d - 2), t.stride(d - 1)).has_value()
             ? t
             : t.contiguous();
}

#endif  // REMOTELENS_HAVE_DNNL

}  // namespace

bool CpuGemmUsesOneDnn() {
#ifdef REMOTELENS_HAVE_DNNL
  return true;
#else
  return false;
#endif
}

bool Sgemm(char trans_a, char trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* a,
           int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
#ifdef REMOTELENS_HAVE_DNNL
  const dnnl_status_t status =
      dnnl_sgemm(trans_a, trans_b, M, N, K, alpha, a, lda, b, ldb, beta, c, ldc);
  TORCH_CHECK(status == dnnl_success, "oneDNN sgemm failed with status ", static_cast<int>(status),
              " for a [", M, ", ", K, "] x [", K, ", ", N, "] product");
  return true;
#else
  return false;
#endif
}

#ifdef REMOTELENS_HAVE_DNNL
namespace {

// x @ w^T through oneDNN for a differentiable forward: `x` requires grad, `w` is frozen (weights
// never do). The backward is one more oneDNN product, grad @ w; no weight gradient exists. Used
// for up to kGradRowsViaOneDnn rows: for the few rows of an interpretability prompt oneDNN's
// products were 2-3x faster than ATen's (OpenBLAS) on the 2-core AMD VM, at 64 rows and more they
// were slower (BENCHMARKS.md, "Gradients"); the inference path's choice is unchanged.
constexpr int64_t kGradRowsViaOneDnn = 32;

class FrozenWeightLinear : public torch::autograd::Function<FrozenWeightLinear> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& w) {
    ctx->save_for_backward({w});
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    return Linear(x.detach(), w, /*onednn=*/true);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor w = ctx->get_saved_variables()[0];  // [N, K]
    const int64_t N = w.size(0), K = w.size(1);
    const at::Tensor g = Readable(grads[0].reshape({-1, N}));
    const at::Tensor wr = Readable(w);
    at::Tensor grad_x = at::empty({g.size(0), K}, g.options());
    Gemm(g.data_ptr<float>(), g.stride(0), g.stride(1), wr.data_ptr<float>(), wr.stride(0),
         wr.stride(1), grad_x.data_ptr<float>(), g.size(0), K, N, 1.0f);
    return {grad_x.view(ctx->saved_data["x_sizes"].toIntVector()), at::Tensor()};
  }
};

}  // namespace
#endif  // REMOTELENS_HAVE_DNNL

at::Tensor Linear(const at::Tensor& x, const at::Tensor& w, bool onednn) {
#ifdef REMOTELENS_HAVE_DNNL
  if (onednn && x.requires_grad() && at::GradMode::is_enabled() && Eligible(x.detach()) &&
      Eligible(w) && x.dim() >= 1 && w.dim() == 2 && x.size(-1) == w.size(1) && x.numel() > 0 &&
      w.numel() > 0 && x.numel() / x.size(-1) <= kGradRowsViaOneDnn) {
    return FrozenWeightLinear::apply(x, w);
  }
  if (onednn && Eligible(x) && Eligible(w) && x.dim() >= 1 && w.dim() == 2 && x.size(-1) == w.size(1) &&
      x.numel() > 0 && w.numel() > 0) {
    const int64_t K = w.size(1), N = w.size(0);
    const at::Tensor x2 = Readable(x.reshape({-1, K}));
    const at::Tensor wt = Readable(w.t());  // [K, N]
    const int64_t M = x2.size(0);
    at::Tensor out = at::empty({M, N}, x.options());
    const int64_t threads = ChunkThreads(M, N);
    if (threads > 1) {
      ChunkedGemm(x2.data_ptr<float>(), x2.stride(0), x2.stride(1), wt.data_ptr<float>(),
                  wt.stride(0), wt.stride(1), out.data_ptr<float>(), M, N, K, threads);
    } else {
      Gemm(x2.data_ptr<float>(), x2.stride(0), x2.stride(1), wt.data_ptr<float>(), wt.stride(0),
           wt.stride(1), out.data_ptr<float>(), M, N, K, 1.0f);
    }
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = N;
    return out.view(shape);
  }
#endif
  return at::linear(x, w);
}

at::Tensor BatchedMatmul(const at::Tensor& a, const at::Tensor& b, double alpha, bool onednn) {
#ifdef REMOTELENS_HAVE_DNNL
  const int64_t d = a.dim();
  if (onednn && Eligible(a) && Eligible(b) && d >= 2 && b.dim() == d &&
      a.sizes().slice(0, d - 2).equals(b.sizes().slice(0, d - 2)) && a.size(d - 1) == b.size(d - 2) &&
      a.numel() > 0 && b.numel() > 0) {
    const at::Tensor ra = Readable(a), rb = Readable(b);
    const int64_t M = a.size(d - 2), K = a.size(d - 1), N = b.size(d - 1);
    std::vector<int64_t> shape(a.sizes().begin(), a.sizes().end());
    shape.back() = N;
    at::Tensor out = at::empty(shape, a.options());
    const int64_t batch = out.numel() / (M * N);
    const float* pa = ra.data_ptr<float>();
    const float* pb = rb.data_ptr<float>();
    float* po = out.data_ptr<float>();
    for (int64_t i = 0; i < batch; ++i) {
      // Element offsets of matrix i in each operand, walking the leading dimensions.
      int64_t off_a = 0, off_b = 0, rest = i;
      for (int64_t dim = d - 3; dim >= 0; --dim) {
        const int64_t index = rest % a.size(dim);
        rest /= a.size(dim);
        off_a += index * ra.stride(dim);
        off_b += index * rb.stride(dim);
      }
      Gemm(pa + off_a, ra.stride(d - 2), ra.stride(d - 1), pb + off_b, rb.stride(d - 2),
           rb.stride(d - 1), po + i * M * N, M, N, K, static_cast<float>(alpha));
    }
    return out;
  }
#endif
  at::Tensor out = at::matmul(a, b);
  return alpha == 1.0 ? out : out.mul_(alpha);
}

}  // namespace remotelens
