// Internal consistency of the forward pass. Parity with an independent reference implementation
// of Llama 3.1 lives in tests/test_parity.py; these tests check that the engine's own paths
// (hooks, padding, KV cache, layer ranges, device split) agree with each other.
#include "engine/llama_model.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <memory>

#include "engine/test_model.h"
#include "engine/model_dir.h"
#include "gtest/gtest.h"

namespace remotelens {
namespace {

class LlamaModelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    DemoModelSpec spec = SmallSpec(64, 3, 96);
    spec.vocab_size = 300;
    spec.original_max_position_embeddings = 16;
    spec.seed = 7;
    test_model_ = new TestModel(MakeTestModel("llama_model_test", spec));
    dir_ = &test_model_->dir;
    model_ = test_model_->model.get();
  }
  static void TearDownTestSuite() { delete test_model_; }

  static at::Tensor Tokens(int64_t batch, int64_t pos, int64_t seed) {
    return at::randint(0, 300, {batch, pos}, at::make_generator<at::CPUGeneratorImpl>(seed), at::kLong);
  }
  static at::Tensor Run(const ForwardInput& input, HookPlan* plan = nullptr, KvCache* kv = nullptr) {
    auto out = model_->Forward(input, plan, kv);
    EXPECT_TRUE(out.ok()) << out.status();
    return out.ok() ? *out : at::Tensor();
  }
  static float MaxDiff(const at::Tensor& a, const at::Tensor& b) {
    return (a - b).abs().max().item<float>();
  }

  static TestModel* test_model_;
  static std::string* dir_;
  static LlamaModel* model_;
};

TestModel* LlamaModelTest::test_model_ = nullptr;
std::string* LlamaModelTest::dir_ = nullptr;
LlamaModel* LlamaModelTest::model_ = nullptr;

TEST_F(LlamaModelTest, CachingEveryHookDoesNotChangeLogits) {
  ForwardInput input;
  input.tokens = Tokens(2, 20, 1);
  const at::Tensor plain = Run(input);
  ASSERT_EQ(plain.sizes(), (std::vector<int64_t>{2, 20, 300}));
  HookPlan plan(3);
  for (HookId id : AllHookIds(3)) plan.AddCache({id});
  const at::Tensor hooked = Run(input, &plan);
  EXPECT_LT(MaxDiff(plain, hooked), 1e-5);
  ASSERT_EQ(plan.cache().size(), static_cast<size_t>(NumHookIds(3)));
  for (const auto& [id, tensor] : plan.cache()) {
    std::vector<int64_t> expected = HookShape(id, model_->config());
    for (auto& d : expected) {
      if (d == -1) d = 0;
    }
    ASSERT_EQ(tensor.dim(), static_cast<int64_t>(expected.size())) << HookName(id);
    EXPECT_EQ(tensor.size(0), 2) << HookName(id);
    for (size_t i = 1; i < expected.size(); ++i) {
      if (expected[i] != 0) {
        EXPECT_EQ(tensor.size(i), expected[i]) << HookName(id);
      }
    }
  }
}

TEST_F(LlamaModelTest, HookResultSumsToAttnOut) {
  ForwardInput input;
  input.tokens = Tokens(1, 9, 2);
  HookPlan plan(3);
  plan.AddCache({{1, HookSite::kAttnResult}});
  plan.AddCache({{1, HookSite::kAttnOut}});
  const at::Tensor logits = Run(input, &plan);
  EXPECT_LT(MaxDiff(plan.cache()[0].second.sum(2), plan.cache()[1].second), 1e-5);
  EXPECT_LT(MaxDiff(logits, Run(input)), 1e-5);
}

// Helpers for the opt-in hook points: the cached tensor of `site` at `layer` in `plan`.
at::Tensor Cached(const HookPlan& plan, int layer, HookSite site) {
  for (const auto& [id, tensor] : plan.cache()) {
    if (id == HookId{layer, site}) return tensor;
  }
  ADD_FAILURE() << "not cached: " << HookName({layer, site});
  return at::Tensor();
}

