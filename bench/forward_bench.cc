// forward_bench: times LlamaModel::Forward on one model in several hook configurations and prints
// one JSON object per line, for bench/forward_bench.py and scripts/gpu_check.sh:
//   {"mode": "none"|"resid_post"|"all"|"decode", "median_ms": ..., "mean_ms": ..., "iters": N, ...}
// Modes (--modes): no hooks; caching every blocks.L.hook_resid_post (to host memory, as the
// server streams them); caching every hook point; "decode": one token per row appended to a
// key/value cache that already holds --pos positions (the generation step, no hooks).
// Timings include waiting for the device (one scalar read back), so CUDA numbers are real.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <numeric>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_split.h"
#include "engine/device_memory.h"
#include "engine/model_dir.h"

ABSL_FLAG(std::string, model_dir, "", "model directory");
ABSL_FLAG(int64_t, batch, 1, "batch size");
ABSL_FLAG(int64_t, pos, 128, "positions per row");
ABSL_FLAG(int, iters, 10, "timed iterations per mode");
ABSL_FLAG(int, warmup, 2, "untimed iterations per mode");
ABSL_FLAG(int, threads, 0, "intra-op threads (0: LibTorch's default)");
ABSL_FLAG(uint64_t, seed, 0, "token seed (the Python driver uses the same ids)");
ABSL_FLAG(bool, onednn_gemm, true,
          "CPU float32 products through oneDNN's sgemm (false: LibTorch's BLAS)");
ABSL_FLAG(std::string, tokens_file, "", "optional: raw int64 token ids [batch, pos] to use");
ABSL_FLAG(std::string, modes, "none,resid_post,all", "comma-separated: none, resid_post, all, decode");
ABSL_FLAG(std::string, device, "cpu", "device(s), comma-separated: cpu, cuda:0, cuda:0,cuda:1");
ABSL_FLAG(std::string, dtype, "float32", "compute dtype: float32, bfloat16 or float16");
ABSL_FLAG(bool, copy_weights, false,
          "copy CPU weights into process memory instead of using them in place from the mapped "
          "checkpoint (load.copy_weights)");

