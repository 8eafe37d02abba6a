#include "engine/hook_plan.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <string>
#include <vector>

#include "engine/hook_names.h"
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

TEST(HookPlan, AddScaledByTokenNormAndMeanNorm) {
  // x [1, 2, 2]: positions (3, 4) and (6, 8), with norms 5 and 10.
  at::Tensor x = at::tensor({3.0f, 4.0f, 6.0f, 8.0f}).view({1, 2, 2});
  const at::Tensor direction = at::tensor({1.0f, 0.0f});

  HookPlan token(kLayers);
  InterventionOp by_token = Op(kResid, OpKind::kAdd);
  by_token.value = direction * 0.5;
  by_token.scale_by = AddScale::kTokenNorm;
  ASSERT_TRUE(token.AddIntervention(by_token).ok());
  at::Tensor a = x;
  ASSERT_TRUE(token.Apply(kResid, a).ok());
  EXPECT_TRUE(at::allclose(a, at::tensor({3.0f + 2.5f, 4.0f, 6.0f + 5.0f, 8.0f}).view({1, 2, 2})));

  HookPlan mean(kLayers);
  InterventionOp by_mean = by_token;
  by_mean.scale_by = AddScale::kMeanNorm;
  by_mean.selector.positions = {-1};  // the mean is over every position, the add only at the last
  ASSERT_TRUE(mean.AddIntervention(by_mean).ok());
  at::Tensor b = x;
  ASSERT_TRUE(mean.Apply(kResid, b).ok());
  EXPECT_TRUE(at::allclose(b, at::tensor({3.0f, 4.0f, 6.0f + 3.75f, 8.0f}).view({1, 2, 2})));
  EXPECT_TRUE(at::equal(x, at::tensor({3.0f, 4.0f, 6.0f, 8.0f}).view({1, 2, 2})));

  HookPlan bad(kLayers);
  InterventionOp on_z = Op(kZ, OpKind::kAdd);
  on_z.value = at::ones({1});
  on_z.scale_by = AddScale::kTokenNorm;
  absl::Status status = bad.AddIntervention(on_z);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("[batch, pos, d_model]"), std::string::npos) << status;
  // The valid sites are listed from the shape table, opt-in ones included.
  EXPECT_NE(status.message().find("blocks.L.hook_mlp_in"), std::string::npos) << status;
  EXPECT_NE(status.message().find("unembed.hook_in"), std::string::npos) << status;
}

TEST(HookPlan, ResidualShapedAndHeadSitesFollowTheShapeTable) {
  for (int i = 0; i < kNumHookSites; ++i) {
    const HookSite site = static_cast<HookSite>(i);
    const std::vector<std::string> dims = HookDims(site);
    EXPECT_EQ(IsResidualShaped(site), dims == std::vector<std::string>({"batch", "pos", "d_model"}))
        << HookName(HookId{0, site});
    const bool heads = std::find(dims.begin(), dims.end(), "head_index") != dims.end() ||
                       std::find(dims.begin(), dims.end(), "kv_head_index") != dims.end();
    EXPECT_EQ(HasHeadDim(site), heads) << HookName(HookId{0, site});
  }
  EXPECT_TRUE(IsResidualShaped(HookSite::kMlpIn));
  EXPECT_TRUE(IsResidualShaped(HookSite::kUnembedIn));
  EXPECT_FALSE(IsResidualShaped(HookSite::kUnembedOut));

  // scale_by on an opt-in residual-shaped hook is accepted.
  HookPlan plan(kLayers);
  InterventionOp on_mlp_in = Op(HookId{0, HookSite::kMlpIn}, OpKind::kAdd);
  on_mlp_in.value = at::ones({1});
  on_mlp_in.scale_by = AddScale::kTokenNorm;
  EXPECT_TRUE(plan.AddIntervention(on_mlp_in).ok());

  // A head selector on a hook without heads names every hook that has them.
  HookPlan bad(kLayers);
  InterventionOp heads_on_resid = Op(kResid, OpKind::kZero, {{}, {0}});
  const absl::Status status = bad.AddIntervention(heads_on_resid);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  for (const char* name : {"blocks.L.hook_attn_in", "blocks.L.hook_q_input", "blocks.L.attn.hook_q",
                           "blocks.L.attn.hook_pattern", "blocks.L.attn.hook_result"}) {
    EXPECT_NE(status.message().find(name), std::string::npos) << name << ": " << status;
  }
  EXPECT_EQ(status.message().find("hook_resid_post,"), std::string::npos) << status;
}