TEST_F(LlamaModelTest, OptInHookPointsHoldTransformerLensValues) {
  // TransformerLens components/transformer_block.py: hook_attn_in and hook_q_input are resid_pre
  // repeated over n_heads, hook_k/v_input over n_key_value_heads; hook_mlp_in is resid_mid.
  // components/unembed.py: unembed.hook_in is ln_final's output, unembed.hook_out the logits.
  ForwardInput input;
  input.tokens = Tokens(2, 6, 11);
  const at::Tensor plain = Run(input);
  HookPlan plan(3);
  for (HookSite site : {HookSite::kResidPre, HookSite::kAttnIn, HookSite::kQInput, HookSite::kKInput,
                        HookSite::kVInput, HookSite::kResidMid, HookSite::kMlpIn}) {
    plan.AddCache({{1, site}});
  }
  plan.AddCache({{-1, HookSite::kLnFinalNormalized}});
  plan.AddCache({{-1, HookSite::kUnembedIn}});
  plan.AddCache({{-1, HookSite::kUnembedOut}});
  const at::Tensor logits = Run(input, &plan);
  EXPECT_LT(MaxDiff(logits, plain), 1e-5);
  const at::Tensor resid_pre = Cached(plan, 1, HookSite::kResidPre);
  ASSERT_EQ(Cached(plan, 1, HookSite::kAttnIn).sizes(), (std::vector<int64_t>{2, 6, 4, 64}));
  ASSERT_EQ(Cached(plan, 1, HookSite::kQInput).sizes(), (std::vector<int64_t>{2, 6, 4, 64}));
  ASSERT_EQ(Cached(plan, 1, HookSite::kKInput).sizes(), (std::vector<int64_t>{2, 6, 2, 64}));
  ASSERT_EQ(Cached(plan, 1, HookSite::kVInput).sizes(), (std::vector<int64_t>{2, 6, 2, 64}));
  for (int64_t head = 0; head < 4; ++head) {
    EXPECT_EQ(MaxDiff(Cached(plan, 1, HookSite::kQInput).select(2, head), resid_pre), 0.f);
    EXPECT_EQ(MaxDiff(Cached(plan, 1, HookSite::kAttnIn).select(2, head), resid_pre), 0.f);
  }
  EXPECT_EQ(MaxDiff(Cached(plan, 1, HookSite::kVInput).select(2, 1), resid_pre), 0.f);
  EXPECT_EQ(MaxDiff(Cached(plan, 1, HookSite::kMlpIn), Cached(plan, 1, HookSite::kResidMid)), 0.f);
  EXPECT_EQ(MaxDiff(Cached(plan, -1, HookSite::kUnembedOut), logits), 0.f);
  EXPECT_LT(MaxDiff(Cached(plan, -1, HookSite::kUnembedIn),
                    Cached(plan, -1, HookSite::kLnFinalNormalized) * model_->weights().ln_final),
            1e-6);
}

TEST_F(LlamaModelTest, ReplacedHeadInputsGoThroughTheirOwnNorm) {
  // A scale-by-1 op replaces each copy with equal values: the per-head path must reproduce the
  // shared one.
  ForwardInput input;
  input.tokens = Tokens(2, 7, 12);
  const at::Tensor plain = Run(input);
  for (HookSite site : {HookSite::kAttnIn, HookSite::kQInput, HookSite::kKInput, HookSite::kVInput}) {
    HookPlan plan(3);
    for (int layer = 0; layer < 3; ++layer) {
      InterventionOp op;
      op.hook = {layer, site};
      op.kind = OpKind::kScale;
      op.factor = 1.0;
      ASSERT_TRUE(plan.AddIntervention(op).ok());
    }
    EXPECT_LT(MaxDiff(Run(input, &plan), plain), 1e-4) << HookName({0, site});
  }
  // RMSNorm per copy: scaling one copy by 3 barely changes anything (only eps sees it) ...
  HookPlan scaled(3);
  InterventionOp op;
  op.hook = {1, HookSite::kKInput};
  op.kind = OpKind::kScale;
  op.factor = 3.0;
  ASSERT_TRUE(scaled.AddIntervention(op).ok());
  EXPECT_LT(MaxDiff(Run(input, &scaled), plain), 1e-3);
  // ... while zeroing one copy zeroes exactly that head's keys and nothing else.
  HookPlan zeroed(3);
  op.kind = OpKind::kZero;
  op.selector.heads = {1};
  ASSERT_TRUE(zeroed.AddIntervention(op).ok());
  zeroed.AddCache({{1, HookSite::kAttnK}});
  zeroed.AddCache({{1, HookSite::kAttnQ}});
  HookPlan reference(3);
  reference.AddCache({{1, HookSite::kAttnK}});
  reference.AddCache({{1, HookSite::kAttnQ}});
  const at::Tensor edited = Run(input, &zeroed);
  Run(input, &reference);
  const at::Tensor k = Cached(zeroed, 1, HookSite::kAttnK), k_ref = Cached(reference, 1, HookSite::kAttnK);
  EXPECT_EQ(k.select(2, 1).abs().max().item<float>(), 0.f);
  EXPECT_LT(MaxDiff(k.select(2, 0), k_ref.select(2, 0)), 1e-5);
  EXPECT_LT(MaxDiff(Cached(zeroed, 1, HookSite::kAttnQ), Cached(reference, 1, HookSite::kAttnQ)), 1e-5);
  EXPECT_GT(MaxDiff(edited, plain), 1e-3);
}

