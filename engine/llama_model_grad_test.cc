// Gradients through the engine (issue 9): a differentiable forward gives the inference forward's
// outputs; cached gradients match finite differences of the forward itself (independent of
// autograd); backward ops rewrite the gradient for everything upstream, as TransformerLens's
// backward hooks do. Parity with the independent Python reference under torch autograd lives in
// tests/client/test_gradients.py.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <map>

#include "engine/llama_model.h"
#include "engine/test_model.h"
#include "gtest/gtest.h"

namespace remotelens {
namespace {

class GradientTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    DemoModelSpec spec = SmallSpec(32, 3, 64);
    spec.vocab_size = 300;
    spec.original_max_position_embeddings = 8;
    spec.seed = 11;
    test_model_ = new TestModel(MakeTestModel("llama_model_grad_test", spec));
    model_ = test_model_->model.get();
  }
  static void TearDownTestSuite() { delete test_model_; }

  static ForwardInput Input(bool differentiable) {
    ForwardInput input;
    input.tokens = at::randint(0, 300, {2, 7}, at::make_generator<at::CPUGeneratorImpl>(3), at::kLong);
    input.differentiable = differentiable;
    return input;
  }
  // A scalar metric of the logits that every position and vocabulary entry feeds.
  static at::Tensor Metric(const at::Tensor& logits) {
    const at::Tensor weights = at::linspace(-1, 1, logits.numel()).view(logits.sizes());
    return (logits * weights).sum();
  }
  // Runs the forward with `ops`, the metric, and the backward; gradients by hook.
  static std::map<std::string, at::Tensor> Gradients(const std::vector<HookId>& hooks,
                                                     std::vector<InterventionOp> ops = {}) {
    HookPlan plan(model_->config().n_layers);
    for (InterventionOp& op : ops) EXPECT_TRUE(plan.AddIntervention(std::move(op)).ok());
    for (HookId id : hooks) {
      CacheRequest request;
      request.hook = id;
      request.gradient = true;
      plan.AddCache(request);
    }
    auto logits = model_->Forward(Input(true), &plan);
    EXPECT_TRUE(logits.ok()) << logits.status();
    const at::Tensor metric = Metric(*logits);
    const absl::Status status = model_->Backward(metric, at::ones({}), &plan);
    EXPECT_TRUE(status.ok()) << status;
    std::map<std::string, at::Tensor> out;
    for (const auto& [id, g] : plan.gradient_cache()) out[HookName(id)] = g;
    return out;
  }
  // d(metric)/d(activation at `id`) along `direction`, by central differences of the forward
  // with `eps * direction` added at the hook.
  static double DirectionalDerivative(HookId id, const at::Tensor& direction, double eps) {
    auto metric_with = [&](double scale) {
      HookPlan plan(model_->config().n_layers);
      InterventionOp add;
      add.hook = id;
      add.kind = OpKind::kAdd;
      add.value = direction * scale;
      EXPECT_TRUE(plan.AddIntervention(add).ok());
      auto logits = model_->Forward(Input(false), &plan);
      EXPECT_TRUE(logits.ok()) << logits.status();
      return Metric(logits->to(at::kDouble)).item<double>();
    };
    return (metric_with(eps) - metric_with(-eps)) / (2 * eps);
  }

  static TestModel* test_model_;
  static LlamaModel* model_;
};
TestModel* GradientTest::test_model_ = nullptr;
LlamaModel* GradientTest::model_ = nullptr;

TEST_F(GradientTest, DifferentiableForwardGivesTheSameLogits) {
  auto fast = model_->Forward(Input(false));
  auto differentiable = model_->Forward(Input(true));
  ASSERT_TRUE(fast.ok() && differentiable.ok());
  EXPECT_FALSE(fast->requires_grad());
  EXPECT_TRUE(differentiable->requires_grad());
  EXPECT_LT((*fast - differentiable->detach()).abs().max().item<float>(), 1e-5);
  // Weights are frozen: nothing accumulates a gradient in them.
  ASSERT_TRUE(model_->Backward(Metric(*differentiable), at::ones({})).ok());
  EXPECT_FALSE(model_->weights().layers[0].w_qkv.grad().defined());
  EXPECT_FALSE(model_->weights().embed.grad().defined());
}

