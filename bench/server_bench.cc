// server_bench: benchmarks a running remotelens_server over loopback with a C++ gRPC client.
// Every figure is reported next to a baseline measured in the same run.
//
//   server_bench --mode=latency --address=127.0.0.1:50051
//       small Run round trips (1 x 8 tokens, logits only): p50/p99, vs the forward time the
//       server reports for the same calls (the server's own overhead = round trip - forward),
//       and vs a raw gRPC stream of the same bytes from an in-process server, interleaved
//   server_bench --mode=stream --address=... --cache_mb=64
//       streaming a large activation cache (Run with cache "*") vs a raw gRPC bytes stream of
//       the same size from an in-process server (same machine, same chunk size)
//   server_bench --mode=load --address=... --clients=32 --seconds=60 [--keys=KEY_A,KEY_B]
//       N concurrent clients issuing small Runs; with two keys, clients alternate between the
//       two users and the per-user completions are compared (fairness)
// Output: one JSON object per line.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_split.h"
#include "bench/raw_stream.grpc.pb.h"
#include "remotelens/v1/remotelens.grpc.pb.h"

ABSL_FLAG(std::string, mode, "latency", "latency | stream | load");
ABSL_FLAG(std::string, address, "127.0.0.1:50051", "remotelens_server address");
ABSL_FLAG(int, iters, 300, "latency: round trips");
ABSL_FLAG(int, pos, 8, "tokens per row for latency/load Runs");
ABSL_FLAG(int, cache_mb, 64, "stream: approximate activation bytes to stream (MiB)");
ABSL_FLAG(int, clients, 32, "load: concurrent clients");
ABSL_FLAG(int, seconds, 60, "load: duration");
ABSL_FLAG(std::string, keys, "", "load: API keys, comma-separated; clients alternate between them");

namespace rl = remotelens::v1;
using Clock = std::chrono::steady_clock;

namespace {

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5))];
}

rl::Tensor Tokens(int batch, int pos, int64_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int64_t> ids(batch * pos);
  for (auto& id : ids) id = rng() % vocab;
  rl::Tensor t;
  t.set_dtype(rl::DTYPE_INT64);
  t.add_shape(batch);
  t.add_shape(pos);
  t.set_data(ids.data(), ids.size() * sizeof(int64_t));
  return t;
}

// One Run; returns OK status and fills bytes/forward time.
grpc::Status RunOnce(rl::RemoteLens::Stub& stub, const rl::RunRequest& request, const std::string& key,
                     int64_t* bytes, double* forward_ms) {
  grpc::ClientContext ctx;
  if (!key.empty()) ctx.AddMetadata("authorization", "Bearer " + key);
  auto reader = stub.Run(&ctx, request);
  rl::RunResponse response;
  *bytes = 0;
  while (reader->Read(&response)) {
    if (response.has_tensor()) *bytes += response.tensor().data().size();
    if (response.has_summary()) *forward_ms = response.summary().forward_ms();
  }
  return reader->Finish();
}

class RawStreamService final : public remotelens::bench::RawStream::Service {
  grpc::Status Pull(grpc::ServerContext*, const remotelens::bench::PullRequest* request,
                    grpc::ServerWriter<remotelens::bench::RawChunk>* writer) override {
    std::string block(request->chunk_bytes(), 'x');
    remotelens::bench::RawChunk chunk;
    for (int64_t sent = 0; sent < request->total_bytes(); sent += request->chunk_bytes()) {
      chunk.set_data(block.data(), std::min<int64_t>(request->chunk_bytes(), request->total_bytes() - sent));
      writer->Write(chunk);
    }
    return grpc::Status::OK;
  }
};

// An in-process RawStream server on a free loopback port, and a stub for it.
struct RawServer {
  RawStreamService service;
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<remotelens::bench::RawStream::Stub> stub;

  RawServer() {
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&service);
    server = builder.BuildAndStart();
    stub = remotelens::bench::RawStream::NewStub(
        grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials()));
  }
  ~RawServer() { server->Shutdown(); }

  // Streams `total_bytes` in chunks of `chunk_bytes`; returns the bytes received.
  int64_t Pull(int64_t total_bytes, int64_t chunk_bytes) {
    remotelens::bench::PullRequest pull;
    pull.set_total_bytes(total_bytes);
    pull.set_chunk_bytes(chunk_bytes);
    grpc::ClientContext ctx;
    auto reader = stub->Pull(&ctx, pull);
    remotelens::bench::RawChunk chunk;
    int64_t got = 0;
    while (reader->Read(&chunk)) got += chunk.data().size();
    reader->Finish();
    return got;
  }
};