TEST_F(LlamaModelTest, AttnInFeedsKeysAndValuesFromTheFirstCopies) {
  // TransformerLens 4 (position_embeddings_attention.py): with grouped-query attention, keys and
  // values read hook_attn_in's first n_key_value_heads copies.
  ForwardInput input;
  input.tokens = Tokens(1, 5, 13);
  HookPlan plan(3), reference(3);
  InterventionOp op;
  op.hook = {0, HookSite::kAttnIn};
  op.kind = OpKind::kZero;
  op.selector.heads = {1};
  ASSERT_TRUE(plan.AddIntervention(op).ok());
  for (HookPlan* p : {&plan, &reference}) {
    for (HookSite site : {HookSite::kAttnQ, HookSite::kAttnK, HookSite::kAttnV}) p->AddCache({{0, site}});
  }
  Run(input, &plan);
  Run(input, &reference);
  for (HookSite site : {HookSite::kAttnQ, HookSite::kAttnK, HookSite::kAttnV}) {
    const at::Tensor got = Cached(plan, 0, site), want = Cached(reference, 0, site);
    EXPECT_EQ(got.select(2, 1).abs().max().item<float>(), 0.f) << HookName({0, site});
    EXPECT_LT(MaxDiff(got.select(2, 0), want.select(2, 0)), 1e-5) << HookName({0, site});
  }
  EXPECT_LT(MaxDiff(Cached(plan, 0, HookSite::kAttnQ).narrow(2, 2, 2),
                    Cached(reference, 0, HookSite::kAttnQ).narrow(2, 2, 2)), 1e-5);
}

TEST_F(LlamaModelTest, MlpInEditsReachTheMlpButNotTheResidualStream) {
  ForwardInput input;
  input.tokens = Tokens(1, 6, 14);
  HookPlan plan(3), reference(3);
  InterventionOp op;
  op.hook = {2, HookSite::kMlpIn};
  op.kind = OpKind::kAdd;
  op.value = at::full({64}, 0.5);
  ASSERT_TRUE(plan.AddIntervention(op).ok());
  for (HookPlan* p : {&plan, &reference}) {
    for (HookSite site : {HookSite::kResidMid, HookSite::kMlpOut, HookSite::kResidPost}) p->AddCache({{2, site}});
  }
  Run(input, &plan);
  Run(input, &reference);
  EXPECT_EQ(MaxDiff(Cached(plan, 2, HookSite::kResidMid), Cached(reference, 2, HookSite::kResidMid)), 0.f);
  EXPECT_GT(MaxDiff(Cached(plan, 2, HookSite::kMlpOut), Cached(reference, 2, HookSite::kMlpOut)), 1e-4);
  EXPECT_LT(MaxDiff(Cached(plan, 2, HookSite::kResidPost),
                    Cached(plan, 2, HookSite::kResidMid) + Cached(plan, 2, HookSite::kMlpOut)), 1e-5);
}