TEST_F(GradientTest, CachedGradientsMatchFiniteDifferencesOfTheForward) {
  const std::vector<HookId> hooks = {
      {-1, HookSite::kEmbed},       {0, HookSite::kResidPre},    {1, HookSite::kAttnQ},
      {1, HookSite::kAttnRotK},     {1, HookSite::kAttnPattern}, {1, HookSite::kAttnZ},
      {1, HookSite::kLn2Scale},     {2, HookSite::kMlpPost},     {2, HookSite::kResidPost},
      {-1, HookSite::kLnFinalNormalized}};
  const auto grads = Gradients(hooks);
  ASSERT_EQ(grads.size(), hooks.size());
  for (HookId id : hooks) {
    SCOPED_TRACE(HookName(id));
    const at::Tensor& g = grads.at(HookName(id));
    const at::Tensor direction =
        at::randn(g.sizes(), at::make_generator<at::CPUGeneratorImpl>(HookIndex(id, 3) + 1));
    const double expected = DirectionalDerivative(id, direction, 1e-2);
    const double actual = (g.to(at::kDouble) * direction.to(at::kDouble)).sum().item<double>();
    EXPECT_NEAR(actual, expected, 2e-3 * std::max(1.0, std::abs(expected)));
  }
}

TEST_F(GradientTest, GradientsHaveTransformerLensShapes) {
  const auto grads = Gradients({{0, HookSite::kAttnK}, {0, HookSite::kAttnScores}, {2, HookSite::kMlpPre}});
  const LlamaConfig& c = model_->config();
  EXPECT_EQ(grads.at("blocks.0.attn.hook_k").sizes(), (std::vector<int64_t>{2, 7, c.n_kv_heads, c.d_head}));
  EXPECT_EQ(grads.at("blocks.0.attn.hook_attn_scores").sizes(), (std::vector<int64_t>{2, c.n_heads, 7, 7}));
  EXPECT_EQ(grads.at("blocks.2.mlp.hook_pre").sizes(), (std::vector<int64_t>{2, 7, c.d_mlp}));
}

TEST_F(GradientTest, ZeroingTheGradientAtOneResidPreZeroesEverythingUpstream) {
  InterventionOp zero;
  zero.hook = {1, HookSite::kResidPre};
  zero.kind = OpKind::kZero;
  zero.backward = true;
  const std::vector<HookId> hooks = {{-1, HookSite::kEmbed}, {0, HookSite::kAttnV},
                                     {0, HookSite::kResidPost}, {1, HookSite::kResidPre},
                                     {1, HookSite::kResidMid}};
  const auto plain = Gradients(hooks);
  const auto zeroed = Gradients(hooks, {zero});
  // Upstream of blocks.1.hook_resid_pre, including blocks.0.hook_resid_post (the same tensor):
  for (const char* name : {"hook_embed", "blocks.0.attn.hook_v", "blocks.0.hook_resid_post"}) {
    SCOPED_TRACE(name);
    EXPECT_GT(plain.at(name).abs().max().item<float>(), 0);
    EXPECT_EQ(zeroed.at(name).abs().max().item<float>(), 0);
  }
  // Downstream the gradient is unchanged; at the hook, ops run in the order they were added (as
  // TransformerLens's backward hooks do), so the cache added after the zero op sees zeros.
  EXPECT_TRUE(at::allclose(zeroed.at("blocks.1.hook_resid_mid"), plain.at("blocks.1.hook_resid_mid")));
  EXPECT_EQ(zeroed.at("blocks.1.hook_resid_pre").abs().max().item<float>(), 0);

  // Scaling heads' gradient by 2 at one hook scales what flows upstream through it.
  InterventionOp scale;
  scale.hook = {0, HookSite::kResidPost};
  scale.kind = OpKind::kScale;
  scale.factor = 2.0;
  scale.backward = true;
  const auto scaled = Gradients(hooks, {scale});
  EXPECT_TRUE(at::allclose(scaled.at("hook_embed"), plain.at("hook_embed") * 2, 1e-4, 1e-6));
}

TEST_F(GradientTest, BadRequestsAreRefused) {
  HookPlan plan(model_->config().n_layers);
  CacheRequest request;
  request.hook = {0, HookSite::kResidPre};
  request.gradient = true;
  plan.AddCache(request);
  // Backward ops without a differentiable forward.
  EXPECT_EQ(model_->Forward(Input(false), &plan).status().code(), absl::StatusCode::kInvalidArgument);
  // A backward without a graph, and a gradient of the wrong shape.
  auto logits = model_->Forward(Input(false));
  ASSERT_TRUE(logits.ok());
  EXPECT_EQ(model_->Backward(*logits, at::ones_like(*logits)).code(), absl::StatusCode::kFailedPrecondition);
  auto graph = model_->Forward(Input(true));
  ASSERT_TRUE(graph.ok());
  const absl::Status wrong = model_->Backward(*graph, at::ones({2, 7}));
  EXPECT_EQ(wrong.code(), absl::StatusCode::kInvalidArgument) << wrong;
  EXPECT_NE(wrong.message().find("[2, 7, 300]"), std::string::npos) << wrong;
  // No key/value cache with gradients.
  KvCache kv;
  EXPECT_EQ(model_->Forward(Input(true), nullptr, &kv).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace remotelens
