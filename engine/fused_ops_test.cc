#include "engine/fused_ops.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

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

}  // namespace
}  // namespace remotelens