TEST_F(LlamaModelTest, HeadInputEditsDecodeIncrementallyAsInOneForward) {
  // Per-head projections of new positions append to the key/value cache like shared ones.
  const at::Tensor tokens = Tokens(1, 9, 16);
  auto plan_for = [] {
    auto plan = std::make_unique<HookPlan>(3);
    InterventionOp op;
    op.hook = {1, HookSite::kKInput};
    op.kind = OpKind::kScale;
    op.factor = -1.0;  // a negated copy: its RMSNorm keeps the sign, so keys flip
    op.selector.heads = {0};
    EXPECT_TRUE(plan->AddIntervention(op).ok());
    return plan;
  };
  ForwardInput full;
  full.tokens = tokens;
  auto full_plan = plan_for();
  const at::Tensor expected = Run(full, full_plan.get());
  EXPECT_GT(MaxDiff(expected, Run(full)), 1e-3);
  KvCache kv;
  ForwardInput prefix;
  prefix.tokens = tokens.narrow(1, 0, 6);
  auto prefix_plan = plan_for();
  EXPECT_LT(MaxDiff(Run(prefix, prefix_plan.get(), &kv), expected.narrow(1, 0, 6)), 1e-4);
  for (int64_t p = 6; p < 9; ++p) {
    ForwardInput step;
    step.tokens = tokens.narrow(1, p, 1);
    auto step_plan = plan_for();
    EXPECT_LT(MaxDiff(Run(step, step_plan.get(), &kv)[0][0], expected[0][p]), 1e-4) << p;
  }
}

TEST_F(LlamaModelTest, UnembedHookOutEditsAreTheLogits) {
  ForwardInput input;
  input.tokens = Tokens(1, 4, 15);
  HookPlan plan(3);
  InterventionOp op;
  op.hook = {-1, HookSite::kUnembedOut};
  op.kind = OpKind::kScale;
  op.factor = 2.0;
  ASSERT_TRUE(plan.AddIntervention(op).ok());
  EXPECT_LT(MaxDiff(Run(input, &plan), 2 * Run(input)), 1e-5);
}

TEST_F(LlamaModelTest, PatternRowsSumToOneAndAreCausal) {
  ForwardInput input;
  input.tokens = Tokens(2, 7, 3);
  HookPlan plan(3);
  plan.AddCache({{0, HookSite::kAttnPattern}});
  Run(input, &plan);
  const at::Tensor pattern = plan.cache()[0].second;  // [batch, heads, q, k]
  EXPECT_LT(MaxDiff(pattern.sum(-1), at::ones({2, 4, 7})), 1e-5);
  EXPECT_EQ(pattern.triu(1).abs().max().item<float>(), 0.f);
}

TEST_F(LlamaModelTest, LeftPaddedRowsMatchUnpaddedRuns) {
  const at::Tensor long_row = Tokens(1, 12, 4), short_row = Tokens(1, 8, 5);
  ForwardInput batch;
  batch.tokens = at::cat({long_row, at::cat({at::zeros({1, 4}, at::kLong), short_row}, 1)}, 0);
  batch.attention_mask = at::ones({2, 12}, at::kLong);
  batch.attention_mask[1].narrow(0, 0, 4).zero_();
  const at::Tensor padded = Run(batch);
  ForwardInput a, b;
  a.tokens = long_row;
  b.tokens = short_row;
  EXPECT_LT(MaxDiff(padded[0], Run(a)[0]), 1e-4);
  EXPECT_LT(MaxDiff(padded[1].narrow(0, 4, 8), Run(b)[0]), 1e-4);
  EXPECT_FALSE(at::isnan(padded).any().item<bool>()) << "padding rows must stay finite";
}

