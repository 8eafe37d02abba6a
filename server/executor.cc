#include "server/executor.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <optional>
#include <utility>

#include "engine/forward_memory.h"
#include "engine/status_macros.h"

namespace remotelens {
namespace {

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

RunPayload& RunOf(Scheduler::Job& job) { return static_cast<RunPayload&>(*job.payload); }
GeneratePayload& GenerateOf(Scheduler::Job& job) { return static_cast<GeneratePayload&>(*job.payload); }

// Runs share a forward when they feed tokens through the same layers without a backward pass.
// A past_kv_cache run has earlier positions of its own, so it runs alone.
bool Batchable(const PreparedRun& run) {
  return run.input.tokens.defined() && !run.input.differentiable && !run.backward.has_value() &&
         !run.kv_cache.has_value();
}

bool SameLayers(const PreparedRun& a, const PreparedRun& b) {
  return a.input.start_at_layer == b.input.start_at_layer && a.input.stop_at_layer == b.input.stop_at_layer;
}

// A job an admin cancelled ends saying so, whatever check noticed it.
absl::Status Attributed(const Scheduler::Job& job, absl::Status status) {
  if (absl::IsCancelled(status) && job.cancel_requested && job.cancel_requested->load()) {
    return absl::CancelledError("cancelled by an admin (CancelJob)");
  }
  return status;
}

}  // namespace

struct ModelExecutor::Generation {
  Scheduler::Job job;
  std::unique_ptr<GenerateExecution> execution;
};

ModelExecutor::ModelExecutor(const LlamaModel& model, ServerMetrics* metrics, Options options)
    : model_(model), metrics_(metrics), options_(options), generations_(model) {}

ModelExecutor::~ModelExecutor() = default;

void ModelExecutor::Reject(Scheduler::Job& job, absl::Status status) {
  if (job.kind == JobKind::kGenerate) {
    GenerateOf(job).done(std::move(status));
  } else {
    RunOf(job).done(std::move(status));
  }
}

void ModelExecutor::Execute(std::vector<Scheduler::Job> jobs) {
  const size_t max_requests = static_cast<size_t>(std::max(1, options_.max_batch_requests));
  // Runs, grouped: compatible ones share a forward (in arrival order, at most max_requests each).
  std::vector<std::vector<Scheduler::Job*>> groups;
  const absl::Time started = absl::Now();
  for (Scheduler::Job& job : jobs) {
    if (job.kind == JobKind::kGenerate) {
      waiting_.push_back(std::move(job));
      continue;
    }
    RunOf(job).started = started;
    const PreparedRun& run = RunOf(job).run;
    std::vector<Scheduler::Job*>* group = nullptr;
    if (Batchable(run)) {
      for (auto& g : groups) {
        const PreparedRun& first = RunOf(*g.front()).run;
        if (g.size() < max_requests && Batchable(first) && SameLayers(first, run)) {
          group = &g;
          break;
        }
      }
    }
    if (group == nullptr) group = &groups.emplace_back();
    group->push_back(&job);
  }
  for (auto& group : groups) RunTogether(std::move(group));

  // Generations: fill the decode batch from those waiting (their prompts share one prefill
  // forward), then one shared decode step.
  std::vector<GenerationBatch::Request> joining;
  while (!waiting_.empty() && generations_.size() + joining.size() < max_requests) {
    Scheduler::Job job = std::move(waiting_.front());
    waiting_.pop_front();
    StartGeneration(std::move(job), &joining);
  }
  if (!joining.empty()) {
    int64_t longest = 0, rows = 0;
    for (const GenerationBatch::Request& r : joining) {
      longest = std::max(longest, r.tokens.size(1));
      rows += r.tokens.size(0);
    }
    const ForwardSize shared_size{rows, longest, 0};
    if (joining.size() > 1 &&
        !(options_.shared_fits ? options_.shared_fits(shared_size, joining_memory_limit_)
                               : CheckJobFits(model_, shared_size, 0, joining_memory_limit_))
             .ok()) {
      // The padded prefill of all of them would not fit: each prompt's forward alone (each was
      // checked to fit when prepared).
      for (GenerationBatch::Request& r : joining) {
        UseThreadsFor(r.tokens.numel());
        generations_.Join(std::move(r));
      }
    } else {
      UseThreadsFor(rows * longest);  // the prompts' forward (the decode step decides again)
      generations_.JoinAll(std::move(joining));
    }
  }
  if (!generations_.empty()) {
    const int64_t members = static_cast<int64_t>(generations_.size()), rows = generations_.rows();
    UseThreadsFor(rows);
    const auto start = std::chrono::steady_clock::now();
    generations_.Step();
    if (metrics_ != nullptr) {
      metrics_->ObserveForward(SecondsSince(start));
      metrics_->ObserveBatch(members, rows);
    }
  }
}

void ModelExecutor::UseThreadsFor(int64_t tokens) {
  ForwardThreadPolicy& policy = options_.threads;
  if (policy.small_threads <= 0) policy.small_threads = at::get_num_threads();
  UseForwardThreads(policy, tokens);
}

void ModelExecutor::FinishRun(Scheduler::Job& job, absl::StatusOr<v1::RunResponse::Summary> summary,
                              int64_t tokens, int64_t streamed) {
  RunPayload& payload = RunOf(job);
  if (!summary.ok()) summary = Attributed(job, summary.status());
  if (summary.ok()) {
    summary->set_queue_ms(absl::ToDoubleMilliseconds(payload.started - payload.enqueued));
  }
  if (metrics_ != nullptr) {
    metrics_->AddTokens(tokens);
    metrics_->AddUserTokens(job.user, tokens);
    metrics_->AddStreamedBytes(streamed);
    metrics_->AddUserStreamedBytes(job.user, streamed);
  }
  // The job leaves the job list before its client hears the end.
  if (scheduler_ != nullptr) scheduler_->Finished(job.id);
  payload.done(std::move(summary));
}

void ModelExecutor::RunAlone(Scheduler::Job& job, std::unique_ptr<RunExecution> prepared) {
  PreparedRun& run = RunOf(job).run;
  if (prepared == nullptr) {
    Scheduler::Job* j = &job;
    prepared = std::make_unique<RunExecution>(model_, run, RunOf(job).emit,
                                              [j] { return j->cancelled(); });
    if (absl::Status s = prepared->Prepare(); !s.ok()) return FinishRun(job, s, 0, 0);
  }
  RunExecution& execution = *prepared;
  UseThreadsFor(execution.tokens());
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<at::Tensor> output =
      model_.Forward(run.input, &execution.plan(), execution.kv_cache());
  const double seconds = SecondsSince(start);
  if (metrics_ != nullptr) {
    metrics_->ObserveForward(seconds);
    metrics_->ObserveBatch(1, execution.tokens());
  }
  if (!output.ok()) return FinishRun(job, output.status(), execution.tokens(), 0);
  absl::StatusOr<v1::RunResponse::Summary> summary = execution.Finish(std::move(*output), seconds);
  FinishRun(job, std::move(summary), execution.tokens(), execution.bytes_streamed());
}

void ModelExecutor::RunTogether(std::vector<Scheduler::Job*> group) {
  if (group.size() == 1) return RunAlone(*group.front());
  struct Part {
    Scheduler::Job* job;
    std::unique_ptr<RunExecution> execution;
  };
  std::vector<Part> parts;
  for (Scheduler::Job* job : group) {
    auto execution = std::make_unique<RunExecution>(model_, RunOf(*job).run, RunOf(*job).emit,
                                                    [job] { return job->cancelled(); });
    if (absl::Status s = execution->Prepare(); !s.ok()) {
      FinishRun(*job, s, 0, 0);
      continue;
    }
    parts.push_back(Part{job, std::move(execution)});
  }
  if (parts.empty()) return;
  int64_t longest = 0, rows = 0;
  for (const Part& p : parts) {
    const at::Tensor& tokens = p.execution->run().input.tokens;
    longest = std::max(longest, tokens.size(1));
    rows += tokens.size(0);
  }
  // The shared forward must fit as a whole; if it does not, its requests run one at a time.
  const PreparedRun& first = parts.front().execution->run();
  const ForwardSize shared_size{rows, longest, 0};
  if (parts.size() == 1 ||
      !(options_.shared_fits
            ? options_.shared_fits(shared_size, first.host_memory_limit_bytes)
            : CheckJobFits(model_, shared_size, 0, first.host_memory_limit_bytes))
           .ok()) {
    for (Part& p : parts) RunAlone(*p.job, std::move(p.execution));  // plans as prepared
    return;
  }
  std::vector<at::Tensor> tokens, masks;
  std::vector<int64_t> row_begin;
  HookPlan shared(model_.config().n_layers);
  int64_t row = 0;
  for (Part& p : parts) {
    const ForwardInput& in = p.execution->run().input;
    const int64_t n = in.tokens.size(0), pos = in.tokens.size(1), pad = longest - pos;
    const at::Tensor own_mask = in.attention_mask.defined() ? in.attention_mask.to(at::kCPU, at::kLong)
                                                            : at::ones({n, pos}, at::kLong);
    tokens.push_back(pad == 0 ? in.tokens.to(at::kLong)
                              : at::cat({at::zeros({n, pad}, at::kLong), in.tokens.to(at::kLong)}, 1));
    masks.push_back(pad == 0 ? own_mask : at::cat({at::zeros({n, pad}, at::kLong), own_mask}, 1));
    shared.AddRequestPlan(&p.execution->plan(), RowSlice{row, n, pos, pos});
    row_begin.push_back(row);
    row += n;
  }
  ForwardInput input;
  input.tokens = at::cat(tokens, 0);
  input.attention_mask = at::cat(masks, 0);
  input.start_at_layer = first.input.start_at_layer;
  input.stop_at_layer = first.input.stop_at_layer;
  UseThreadsFor(rows * longest);
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<at::Tensor> output = model_.Forward(input, &shared);
  const double seconds = SecondsSince(start);
  if (metrics_ != nullptr) {
    metrics_->ObserveForward(seconds);
    metrics_->ObserveBatch(static_cast<int64_t>(parts.size()), rows * longest);
  }
  for (size_t i = 0; i < parts.size(); ++i) {
    Part& p = parts[i];
    const int64_t tokens_i = p.execution->tokens();
    if (!output.ok()) {
      FinishRun(*p.job, output.status(), tokens_i, 0);
      continue;
    }
    if (!shared.request_status(i).ok()) {
      FinishRun(*p.job, shared.request_status(i), tokens_i, p.execution->bytes_streamed());
      continue;
    }
    const at::Tensor& in_tokens = p.execution->run().input.tokens;
    const int64_t n = in_tokens.size(0), pos = in_tokens.size(1);
    at::Tensor own = output->narrow(0, row_begin[i], n).narrow(1, longest - pos, pos).contiguous();
    absl::StatusOr<v1::RunResponse::Summary> summary = p.execution->Finish(std::move(own), seconds);
    FinishRun(*p.job, std::move(summary), tokens_i, p.execution->bytes_streamed());
    p.execution.reset();
  }
}

void ModelExecutor::StartGeneration(Scheduler::Job job,
                                    std::vector<GenerationBatch::Request>* joining) {
  auto generation = std::make_unique<Generation>();
  generation->job = std::move(job);
  Scheduler::Job* j = &generation->job;
  GeneratePayload& payload = GenerateOf(*j);
  generation->execution = std::make_unique<GenerateExecution>(
      model_, payload.generate, payload.token_text, payload.emit, [j] { return j->cancelled(); });
  GenerateExecution* execution = generation->execution.get();
  const uint64_t id = j->id;
  active_[id] = std::move(generation);
  if (absl::Status s = execution->Prepare(); !s.ok()) return FinishGeneration(id, s);
  PreparedGenerate& g = payload.generate;
  auto done = [this, id](absl::StatusOr<at::Tensor> sequences) {
    auto it = active_.find(id);
    if (it == active_.end()) return;
    absl::Status status = sequences.status();
    if (sequences.ok()) {
      if (metrics_ != nullptr) {
        metrics_->AddTokens(sequences->numel());
        metrics_->AddUserTokens(it->second->job.user, sequences->numel());
      }
      status = it->second->execution->Done(*sequences);
    }
    FinishGeneration(id, status);
  };
  if (!g.options.use_past_kv_cache) {
    // Full recompute each step: its own forwards, alone.
    UseThreadsFor(g.tokens.numel());
    done(Generate(model_, g.tokens, g.attention_mask, g.options, &execution->plan(),
                  [execution](int64_t step, const at::Tensor& next) { return execution->OnToken(step, next); }));
    return;
  }
  GenerationBatch::Request request;
  request.tokens = g.tokens;
  request.attention_mask = g.attention_mask;
  request.options = g.options;
  request.plan = &execution->plan();
  request.on_token = [execution](int64_t step, const at::Tensor& next) {
    return execution->OnToken(step, next);
  };
  request.on_done = std::move(done);
  joining_memory_limit_ = g.host_memory_limit_bytes;  // the server's, the same for every job
  joining->push_back(std::move(request));
}

void ModelExecutor::FinishGeneration(uint64_t id, absl::Status status) {
  auto it = active_.find(id);
  if (it == active_.end()) return;
  std::unique_ptr<Generation> generation = std::move(it->second);
  active_.erase(it);
  if (metrics_ != nullptr) {
    metrics_->AddStreamedBytes(generation->execution->bytes_streamed());
    metrics_->AddUserStreamedBytes(generation->job.user, generation->execution->bytes_streamed());
  }
  if (scheduler_ != nullptr) scheduler_->Finished(id);
  GenerateOf(generation->job).done(Attributed(generation->job, std::move(status)));
}

}  // namespace remotelens