int Latency(rl::RemoteLens::Stub& stub, const rl::ModelInfo& info) {
  rl::RunRequest request;
  *request.mutable_tokens() = Tokens(1, absl::GetFlag(FLAGS_pos), info.d_vocab(), 1);
  RawServer raw;
  std::vector<double> round_trip, forward, raw_round_trip;
  // Blocks of 50 Runs then 50 raw pulls of the same bytes: interleaved often enough to share
  // the machine's state, rarely enough that each call finds its own server's threads warm.
  constexpr int kBlock = 50;
  int64_t bytes = 0;
  for (int done = -kBlock; done < absl::GetFlag(FLAGS_iters); done += kBlock) {  // first block: warm-up
    for (int i = 0; i < kBlock; ++i) {
      double fwd = 0;
      const auto start = Clock::now();
      grpc::Status s = RunOnce(stub, request, "", &bytes, &fwd);
      const double ms = Ms(Clock::now() - start);
      if (!s.ok()) {
        std::fprintf(stderr, "Run failed: %s\n", s.error_message().c_str());
        return 1;
      }
      if (done >= 0) {
        round_trip.push_back(ms);
        forward.push_back(fwd);
      }
    }
    for (int i = 0; i < kBlock; ++i) {
      const auto start = Clock::now();
      raw.Pull(bytes, 1 << 20);
      if (done >= 0) raw_round_trip.push_back(Ms(Clock::now() - start));
    }
  }
  const double p50 = Percentile(round_trip, 0.5), fwd50 = Percentile(forward, 0.5);
  const double raw50 = Percentile(raw_round_trip, 0.5);
  std::printf("{\"mode\": \"latency\", \"pos\": %d, \"iters\": %zu, \"round_trip_p50_ms\": %.3f, "
              "\"round_trip_p99_ms\": %.3f, \"forward_p50_ms\": %.3f, \"overhead_p50_ms\": %.3f, "
              "\"round_trip_over_forward\": %.2f, \"raw_grpc_p50_ms\": %.3f}\n",
              absl::GetFlag(FLAGS_pos), round_trip.size(), p50, Percentile(round_trip, 0.99), fwd50,
              p50 - fwd50, p50 / fwd50, raw50);
  return 0;
}

int Stream(rl::RemoteLens::Stub& stub, const rl::ModelInfo& info) {
  // Store every hook's activation of a batch sized to about cache_mb in a session, then time
  // FetchCache of it (pure transfer: tensors -> TensorChunks -> loopback -> client) against a
  // raw gRPC bytes stream of the same size and chunking from an in-process server.
  rl::Session session;
  {
    grpc::ClientContext ctx;
    if (!stub.CreateSession(&ctx, rl::CreateSessionRequest(), &session).ok()) return 1;
  }
  rl::RunRequest request;
  request.set_session_id(session.session_id());
  request.mutable_cache()->add_names("*");
  request.mutable_cache()->set_store(true);
  request.set_return_type(rl::RETURN_TYPE_NONE);
  const int pos = 64;
  int64_t bytes = 0;
  auto store = [&](int batch, std::string* handle) {
    *request.mutable_tokens() = Tokens(batch, pos, info.d_vocab(), 2);
    grpc::ClientContext ctx;
    auto reader = stub.Run(&ctx, request);
    rl::RunResponse response;
    while (reader->Read(&response)) {
      if (response.has_summary()) *handle = response.summary().cache_handle();
    }
    return reader->Finish().ok();
  };
  auto fetch = [&](const std::string& handle, int64_t* got) {
    rl::FetchCacheRequest fetch_request;
    fetch_request.set_session_id(session.session_id());
    fetch_request.set_cache_handle(handle);
    grpc::ClientContext ctx;
    auto reader = stub.FetchCache(&ctx, fetch_request);
    rl::TensorChunk chunk;
    *got = 0;
    while (reader->Read(&chunk)) *got += chunk.data().size();
    return reader->Finish().ok();
  };
  std::string handle;
  if (!store(1, &handle) || !fetch(handle, &bytes) || bytes == 0) return 1;
  const int batch = std::max<int64_t>(1, (int64_t{absl::GetFlag(FLAGS_cache_mb)} << 20) / bytes);
  if (!store(batch, &handle)) return 1;

  RawServer raw;
  std::vector<double> server_ms, raw_ms;
  int64_t streamed = 0;
  for (int i = 0; i < 7; ++i) {  // interleaved, first round is warm-up
    auto start = Clock::now();
    if (!fetch(handle, &streamed)) return 1;
    if (i > 0) server_ms.push_back(Ms(Clock::now() - start));
    start = Clock::now();
    raw.Pull(streamed, 1 << 20);
    if (i > 0) raw_ms.push_back(Ms(Clock::now() - start));
  }
  const double server = Percentile(server_ms, 0.5), raw_median = Percentile(raw_ms, 0.5);
  const double mib = streamed / double(1 << 20);
  std::printf("{\"mode\": \"stream\", \"mib\": %.1f, \"batch\": %d, \"fetch_cache_ms\": %.1f, "
              "\"raw_grpc_ms\": %.1f, \"fetch_mib_per_s\": %.0f, \"raw_mib_per_s\": %.0f, "
              "\"throughput_ratio\": %.2f}\n",
              mib, batch, server, raw_median, mib / server * 1e3, mib / raw_median * 1e3,
              raw_median / server);
  return 0;
}