TEST_F(LlamaModelTest, KvCacheDecodingMatchesFullForward) {
  const at::Tensor tokens = Tokens(2, 15, 6);
  ForwardInput full;
  full.tokens = tokens;
  const at::Tensor expected = Run(full);
  KvCache kv;
  ForwardInput prefix;
  prefix.tokens = tokens.narrow(1, 0, 10);
  at::Tensor got = Run(prefix, nullptr, &kv);
  EXPECT_LT(MaxDiff(got, expected.narrow(1, 0, 10)), 1e-4);
  for (int64_t p = 10; p < 15; ++p) {
    ForwardInput step;
    step.tokens = tokens.narrow(1, p, 1);
    got = Run(step, nullptr, &kv);
    EXPECT_LT(MaxDiff(got[0][0], expected[0][p]), 1e-4) << "position " << p;
    EXPECT_LT(MaxDiff(got[1][0], expected[1][p]), 1e-4) << "position " << p;
  }
  EXPECT_EQ(kv.length(), 15);
}

TEST_F(LlamaModelTest, KvCacheWithLeftPaddingMatchesUnpadded) {
  const at::Tensor row = Tokens(1, 6, 8);
  ForwardInput prefix;
  prefix.tokens = at::cat({at::zeros({1, 3}, at::kLong), row.narrow(1, 0, 5)}, 1);
  prefix.attention_mask = at::tensor({0, 0, 0, 1, 1, 1, 1, 1}, at::kLong).view({1, 8});
  KvCache kv;
  Run(prefix, nullptr, &kv);
  ForwardInput step;
  step.tokens = row.narrow(1, 5, 1);
  const at::Tensor last = Run(step, nullptr, &kv);
  ForwardInput plain;
  plain.tokens = row;
  EXPECT_LT(MaxDiff(last[0][0], Run(plain)[0][5]), 1e-4);
}

TEST_F(LlamaModelTest, StopAndStartAtLayerCompose) {
  ForwardInput input;
  input.tokens = Tokens(2, 5, 9);
  HookPlan plan(3);
  plan.AddCache({{1, HookSite::kResidPost}});
  const at::Tensor logits = Run(input, &plan);
  input.stop_at_layer = 2;
  const at::Tensor resid = Run(input);
  ASSERT_EQ(resid.sizes(), (std::vector<int64_t>{2, 5, 64}));
  EXPECT_LT(MaxDiff(resid, plan.cache()[0].second), 1e-6);
  ForwardInput rest;
  rest.residual = resid;
  rest.start_at_layer = -1;  // the last block
  EXPECT_LT(MaxDiff(Run(rest), logits), 1e-5);
}

TEST_F(LlamaModelTest, InterventionOnNextResidPreLeavesCachedResidPostIntact) {
  ForwardInput input;
  input.tokens = Tokens(1, 4, 10);
  HookPlan plan(3);
  plan.AddCache({{0, HookSite::kResidPost}});
  InterventionOp zero;
  zero.hook = {1, HookSite::kResidPre};
  zero.kind = OpKind::kZero;
  ASSERT_TRUE(plan.AddIntervention(zero).ok());
  Run(input, &plan);
  EXPECT_GT(plan.cache()[0].second.abs().max().item<float>(), 0.1f);
}

TEST_F(LlamaModelTest, ZeroAblatingAHeadChangesOnlyLaterComputation) {
  ForwardInput input;
  input.tokens = Tokens(1, 6, 11);
  HookPlan plan(3);
  InterventionOp zero;
  zero.hook = {1, HookSite::kAttnZ};
  zero.kind = OpKind::kZero;
  zero.selector.heads = {2};
  ASSERT_TRUE(plan.AddIntervention(zero).ok());
  plan.AddCache({{1, HookSite::kAttnZ}});
  plan.AddCache({{0, HookSite::kResidPost}});
  const at::Tensor ablated = Run(input, &plan);
  EXPECT_EQ(plan.cache()[1].second.select(2, 2).abs().max().item<float>(), 0.f);
  EXPECT_GT(MaxDiff(ablated, Run(input)), 1e-3);
  HookPlan clean(3);
  clean.AddCache({{0, HookSite::kResidPost}});
  Run(input, &clean);
  EXPECT_TRUE(at::equal(clean.cache()[0].second, plan.cache()[0].second));
}

TEST_F(LlamaModelTest, LayersSplitAcrossDevicesGiveTheSameLogits) {
  LoadOptions split;
  split.devices = {at::Device(at::kCPU), at::Device(at::kCPU), at::Device(at::kCPU)};
  auto model = LoadModelDir(*dir_, split);
  ASSERT_TRUE(model.ok()) << model.status();
  ForwardInput input;
  input.tokens = Tokens(1, 5, 12);
  EXPECT_LT(MaxDiff((*model)->Forward(input).value(), Run(input)), 1e-6);
}

