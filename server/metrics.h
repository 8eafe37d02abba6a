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

  // remotelens_device_memory_bytes{device}. A device not given at construction is ignored:
  // metrics never fail a request, and an unexpected label would be unbounded.
  void SetDeviceMemoryBytes(absl::string_view device, int64_t bytes);

  // remotelens_model_info{model,dtype} = 1. Always a single series: a new call replaces the
  // previous labels.
  void SetModelInfo(absl::string_view model_name, absl::string_view dtype);

 private:
  static constexpr int kNumMethodLabels = 17;  // 16 RPCs + "other"
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
