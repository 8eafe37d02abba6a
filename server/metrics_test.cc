#include "server/metrics.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/exposer.h"
#include "prometheus/text_serializer.h"

namespace remotelens {
namespace {

using ::testing::Contains;
using ::testing::Not;

std::vector<std::string> ExpositionLines(prometheus::Registry& registry) {
  const std::string text = prometheus::TextSerializer().Serialize(registry.Collect());
  return absl::StrSplit(text, '\n', absl::SkipEmpty());
}

// Sample lines (not # HELP / # TYPE) of the series named exactly `name`.
std::vector<std::string> Samples(const std::vector<std::string>& lines, const std::string& name) {
  std::vector<std::string> samples;
  for (const std::string& line : lines) {
    if (absl::StartsWith(line, name + "{") || absl::StartsWith(line, name + " ")) {
      samples.push_back(line);
    }
  }
  return samples;
}

TEST(MetricLabels, MapOnlyKnownValues) {
  EXPECT_EQ(MetricMethodLabel("Run"), "Run");
  EXPECT_EQ(MetricMethodLabel("GetWeights"), "GetWeights");
  EXPECT_EQ(MetricMethodLabel("/remotelens.v1.RemoteLens/RunInteractive"), "RunInteractive");
  EXPECT_EQ(MetricMethodLabel("run"), "other");
  EXPECT_EQ(MetricMethodLabel("/grpc.health.v1.Health/Check"), "other");
  EXPECT_EQ(MetricMethodLabel("/other.Service/Run"), "other");
  EXPECT_EQ(MetricMethodLabel(""), "other");
  EXPECT_EQ(MetricCodeLabel(absl::StatusCode::kOk), "OK");
  EXPECT_EQ(MetricCodeLabel(absl::StatusCode::kResourceExhausted), "RESOURCE_EXHAUSTED");
  EXPECT_EQ(MetricCodeLabel(absl::StatusCode::kUnauthenticated), "UNAUTHENTICATED");
  EXPECT_EQ(MetricCodeLabel(static_cast<absl::StatusCode>(99)), "UNKNOWN");
  // Same spelling as Abseil for every canonical code.
  for (int code = 0; code <= 16; ++code) {
    EXPECT_EQ(MetricCodeLabel(static_cast<absl::StatusCode>(code)),
              absl::StatusCodeToString(static_cast<absl::StatusCode>(code)));
  }
}

TEST(ServerMetrics, ExportsRecordedValues) {
  prometheus::Registry registry;
  ServerMetrics metrics(registry, {"cpu", "cuda:0"});
  metrics.RecordRpc("Run", absl::StatusCode::kOk, 0.02);
  metrics.RecordRpc("/remotelens.v1.RemoteLens/Run", absl::StatusCode::kOk, 0.3);
  metrics.RecordRpc("Run", absl::StatusCode::kInvalidArgument, 0.0001);
  metrics.RecordRpc("Generate", absl::StatusCode::kCancelled, 100);
  metrics.SetQueueDepth(3);
  metrics.ObserveQueueWait(0.004);
  metrics.ObserveForward(0.2);
  metrics.ObserveForward(0.7);
  metrics.AddTokens(100);
  metrics.AddTokens(28);
  metrics.AddTokens(-5);  // ignored: counters never go down
  metrics.AddStreamedBytes(1 << 20);
  metrics.SetActiveSessions(4);
  metrics.SetActiveHooks(7);
  metrics.SetStoredCacheBytes(123456789);
  metrics.SetDeviceMemoryBytes("cuda:0", 1024);
  metrics.SetDeviceMemoryBytes("cuda:7", 99);  // not a configured device: ignored
  metrics.SetModelInfo("demo", "float32");

  const std::vector<std::string> lines = ExpositionLines(registry);
  for (const char* expected : {
           R"(remotelens_rpc_requests_total{code="OK",method="Run"} 2)",
           R"(remotelens_rpc_requests_total{code="INVALID_ARGUMENT",method="Run"} 1)",
           R"(remotelens_rpc_requests_total{code="CANCELLED",method="Generate"} 1)",
           R"(remotelens_rpc_latency_seconds_count{method="Run"} 3)",
           R"(remotelens_rpc_latency_seconds_bucket{method="Run",le="0.0005"} 1)",
           R"(remotelens_rpc_latency_seconds_bucket{method="Run",le="0.025"} 2)",
           R"(remotelens_rpc_latency_seconds_bucket{method="Run",le="0.25"} 2)",
           R"(remotelens_rpc_latency_seconds_bucket{method="Run",le="0.5"} 3)",
           R"(remotelens_rpc_latency_seconds_bucket{method="Run",le="+Inf"} 3)",
           R"(remotelens_rpc_latency_seconds_bucket{method="Generate",le="60"} 0)",
           R"(remotelens_rpc_latency_seconds_bucket{method="Generate",le="+Inf"} 1)",
           R"(remotelens_rpc_latency_seconds_sum{method="Generate"} 100)",
           "remotelens_queue_depth 3",
           "remotelens_queue_wait_seconds_count 1",
           R"(remotelens_queue_wait_seconds_bucket{le="0.0025"} 0)",
           R"(remotelens_queue_wait_seconds_bucket{le="0.005"} 1)",
           "remotelens_forward_seconds_count 2",
           R"(remotelens_forward_seconds_bucket{le="0.25"} 1)",
           R"(remotelens_forward_seconds_bucket{le="1"} 2)",
           "remotelens_tokens_processed_total 128",
           "remotelens_activation_bytes_streamed_total 1048576",
           "remotelens_active_sessions 4",
           "remotelens_session_hooks 7",
           "remotelens_stored_cache_bytes 123456789",
           R"(remotelens_device_memory_bytes{device="cuda:0"} 1024)",
           R"(remotelens_device_memory_bytes{device="cpu"} 0)",
           R"(remotelens_model_info{dtype="float32",model="demo"} 1)",
           "# TYPE remotelens_rpc_requests_total counter",
           "# TYPE remotelens_rpc_latency_seconds histogram",
           "# TYPE remotelens_queue_depth gauge",
       }) {
    EXPECT_THAT(lines, Contains(expected));
  }
  EXPECT_EQ(Samples(lines, "remotelens_device_memory_bytes").size(), 2u);
  EXPECT_EQ(Samples(lines, "remotelens_rpc_requests_total").size(), 3u);
  // 16 finite buckets + the implicit +Inf, per method that has been seen.
  EXPECT_EQ(LatencyBucketsSeconds().size(), 16u);
  EXPECT_EQ(Samples(lines, "remotelens_rpc_latency_seconds_bucket").size(), 2u * 17u);
}

TEST(ServerMetrics, UnknownMethodsShareOneBoundedSeries) {
  prometheus::Registry registry;
  ServerMetrics metrics(registry, {"cpu"});
  for (int i = 0; i < 1000; ++i) {
    metrics.RecordRpc(absl::StrCat("/evil.Service/Method", i), absl::StatusCode::kUnimplemented,
                      0.001);
  }
  metrics.RecordRpc("Tokenize", absl::StatusCode::kOk, 0.001);
  const std::vector<std::string> lines = ExpositionLines(registry);
  EXPECT_THAT(
      lines,
      Contains(R"(remotelens_rpc_requests_total{code="UNIMPLEMENTED",method="other"} 1000)"));
  EXPECT_THAT(lines, Contains(R"(remotelens_rpc_latency_seconds_count{method="other"} 1000)"));
  EXPECT_EQ(Samples(lines, "remotelens_rpc_requests_total").size(), 2u);
  EXPECT_EQ(Samples(lines, "remotelens_rpc_latency_seconds_count").size(), 2u);
  for (const std::string& line : lines) {
    EXPECT_FALSE(absl::StrContains(line, "evil")) << line;
  }
}

TEST(ServerMetrics, SeriesCountIsBoundedByMethodsTimesCodes) {
  const std::vector<std::string> rpcs = {
      "GetModelInfo", "Tokenize",     "Detokenize",  "CreateSession",
      "CloseSession", "ListSessions", "AddHook",     "RemoveHook",
      "ListHooks",    "ResetHooks",   "Run",         "RunInteractive",
      "Generate",     "FetchCache",   "DeleteCache", "GetWeights",
      "ListJobs",     "CancelJob"};
  prometheus::Registry registry;
  ServerMetrics metrics(registry, {"cpu"});
  for (int code = -1; code <= 20; ++code) {  // includes values outside the 17 codes
    const auto status_code = static_cast<absl::StatusCode>(code);
    for (const std::string& rpc : rpcs) {
      metrics.RecordRpc(absl::StrCat("/remotelens.v1.RemoteLens/", rpc), status_code, 0.01);
    }
    for (int i = 0; i < 50; ++i) {
      metrics.RecordRpc(absl::StrCat("made_up_", code, "_", i), status_code, 0.01);
    }
  }
  const std::vector<std::string> lines = ExpositionLines(registry);
  EXPECT_EQ(Samples(lines, "remotelens_rpc_requests_total").size(), 19u * 17u);
  EXPECT_EQ(Samples(lines, "remotelens_rpc_latency_seconds_count").size(), 19u);
  for (const std::string& rpc : rpcs) {
    // Codes -1, 17..20 all land on UNKNOWN, next to the real UNKNOWN (2).
    EXPECT_THAT(lines, Contains(absl::StrCat(R"(remotelens_rpc_requests_total{code="UNKNOWN",)",
                                             R"(method=")", rpc, R"("} 6)")));
  }
  EXPECT_THAT(lines, Contains(R"(remotelens_rpc_requests_total{code="OK",method="other"} 50)"));
  EXPECT_THAT(lines, Not(Contains(::testing::HasSubstr("made_up"))));
}

TEST(ServerMetrics, ModelInfoStaysASingleSeries) {
  prometheus::Registry registry;
  ServerMetrics metrics(registry, {});
  metrics.SetModelInfo("demo", "float32");
  metrics.SetModelInfo("Llama-3.1-8B", "bfloat16");
  metrics.SetModelInfo("Llama-3.1-8B", "bfloat16");
  const std::vector<std::string> lines = ExpositionLines(registry);
  const std::vector<std::string> samples = Samples(lines, "remotelens_model_info");
  ASSERT_EQ(samples.size(), 1u);
  EXPECT_EQ(samples[0], R"(remotelens_model_info{dtype="bfloat16",model="Llama-3.1-8B"} 1)");
}

TEST(ServerMetrics, ZeroValuedSingleSeriesExistBeforeAnyRecording) {
  // Dashboards and alerts need the series present (at 0) from the first scrape.
  prometheus::Registry registry;
  ServerMetrics metrics(registry, {"cpu"});
  const std::vector<std::string> lines = ExpositionLines(registry);
  for (const char* expected :
       {"remotelens_queue_depth 0", "remotelens_tokens_processed_total 0",
        "remotelens_activation_bytes_streamed_total 0", "remotelens_forward_seconds_count 0",
        "remotelens_queue_wait_seconds_count 0", "remotelens_active_sessions 0",
        "remotelens_session_hooks 0", "remotelens_stored_cache_bytes 0",
        R"(remotelens_device_memory_bytes{device="cpu"} 0)"}) {
    EXPECT_THAT(lines, Contains(expected));
  }
  EXPECT_TRUE(Samples(lines, "remotelens_rpc_requests_total").empty());
  EXPECT_TRUE(Samples(lines, "remotelens_model_info").empty());
}

// Plain HTTP/1.0 GET over a socket: enough to prove the exposer serves what the registry holds.
std::string HttpGet(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return "";
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string response;
  if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0) {
    const std::string request = absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: localhost\r\n\r\n");
    if (write(fd, request.data(), request.size()) == static_cast<ssize_t>(request.size())) {
      char buffer[4096];
      ssize_t n;
      while ((n = read(fd, buffer, sizeof(buffer))) > 0) response.append(buffer, n);
    }
  }
  close(fd);
  return response;
}

TEST(ServerMetrics, ExposerServesTheRegistry) {
  auto registry = std::make_shared<prometheus::Registry>();
  ServerMetrics metrics(*registry, {"cpu"});
  metrics.RecordRpc("GetModelInfo", absl::StatusCode::kOk, 0.001);
  metrics.AddTokens(42);

  prometheus::Exposer exposer("127.0.0.1:0");  // port 0: the kernel picks a free one
  exposer.RegisterCollectable(registry);
  const std::vector<int> ports = exposer.GetListeningPorts();
  ASSERT_EQ(ports.size(), 1u);
  ASSERT_GT(ports[0], 0);

  const std::string response = HttpGet(ports[0], "/metrics");
  EXPECT_TRUE(absl::StartsWith(response, "HTTP/1.1 200")) << response.substr(0, 200);
  EXPECT_TRUE(absl::StrContains(
      response, "\nremotelens_rpc_requests_total{code=\"OK\",method=\"GetModelInfo\"} 1\n"))
      << response;
  EXPECT_TRUE(absl::StrContains(response, "\nremotelens_tokens_processed_total 42\n"));
}

// Batching and per-user series: user labels come only from the users file, plus "anonymous"
// and "other", however many names requests carry.
TEST(ServerMetrics, BatchAndPerUserSeriesAreBounded) {
  prometheus::Registry registry;
  ServerMetrics metrics(registry, {"cpu"});
  metrics.SetKnownUsers({"alice", "bob"});
  metrics.ObserveBatch(3, 48);
  metrics.ObserveBatch(1, 16);
  metrics.SetJobsRunning("generate", 2);
  metrics.RecordUserJob("alice", 0.01);
  metrics.AddUserTokens("alice", 16);
  metrics.AddUserStreamedBytes("bob", 100);
  for (int i = 0; i < 100; ++i) metrics.RecordUserJob(absl::StrCat("mallory", i), 0.01);
  metrics.RecordUserJob("", 0.01);
  const std::vector<std::string> lines = ExpositionLines(registry);
  EXPECT_THAT(lines, Contains("remotelens_batch_requests_count 2"));
  EXPECT_THAT(lines, Contains("remotelens_batch_requests_sum 4"));
  EXPECT_THAT(lines, Contains(R"(remotelens_batch_requests_bucket{le="1"} 1)"));
  EXPECT_THAT(lines, Contains("remotelens_batch_tokens_sum 64"));
  EXPECT_THAT(lines, Contains(R"(remotelens_jobs_running{kind="generate"} 2)"));
  EXPECT_THAT(lines, Contains(R"(remotelens_jobs_running{kind="run"} 0)"));
  EXPECT_THAT(lines, Contains(R"(remotelens_user_jobs_total{user="alice"} 1)"));
  EXPECT_THAT(lines, Contains(R"(remotelens_user_jobs_total{user="other"} 100)"));
  EXPECT_THAT(lines, Contains(R"(remotelens_user_jobs_total{user="anonymous"} 1)"));
  EXPECT_THAT(lines, Contains(R"(remotelens_user_tokens_total{user="alice"} 16)"));
  EXPECT_THAT(lines, Contains(R"(remotelens_user_streamed_bytes_total{user="bob"} 100)"));
  EXPECT_EQ(Samples(lines, "remotelens_user_jobs_total").size(), 4u);  // alice, bob, anonymous, other
}

}  // namespace
}  // namespace remotelens