TEST_F(LlamaModelTest, BFloat16StaysCloseToFloat32) {
  LoadOptions bf16;
  bf16.dtype = at::kBFloat16;
  auto model = LoadModelDir(*dir_, bf16);
  ASSERT_TRUE(model.ok()) << model.status();
  ForwardInput input;
  input.tokens = Tokens(1, 8, 13);
  const at::Tensor logits = (*model)->Forward(input).value();
  EXPECT_EQ(logits.scalar_type(), at::kBFloat16);
  const at::Tensor reference = Run(input);
  // bf16 keeps 8 bits of mantissa; relative to the logits' spread this stays within a few %.
  EXPECT_LT(MaxDiff(logits.to(at::kFloat), reference) / reference.abs().max().item<float>(), 0.1);
}

TEST_F(LlamaModelTest, Float16LoadsWhereLibTorchCanMultiplyItElseIsRefusedAtLoad) {
  LoadOptions fp16;
  fp16.dtype = at::kHalf;
  auto model = LoadModelDir(*dir_, fp16);
  if (!model.ok()) {
    // LibTorch 1.13 has no float16 matmul on CPU: refused up front, with the alternatives.
    EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(model.status().message().find("Half is not supported on cpu"), std::string::npos)
        << model.status();
    EXPECT_NE(model.status().message().find("bfloat16 or float32"), std::string::npos);
    return;
  }
  ForwardInput input;
  input.tokens = Tokens(1, 8, 14);
  const at::Tensor logits = (*model)->Forward(input).value();
  EXPECT_EQ(logits.scalar_type(), at::kHalf);
  const at::Tensor reference = Run(input);
  EXPECT_LT(MaxDiff(logits.to(at::kFloat), reference) / reference.abs().max().item<float>(), 0.02);
}

TEST_F(LlamaModelTest, RejectsBadInputWithClearErrors) {
  ForwardInput input;
  input.tokens = at::tensor({1, 2, 300}, at::kLong).view({1, 3});
  auto out = model_->Forward(input);
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(out.status().message().find("token id 300 at [0, 2]"), std::string::npos) << out.status();

  input.tokens = at::zeros({1, 97}, at::kLong);
  out = model_->Forward(input);
  EXPECT_EQ(out.status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_NE(out.status().message().find("exceeds the model's maximum of 96"), std::string::npos);

  input.tokens = at::zeros({3}, at::kLong);
  EXPECT_EQ(model_->Forward(input).status().code(), absl::StatusCode::kInvalidArgument);

  input.tokens = at::zeros({1, 3}, at::kLong);
  input.attention_mask = at::ones({1, 2}, at::kLong);
  EXPECT_EQ(model_->Forward(input).status().code(), absl::StatusCode::kInvalidArgument);
  input.attention_mask = at::full({1, 3}, 2, at::kLong);
  EXPECT_EQ(model_->Forward(input).status().code(), absl::StatusCode::kInvalidArgument);

  input.attention_mask = at::Tensor();
  input.stop_at_layer = 4;
  EXPECT_EQ(model_->Forward(input).status().code(), absl::StatusCode::kInvalidArgument);

  ForwardInput wrong_residual;
  wrong_residual.start_at_layer = 1;
  wrong_residual.residual = at::zeros({1, 3, 7});
  EXPECT_EQ(model_->Forward(wrong_residual).status().code(), absl::StatusCode::kInvalidArgument);

  // A KV cache cannot outgrow n_ctx either.
  KvCache kv;
  ForwardInput prefix;
  prefix.tokens = at::zeros({1, 90}, at::kLong);
  ASSERT_TRUE(model_->Forward(prefix, nullptr, &kv).ok());
  prefix.tokens = at::zeros({1, 7}, at::kLong);
  EXPECT_EQ(model_->Forward(prefix, nullptr, &kv).status().code(), absl::StatusCode::kOutOfRange);
}

}  // namespace
}  // namespace remotelens
