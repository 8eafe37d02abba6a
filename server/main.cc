// remotelens_server: keeps one Llama model resident and serves the RemoteLens gRPC API.
//
//   remotelens_server --config configs/demo.textproto [--port 50051] [--model_dir DIR]
//       [--metrics_port 9464] [--device cpu|cuda:0,...] [--dtype float32] [--users_file F]
//       [--host 127.0.0.1] [--intra_op_threads N] [--load_threads N] [--load_reserve_bytes B]
//       [--host_memory_limit_bytes B]
//
// The config (a ServerConfig textproto) is read here and nowhere else; flags override it.
// Without a users file the server only listens on loopback. On SIGTERM or SIGINT it stops
// accepting calls, lets in-flight work finish for shutdown_grace_seconds, and exits 0.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <prometheus/registry.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/notification.h"
#include "engine/demo_model.h"
#include "engine/device_memory.h"
#include "engine/host_memory.h"
#include "engine/model_dir.h"
#include "engine/status_macros.h"
#include "engine/tokenizer.h"
#include "engine/tokenizer_config.h"
#include "google/protobuf/text_format.h"
#include "remotelens/v1/config.pb.h"
#include "server/auth.h"
#include "server/memory_release.h"
#include "server/metrics.h"
#include "server/metrics_http.h"
#include "server/request_builder.h"
#include "server/executor.h"
#include "server/forward_threads.h"
#include "server/scheduler.h"
#include "server/service.h"
#include "server/session_store.h"

ABSL_FLAG(std::string, config, "", "ServerConfig textproto (e.g. configs/demo.textproto)");
ABSL_FLAG(std::string, model_dir, "", "Hugging Face model directory (overrides the config)");
ABSL_FLAG(std::string, host, "", "listen host (overrides the config; default 127.0.0.1)");
ABSL_FLAG(int, port, -1, "gRPC port (overrides the config; 0 picks a free port)");
ABSL_FLAG(int, metrics_port, -1, "Prometheus /metrics port (overrides the config; 0 picks one)");
ABSL_FLAG(std::string, device, "", "device(s): cpu, cuda:0, cuda:0,cuda:1 (overrides the config)");
ABSL_FLAG(std::string, dtype, "", "float32, bfloat16 or float16 (overrides the config)");
ABSL_FLAG(std::string, users_file, "", "UsersFile textproto with API key hashes (overrides)");
ABSL_FLAG(int, intra_op_threads, -1, "CPU threads per forward (overrides the config; 0: LibTorch's choice)");
ABSL_FLAG(int, large_forward_threads, -1,
          "CPU threads for forwards of >= large_forward_gflop (overrides the config; 0: one per physical core)");
ABSL_FLAG(double, large_forward_gflop, -1,
          "matrix-product work from which a forward uses large_forward_threads (overrides; 0: 0.1)");
ABSL_FLAG(int, max_batch_requests, -1,
          "requests sharing one forward / decode step (overrides scheduler.max_batch_requests; 1: no batching)");
ABSL_FLAG(int64_t, max_batch_tokens, -1, "rows x positions per shared forward (overrides scheduler.max_batch_tokens)");
ABSL_FLAG(int64_t, batch_wait_us, -1, "idle wait for requests to share a forward (overrides scheduler.batch_wait_us)");
ABSL_FLAG(int, load_threads, -1, "threads reading the checkpoint (overrides load.threads; 0: one per core)");
ABSL_FLAG(int64_t, load_reserve_bytes, -1,
          "working memory each device keeps free beyond the weights (overrides load.reserve_bytes)");
ABSL_FLAG(int64_t, host_memory_limit_bytes, -1,
          "cap on host memory a CPU load may use (overrides load.host_memory_limit_bytes; 0: none)");

