// load_bench --model_dir DIR: how long a checkpoint takes to load against the time to read its
// files, and how much memory the loaded model holds against its weights' bytes.
//
//   load_bench --model_dir /tmp/llama8b --dtype bfloat16 [--device cpu|cuda:0] [--tokens 8]
//
// Steps, in one process: read every checkpoint file front to back on one thread, twice (what
// `cat` does; the first pass warms the page cache, the second is the file-read time), load the
// model as the server does, run a 1 x tokens forward twice. Prints a human summary on stderr and one line
// `load_bench {json}` on stdout with: file_bytes, weight_bytes, read_seconds (warm),
// first_read_seconds, load_seconds,
// load_over_read, rss_before_load_bytes, rss_after_load_bytes, rss_after_forward_bytes,
// rss_file_after_load_bytes, rss_over_weights_after_load, rss_over_weights_after_forward,
// device_memory_bytes (CUDA allocator, -1 elsewhere), forward_seconds.
#include <ATen/ATen.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/time/clock.h"
#include "engine/host_memory.h"
#include "engine/model_dir.h"
#include "engine/safetensors.h"
#include "engine/status_macros.h"
#include <nlohmann/json.hpp>

#ifdef REMOTELENS_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

ABSL_FLAG(std::string, model_dir, "", "Hugging Face checkpoint directory");
ABSL_FLAG(std::string, device, "cpu", "cpu, cuda:0, or cuda:0,cuda:1");
ABSL_FLAG(std::string, dtype, "bfloat16", "float32, bfloat16 or float16");
ABSL_FLAG(int, tokens, 8, "positions of the 1 x tokens forward after the load (0: none)");
ABSL_FLAG(int, threads, 0, "checkpoint reader threads (0: one per core)");
ABSL_FLAG(bool, copy_weights, false,
          "copy every weight into process memory (load.copy_weights) instead of using CPU weights "
          "in place from the mapped checkpoint");

namespace remotelens {
namespace {

double Seconds(absl::Time since) { return absl::ToDoubleSeconds(absl::Now() - since); }

// Reads each file sequentially on one thread into a small buffer, as `cat FILE > /dev/null`.
absl::StatusOr<double> ReadFilesSeconds(const std::vector<std::pair<std::string, uint64_t>>& files) {
  std::vector<char> buffer(size_t{8} << 20);
  const absl::Time start = absl::Now();
  for (const auto& [path, size] : files) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return absl::ErrnoToStatus(errno, "open " + path);
    ssize_t got;
    while ((got = ::read(fd, buffer.data(), buffer.size())) > 0) {
    }
    ::close(fd);
    if (got < 0) return absl::ErrnoToStatus(errno, "read " + path);
  }
  return Seconds(start);
}

int64_t DeviceMemoryBytes(const at::Device& device) {
#ifdef REMOTELENS_WITH_CUDA
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    return stats.reserved_bytes[0].current;
  }
#endif
  (void)device;
  return -1;
}

