#include "engine/generator.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include "engine/test_model.h"
#include "gtest/gtest.h"

namespace remotelens {
namespace {

struct GeneratorTestModel {
  static constexpr char kName[] = "generator_test";
  static DemoModelSpec Spec() { return SmallSpec(64, 2, 64); }
};
using GeneratorTest = SharedModelTest<GeneratorTestModel>;

GenerateOptions Greedy(int64_t n) {
  GenerateOptions options;
  options.max_new_tokens = n;
  options.sampling.do_sample = false;
  options.stop_at_eos = false;
  return options;
}

TEST_F(GeneratorTest, GreedyKvCacheEqualsFullRecompute) {
  const at::Tensor prompt = at::tensor({10, 20, 30, 40, 50, 60, 70, 80, 90, 11, 12, 13, 14, 15}, at::kLong).view({2, 7});
  GenerateOptions options = Greedy(8);
  const at::Tensor cached = Generate(*model_, prompt, at::Tensor(), options, nullptr, nullptr).value();
  options.use_past_kv_cache = false;
  const at::Tensor full = Generate(*model_, prompt, at::Tensor(), options, nullptr, nullptr).value();
  EXPECT_EQ(cached.sizes(), (std::vector<int64_t>{2, 15}));
  EXPECT_TRUE(at::equal(cached, full));
  // Greedy steps are the argmax of a plain forward over the sequence so far.
  ForwardInput input;
  input.tokens = cached.narrow(1, 0, 14);
  const at::Tensor logits = model_->Forward(input).value();
  EXPECT_TRUE(at::equal(logits.select(1, 13).argmax(-1), cached.select(1, 14)));
}

TEST_F(GeneratorTest, CallbackSeesEveryStepAndCanStop) {
  const at::Tensor prompt = at::tensor({1, 2, 3}, at::kLong).view({1, 3});
  std::vector<int64_t> streamed;
  auto result = Generate(*model_, prompt, at::Tensor(), Greedy(5), nullptr,
                         [&](int64_t step, const at::Tensor& next) {
                           streamed.push_back(next[0].item<int64_t>());
                           return step == 2 ? absl::CancelledError("client went away") : absl::OkStatus();
                         });
  EXPECT_EQ(result.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(streamed.size(), 3u);
  const at::Tensor full = Generate(*model_, prompt, at::Tensor(), Greedy(3), nullptr, nullptr).value();
  for (int i = 0; i < 3; ++i) EXPECT_EQ(streamed[i], full[0][3 + i].item<int64_t>());
}

TEST_F(GeneratorTest, SteeringHookAppliesAtEveryStep) {
  const at::Tensor prompt = at::tensor({5, 6, 7}, at::kLong).view({1, 3});
  HookPlan plan(2);
  InterventionOp steer;
  steer.hook = {1, HookSite::kResidPost};
  steer.kind = OpKind::kAdd;
  steer.value = at::randn({64}, at::make_generator<at::CPUGeneratorImpl>(3)) * 20;
  ASSERT_TRUE(plan.AddIntervention(steer).ok());
  const at::Tensor steered = Generate(*model_, prompt, at::Tensor(), Greedy(6), &plan, nullptr).value();
  // Reference: steer a full forward each step, no cache.
  at::Tensor seq = prompt;
  for (int i = 0; i < 6; ++i) {
    HookPlan again(2);
    ASSERT_TRUE(again.AddIntervention(steer).ok());
    ForwardInput input;
    input.tokens = seq;
    const at::Tensor next = model_->Forward(input, &again).value().select(1, seq.size(1) - 1).argmax(-1);
    seq = at::cat({seq, next.unsqueeze(1)}, 1);
  }
  EXPECT_TRUE(at::equal(steered, seq));
  const at::Tensor plain = Generate(*model_, prompt, at::Tensor(), Greedy(6), nullptr, nullptr).value();
  EXPECT_FALSE(at::equal(steered, plain)) << "a strong steering vector must change the greedy text";
}

TEST_F(GeneratorTest, SeededSamplingIsReproducibleAndStopsAtEos) {
  const at::Tensor prompt = at::tensor({5, 6, 7}, at::kLong).view({1, 3});
  GenerateOptions options;
  options.max_new_tokens = 12;
  options.seed = 42;
  options.stop_at_eos = false;
  const at::Tensor a = Generate(*model_, prompt, at::Tensor(), options, nullptr, nullptr).value();
  const at::Tensor b = Generate(*model_, prompt, at::Tensor(), options, nullptr, nullptr).value();
  EXPECT_TRUE(at::equal(a, b));
  // Declare the 2nd sampled token an eos id: generation must stop right there.
  options.stop_at_eos = true;
  options.eos_token_ids = {a[0][4].item<int64_t>()};
  const at::Tensor stopped = Generate(*model_, prompt, at::Tensor(), options, nullptr, nullptr).value();
  EXPECT_LE(stopped.size(1), 5);
  EXPECT_EQ(stopped[0][stopped.size(1) - 1].item<int64_t>(), options.eos_token_ids[0]);
}

TEST_F(GeneratorTest, RejectsBadOptions) {
  const at::Tensor prompt = at::tensor({5, 6, 7}, at::kLong).view({1, 3});
  GenerateOptions options = Greedy(0);
  EXPECT_EQ(Generate(*model_, prompt, at::Tensor(), options, nullptr, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
  options = Greedy(62);
  EXPECT_EQ(Generate(*model_, prompt, at::Tensor(), options, nullptr, nullptr).status().code(),
            absl::StatusCode::kOutOfRange);
  options = Greedy(2);
  options.sampling.do_sample = true;
  options.sampling.top_p = 0;
  EXPECT_EQ(Generate(*model_, prompt, at::Tensor(), options, nullptr, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace remotelens