namespace remotelens {
namespace {

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// host:port with the port replaced.
std::string WithPort(const std::string& address, int port) {
  const size_t colon = address.rfind(':');
  return absl::StrCat(colon == std::string::npos ? address : address.substr(0, colon), ":", port);
}

std::string WithHost(const std::string& address, const std::string& host) {
  const size_t colon = address.rfind(':');
  return absl::StrCat(host, colon == std::string::npos ? ":50051" : address.substr(colon));
}

absl::StatusOr<v1::ServerConfig> LoadConfig() {
  v1::ServerConfig config;
  const std::string path = absl::GetFlag(FLAGS_config);
  if (!path.empty()) {
    ASSIGN_OR_RETURN(std::string text, ReadFile(path));
    if (!google::protobuf::TextFormat::ParseFromString(text, &config)) {
      return absl::InvalidArgumentError(absl::StrCat(path, " is not a valid ServerConfig textproto"));
    }
  }
  if (!absl::GetFlag(FLAGS_model_dir).empty()) config.set_model_dir(absl::GetFlag(FLAGS_model_dir));
  if (!absl::GetFlag(FLAGS_dtype).empty()) config.set_dtype(absl::GetFlag(FLAGS_dtype));
  if (absl::GetFlag(FLAGS_intra_op_threads) >= 0) {
    config.set_intra_op_threads(absl::GetFlag(FLAGS_intra_op_threads));
  }
  if (absl::GetFlag(FLAGS_large_forward_threads) >= 0) {
    config.set_large_forward_threads(absl::GetFlag(FLAGS_large_forward_threads));
  }
  if (absl::GetFlag(FLAGS_large_forward_gflop) >= 0) {
    config.set_large_forward_gflop(absl::GetFlag(FLAGS_large_forward_gflop));
  }
  if (!absl::GetFlag(FLAGS_device).empty()) {
    config.clear_devices();
    for (absl::string_view d : absl::StrSplit(absl::GetFlag(FLAGS_device), ',', absl::SkipEmpty())) {
      config.add_devices(std::string(d));
    }
  }
  if (!absl::GetFlag(FLAGS_users_file).empty()) config.set_users_file(absl::GetFlag(FLAGS_users_file));
  v1::SchedulerSettings& scheduler = *config.mutable_scheduler();
  if (absl::GetFlag(FLAGS_max_batch_requests) >= 0) {
    scheduler.set_max_batch_requests(absl::GetFlag(FLAGS_max_batch_requests));
  }
  if (absl::GetFlag(FLAGS_max_batch_tokens) >= 0) {
    scheduler.set_max_batch_tokens(absl::GetFlag(FLAGS_max_batch_tokens));
  }
  if (absl::GetFlag(FLAGS_batch_wait_us) >= 0) scheduler.set_batch_wait_us(absl::GetFlag(FLAGS_batch_wait_us));
  v1::LoadSettings& load = *config.mutable_load();
  if (absl::GetFlag(FLAGS_load_threads) >= 0) load.set_threads(absl::GetFlag(FLAGS_load_threads));
  if (absl::GetFlag(FLAGS_load_reserve_bytes) >= 0) {
    load.set_reserve_bytes(absl::GetFlag(FLAGS_load_reserve_bytes));
  } else if (load.reserve_bytes() == 0) {
    load.set_reserve_bytes(int64_t{1} << 30);
  }
  if (absl::GetFlag(FLAGS_host_memory_limit_bytes) >= 0) {
    load.set_host_memory_limit_bytes(absl::GetFlag(FLAGS_host_memory_limit_bytes));
  }
  if (load.threads() < 0 || load.reserve_bytes() < 0 || load.host_memory_limit_bytes() < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "load settings must be >= 0; got threads ", load.threads(), ", reserve_bytes ",
        load.reserve_bytes(), ", host_memory_limit_bytes ", load.host_memory_limit_bytes()));
  }
  if (config.listen_address().empty()) config.set_listen_address("127.0.0.1:50051");
  if (!absl::GetFlag(FLAGS_host).empty()) {
    config.set_listen_address(WithHost(config.listen_address(), absl::GetFlag(FLAGS_host)));
  }
  if (absl::GetFlag(FLAGS_port) >= 0) {
    config.set_listen_address(WithPort(config.listen_address(), absl::GetFlag(FLAGS_port)));
  }
  if (config.metrics_address().empty()) config.set_metrics_address("127.0.0.1:9464");
  if (absl::GetFlag(FLAGS_metrics_port) >= 0) {
    const std::string base = config.metrics_address() == "none" ? "127.0.0.1:9464" : config.metrics_address();
    config.set_metrics_address(WithPort(base, absl::GetFlag(FLAGS_metrics_port)));
  }
  if (config.dtype().empty()) config.set_dtype("float32");
  if (config.devices().empty()) config.add_devices("cpu");
  if (config.shutdown_grace_seconds() <= 0) config.set_shutdown_grace_seconds(10);
  if (config.intra_op_threads() < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "intra_op_threads must be >= 0 (0: LibTorch's choice), got ", config.intra_op_threads()));
  }
  if (config.large_forward_threads() < 0 || config.large_forward_threads() > 1024 ||
      !(config.large_forward_gflop() >= 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "large_forward_threads must be 0..1024 (0: one per physical core) and "
        "large_forward_gflop >= 0 (0: 0.1); got ",
        config.large_forward_threads(), " and ", config.large_forward_gflop()));
  }
  if (config.large_forward_threads() == 0) config.set_large_forward_threads(PhysicalCores());
  if (config.large_forward_gflop() == 0) config.set_large_forward_gflop(0.1);
  *config.mutable_limits() = LimitsWithDefaults(config.limits());
  return config;
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> Credentials(const v1::TlsConfig& tls) {
  if (tls.cert_file().empty() && tls.key_file().empty()) return grpc::InsecureServerCredentials();
  if (tls.cert_file().empty() || tls.key_file().empty()) {
    return absl::InvalidArgumentError("tls needs both cert_file and key_file");
  }
  grpc::SslServerCredentialsOptions options;
  ASSIGN_OR_RETURN(std::string cert, ReadFile(tls.cert_file()));
  ASSIGN_OR_RETURN(std::string key, ReadFile(tls.key_file()));
  options.pem_key_cert_pairs.push_back({key, cert});
  if (!tls.client_ca_file().empty()) {
    ASSIGN_OR_RETURN(options.pem_root_certs, ReadFile(tls.client_ca_file()));
    options.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(options);
}

// SIGTERM and SIGINT. Blocking them cannot cover every thread: OpenBLAS starts its pool while
// the libraries load, before main, and a signal delivered to one of those threads used the
// default action (a second SIGTERM during the drain killed the process). So main installs a
// handler first thing, which every thread shares: it only writes the signal number to a pipe,
// which Serve reads once; later signals are absorbed. The pipe is the one piece of global state
// here, because a signal handler can reach nothing else.
int shutdown_pipe[2] = {-1, -1};

void OnShutdownSignal(int signal_number) {
  const int saved_errno = errno;
  const char byte = static_cast<char>(signal_number);
  (void)!::write(shutdown_pipe[1], &byte, 1);  // async-signal-safe; a full pipe drops it
  errno = saved_errno;
}

absl::Status InstallShutdownHandler() {
  if (::pipe2(shutdown_pipe, O_CLOEXEC | O_NONBLOCK) != 0) {
    return absl::ErrnoToStatus(errno, "cannot create the shutdown signal pipe");
  }
  struct sigaction action {};
  action.sa_handler = OnShutdownSignal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  for (int signal_number : {SIGTERM, SIGINT}) {
    if (::sigaction(signal_number, &action, nullptr) != 0) {
      return absl::ErrnoToStatus(errno, "cannot install the shutdown signal handler");
    }
  }
  return absl::OkStatus();
}

// Blocks until the first SIGTERM or SIGINT; returns its number.
int WaitForShutdownSignal() {
  for (;;) {
    pollfd p{shutdown_pipe[0], POLLIN, 0};
    if (::poll(&p, 1, -1) <= 0) continue;  // EINTR
    char byte = 0;
    if (::read(shutdown_pipe[0], &byte, 1) == 1) return byte;
  }
}

// Free allocator memory beyond this is returned to the system by the janitor.
constexpr int64_t kReleaseFreeBytesAbove = int64_t{64} << 20;

absl::Status Serve() {
  ASSIGN_OR_RETURN(v1::ServerConfig config, LoadConfig());
  const v1::Limits& limits = config.limits();

  std::unique_ptr<Authenticator> auth;
  if (config.users_file().empty()) {
    if (!IsLoopbackAddress(config.listen_address())) {
      return absl::FailedPreconditionError(absl::StrCat(
          "refusing to listen on ", config.listen_address(),
          " without authentication; set users_file (API keys) or listen on 127.0.0.1"));
    }
    auth = Authenticator::Disabled();
  } else {
    ASSIGN_OR_RETURN(auth, Authenticator::FromUsersFile(config.users_file()));
  }

  std::string model_dir = config.model_dir();
  if (model_dir.empty()) {
    if (config.demo_model_dir().empty()) {
      return absl::InvalidArgumentError("no model: set model_dir (or demo_model_dir) in the config or --model_dir");
    }
    model_dir = config.demo_model_dir();
    if (!std::filesystem::exists(model_dir + "/config.json")) {
      std::fprintf(stderr, "remotelens_server: generating the built-in demo model in %s\n", model_dir.c_str());
      RETURN_IF_ERROR(WriteDemoModel(model_dir, DemoModelSpec()));
    }
  }
  LoadOptions load;
  ASSIGN_OR_RETURN(load.dtype, ParseDtype(config.dtype()));
  ASSIGN_OR_RETURN(load.devices, ParseDevices(absl::StrJoin(config.devices(), ",")));
  load.load_threads = config.load().threads();
  load.reserve_bytes = config.load().reserve_bytes();
  load.host_memory_limit_bytes = config.load().host_memory_limit_bytes();
  load.map_cpu_weights = !config.load().copy_weights();
  // An operator watching a slow disk sees that the load is alive and how fast it goes.
  load.on_progress = [](const ReadProgress& p) {
    const double seconds = absl::ToDoubleSeconds(p.elapsed);
    std::fprintf(stderr, "remotelens_server: loading weights %s of %s, %d of %d files, %.1f s, %.2f GB/s\n",
                 HumanBytes(p.bytes_done).c_str(), HumanBytes(p.bytes_total).c_str(), p.files_done,
                 p.files_total, seconds, seconds > 0 ? p.bytes_done / seconds / 1e9 : 0.0);
  };
  std::fprintf(stderr, "remotelens_server: loading %s (%s on %s)\n", model_dir.c_str(),
               config.dtype().c_str(), absl::StrJoin(config.devices(), ",").c_str());
  ASSIGN_OR_RETURN(std::unique_ptr<LlamaModel> model, LoadModelDir(model_dir, load));
  if (model->weights().bytes_in_place > 0) {
    std::fprintf(stderr, "remotelens_server: %s of the weights used in place from the checkpoint's "
                 "pages (load.copy_weights: false)\n",
                 HumanBytes(model->weights().bytes_in_place).c_str());
  }
  std::unique_ptr<Tokenizer> tokenizer;
  if (std::filesystem::exists(model_dir + "/tokenizer.json")) {
    const LlamaConfig& c = model->config();
    std::optional<int64_t> bos, eos;
    if (c.bos_token_id >= 0) bos = c.bos_token_id;
    if (!c.eos_token_ids.empty()) eos = c.eos_token_ids[0];
    ASSIGN_OR_RETURN(tokenizer, Tokenizer::FromJsonFile(model_dir + "/tokenizer.json", bos, eos));
  }
  // Chat templates are passed to clients, which render them (docs/decisions.md).
  ASSIGN_OR_RETURN(TokenizerConfig tokenizer_config, ReadTokenizerConfig(model_dir));

  auto registry = std::make_shared<prometheus::Registry>();
  std::vector<std::string> devices(config.devices().begin(), config.devices().end());
  ServerMetrics metrics(*registry, devices);
  metrics.SetModelInfo(model->config().model_name, config.dtype());
  // remotelens_device_memory_bytes: the CUDA caching allocator's allocated bytes where there is
  // one (refreshed as each job starts, on the model thread), else the resident weight bytes
  // (the model is immutable, so those are set once).
  const std::map<std::string, int64_t> weight_bytes = WeightBytesByDevice(model->weights());
  auto refresh_device_memory = [&metrics, &weight_bytes]() {
    for (const auto& [device, n] : weight_bytes) {
      metrics.SetDeviceMemoryBytes(device, AllocatedDeviceBytes(at::Device(device)).value_or(n));
    }
  };
  refresh_device_memory();
  MetricsHttpServer metrics_http(registry);
  int metrics_port = 0;
  if (config.metrics_address() != "none") {
    ASSIGN_OR_RETURN(metrics_port, metrics_http.Start(config.metrics_address()));
  }

  metrics.SetKnownUsers(auth->UserNames());
  const v1::SchedulerSettings& batching = config.scheduler();
  if (batching.max_batch_requests() < 0 || batching.max_batch_requests() > 1024 ||
      batching.max_batch_tokens() < 0 || batching.batch_wait_us() < 0 ||
      batching.batch_wait_us() > 1000000) {
    return absl::InvalidArgumentError(
        "scheduler: max_batch_requests must be 0..1024 (0: default 16; 1: no batching), "
        "max_batch_tokens >= 0, batch_wait_us 0..1000000");
  }
  const int max_batch_requests = batching.max_batch_requests() > 0 ? batching.max_batch_requests() : 16;
  ModelExecutor::Options executor_options;
  executor_options.max_batch_requests = max_batch_requests;
  executor_options.threads.large_threads = config.large_forward_threads();
  executor_options.threads.flops_per_token = MatmulFlopsPerToken(model->config());
  executor_options.threads.min_large_flops = config.large_forward_gflop() * 1e9;
  ModelExecutor executor(*model, &metrics, executor_options);
  Scheduler::Options scheduler_options;
  scheduler_options.max_queue = limits.max_queue();
  scheduler_options.max_batch_requests = max_batch_requests;
  scheduler_options.max_batch_tokens = batching.max_batch_tokens() > 0 ? batching.max_batch_tokens() : 16384;
  scheduler_options.batch_wait = absl::Microseconds(batching.batch_wait_us());
  scheduler_options.on_depth = [&metrics](int64_t depth) { metrics.SetQueueDepth(depth); };
  scheduler_options.on_start = [&metrics, &refresh_device_memory](const Scheduler::Job& job,
                                                                  absl::Duration wait) {
    metrics.ObserveQueueWait(absl::ToDoubleSeconds(wait));
    metrics.RecordUserJob(job.user, absl::ToDoubleSeconds(wait));
    refresh_device_memory();
  };
  scheduler_options.on_running = [&metrics](const std::array<int64_t, kNumJobKinds>& running) {
    for (int k = 0; k < kNumJobKinds; ++k) {
      metrics.SetJobsRunning(JobKindName(static_cast<JobKind>(k)), running[k]);
    }
  };
  // OpenMP's thread count is per thread: without this the model thread (not main) would run
  // oneDNN with every core while ATen uses LibTorch's choice. See docs/decisions.md.
  scheduler_options.on_thread_start = [threads = config.intra_op_threads(),
                                       large = config.large_forward_threads(),
                                       gflop = config.large_forward_gflop()] {
    if (threads > 0) {
      at::set_num_threads(threads);
    } else {
      at::init_num_threads();
    }
    std::fprintf(stderr,
                 "remotelens_server: model thread uses %d intra-op thread(s); %d for forwards of "
                 ">= %g GFLOP\n",
                 at::get_num_threads(), large, gflop);
  };
  Scheduler scheduler(scheduler_options, &executor);
  executor.set_scheduler(&scheduler);

  SessionLimits session_limits;
  session_limits.default_ttl = absl::Seconds(limits.session_ttl_seconds());
  session_limits.max_ttl = absl::Seconds(limits.max_session_ttl_seconds());
  session_limits.max_sessions_per_user = limits.max_sessions_per_user();
  session_limits.max_hooks_per_session = limits.max_hooks_per_session();
  session_limits.max_total_stored_bytes = limits.max_stored_cache_bytes();
  SessionStore sessions(session_limits);

  ServiceDeps deps;
  deps.model = model.get();
  deps.tokenizer = tokenizer.get();
  deps.tokenizer_config = std::move(tokenizer_config);
  deps.auth = auth.get();
  deps.sessions = &sessions;
  deps.scheduler = &scheduler;
  deps.metrics = &metrics;
  deps.limits = limits;
  deps.devices = devices;
  deps.host_memory_limit_bytes = config.load().host_memory_limit_bytes();
  RemoteLensService service(deps);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials, Credentials(config.tls()));
  int selected_port = 0;
  builder.AddListeningPort(config.listen_address(), credentials, &selected_port);
  // gRPC sets SO_REUSEPORT by default, so a second server on a busy port would start and take a
  // share of its connections. Refuse instead.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.SetMaxReceiveMessageSize(static_cast<int>(std::min<int64_t>(limits.max_request_bytes(), INT32_MAX)));
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || selected_port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", config.listen_address(),
                                               ": the port is in use or the address is not local"));
  }
  // Tests and scripts read this line to find the port.
  std::printf("remotelens_server listening on %s (model %s, %s, auth %s, tls %s, metrics %s)\n",
              WithPort(config.listen_address(), selected_port).c_str(),
              model->config().model_name.c_str(), config.dtype().c_str(),
              auth->enabled() ? "on" : "off", config.tls().cert_file().empty() ? "off" : "on",
              metrics_port > 0 ? WithPort(config.metrics_address(), metrics_port).c_str() : "off");
  std::fflush(stdout);

  absl::Notification stop_janitor;
  // Every second: free expired sessions, and give memory that large requests left free back to
  // the system (tcmalloc keeps it otherwise; see memory_release.h).
  std::thread janitor([&] {
    while (!stop_janitor.WaitForNotificationWithTimeout(absl::Seconds(1))) {
      if (sessions.ExpireIdle() > 0) service.UpdateSessionMetrics();
      ReleaseFreeMemory(kReleaseFreeBytesAbove);
    }
  });

  const int signal_number = WaitForShutdownSignal();
  std::fprintf(stderr, "remotelens_server: signal %d, shutting down (grace %ds)\n", signal_number,
               config.shutdown_grace_seconds());
  server->GetHealthCheckService()->SetServingStatus(false);
  // New calls are refused (UNAVAILABLE) from here; streaming calls in flight, and the jobs they
  // queued, get the grace period. An idle server exits at once; after the grace period gRPC
  // cancels what is left and the scheduler drops its queue.
  service.BeginDrain();
  const absl::Time until = absl::Now() + absl::Seconds(config.shutdown_grace_seconds());
  while (service.active_streams() > 0 && absl::Now() < until) absl::SleepFor(absl::Milliseconds(20));
  server->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(1)));
  scheduler.Shutdown(absl::ZeroDuration());
  stop_janitor.Notify();
  janitor.join();
  metrics_http.Stop();
  std::fprintf(stderr, "remotelens_server: stopped\n");
  return absl::OkStatus();
}

}  // namespace
}  // namespace remotelens

int main(int argc, char** argv) {
  // First thing: from here on no signal of the two can end the process by default action.
  if (absl::Status installed = remotelens::InstallShutdownHandler(); !installed.ok()) {
    std::fprintf(stderr, "remotelens_server: %s\n", installed.ToString().c_str());
    return 1;
  }
  absl::SetProgramUsageMessage("remotelens_server --config configs/demo.textproto [flags]");
  absl::ParseCommandLine(argc, argv);
  absl::Status status = remotelens::Serve();
  if (!status.ok()) {
    std::fprintf(stderr, "remotelens_server: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
