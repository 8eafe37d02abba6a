#include "server/executor.h"

#include <ATen/ATen.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "engine/test_model.h"
#include "gtest/gtest.h"
#include "server/tensor_codec.h"

namespace remotelens {
namespace {

struct ExecutorTestModel {
  static constexpr char kName[] = "executor_test";
  static DemoModelSpec Spec() { return SmallSpec(32, 2, 32); }
};
using ExecutorTest = SharedModelTest<ExecutorTestModel>;

// One run's job and what came back for it.
struct Outcome {
  std::map<std::string, at::Tensor> tensors;
  std::optional<absl::Status> status;
};

Scheduler::Job MakeJob(uint64_t id, JobKind kind, const at::Tensor& tokens,
                       std::shared_ptr<JobPayload> payload) {
  Scheduler::Job job;
  job.id = id;
  job.user = "u" + std::to_string(id);
  job.kind = kind;
  job.tokens = tokens.numel();
  job.payload = std::move(payload);
  return job;
}

Scheduler::Job RunJob(uint64_t id, const at::Tensor& tokens, Outcome* out) {
  auto payload = std::make_shared<RunPayload>();
  payload->run.input.tokens = tokens;
  payload->run.cache = {CacheRequest{{1, HookSite::kResidPost}}};
  payload->run.stream_cache = true;
  auto assembler = std::make_shared<ChunkAssembler>();
  payload->emit = [assembler, out](v1::TensorChunk&& chunk) -> absl::Status {
    auto done = assembler->Add(chunk);
    if (!done.ok()) return done.status();
    if (done->has_value()) out->tensors[(*done)->first] = (*done)->second;
    return absl::OkStatus();
  };
  payload->done = [out](absl::StatusOr<v1::RunResponse::Summary> summary) {
    out->status = summary.status();
  };
  return MakeJob(id, JobKind::kRun, tokens, std::move(payload));
}

std::vector<at::Tensor> Prompts() {
  return {at::tensor({1, 2, 3, 4, 5}, at::kLong).view({1, 5}),
          at::tensor({7, 8}, at::kLong).view({1, 2}),
          at::tensor({9, 10, 11, 12, 13, 14, 15, 16}, at::kLong).view({2, 4})};
}

// Each prompt run by an executor that never shares a forward.
std::vector<Outcome> Alone(const LlamaModel& model) {
  ModelExecutor::Options options;
  options.max_batch_requests = 1;
  ModelExecutor executor(model, nullptr, options);
  const std::vector<at::Tensor> prompts = Prompts();
  std::vector<Outcome> outcomes(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    std::vector<Scheduler::Job> jobs;
    jobs.push_back(RunJob(i + 1, prompts[i], &outcomes[i]));
    executor.Execute(std::move(jobs));
  }
  return outcomes;
}

using MakeJobFn = std::function<Scheduler::Job(size_t index, const at::Tensor& prompt, Outcome* out)>;

// Every prompt's job handed to one executor in one batch, then empty batches (decode steps)
// while generations remain.
std::vector<Outcome> AllAtOnce(const LlamaModel& model, ModelExecutor::Options options,
                               const MakeJobFn& make) {
  ModelExecutor executor(model, nullptr, std::move(options));
  const std::vector<at::Tensor> prompts = Prompts();
  std::vector<Outcome> outcomes(prompts.size());
  std::vector<Scheduler::Job> jobs;
  for (size_t i = 0; i < prompts.size(); ++i) jobs.push_back(make(i, prompts[i], &outcomes[i]));
  executor.Execute(std::move(jobs));
  for (int steps = 0; executor.Busy(); ++steps) {
    EXPECT_LT(steps, 50);
    if (steps >= 50) break;
    executor.Execute({});
  }
  return outcomes;
}

std::vector<Outcome> AllAtOnce(const LlamaModel& model, ModelExecutor::Options options) {
  return AllAtOnce(model, std::move(options), [](size_t i, const at::Tensor& prompt, Outcome* out) {
    return RunJob(i + 1, prompt, out);
  });
}

void ExpectSame(const std::vector<Outcome>& got, const std::vector<Outcome>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_TRUE(got[i].status.has_value() && got[i].status->ok()) << i;
    ASSERT_EQ(got[i].tensors.size(), 2u) << i;  // blocks.1.hook_resid_post and logits
    for (const auto& [name, tensor] : want[i].tensors) {
      ASSERT_TRUE(got[i].tensors.count(name)) << name;
      EXPECT_TRUE(at::allclose(got[i].tensors.at(name), tensor, 0, 1e-5)) << i << " " << name;
    }
  }
}

TEST_F(ExecutorTest, RunsShareAForwardWhenItFits) {
  const std::vector<Outcome> alone = Alone(*model_);
  std::vector<ForwardSize> asked;
  ModelExecutor::Options options;
  options.shared_fits = [&](const ForwardSize& size, int64_t) {
    asked.push_back(size);
    return absl::OkStatus();
  };
  const std::vector<Outcome> outcomes = AllAtOnce(*model_, options);
  ASSERT_EQ(asked.size(), 1u);  // one shared forward of 4 rows, left-padded to 5 positions
  EXPECT_EQ(asked[0].batch, 4);
  EXPECT_EQ(asked[0].pos, 5);
  ExpectSame(outcomes, alone);
}

TEST_F(ExecutorTest, RunsGoOneAtATimeWhenTheSharedForwardDoesNotFit) {
  const std::vector<Outcome> alone = Alone(*model_);
  int asked = 0;
  ModelExecutor::Options options;
  options.shared_fits = [&](const ForwardSize& size, int64_t) {
    ++asked;
    return size.batch > 1 ? absl::ResourceExhaustedError("does not fit") : absl::OkStatus();
  };
  const std::vector<Outcome> outcomes = AllAtOnce(*model_, options);
  EXPECT_EQ(asked, 1);
  ExpectSame(outcomes, alone);  // each ran alone, on the plan prepared for the group
}

// A greedy generation's job; `out` gets its sequences (from the Done message) and status.
Scheduler::Job GenerateJob(uint64_t id, const at::Tensor& tokens, int64_t new_tokens, Outcome* out) {
  auto payload = std::make_shared<GeneratePayload>();
  payload->generate.tokens = tokens;
  payload->generate.options.max_new_tokens = new_tokens;
  payload->generate.options.sampling.do_sample = false;
  payload->generate.options.stop_at_eos = false;
  payload->token_text = [](int64_t) { return std::string(); };
  payload->emit = [out](v1::GenerateResponse&& response) -> absl::Status {
    if (response.has_done()) {
      absl::StatusOr<at::Tensor> sequences = TensorFromProto(response.done().sequences(), "sequences");
      if (!sequences.ok()) return sequences.status();
      out->tensors["sequences"] = *sequences;
    }
    return absl::OkStatus();
  };
  payload->done = [out](absl::Status status) { out->status = status; };
  return MakeJob(id, JobKind::kGenerate, tokens, std::move(payload));
}

// Every prompt's greedy generation (4, 5, 6 new tokens) handed to one executor at once.
std::vector<Outcome> GenerateAll(const LlamaModel& model, ModelExecutor::Options options) {
  return AllAtOnce(model, std::move(options), [](size_t i, const at::Tensor& prompt, Outcome* out) {
    return GenerateJob(i + 1, prompt, 4 + static_cast<int64_t>(i), out);
  });
}

TEST_F(ExecutorTest, GenerationsArrivingTogetherShareOnePrefillAndEqualEachAlone) {
  ModelExecutor::Options one;
  one.max_batch_requests = 1;
  const std::vector<Outcome> alone = GenerateAll(*model_, one);
  std::vector<ForwardSize> asked;
  ModelExecutor::Options options;
  options.shared_fits = [&](const ForwardSize& size, int64_t) {
    asked.push_back(size);
    return absl::OkStatus();
  };
  const std::vector<Outcome> together = GenerateAll(*model_, options);
  ASSERT_EQ(asked.size(), 1u);  // one prefill of 4 rows, left-padded to 5 positions
  EXPECT_EQ(asked[0].batch, 4);
  EXPECT_EQ(asked[0].pos, 5);
  // When that prefill would not fit, each prompt's goes alone; the results are the same.
  options.shared_fits = [](const ForwardSize& size, int64_t) {
    return size.batch > 1 ? absl::ResourceExhaustedError("does not fit") : absl::OkStatus();
  };
  const std::vector<Outcome> one_by_one = GenerateAll(*model_, options);
  for (size_t i = 0; i < alone.size(); ++i) {
    for (const std::vector<Outcome>* got : {&together, &one_by_one}) {
      ASSERT_TRUE((*got)[i].status.has_value() && (*got)[i].status->ok()) << i;
      ASSERT_TRUE(alone[i].status.has_value() && alone[i].status->ok()) << i;
      const at::Tensor& want = alone[i].tensors.at("sequences");
      EXPECT_EQ(want.size(1), Prompts()[i].size(1) + 4 + static_cast<int64_t>(i));
      EXPECT_TRUE(at::equal((*got)[i].tensors.at("sequences"), want)) << i;
    }
  }
}

}  // namespace
}  // namespace remotelens