int Load(const std::string& address, const rl::ModelInfo& info) {
  const int clients = absl::GetFlag(FLAGS_clients);
  std::vector<std::string> keys = absl::StrSplit(absl::GetFlag(FLAGS_keys), ',', absl::SkipEmpty());
  if (keys.empty()) keys.push_back("");
  const auto stop_at = Clock::now() + std::chrono::seconds(absl::GetFlag(FLAGS_seconds));
  std::vector<std::vector<double>> latencies(clients);
  std::vector<int64_t> errors(clients, 0);
  std::map<std::string, int64_t> error_kinds;
  std::mutex mu;
  std::vector<std::thread> threads;
  for (int c = 0; c < clients; ++c) {
    threads.emplace_back([&, c] {
      // One channel per client, as separate notebooks would have.
      grpc::ChannelArguments args;
      args.SetInt("grpc.use_local_subchannel_pool", 1);
      auto channel = grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
      // Connect before the clock starts: a connection attempt that fails once (a busy CI machine)
      // puts the channel in backoff, where every call fails at once, and the loop below would count
      // thousands of those as errors of the server under load.
      if (!channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(30))) {
        std::lock_guard<std::mutex> lock(mu);
        ++errors[c];
        ++error_kinds["client could not connect within 30 s"];
        return;
      }
      auto stub = rl::RemoteLens::NewStub(channel);
      rl::RunRequest request;
      *request.mutable_tokens() = Tokens(1, absl::GetFlag(FLAGS_pos), info.d_vocab(), 100 + c);
      const std::string& key = keys[c % keys.size()];
      while (Clock::now() < stop_at) {
        int64_t bytes;
        double fwd;
        const auto start = Clock::now();
        grpc::Status s = RunOnce(*stub, request, key, &bytes, &fwd);
        if (s.ok()) {
          latencies[c].push_back(Ms(Clock::now() - start));
        } else {
          ++errors[c];
          std::lock_guard<std::mutex> lock(mu);
          ++error_kinds[std::to_string(s.error_code()) + ": " + s.error_message().substr(0, 240)];
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  std::vector<double> all;
  std::map<std::string, int64_t> per_user;
  int64_t total_errors = 0;
  for (int c = 0; c < clients; ++c) {
    all.insert(all.end(), latencies[c].begin(), latencies[c].end());
    per_user[keys[c % keys.size()].empty() ? "local" : "user" + std::to_string(c % keys.size())] += latencies[c].size();
    total_errors += errors[c];
  }
  const double seconds = absl::GetFlag(FLAGS_seconds);
  std::printf("{\"mode\": \"load\", \"clients\": %d, \"seconds\": %.0f, \"requests\": %zu, "
              "\"errors\": %ld, \"throughput_rps\": %.1f, \"p50_ms\": %.2f, \"p99_ms\": %.2f",
              clients, seconds, all.size(), total_errors, all.size() / seconds, Percentile(all, 0.5),
              Percentile(all, 0.99));
  if (per_user.size() == 2) {
    const double a = per_user.begin()->second, b = per_user.rbegin()->second;
    std::printf(", \"user0_requests\": %.0f, \"user1_requests\": %.0f, \"share_ratio\": %.3f", a, b,
                std::min(a, b) / std::max(a, b));
  }
  std::printf("}\n");
  for (const auto& [kind, n] : error_kinds) std::fprintf(stderr, "error x%ld: %s\n", n, kind.c_str());
  return total_errors == 0 ? 0 : 2;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const std::string address = absl::GetFlag(FLAGS_address);
  auto stub = rl::RemoteLens::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  rl::ModelInfo info;
  {
    grpc::ClientContext ctx;
    std::vector<std::string> keys = absl::StrSplit(absl::GetFlag(FLAGS_keys), ',', absl::SkipEmpty());
    if (!keys.empty()) ctx.AddMetadata("authorization", "Bearer " + keys[0]);
    grpc::Status s = stub->GetModelInfo(&ctx, rl::GetModelInfoRequest(), &info);
    if (!s.ok()) {
      std::fprintf(stderr, "GetModelInfo failed: %s\n", s.error_message().c_str());
      return 1;
    }
  }
  const std::string mode = absl::GetFlag(FLAGS_mode);
  if (mode == "latency") return Latency(*stub, info);
  if (mode == "stream") return Stream(*stub, info);
  if (mode == "load") return Load(address, info);
  std::fprintf(stderr, "unknown --mode %s\n", mode.c_str());
  return 1;
}
