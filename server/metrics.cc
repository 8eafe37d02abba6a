#include "server/metrics.h"

#include <map>

#include "absl/strings/strip.h"

namespace remotelens {
namespace {

// Index i is the `method` label of index i in the per-method arrays; the last one is "other".
constexpr std::array<absl::string_view, 19> kMethodLabels = {
    "GetModelInfo", "Tokenize",   "Detokenize",  "CreateSession", "CloseSession", "ListSessions",
    "AddHook",      "RemoveHook", "ListHooks",   "ResetHooks",    "Run",          "RunInteractive",
    "Generate",     "FetchCache", "DeleteCache", "GetWeights",    "ListJobs",     "CancelJob",
    "other",
};
constexpr int kOtherMethodIndex = static_cast<int>(kMethodLabels.size()) - 1;

// Indexed by the numeric value of absl::StatusCode (0..16), which is also gRPC's.
constexpr std::array<absl::string_view, 17> kCodeLabels = {
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
};
constexpr int kUnknownCodeIndex = 2;

// What gRPC's server-side interceptors report as the method name.
constexpr absl::string_view kServicePrefix = "/remotelens.v1.RemoteLens/";

int MethodIndex(absl::string_view method) {
  absl::ConsumePrefix(&method, kServicePrefix);
  for (int i = 0; i < kOtherMethodIndex; ++i) {
    if (kMethodLabels[i] == method) return i;
  }
  return kOtherMethodIndex;
}

int CodeIndex(absl::StatusCode code) {
  const int value = static_cast<int>(code);
  return value >= 0 && value < static_cast<int>(kCodeLabels.size()) ? value : kUnknownCodeIndex;
}

template <typename Builder>
auto& Register(Builder builder, prometheus::Registry& registry, const std::string& name,
               const std::string& help) {
  return builder.Name(name).Help(help).Register(registry);
}

}  // namespace

absl::string_view MetricMethodLabel(absl::string_view method) {
  return kMethodLabels[MethodIndex(method)];
}

absl::string_view MetricCodeLabel(absl::StatusCode code) { return kCodeLabels[CodeIndex(code)]; }

std::vector<double> LatencyBucketsSeconds() {
  return {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60};
}

ServerMetrics::ServerMetrics(prometheus::Registry& registry,
                             const std::vector<std::string>& devices)
    : requests_(Register(prometheus::BuildCounter(), registry, "remotelens_rpc_requests_total",
                         "Finished RPCs by method and gRPC status code.")),
      latency_(Register(prometheus::BuildHistogram(), registry, "remotelens_rpc_latency_seconds",
                        "RPC wall time from arrival to final status, in seconds.")),
      device_memory_(Register(prometheus::BuildGauge(), registry, "remotelens_device_memory_bytes",
                              "Memory allocated on each model device, in bytes.")),
      model_info_(Register(prometheus::BuildGauge(), registry, "remotelens_model_info",
                           "Always 1; labels name the served model and its dtype.")),
      user_jobs_(Register(prometheus::BuildCounter(), registry, "remotelens_user_jobs_total",
                          "Model jobs (Run, RunInteractive, Generate) started, by user.")),
      user_queue_wait_(Register(prometheus::BuildHistogram(), registry,
                                "remotelens_user_queue_wait_seconds",
                                "Time a user's job waited in the scheduler queue, in seconds.")),
      user_tokens_(Register(prometheus::BuildCounter(), registry, "remotelens_user_tokens_total",
                            "Tokens run through the model for each user.")),
      user_streamed_bytes_(Register(prometheus::BuildCounter(), registry,
                                    "remotelens_user_streamed_bytes_total",
                                    "Tensor bytes streamed to each user.")),
      jobs_running_(Register(prometheus::BuildGauge(), registry, "remotelens_jobs_running",
                             "Jobs the model thread holds now (running or mid-generation), by kind.")),
      batch_requests_(Register(prometheus::BuildHistogram(), registry, "remotelens_batch_requests",
                               "Requests sharing one engine forward.")
                          .Add({}, prometheus::Histogram::BucketBoundaries{1, 2, 4, 8, 16, 32, 64})),
      batch_tokens_(Register(prometheus::BuildHistogram(), registry, "remotelens_batch_tokens",
                             "Rows x positions of one engine forward, padding included.")
                        .Add({}, prometheus::Histogram::BucketBoundaries{
                                     16, 64, 256, 1024, 4096, 16384, 65536})),
      queue_depth_(Register(prometheus::BuildGauge(), registry, "remotelens_queue_depth",
                            "Requests waiting in the scheduler queue.")
                       .Add({})),
      queue_wait_(Register(prometheus::BuildHistogram(), registry, "remotelens_queue_wait_seconds",
                           "Time a request waited in the scheduler queue, in seconds.")
                      .Add({}, LatencyBucketsSeconds())),
      forward_(Register(prometheus::BuildHistogram(), registry, "remotelens_forward_seconds",
                        "Duration of one engine forward pass, in seconds.")
                   .Add({}, LatencyBucketsSeconds())),
      tokens_(Register(prometheus::BuildCounter(), registry, "remotelens_tokens_processed_total",
                       "Tokens run through the model (prompt and generated).")
                  .Add({})),
      streamed_bytes_(Register(prometheus::BuildCounter(), registry,
                               "remotelens_activation_bytes_streamed_total",
                               "Tensor bytes streamed to clients (activations, caches, weights).")
                          .Add({})),
      active_sessions_(Register(prometheus::BuildGauge(), registry, "remotelens_active_sessions",
                                "Open sessions over all users.")
                           .Add({})),
      session_hooks_(Register(prometheus::BuildGauge(), registry, "remotelens_session_hooks",
                              "Hooks registered over all open sessions.")
                         .Add({})),
      stored_cache_bytes_(Register(prometheus::BuildGauge(), registry,
                                   "remotelens_stored_cache_bytes",
                                   "Bytes of activation caches stored in sessions.")
                              .Add({})) {
  for (const std::string& device : devices) {
    if (device_memory_by_device_.contains(device)) continue;
    device_memory_by_device_[device] = &device_memory_.Add({{"device", device}});
  }
  for (const char* kind : {"run", "interactive", "generate"}) jobs_running_.Add({{"kind", kind}});
  anonymous_ = MakeUserSeries("anonymous");
  other_ = MakeUserSeries("other");
}

ServerMetrics::UserSeries ServerMetrics::MakeUserSeries(const std::string& label) {
  const std::map<std::string, std::string> labels{{"user", label}};
  return UserSeries{&user_jobs_.Add(labels), &user_queue_wait_.Add(labels, LatencyBucketsSeconds()),
                    &user_tokens_.Add(labels), &user_streamed_bytes_.Add(labels)};
}

void ServerMetrics::SetKnownUsers(const std::vector<std::string>& users) {
  for (const std::string& user : users) {
    if (user.empty() || user == "anonymous" || user == "other" || users_.contains(user)) continue;
    users_.emplace(user, MakeUserSeries(user));
  }
}

ServerMetrics::UserSeries& ServerMetrics::User(absl::string_view user) {
  if (user.empty() || user == "anonymous") return anonymous_;
  auto it = users_.find(user);
  return it == users_.end() ? other_ : it->second;
}

void ServerMetrics::RecordUserJob(absl::string_view user, double queue_seconds) {
  UserSeries& series = User(user);
  series.jobs->Increment();
  series.queue_wait->Observe(queue_seconds);
}

void ServerMetrics::AddUserTokens(absl::string_view user, int64_t n) {
  if (n > 0) User(user).tokens->Increment(static_cast<double>(n));
}

void ServerMetrics::AddUserStreamedBytes(absl::string_view user, int64_t n) {
  if (n > 0) User(user).streamed_bytes->Increment(static_cast<double>(n));
}

void ServerMetrics::ObserveBatch(int64_t requests, int64_t tokens) {
  batch_requests_.Observe(static_cast<double>(requests));
  batch_tokens_.Observe(static_cast<double>(tokens));
}

void ServerMetrics::SetJobsRunning(absl::string_view kind, int64_t n) {
  jobs_running_.Add({{"kind", std::string(kind)}}).Set(static_cast<double>(n));
}

prometheus::Counter& ServerMetrics::RequestCounter(int method_index, int code_index) {
  std::atomic<prometheus::Counter*>& slot = request_counters_[method_index][code_index];
  prometheus::Counter* counter = slot.load(std::memory_order_acquire);
  if (counter == nullptr) {
    counter = &requests_.Add({{"method", std::string(kMethodLabels[method_index])},
                              {"code", std::string(kCodeLabels[code_index])}});
    slot.store(counter, std::memory_order_release);
  }
  return *counter;
}

prometheus::Histogram& ServerMetrics::LatencyHistogram(int method_index) {
  std::atomic<prometheus::Histogram*>& slot = latency_histograms_[method_index];
  prometheus::Histogram* histogram = slot.load(std::memory_order_acquire);
  if (histogram == nullptr) {
    histogram = &latency_.Add({{"method", std::string(kMethodLabels[method_index])}},
                              LatencyBucketsSeconds());
    slot.store(histogram, std::memory_order_release);
  }
  return *histogram;
}

void ServerMetrics::RecordRpc(absl::string_view method, absl::StatusCode code, double seconds) {
  const int method_index = MethodIndex(method);
  RequestCounter(method_index, CodeIndex(code)).Increment();
  LatencyHistogram(method_index).Observe(seconds);
}

void ServerMetrics::SetQueueDepth(int64_t depth) { queue_depth_.Set(static_cast<double>(depth)); }

void ServerMetrics::ObserveQueueWait(double seconds) { queue_wait_.Observe(seconds); }

void ServerMetrics::ObserveForward(double seconds) { forward_.Observe(seconds); }

// Counters only go up; a negative amount is a caller bug and is dropped rather than thrown.
void ServerMetrics::AddTokens(int64_t n) {
  if (n > 0) tokens_.Increment(static_cast<double>(n));
}

void ServerMetrics::AddStreamedBytes(int64_t n) {
  if (n > 0) streamed_bytes_.Increment(static_cast<double>(n));
}

void ServerMetrics::SetActiveSessions(int64_t n) { active_sessions_.Set(static_cast<double>(n)); }

void ServerMetrics::SetActiveHooks(int64_t n) { session_hooks_.Set(static_cast<double>(n)); }

void ServerMetrics::SetStoredCacheBytes(int64_t n) {
  stored_cache_bytes_.Set(static_cast<double>(n));
}

void ServerMetrics::SetDeviceMemoryBytes(absl::string_view device, int64_t bytes) {
  auto it = device_memory_by_device_.find(device);
  if (it == device_memory_by_device_.end()) return;
  it->second->Set(static_cast<double>(bytes));
}

void ServerMetrics::SetModelInfo(absl::string_view model_name, absl::string_view dtype) {
  absl::MutexLock lock(&model_info_mu_);
  if (model_info_series_ != nullptr) model_info_.Remove(model_info_series_);
  model_info_series_ =
      &model_info_.Add({{"model", std::string(model_name)}, {"dtype", std::string(dtype)}});
  model_info_series_->Set(1);
}

}  // namespace remotelens
