#include "engine/hook_plan.h"

#include <ATen/ATen.h>

#include "gtest/gtest.h"

namespace remotelens {
namespace {

constexpr int64_t kLayers = 2;
const HookId kZ{1, HookSite::kAttnZ};              // [batch, pos, heads, d_head]
const HookId kResid{0, HookSite::kResidPost};      // [batch, pos, d_model]
const HookId kPattern{0, HookSite::kAttnPattern};  // [batch, heads, qpos, kpos]

at::Tensor Arange(std::vector<int64_t> shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return at::arange(n, at::kFloat).view(shape);
}

InterventionOp Op(HookId hook, OpKind kind, Selector selector = {}) {
  InterventionOp op;
  op.hook = hook;
  op.kind = kind;
  op.selector = std::move(selector);
  return op;
}

TEST(HookPlan, EmptyPlanHasNothing) {
  HookPlan plan(kLayers);
  EXPECT_TRUE(plan.empty());
  EXPECT_FALSE(plan.Has(kZ));
  at::Tensor x = Arange({1, 2, 3});
  const at::Tensor before = x;
  ASSERT_TRUE(plan.Apply(kResid, x).ok());
  EXPECT_TRUE(x.is_same(before));
}

TEST(HookPlan, ZeroOneHeadAtOnePosition) {
  HookPlan plan(kLayers);
  ASSERT_TRUE(plan.AddIntervention(Op(kZ, OpKind::kZero, {{-1}, {2}})).ok());
  at::Tensor x = Arange({2, 3, 4, 5});
  const at::Tensor original = x.clone();
  const at::Tensor input = x;
  ASSERT_TRUE(plan.Apply(kZ, x).ok());
  at::Tensor expected = original.clone();
  expected.select(1, 2).select(1, 2).zero_();
  EXPECT_TRUE(at::equal(x, expected));
  EXPECT_TRUE(at::equal(input, original)) << "the input tensor must not be written in place";
}

TEST(HookPlan, SetBroadcastsAndAddSteers) {
  HookPlan plan(kLayers);
  InterventionOp set = Op(kResid, OpKind::kSet, {{0}, {}});
  set.value = at::full({4}, 7.0);
  InterventionOp add = Op(kResid, OpKind::kAdd);
  add.value = at::ones({4});
  ASSERT_TRUE(plan.AddIntervention(set).ok());
  ASSERT_TRUE(plan.AddIntervention(add).ok());
  at::Tensor x = Arange({2, 3, 4});
  at::Tensor expected = x.clone();
  expected.select(1, 0).fill_(7.0);
  expected += 1;
  ASSERT_TRUE(plan.Apply(kResid, x).ok());
  EXPECT_TRUE(at::equal(x, expected));
}

TEST(HookPlan, ScaleAndMean) {
  HookPlan plan(kLayers);
  InterventionOp scale = Op(kResid, OpKind::kScale);
  scale.factor = 0.5;
  ASSERT_TRUE(plan.AddIntervention(scale).ok());
  ASSERT_TRUE(plan.AddIntervention(Op(kResid, OpKind::kMean, {{1}, {}})).ok());
  at::Tensor x = Arange({2, 3, 4});
  at::Tensor expected = x * 0.5;
  expected.select(1, 1).copy_(expected.select(1, 1).mean(0, true).expand({2, 4}));
  ASSERT_TRUE(plan.Apply(kResid, x).ok());
  EXPECT_TRUE(at::allclose(x, expected));
}

TEST(HookPlan, PatternSelectorsUseQueryPosAndHeadDims) {
  HookPlan plan(kLayers);
  ASSERT_TRUE(plan.AddIntervention(Op(kPattern, OpKind::kZero, {{1}, {0}})).ok());
  at::Tensor x = Arange({1, 2, 3, 3}) + 1;
  ASSERT_TRUE(plan.Apply(kPattern, x).ok());
  EXPECT_EQ(x[0][0][1].abs().sum().item<float>(), 0.f);   // head 0, query 1 zeroed
  EXPECT_GT(x[0][0][0].abs().sum().item<float>(), 0.f);   // head 0, query 0 intact
  EXPECT_GT(x[0][1][1].abs().sum().item<float>(), 0.f);   // head 1 intact
}

TEST(HookPlan, OpsApplyInRegistrationOrderThenCache) {
  HookPlan plan(kLayers);
  InterventionOp add = Op(kResid, OpKind::kAdd);
  add.value = at::ones({1});
  InterventionOp scale = Op(kResid, OpKind::kScale);
  scale.factor = 3.0;
  plan.AddCache({kResid});
  ASSERT_TRUE(plan.AddIntervention(add).ok());
  ASSERT_TRUE(plan.AddIntervention(scale).ok());
  at::Tensor x = at::zeros({1, 1, 2});
  ASSERT_TRUE(plan.Apply(kResid, x).ok());
  // (0 + 1) * 3, not 0 * 3 + 1; the cache request, though registered first, saw the input.
  EXPECT_TRUE(at::equal(x, at::full({1, 1, 2}, 3.0)));
  ASSERT_EQ(plan.cache().size(), 1u);
  EXPECT_TRUE(at::equal(plan.cache()[0].second, at::zeros({1, 1, 2})));
}

TEST(HookPlan, CacheSlicesCastsAndCopies) {
  HookPlan plan(kLayers);
  CacheRequest request{kResid};
  request.pos_start = -2;
  request.dtype = at::kDouble;
  plan.AddCache(request);
  at::Tensor x = Arange({1, 4, 2});
  ASSERT_TRUE(plan.Apply(kResid, x).ok());
  x.zero_();  // later in-place work must not reach the cache
  const at::Tensor cached = plan.cache()[0].second;
  EXPECT_EQ(cached.scalar_type(), at::kDouble);
  EXPECT_TRUE(at::equal(cached, Arange({1, 4, 2}).narrow(1, 2, 2).to(at::kDouble)));
}

TEST(HookPlan, SinkReceivesInsteadOfCache) {
  HookPlan plan(kLayers);
  std::vector<std::string> seen;
  plan.SetCacheSink([&](HookId id, at::Tensor t) {
    seen.push_back(HookName(id));
    return absl::OkStatus();
  });
  plan.AddCache({kResid});
  at::Tensor x = at::zeros({1, 1, 1});
  ASSERT_TRUE(plan.Apply(kResid, x).ok());
  EXPECT_EQ(seen, std::vector<std::string>{"blocks.0.hook_resid_post"});
  EXPECT_TRUE(plan.cache().empty());
}

TEST(HookPlan, CallbackReplacesAndIsValidated) {
  HookPlan plan(kLayers);
  InterventionOp op = Op(kResid, OpKind::kCallback);
  op.callback = [](HookId, const at::Tensor& t) -> absl::StatusOr<std::optional<at::Tensor>> {
    return std::optional<at::Tensor>(t * 2);
  };
  ASSERT_TRUE(plan.AddIntervention(op).ok());
  at::Tensor x = at::ones({1, 2, 3});
  ASSERT_TRUE(plan.Apply(kResid, x).ok());
  EXPECT_TRUE(at::equal(x, at::full({1, 2, 3}, 2.0)));

  HookPlan bad(kLayers);
  op.callback = [](HookId, const at::Tensor& t) -> absl::StatusOr<std::optional<at::Tensor>> {
    return std::optional<at::Tensor>(at::ones({5}));
  };
  ASSERT_TRUE(bad.AddIntervention(op).ok());
  absl::Status status = bad.Apply(kResid, x);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("returned shape [5]"), std::string::npos) << status;
}

TEST(HookPlan, RejectsBadOps) {
  HookPlan plan(kLayers);
  absl::Status heads_on_resid = plan.AddIntervention(Op(kResid, OpKind::kZero, {{}, {0}}));
  EXPECT_EQ(heads_on_resid.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(heads_on_resid.message().find("no head dimension"), std::string::npos);
  EXPECT_FALSE(plan.AddIntervention(Op(kResid, OpKind::kSet)).ok());  // no value
  InterventionOp int_value = Op(kResid, OpKind::kAdd);
  int_value.value = at::ones({2}, at::kLong);
  EXPECT_FALSE(plan.AddIntervention(int_value).ok());

  // Wrong shape and out-of-range selectors surface at Apply, naming the problem.
  HookPlan shape_plan(kLayers);
  InterventionOp wrong = Op(kResid, OpKind::kSet);
  wrong.value = at::ones({5});
  ASSERT_TRUE(shape_plan.AddIntervention(wrong).ok());
  at::Tensor x = at::zeros({1, 2, 4});
  absl::Status status = shape_plan.Apply(kResid, x);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("does not broadcast"), std::string::npos) << status;

  HookPlan range_plan(kLayers);
  ASSERT_TRUE(range_plan.AddIntervention(Op(kResid, OpKind::kZero, {{7}, {}})).ok());
  status = range_plan.Apply(kResid, x);
  EXPECT_NE(status.message().find("position 7 is out of range"), std::string::npos) << status;
}

}  // namespace
}  // namespace remotelens
