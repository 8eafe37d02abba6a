#include "server/run_job.h"

#include <ATen/ATen.h>

#include "engine/test_model.h"
#include "gtest/gtest.h"
#include "server/tensor_codec.h"

namespace remotelens {
namespace {

struct RunJobTestModel {
  static constexpr char kName[] = "run_job_test";
  static DemoModelSpec Spec() { return SmallSpec(32, 2, 32); }
};
using RunJobTest = SharedModelTest<RunJobTestModel>;

TEST_F(RunJobTest, StreamsCacheInForwardOrderThenLogitsAndStores) {
  PreparedRun run;
  run.input.tokens = at::tensor({1, 2, 3, 4}, at::kLong).view({1, 4});
  run.cache = {CacheRequest{{1, HookSite::kResidPost}}, CacheRequest{{0, HookSite::kAttnPattern}}};
  run.stream_cache = true;
  run.store_cache = true;
  StoredCache stored;
  run.store = [&](StoredCache c) -> absl::StatusOr<std::string> {
    stored = std::move(c);
    return std::string("c1");
  };
  run.chunk_bytes = 64;  // force several chunks per tensor
  ChunkAssembler assembler;
  std::vector<std::pair<std::string, at::Tensor>> received;
  auto summary = ExecuteRun(*model_, run, [&](v1::TensorChunk&& chunk) -> absl::Status {
    EXPECT_LE(chunk.data().size(), 64u);
    auto done = assembler.Add(chunk);
    if (!done.ok()) return done.status();
    if (done->has_value()) received.push_back(std::move(**done));
    return absl::OkStatus();
  }, [] { return false; }, nullptr);
  ASSERT_TRUE(summary.ok()) << summary.status();
  ASSERT_EQ(received.size(), 3u);
  EXPECT_EQ(received[0].first, "blocks.0.attn.hook_pattern");  // forward order, not request order
  EXPECT_EQ(received[1].first, "blocks.1.hook_resid_post");
  EXPECT_EQ(received[2].first, "logits");
  EXPECT_EQ(summary->cache_handle(), "c1");
  EXPECT_EQ(summary->tokens_processed(), 4);

  // Equal to the engine called directly.
  HookPlan plan(2);
  plan.AddCache({{1, HookSite::kResidPost}});
  ForwardInput input;
  input.tokens = run.input.tokens;
  const at::Tensor logits = model_->Forward(input, &plan).value();
  EXPECT_TRUE(at::allclose(received[2].second, logits, 0, 1e-6));
  EXPECT_TRUE(at::allclose(received[1].second, plan.cache()[0].second, 0, 1e-6));
  ASSERT_EQ(stored.tensors.size(), 2u);
  EXPECT_EQ(stored.bytes, (4 * 32 + 4 * 4 * 4) * 4);
}

TEST_F(RunJobTest, QuotaCancellationAndLossErrors) {
  PreparedRun run;
  run.input.tokens = at::tensor({1, 2, 3}, at::kLong).view({1, 3});
  run.cache = {CacheRequest{{0, HookSite::kResidPost}}};
  run.stream_cache = true;
  run.max_streamed_bytes = 100;  // resid_post is 3 * 32 * 4 = 384 bytes
  auto ok_emit = [](v1::TensorChunk&&) { return absl::OkStatus(); };
  auto quota = ExecuteRun(*model_, run, ok_emit, [] { return false; }, nullptr);
  EXPECT_EQ(quota.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(quota.status().message().find("quota"), std::string::npos) << quota.status();

  run.max_streamed_bytes = 1 << 20;
  auto cancelled = ExecuteRun(*model_, run, ok_emit, [] { return true; }, nullptr);
  EXPECT_EQ(cancelled.status().code(), absl::StatusCode::kCancelled);

  PreparedRun loss;
  loss.input.tokens = at::tensor({5}, at::kLong).view({1, 1});
  loss.return_type = v1::RETURN_TYPE_LOSS;
  EXPECT_EQ(ExecuteRun(*model_, loss, ok_emit, [] { return false; }, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(RunJobTest, GenerateStreamsStepsThenDoneEqualToEngine) {
  PreparedGenerate job;
  job.tokens = at::tensor({3, 4, 5}, at::kLong).view({1, 3});
  job.options.max_new_tokens = 4;
  job.options.sampling.do_sample = false;
  job.options.stop_at_eos = false;
  job.step_cache = {CacheRequest{{1, HookSite::kResidPost}}};
  std::vector<int64_t> streamed;
  std::vector<std::string> kinds;
  absl::Status status = ExecuteGenerate(*model_, job, nullptr, [&](v1::GenerateResponse&& r) {
    kinds.push_back(r.has_step() ? "step" : r.has_tensor() ? "tensor" : "done");
    if (r.has_step()) streamed.push_back(r.step().tokens(0));
    return absl::OkStatus();
  }, [] { return false; }, nullptr);
  ASSERT_TRUE(status.ok()) << status;
  EXPECT_EQ(kinds, (std::vector<std::string>{"step", "tensor", "step", "tensor", "step", "tensor",
                                             "step", "tensor", "done"}));
  const at::Tensor direct = Generate(*model_, job.tokens, at::Tensor(), job.options, nullptr, nullptr).value();
  for (int i = 0; i < 4; ++i) EXPECT_EQ(streamed[i], direct[0][3 + i].item<int64_t>());
}

}  // namespace
}  // namespace remotelens