TEST(HookPlan, CopyRowPatchesEveryRowFromTheSourceRow) {
  HookPlan plan(kLayers);
  InterventionOp copy = Op(kResid, OpKind::kCopyRow, {{-1}, {}});
  copy.source_row = 0;
  ASSERT_TRUE(plan.AddIntervention(copy).ok());
  at::Tensor x = Arange({2, 3, 4});
  const at::Tensor original = x.clone();
  ASSERT_TRUE(plan.Apply(kResid, x).ok());
  at::Tensor expected = original.clone();
  expected[1][2].copy_(original[0][2]);
  EXPECT_TRUE(at::equal(x, expected));

  HookPlan bad(kLayers);
  copy.source_row = -3;
  ASSERT_TRUE(bad.AddIntervention(copy).ok());
  at::Tensor y = Arange({2, 3, 4});
  absl::Status status = bad.Apply(kResid, y);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("source_row -3 is out of range"), std::string::npos) << status;
  EXPECT_NE(status.message().find("valid: -2..1"), std::string::npos) << status;
}

TEST(HookPlan, ReadoutsStackNormsMeansAndLensTopK) {
  HookPlan plan(kLayers);
  const HookId resid1{1, HookSite::kResidPost};
  ReadoutRequest norm;
  norm.hooks = {kResid, resid1};
  norm.kind = ReadoutKind::kNorm;
  norm.positions = {-1};
  ASSERT_TRUE(plan.AddReadout(norm).ok());
  ReadoutRequest mean;
  mean.hooks = {resid1};
  mean.kind = ReadoutKind::kMean;
  ASSERT_TRUE(plan.AddReadout(mean).ok());
  // A stand-in lens: logits = the residual itself (d_vocab = d_model = 3).
  ReadoutRequest lens;
  lens.hooks = {resid1};
  lens.kind = ReadoutKind::kLens;
  lens.top_k = 2;
  lens.lens = [](const at::Tensor& r) { return r * 2; };
  ASSERT_TRUE(plan.AddReadout(lens).ok());

  at::Tensor x0 = at::tensor({3.0f, 4.0f, 0.0f, 0.0f, 0.0f, 2.0f}).view({1, 2, 3});
  at::Tensor x1 = at::tensor({1.0f, 0.5f, 0.0f, 5.0f, -1.0f, 7.0f}).view({1, 2, 3});
  ASSERT_TRUE(plan.Apply(kResid, x0).ok());
  ASSERT_TRUE(plan.Apply(resid1, x1).ok());
  x1.zero_();  // the residual stream is written in place later; a lens keeps its own copy
  auto results = plan.TakeReadouts();
  ASSERT_TRUE(results.ok()) << results.status();
  ASSERT_EQ(results->size(), 3u);
  EXPECT_TRUE(at::allclose((*results)[0].values, at::tensor({2.0f, std::sqrt(75.0f)}).view({2, 1, 1})));
  EXPECT_FALSE((*results)[0].indices.defined());
  EXPECT_TRUE(at::allclose((*results)[1].values, at::tensor({3.0f, -0.25f, 3.5f}).view({1, 1, 3})));
  EXPECT_TRUE(at::equal((*results)[2].indices, at::tensor({0L, 1L, 2L, 0L}, at::kLong).view({1, 1, 2, 2})));
  EXPECT_TRUE(at::allclose((*results)[2].values, at::tensor({2.0f, 1.0f, 14.0f, 10.0f}).view({1, 1, 2, 2})));
}

TEST(HookPlan, ReadoutsRejectBadRequestsAndUnreachedHooks) {
  HookPlan plan(kLayers);
  ReadoutRequest empty;
  EXPECT_EQ(plan.AddReadout(empty).code(), absl::StatusCode::kInvalidArgument);
  ReadoutRequest lens_on_z;
  lens_on_z.hooks = {kZ};
  lens_on_z.kind = ReadoutKind::kLens;
  lens_on_z.lens = [](const at::Tensor& r) { return r; };
  absl::Status status = plan.AddReadout(lens_on_z);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("residual-stream hooks"), std::string::npos) << status;
  ReadoutRequest no_fn;
  no_fn.hooks = {kResid};
  no_fn.kind = ReadoutKind::kLens;
  EXPECT_EQ(plan.AddReadout(no_fn).code(), absl::StatusCode::kInvalidArgument);

  ReadoutRequest norm;
  norm.hooks = {kResid};
  norm.kind = ReadoutKind::kNorm;
  norm.positions = {5};
  ASSERT_TRUE(plan.AddReadout(norm).ok());
  auto unreached = plan.TakeReadouts();
  EXPECT_EQ(unreached.status().code(), absl::StatusCode::kFailedPrecondition);
  HookPlan range(kLayers);
  ASSERT_TRUE(range.AddReadout(norm).ok());
  at::Tensor x = at::zeros({1, 2, 3});
  status = range.Apply(kResid, x);
  EXPECT_NE(status.message().find("position 5 is out of range"), std::string::npos) << status;
}

}  // namespace
}  // namespace remotelens