namespace remotelens {
namespace {

int Main() {
  if (absl::GetFlag(FLAGS_threads) > 0) at::set_num_threads(absl::GetFlag(FLAGS_threads));
  LoadOptions load;
  load.onednn_gemm = absl::GetFlag(FLAGS_onednn_gemm);
  load.map_cpu_weights = !absl::GetFlag(FLAGS_copy_weights);
  auto dtype = ParseDtype(absl::GetFlag(FLAGS_dtype));
  auto devices = ParseDevices(absl::GetFlag(FLAGS_device));
  if (!dtype.ok() || !devices.ok()) {
    std::fprintf(stderr, "forward_bench: %s\n",
                 (!dtype.ok() ? dtype.status() : devices.status()).ToString().c_str());
    return 1;
  }
  load.dtype = *dtype;
  load.devices = *devices;
  auto model = LoadModelDir(absl::GetFlag(FLAGS_model_dir), load);
  if (!model.ok()) {
    std::fprintf(stderr, "forward_bench: %s\n", model.status().ToString().c_str());
    return 1;
  }
  const LlamaConfig& c = (*model)->config();
  const int64_t batch = absl::GetFlag(FLAGS_batch), pos = absl::GetFlag(FLAGS_pos);
  at::Tensor tokens;
  if (!absl::GetFlag(FLAGS_tokens_file).empty()) {
    std::FILE* f = std::fopen(absl::GetFlag(FLAGS_tokens_file).c_str(), "rb");
    if (f == nullptr) return 1;
    tokens = at::empty({batch, pos}, at::kLong);
    const size_t n = std::fread(tokens.data_ptr<int64_t>(), sizeof(int64_t), batch * pos, f);
    std::fclose(f);
    if (n != static_cast<size_t>(batch * pos)) {
      std::fprintf(stderr, "forward_bench: tokens file holds %zu ids, need %ld\n", n, batch * pos);
      return 1;
    }
  } else {
    tokens = at::randint(0, c.d_vocab, {batch, pos},
                         at::make_generator<at::CPUGeneratorImpl>(absl::GetFlag(FLAGS_seed)), at::kLong);
  }
  ForwardInput input;
  input.tokens = tokens;

  // Weight bytes and parameters, for the bounds the caller compares against.
  int64_t weight_bytes = 0, params = 0;
  for (const auto& [device, n] : WeightBytesByDevice((*model)->weights())) weight_bytes += n;
  params = weight_bytes / at::elementSize(load.dtype);

  const std::vector<std::string> modes = absl::StrSplit(absl::GetFlag(FLAGS_modes), ',', absl::SkipEmpty());
  for (const std::string& mode : modes) {
    if (mode != "none" && mode != "resid_post" && mode != "all" && mode != "decode") {
      std::fprintf(stderr, "forward_bench: unknown mode \"%s\"; valid: none, resid_post, all, decode\n",
                   mode.c_str());
      return 1;
    }
    // decode: a cache holding `pos` positions, then one new token per row per timed call.
    KvCache kv;
    ForwardInput step;
    if (mode == "decode") {
      auto prefill = (*model)->Forward(input, nullptr, &kv);
      if (!prefill.ok()) {
        std::fprintf(stderr, "forward_bench: %s\n", prefill.status().ToString().c_str());
        return 1;
      }
      step.tokens = tokens.narrow(1, 0, 1).clone();
    }
    auto run_once = [&]() {
      HookPlan plan(c.n_layers);
      if (mode == "resid_post") {
        for (int layer = 0; layer < c.n_layers; ++layer) plan.AddCache({{layer, HookSite::kResidPost}});
      } else if (mode == "all") {
        for (HookId id : AllHookIds(c.n_layers)) {
          // The set measured before the opt-in per-head inputs, hook_mlp_in and unembed.* hook
          // points existed, so "all" stays comparable across BENCHMARKS.md entries.
          const HookSite s = id.site;
          if (s == HookSite::kAttnIn || s == HookSite::kQInput || s == HookSite::kKInput ||
              s == HookSite::kVInput || s == HookSite::kMlpIn || s == HookSite::kUnembedIn ||
              s == HookSite::kUnembedOut) {
            continue;
          }
          plan.AddCache({id});
        }
      }
      const bool hooked = mode == "resid_post" || mode == "all";
      const auto start = std::chrono::steady_clock::now();
      auto logits = mode == "decode" ? (*model)->Forward(step, nullptr, &kv)
                                     : (*model)->Forward(input, hooked ? &plan : nullptr);
      if (logits.ok()) logits->reshape({-1})[0].item<double>();  // waits for the device
      const auto stop = std::chrono::steady_clock::now();
      if (!logits.ok()) {
        std::fprintf(stderr, "forward_bench: %s\n", logits.status().ToString().c_str());
        std::exit(1);
      }
      return std::chrono::duration<double, std::milli>(stop - start).count();
    };
    for (int i = 0; i < absl::GetFlag(FLAGS_warmup); ++i) run_once();
    std::vector<double> times;
    for (int i = 0; i < absl::GetFlag(FLAGS_iters); ++i) times.push_back(run_once());
    std::sort(times.begin(), times.end());
    const double median = times[times.size() / 2];
    const double mean = std::accumulate(times.begin(), times.end(), 0.0) / times.size();
    int64_t device_bytes = 0;
    for (const at::Device& d : load.devices) device_bytes += AllocatedDeviceBytes(d).value_or(0);
    std::printf("{\"mode\": \"%s\", \"median_ms\": %.4f, \"mean_ms\": %.4f, \"iters\": %zu, "
                "\"threads\": %d, \"batch\": %ld, \"pos\": %ld, \"weight_bytes\": %ld, "
                "\"params\": %ld, \"device_memory_bytes\": %ld, \"device\": \"%s\", \"dtype\": \"%s\"}\n",
                mode.c_str(), median, mean, times.size(), at::get_num_threads(), batch,
                mode == "decode" ? 1L : pos, weight_bytes, params, device_bytes,
                absl::GetFlag(FLAGS_device).c_str(), absl::GetFlag(FLAGS_dtype).c_str());
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace
}  // namespace remotelens

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return remotelens::Main();
}