absl::Status Run() {
  const std::string dir = absl::GetFlag(FLAGS_model_dir);
  if (dir.empty()) return absl::InvalidArgumentError("--model_dir is required");
  LoadOptions options;
  ASSIGN_OR_RETURN(options.dtype, ParseDtype(absl::GetFlag(FLAGS_dtype)));
  ASSIGN_OR_RETURN(options.devices, ParseDevices(absl::GetFlag(FLAGS_device)));
  options.load_threads = absl::GetFlag(FLAGS_threads);
  options.map_cpu_weights = !absl::GetFlag(FLAGS_copy_weights);
  options.on_progress = [](const ReadProgress& p) {
    std::fprintf(stderr, "load_bench: loading %s of %s, %d of %d files, %.1f s\n",
                 HumanBytes(p.bytes_done).c_str(), HumanBytes(p.bytes_total).c_str(),
                 p.files_done, p.files_total, absl::ToDoubleSeconds(p.elapsed));
  };

  std::vector<std::pair<std::string, uint64_t>> files;
  {
    ASSIGN_OR_RETURN(std::unique_ptr<CheckpointTensors> checkpoint, CheckpointTensors::Open(dir));
    files = checkpoint->FileSizes();
  }
  uint64_t file_bytes = 0;
  for (const auto& file : files) file_bytes += file.second;
  // The first pass brings the files into the page cache (from disk if they were not there); the
  // second is the warm file-read time the load is compared with.
  ASSIGN_OR_RETURN(const double cold_read_seconds, ReadFilesSeconds(files));
  ASSIGN_OR_RETURN(const double read_seconds, ReadFilesSeconds(files));
  std::fprintf(stderr, "load_bench: read %s in %zu files in %.2f s (first pass %.2f s)\n",
               HumanBytes(static_cast<int64_t>(file_bytes)).c_str(), files.size(), read_seconds,
               cold_read_seconds);

  const ProcessMemory before = ReadProcessMemory();
  absl::Time start = absl::Now();
  ASSIGN_OR_RETURN(std::unique_ptr<LlamaModel> model, LoadModelDir(dir, options));
  const double load_seconds = Seconds(start);
  const ProcessMemory after_load = ReadProcessMemory();

  int64_t weight_bytes = 0;
  auto add = [&](const at::Tensor& t) { weight_bytes += t.numel() * t.element_size(); };
  const LlamaWeights& w = model->weights();
  add(w.embed);
  add(w.ln_final);
  if (!w.unembed.is_same(w.embed)) add(w.unembed);
  for (const LayerWeights& l : w.layers) {
    for (const at::Tensor* t : {&l.ln1, &l.w_qkv, &l.w_o, &l.ln2, &l.w_gate_up, &l.w_down}) add(*t);
  }

  double forward_seconds = 0;
  const int tokens = absl::GetFlag(FLAGS_tokens);
  if (tokens > 0) {
    ForwardInput input;
    input.tokens = at::arange(1, tokens + 1, at::kLong).reshape({1, tokens}) %
                   model->config().d_vocab;
    input.tokens = input.tokens.to(options.devices.front());
    for (int run = 0; run < 2; ++run) {  // the first run warms allocators and kernels
      start = absl::Now();
      ASSIGN_OR_RETURN(at::Tensor logits, model->Forward(input));
      const at::Tensor finite = logits.isfinite().all().cpu();  // also waits for the device
      forward_seconds = Seconds(start);
      if (!finite.item<bool>()) return absl::InternalError("the forward gave non-finite logits");
    }
  }
  const ProcessMemory after_forward = ReadProcessMemory();

  nlohmann::json report = {
      {"model_dir", dir},
      {"device", absl::GetFlag(FLAGS_device)},
      {"dtype", absl::GetFlag(FLAGS_dtype)},
      {"files", files.size()},
      {"file_bytes", file_bytes},
      {"weight_bytes", weight_bytes},
      {"weight_bytes_in_place", w.bytes_in_place},
      {"read_seconds", read_seconds},
      {"first_read_seconds", cold_read_seconds},
      {"load_seconds", load_seconds},
      {"load_over_read", load_seconds / read_seconds},
      {"rss_before_load_bytes", before.rss_bytes},
      {"rss_after_load_bytes", after_load.rss_bytes},
      {"rss_after_forward_bytes", after_forward.rss_bytes},
      {"rss_file_after_load_bytes", after_load.file_bytes},
      {"rss_over_weights_after_load",
       static_cast<double>(after_load.rss_bytes) / static_cast<double>(weight_bytes)},
      {"rss_over_weights_after_forward",
       static_cast<double>(after_forward.rss_bytes) / static_cast<double>(weight_bytes)},
      {"device_memory_bytes", DeviceMemoryBytes(options.devices.front())},
      {"forward_tokens", tokens},
      {"forward_seconds", forward_seconds},
  };
  std::fprintf(stderr,
               "load_bench: load %.2f s = %.2fx the file read; RSS %s after load, %s after a "
               "1x%d forward (%.3f s), weights %s (%.3fx, %.3fx; %s used in place)\n",
               load_seconds, load_seconds / read_seconds,
               HumanBytes(after_load.rss_bytes).c_str(), HumanBytes(after_forward.rss_bytes).c_str(),
               tokens, forward_seconds, HumanBytes(weight_bytes).c_str(),
               static_cast<double>(after_load.rss_bytes) / weight_bytes,
               static_cast<double>(after_forward.rss_bytes) / weight_bytes,
               HumanBytes(w.bytes_in_place).c_str());
  std::printf("load_bench %s\n", report.dump().c_str());
  return absl::OkStatus();
}

}  // namespace
}  // namespace remotelens

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("load_bench --model_dir DIR [--device cpu] [--dtype bfloat16]");
  absl::ParseCommandLine(argc, argv);
  const absl::Status status = remotelens::Run();
  if (!status.ok()) {
    std::fprintf(stderr, "load_bench: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
