#include "engine/cpu_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <vector>

#include "gtest/gtest.h"

namespace remotelens {
namespace {

// The product in float64 through LibTorch, as the reference.
at::Tensor ReferenceLinear(const at::Tensor& x, const at::Tensor& w) {
  return at::linear(x.to(at::kDouble), w.to(at::kDouble));
}

void ExpectClose(const at::Tensor& got, const at::Tensor& want) {
  ASSERT_EQ(got.sizes(), want.sizes());
  EXPECT_EQ(got.scalar_type(), at::kFloat);
  const double err = (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
  EXPECT_LT(err, 1e-4) << "max abs error " << err;
}

class CpuGemmTest : public ::testing::Test {
 protected:
  void SetUp() override { at::manual_seed(7); }
  c10::InferenceMode inference_mode_;
};

TEST_F(CpuGemmTest, ThisBuildUsesOneDnn) {
#ifdef REMOTELENS_HAVE_DNNL
  EXPECT_TRUE(CpuGemmUsesOneDnn());
#else
  EXPECT_FALSE(CpuGemmUsesOneDnn());
#endif
}

TEST_F(CpuGemmTest, LinearMatchesReferenceForModelShapes) {
  // Shapes of the demo model's projections at 8 tokens and of a larger model at 128.
  for (auto [rows, n, k] : {std::tuple<int64_t, int64_t, int64_t>{8, 256, 128},
                            {8, 128, 384},
                            {1, 768, 128},
                            {128, 1280, 768},
                            {3, 5, 7}}) {
    const at::Tensor x = at::randn({1, rows, k});
    const at::Tensor w = at::randn({n, k});
    SCOPED_TRACE(testing::Message() << rows << "x" << n << "x" << k);
    ExpectClose(Linear(x, w), ReferenceLinear(x, w));
  }
}

TEST_F(CpuGemmTest, LinearOnSeveralThreadsMatchesReferenceAroundTheChunking) {
  // With more than one intra-op thread, products of 8-256 rows run as 256-column chunks that the
  // threads take in turn: rows and columns either side of those bounds, a partial last chunk,
  // and a strided input, on more threads than chunks and fewer.
  const int saved = at::get_num_threads();
  for (int threads : {2, 3}) {
    at::set_num_threads(threads);
    for (auto [rows, n, k] : {std::tuple<int64_t, int64_t, int64_t>{7, 1000, 64},
                              {8, 256, 64},
                              {8, 257, 64},
                              {16, 1000, 96},
                              {128, 4096, 64},
                              {256, 777, 32},
                              {257, 600, 32}}) {
      SCOPED_TRACE(testing::Message() << threads << " threads, " << rows << "x" << n << "x" << k);
      const at::Tensor w = at::randn({n, k});
      const at::Tensor x = at::randn({1, rows, k});
      ExpectClose(Linear(x, w), ReferenceLinear(x, w));
      const at::Tensor strided = at::randn({rows, 2 * k}).narrow(1, k, k);
      ExpectClose(Linear(strided, w), ReferenceLinear(strided, w));
    }
    // Inside a parallel region (another op's worker) the product runs unchunked, still right.
    const at::Tensor w = at::randn({1000, 64});
    std::vector<at::Tensor> got(4), x(4);
    for (int i = 0; i < 4; ++i) x[i] = at::randn({16, 64});
    at::parallel_for(0, 4, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) got[i] = Linear(x[i], w);
    });
    for (int i = 0; i < 4; ++i) ExpectClose(got[i], ReferenceLinear(x[i], w));
  }
  at::set_num_threads(saved);
}

TEST_F(CpuGemmTest, LinearKeepsLeadingDimensions) {
  const at::Tensor w = at::randn({6, 4});
  EXPECT_EQ(Linear(at::randn({4}), w).sizes(), at::IntArrayRef({6}));
  EXPECT_EQ(Linear(at::randn({2, 3, 5, 4}), w).sizes(), at::IntArrayRef({2, 3, 5, 6}));
}

TEST_F(CpuGemmTest, LinearReadsStridedViews) {
  // Columns narrowed out of a wider activation (how q, k and v come out of the fused QKV).
  const at::Tensor wide = at::randn({2, 5, 24});
  const at::Tensor x = wide.narrow(-1, 8, 8);
  // A transposed activation, whose rows cannot be collapsed without a copy.
  const at::Tensor xt = at::randn({8, 5, 2}).permute({2, 1, 0});
  // A column-major weight.
  const at::Tensor w_col_major = at::randn({8, 6}).t();  // [6, 8], strides (1, 6)
  const at::Tensor w = at::randn({6, 8});
  ExpectClose(Linear(x, w), ReferenceLinear(x, w));
  ExpectClose(Linear(xt, w), ReferenceLinear(xt, w));
  ExpectClose(Linear(x, w_col_major), ReferenceLinear(x, w_col_major));
  // Expanded (stride 0) rows.
  const at::Tensor expanded = at::randn({1, 8}).expand({4, 8});
  ExpectClose(Linear(expanded, w), ReferenceLinear(expanded, w));
}

TEST_F(CpuGemmTest, LinearFallsBackForOtherDtypesAndEmptyInputs) {
  const at::Tensor x = at::randn({3, 4}, at::kDouble), w = at::randn({5, 4}, at::kDouble);
  const at::Tensor y = Linear(x, w);
  EXPECT_EQ(y.scalar_type(), at::kDouble);
  EXPECT_TRUE(at::allclose(y, at::linear(x, w)));
  const at::Tensor b = Linear(x.to(at::kBFloat16), w.to(at::kBFloat16));
  EXPECT_EQ(b.scalar_type(), at::kBFloat16);
  EXPECT_EQ(Linear(at::randn({0, 4}), at::randn({5, 4})).sizes(), at::IntArrayRef({0, 5}));
}

TEST_F(CpuGemmTest, OneDnnOffIsLibTorchExactly) {
  const at::Tensor x = at::randn({2, 3, 16}), w = at::randn({8, 16});
  EXPECT_TRUE(at::equal(Linear(x, w, /*onednn=*/false), at::linear(x, w)));
  const at::Tensor a = at::randn({2, 3, 4}), b = at::randn({2, 4, 5});
  EXPECT_TRUE(at::equal(BatchedMatmul(a, b, 0.5, /*onednn=*/false), at::matmul(a, b).mul(0.5)));
}

TEST_F(CpuGemmTest, BatchedMatmulMatchesReferenceOnAttentionViews) {
  // Grouped-query attention as the forward runs it: q [b, Hkv, group * pos, dh] against keys
  // and values that are transposed views of a fused [b, pos, (H + 2 Hkv) dh] projection.
  const int64_t b = 2, pos = 5, H = 8, Hkv = 2, dh = 4, group = H / Hkv;
  const at::Tensor qkv = at::randn({b, pos, (H + 2 * Hkv) * dh});
  const at::Tensor q = qkv.narrow(-1, 0, H * dh).view({b, pos, H, dh}).transpose(1, 2)
                           .contiguous().view({b, Hkv, group * pos, dh});
  const at::Tensor keys = qkv.narrow(-1, H * dh, Hkv * dh).view({b, pos, Hkv, dh}).transpose(1, 2);
  const at::Tensor values = qkv.narrow(-1, (H + Hkv) * dh, Hkv * dh).view({b, pos, Hkv, dh}).transpose(1, 2);
  const at::Tensor scores = BatchedMatmul(q, keys.transpose(-1, -2), 0.5);
  ExpectClose(scores, at::matmul(q.to(at::kDouble), keys.transpose(-1, -2).to(at::kDouble)) * 0.5);
  const at::Tensor pattern = at::softmax(scores, -1);
  ExpectClose(BatchedMatmul(pattern, values),
              at::matmul(pattern.to(at::kDouble), values.to(at::kDouble)));
  EXPECT_TRUE(BatchedMatmul(pattern, values).is_contiguous());
}

TEST_F(CpuGemmTest, BatchedMatmulPlainAndUnreadableLayouts) {
  const at::Tensor a = at::randn({3, 4});
  const at::Tensor b = at::randn({4, 2});
  ExpectClose(BatchedMatmul(a, b), at::matmul(a.to(at::kDouble), b.to(at::kDouble)));
  // Neither dimension has unit stride: copied before the product.
  const at::Tensor sparse_a = at::randn({3, 4, 2}).select(2, 1);  // strides (8, 2)
  ExpectClose(BatchedMatmul(sparse_a, b), at::matmul(sparse_a.to(at::kDouble), b.to(at::kDouble)));
}

TEST_F(CpuGemmTest, BatchedMatmulFallsBackToBroadcasting) {
  // Different leading dimensions are LibTorch's broadcasting matmul.
  const at::Tensor a = at::randn({2, 3, 4}), b = at::randn({4, 5});
  ExpectClose(BatchedMatmul(a, b, 2.0), at::matmul(a.to(at::kDouble), b.to(at::kDouble)) * 2.0);
  EXPECT_THROW(BatchedMatmul(at::randn({2, 3, 4}), at::randn({2, 5, 6})), c10::Error);
}

// A differentiable forward (gradient requests) keeps oneDNN's products: the gradient reaching
// x equals LibTorch's, through a strided view, and no gradient is made for the frozen weight.
TEST_F(CpuGemmTest, LinearIsDifferentiableInItsInputWithTheWeightFrozen) {
  c10::InferenceMode autograd_on(/*enabled=*/false);  // the fixture's inference mode, undone
  const at::Tensor w = at::randn({6, 4});
  const at::Tensor base = at::randn({2, 3, 5}).narrow(2, 1, 4).detach().requires_grad_(true);
  const at::Tensor upstream = at::randn({2, 3, 6});
  const at::Tensor y = Linear(base, w);
  EXPECT_TRUE(y.requires_grad());
  ExpectClose(y.detach(), at::linear(base.detach().to(at::kDouble), w.to(at::kDouble)));
  y.backward(upstream);
  const at::Tensor expected = at::matmul(upstream.to(at::kDouble), w.to(at::kDouble));
  ASSERT_TRUE(base.grad().defined());
  EXPECT_EQ(base.grad().sizes(), base.sizes());
  ExpectClose(base.grad(), expected);
  EXPECT_FALSE(w.grad().defined());

  // More rows than the oneDNN gradient path takes: LibTorch's, with the same answer.
  const at::Tensor many = at::randn({40, 4}).requires_grad_(true);
  const at::Tensor upstream_many = at::randn({40, 6});
  Linear(many, w).backward(upstream_many);
  ExpectClose(many.grad(), at::matmul(upstream_many.to(at::kDouble), w.to(at::kDouble)));
}

}  // namespace
}  // namespace remotelens
