// Every Prometheus series the server exports, created once on an injected registry.
//
// Label values are bounded by construction, so no client can grow the exposition: `method` only
// takes RemoteLens RPC names (anything else is "other"), `code` only the 17 canonical status
// code names, `device` only the devices given at construction.
//
//   auto registry = std::make_shared<prometheus::Registry>();
//   ServerMetrics metrics(*registry, {"cuda:0", "cuda:1"});
//   prometheus::Exposer exposer("127.0.0.1:9464");
//   exposer.RegisterCollectable(registry);
//
//   metrics.RecordRpc("Run", absl::StatusCode::kOk, 0.42);
//   // remotelens_rpc_requests_total{code="OK",method="Run"} 1
//   metrics.RecordRpc("/remotelens.v1.RemoteLens/Generate", absl::StatusCode::kCancelled, 3.0);
//   // remotelens_rpc_requests_total{code="CANCELLED",method="Generate"} 1
//
// Thread-safe; the registry must outlive this object.
#ifndef REMOTELENS_SERVER_METRICS_H_
#define REMOTELENS_SERVER_METRICS_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace remotelens {

// The `method` label for an RPC name, bare ("Run") or as gRPC spells it
// ("/remotelens.v1.RemoteLens/Run"); "other" for anything that is not a RemoteLens RPC.
absl::string_view MetricMethodLabel(absl::string_view method);

// The `code` label: "OK", "INVALID_ARGUMENT", ...; "UNKNOWN" for a value outside the 17 codes.
absl::string_view MetricCodeLabel(absl::StatusCode code);

// Upper bounds (seconds) of every latency histogram: 0.5 ms to 60 s in 1-2.5-5 steps, so
// `le` labels are round numbers an alert or SLO query can name ("le=\"0.1\"").
std::vector<double> LatencyBucketsSeconds();

class ServerMetrics {
 public:
  // `devices` ("cpu", "cuda:0", ...) are the only values the `device` label will take.
  ServerMetrics(prometheus::Registry& registry, const std::vector<std::string>& devices);
  ServerMetrics(const ServerMetrics&) = delete;
  ServerMetrics& operator=(const ServerMetrics&) = delete;

  // One finished RPC: remotelens_rpc_requests_total{method,code} and
  // remotelens_rpc_latency_seconds{method}.
  void RecordRpc(absl::string_view method, absl::StatusCode code, double seconds);

  void SetQueueDepth(int64_t depth);      // remotelens_queue_depth: requests waiting now
  void ObserveQueueWait(double seconds);  // remotelens_queue_wait_seconds: enqueue -> start
  void ObserveForward(double seconds);    // remotelens_forward_seconds: one engine forward
  void AddTokens(int64_t n);              // remotelens_tokens_processed_total
  void AddStreamedBytes(int64_t n);       // remotelens_activation_bytes_streamed_total
  void SetActiveSessions(int64_t n);      // remotelens_active_sessions
  void SetActiveHooks(int64_t n);         // remotelens_session_hooks: over all sessions
  void SetStoredCacheBytes(int64_t n);    // remotelens_stored_cache_bytes: over all sessions

  // Batching: remotelens_batch_requests (requests sharing one forward) and
  // remotelens_batch_tokens (rows x positions of that forward, padding included).
  void ObserveBatch(int64_t requests, int64_t tokens);
  // remotelens_jobs_running{kind}: jobs the model thread holds now, by kind.
  void SetJobsRunning(absl::string_view kind, int64_t n);

  // Per-user series, labelled user="<name>" for the users given here (the users file),
  // "anonymous" for requests without a user, and "other" for any other name, so the label's
  // values are bounded by the users file. Call once, before serving.
  void SetKnownUsers(const std::vector<std::string>& users);
  // A job of `user` started after waiting `queue_seconds`: remotelens_user_jobs_total{user},
  // remotelens_user_queue_wait_seconds{user}.
  void RecordUserJob(absl::string_view user, double queue_seconds);
  // remotelens_user_tokens_total{user}, remotelens_user_streamed_bytes_total{user}.
  void AddUserTokens(absl::string_view user, int64_t n);
  void AddUserStreamedBytes(absl::string_view user, int64_t n);

  // remotelens_device_memory_bytes{device}. A device not given at construction is ignored:
  // metrics never fail a request, and an unexpected label would be unbounded.
  void SetDeviceMemoryBytes(absl::string_view device, int64_t bytes);

  // remotelens_model_info{model,dtype} = 1. Always a single series: a new call replaces the
  // previous labels.
  void SetModelInfo(absl::string_view model_name, absl::string_view dtype);

 private:
  static constexpr int kNumMethodLabels = 19;  // 18 RPCs + "other"
  static constexpr int kNumCodeLabels = 17;

  // Series are created on first use rather than all 17 x 17 up front, so /metrics does not list
  // hundreds of zeros. Family::Add is thread-safe and returns the same series for the same
  // labels, so two threads racing to fill a slot store the same pointer; after that the per-RPC
  // path is one atomic load, no lock and no label-map hashing.
  prometheus::Counter& RequestCounter(int method_index, int code_index);
  prometheus::Histogram& LatencyHistogram(int method_index);

  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Family<prometheus::Histogram>& latency_;
  prometheus::Family<prometheus::Gauge>& device_memory_;
  prometheus::Family<prometheus::Gauge>& model_info_;

  struct UserSeries {
    prometheus::Counter* jobs;
    prometheus::Histogram* queue_wait;
    prometheus::Counter* tokens;
    prometheus::Counter* streamed_bytes;
  };
  UserSeries& User(absl::string_view user);
  UserSeries MakeUserSeries(const std::string& label);

  prometheus::Family<prometheus::Counter>& user_jobs_;
  prometheus::Family<prometheus::Histogram>& user_queue_wait_;
  prometheus::Family<prometheus::Counter>& user_tokens_;
  prometheus::Family<prometheus::Counter>& user_streamed_bytes_;
  prometheus::Family<prometheus::Gauge>& jobs_running_;
  prometheus::Histogram& batch_requests_;
  prometheus::Histogram& batch_tokens_;
  // Filled by SetKnownUsers before serving, read-only afterwards ("anonymous" and "other" always).
  absl::flat_hash_map<std::string, UserSeries> users_;
  UserSeries anonymous_, other_;

  prometheus::Gauge& queue_depth_;
  prometheus::Histogram& queue_wait_;
  prometheus::Histogram& forward_;
  prometheus::Counter& tokens_;
  prometheus::Counter& streamed_bytes_;
  prometheus::Gauge& active_sessions_;
  prometheus::Gauge& session_hooks_;
  prometheus::Gauge& stored_cache_bytes_;
  // Filled in the constructor, read-only afterwards.
  absl::flat_hash_map<std::string, prometheus::Gauge*> device_memory_by_device_;

  std::array<std::array<std::atomic<prometheus::Counter*>, kNumCodeLabels>, kNumMethodLabels>
      request_counters_{};
  std::array<std::atomic<prometheus::Histogram*>, kNumMethodLabels> latency_histograms_{};

  absl::Mutex model_info_mu_;
  prometheus::Gauge* model_info_series_ ABSL_GUARDED_BY(model_info_mu_) = nullptr;
};

}  // namespace remotelens

#endif  // REMOTELENS_SERVER_METRICS_H_
