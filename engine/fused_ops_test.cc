#include "engine/fused_ops.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <limits>

#include "engine/cpu_gemm.h"
#include "gtest/gtest.h"

namespace remotelens {
namespace {

// The formulas in float64 LibTorch ops, as the reference.
at::Tensor ReferenceRmsNorm(const at::Tensor& x, const at::Tensor& w, double eps) {
  const at::Tensor x64 = x.to(at::kDouble);
  return x64 * at::rsqrt(x64.pow(2).mean(-1, true) + eps) * w.to(at::kDouble);
}

at::Tensor ReferenceRotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const at::Tensor x64 = x.to(at::kDouble);
  const int64_t half = x.size(-1) / 2;
  const at::Tensor rotated = at::cat({-x64.narrow(-1, half, half), x64.narrow(-1, 0, half)}, -1);
  return x64 * cos.to(at::kDouble) + rotated * sin.to(at::kDouble);
}

void ExpectClose(const at::Tensor& got, const at::Tensor& want, double tol = 1e-5) {
  ASSERT_EQ(got.sizes(), want.sizes());
  const double err = (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
  EXPECT_LT(err, tol) << "max abs error " << err;
}

// cos/sin tables [rows, pos, 1, dh] from random angles, as the model builds them.
std::pair<at::Tensor, at::Tensor> Tables(int64_t rows, int64_t pos, int64_t dh) {
  const at::Tensor angles = at::rand({rows, pos, 1, dh / 2}) * 10;
  const at::Tensor emb = at::cat({angles, angles}, -1);
  return {emb.cos(), emb.sin()};
}

class FusedOpsTest : public ::testing::Test {
 protected:
  void SetUp() override { at::manual_seed(3); }
  c10::InferenceMode inference_mode_;
};

TEST_F(FusedOpsTest, RmsNormMatchesReference) {
  // d not a multiple of the eight partial sums, and the demo model's width.
  for (int64_t d : {13, 128}) {
    const at::Tensor x = at::randn({2, 5, d}) * 3;
    const at::Tensor w = at::randn({d});
    const at::Tensor y = RmsNorm(x, w, 1e-5);
    EXPECT_EQ(y.scalar_type(), at::kFloat);
    ExpectClose(y, ReferenceRmsNorm(x, w, 1e-5));
  }
}

TEST_F(FusedOpsTest, RmsNormEpsilonMattersNearZero) {
  const at::Tensor x = at::full({1, 4}, 1e-3);
  const at::Tensor w = at::ones({4});
  // mean(x^2) = 1e-6: with eps 1e-6 the result is x / sqrt(2e-6), not 1.
  ExpectClose(RmsNorm(x, w, 1e-6), at::full({1, 4}, 1e-3 / std::sqrt(2e-6)), 1e-4);
}

TEST_F(FusedOpsTest, RmsNormReadsNonContiguousInput) {
  const at::Tensor x = at::randn({16, 3}).t();  // [3, 16], strides (1, 3)
  const at::Tensor w = at::randn({16});
  ExpectClose(RmsNorm(x, w, 1e-5), ReferenceRmsNorm(x, w, 1e-5));
}

TEST_F(FusedOpsTest, RmsNormOtherDtypesKeepTheirDtype) {
  const at::Tensor x = at::randn({3, 8});
  const at::Tensor w = at::randn({8});
  const at::Tensor y = RmsNorm(x.to(at::kBFloat16), w.to(at::kBFloat16), 1e-5);
  EXPECT_EQ(y.scalar_type(), at::kBFloat16);
  ExpectClose(y, ReferenceRmsNorm(x, w, 1e-5), 0.1);
}

TEST_F(FusedOpsTest, RotaryMatchesReferenceOnProjectionViews) {
  // q and k as the forward takes them: strided views of one fused [batch, pos, ...] projection.
  const int64_t batch = 2, pos = 6, H = 4, Hkv = 2, dh = 8;
  const at::Tensor qkv = at::randn({batch, pos, (H + 2 * Hkv) * dh});
  const at::Tensor q = qkv.narrow(-1, 0, H * dh).view({batch, pos, H, dh});
  const at::Tensor k = qkv.narrow(-1, H * dh, Hkv * dh).view({batch, pos, Hkv, dh});
  for (int64_t rows : {int64_t{1}, batch}) {  // one table for all rows, or one per row (padding)
    auto [cos, sin] = Tables(rows, pos, dh);
    SCOPED_TRACE(rows);
    const at::Tensor rq = Rotary(q, cos, sin);
    ExpectClose(rq, ReferenceRotary(q, cos, sin));
    ExpectClose(Rotary(k, cos, sin), ReferenceRotary(k, cos, sin));
    // Head-major storage: attention reads [batch, heads, pos, d_head] without a copy.
    EXPECT_TRUE(rq.transpose(1, 2).is_contiguous());
  }
}

TEST_F(FusedOpsTest, RotaryPositionZeroIsIdentity) {
  const at::Tensor x = at::randn({1, 1, 2, 4});
  const at::Tensor cos = at::ones({1, 1, 1, 4}), sin = at::zeros({1, 1, 1, 4});
  ExpectClose(Rotary(x, cos, sin), x, 1e-7);
}

TEST_F(FusedOpsTest, RotaryPairsDimensionIWithIPlusHalf) {
  // A quarter turn (cos 0, sin 1) maps (a, b) in the pair (i, i + d/2) to (-b, a).
  const at::Tensor x = at::tensor({1.0f, 2.0f, 3.0f, 4.0f}).view({1, 1, 1, 4});
  const at::Tensor cos = at::zeros({1, 1, 1, 4}), sin = at::ones({1, 1, 1, 4});
  ExpectClose(Rotary(x, cos, sin), at::tensor({-3.0, -4.0, 1.0, 2.0}).view({1, 1, 1, 4}), 1e-7);
}

TEST_F(FusedOpsTest, RotaryOtherDtypesUseLibTorch) {
  const at::Tensor x = at::randn({1, 3, 2, 4}, at::kDouble);
  auto [cos, sin] = Tables(1, 3, 4);
  const at::Tensor y = Rotary(x, cos.to(at::kDouble), sin.to(at::kDouble));
  EXPECT_EQ(y.scalar_type(), at::kDouble);
  ExpectClose(y, ReferenceRotary(x, cos, sin), 1e-6);
}

// softmax(q k^T * scale + mask) v in float64, each query head with its key/value head.
at::Tensor ReferenceAttention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                              const at::Tensor& mask, double scale) {
  const int64_t group = q.size(1) / keys.size(1);
  const at::Tensor k = keys.to(at::kDouble).repeat_interleave(group, 1);
  const at::Tensor v = values.to(at::kDouble).repeat_interleave(group, 1);
  const at::Tensor scores = at::matmul(q.to(at::kDouble), k.transpose(-1, -2)) * scale + mask.to(at::kDouble);
  return at::matmul(at::softmax(scores, -1), v).transpose(1, 2);  // [batch, pos, H, d_head]
}

at::Tensor CausalMask(int64_t pos, int64_t n_keys) {
  // Query p sits at key position n_keys - pos + p and sees keys up to it.
  return at::full({1, 1, pos, n_keys}, -std::numeric_limits<float>::infinity())
      .triu_(n_keys - pos + 1);
}

TEST_F(FusedOpsTest, AttentionMatchesReferenceWithGroupedHeads) {
  const int64_t batch = 2, H = 8, Hkv = 2, pos = 5, dh = 4;
  const at::Tensor q = at::randn({batch, H, pos, dh});
  const at::Tensor keys = at::randn({batch, Hkv, pos, dh});
  const at::Tensor values = at::randn({batch, Hkv, pos, dh});
  const at::Tensor mask = CausalMask(pos, pos);
  const at::Tensor z = FusedAttention(q, keys, values, mask, 0.5);
  if (!CpuGemmUsesOneDnn()) {  // a build without oneDNN always declines (the caller falls back)
    EXPECT_FALSE(z.defined());
    GTEST_SKIP() << "built without oneDNN";
  }
  ASSERT_TRUE(z.defined()) << "CPU float32 inputs of these shapes must take the fused path";
  EXPECT_TRUE(z.is_contiguous());
  ExpectClose(z, ReferenceAttention(q, keys, values, mask, 0.5));
  // Position 0 sees only key 0: its output is exactly value 0 of its key/value head.
  ExpectClose(z.select(1, 0).select(1, 5), values.select(1, 1).select(1, 0), 1e-6);
}

TEST_F(FusedOpsTest, AttentionReadsCacheViewsAndPerRowPaddingMasks) {
  // Keys and values narrowed out of a larger cache (capacity 16, 7 filled), 3 new queries, and a
  // per-row mask hiding row 1's first two (padding) keys.
  const int64_t batch = 2, H = 4, Hkv = 4, pos = 3, dh = 8, n_keys = 7;
  const at::Tensor cache_k = at::randn({batch, Hkv, 16, dh});
  const at::Tensor cache_v = at::randn({batch, Hkv, 16, dh});
  const at::Tensor keys = cache_k.narrow(2, 0, n_keys), values = cache_v.narrow(2, 0, n_keys);
  const at::Tensor q = at::randn({batch, H, pos, dh});
  at::Tensor mask = CausalMask(pos, n_keys).repeat({batch, 1, 1, 1});
  mask.select(0, 1).narrow(-1, 0, 2).fill_(-std::numeric_limits<float>::infinity());
  const at::Tensor z = FusedAttention(q, keys, values, mask, 0.35);
  if (!CpuGemmUsesOneDnn()) GTEST_SKIP() << "built without oneDNN";
  ASSERT_TRUE(z.defined());
  ExpectClose(z, ReferenceAttention(q, keys, values, mask, 0.35));
}

TEST_F(FusedOpsTest, AttentionDeclinesWhatItCannotRun) {
  const at::Tensor q = at::randn({1, 4, 3, 8});
  const at::Tensor kv = at::randn({1, 2, 3, 8});
  const at::Tensor mask = CausalMask(3, 3);
  EXPECT_FALSE(FusedAttention(q.to(at::kDouble), kv.to(at::kDouble), kv.to(at::kDouble),
                              mask.to(at::kDouble), 1.0).defined());
  EXPECT_FALSE(FusedAttention(q.transpose(2, 3), kv, kv, mask, 1.0).defined());  // not contiguous
  EXPECT_FALSE(FusedAttention(at::randn({1, 3, 3, 8}), kv, kv, mask, 1.0).defined());  // 3 % 2 heads
  EXPECT_FALSE(FusedAttention(q, kv, kv, CausalMask(3, 4), 1.0).defined());  // mask keys != 3
}

}  // namespace
}  // namespace remotelens
