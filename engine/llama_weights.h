// LlamaWeights: a Llama checkpoint's tensors in the engine's layout, loaded from a Hugging Face
// model directory (model.safetensors, or shards named by model.safetensors.index.json).
//
// Layout choices, made once at load so the forward pass never re-arranges weights:
//   - W_Q, W_K, W_V are stacked into one [(n_heads + 2 n_kv_heads) d_head, d_model] matrix and
//     gate/up into one [2 d_mlp, d_model] matrix, so each is a single matmul;
//   - rows stay in Hugging Face's rotate-half order (no permutation back to Meta's interleaved
//     layout), and the rotary code uses rotate-half to match;
//   - RMSNorm weights are kept as they are. TransformerLens's "fold_ln"/"center_writing_weights"
//     processing applies to LayerNorm models only; for RMSNorm there is nothing to centre, so it
//     is simply not applied (and no warning is printed about it).
//
//   LoadOptions options;
//   options.dtype = at::kBFloat16;
//   options.devices = {at::Device("cuda:0"), at::Device("cuda:1")};  // layers split evenly
//   ASSIGN_OR_RETURN(LlamaWeights weights, LoadLlamaWeights(dir, config, options));
#ifndef REMOTELENS_ENGINE_LLAMA_WEIGHTS_H_
#define REMOTELENS_ENGINE_LLAMA_WEIGHTS_H_

#include <ATen/core/Tensor.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/checkpoint_reader.h"
#include "engine/llama_config.h"

namespace remotelens {

struct LayerWeights {
  at::Tensor ln1;        // [d_model]
  at::Tensor w_qkv;      // [(n_heads + 2 n_kv_heads) * d_head, d_model]  rows: Q, then K, then V
  at::Tensor w_o;        // [d_model, n_heads * d_head]
  at::Tensor ln2;        // [d_model]
  at::Tensor w_gate_up;  // [2 * d_mlp, d_model]  rows: gate, then up
  at::Tensor w_down;     // [d_model, d_mlp]
};

struct LlamaWeights {
  at::Tensor embed;     // [d_vocab, d_model]
  std::vector<LayerWeights> layers;
  at::Tensor ln_final;  // [d_model]
  at::Tensor unembed;   // [d_vocab, d_model]; the same tensor as `embed` when tied
  // Bytes of the above that are read-only views of the mapped checkpoint
  // (LoadOptions::map_cpu_weights); the rest were copied.
  int64_t bytes_in_place = 0;
};

struct LoadOptions {
  // float32, bfloat16 or float16; weights are cast on load. A dtype the LibTorch build cannot
  // multiply on a device (float16 on CPU with LibTorch 1.13) is refused at load.
  at::ScalarType dtype = at::kFloat;
  // Devices to spread the blocks over, in order (TransformerLens n_devices): block i goes to
  // devices[i * devices.size() / n_layers]; the embedding sits on the first, ln_final and the
  // unembedding on the last. Default: one CPU.
  std::vector<at::Device> devices = {at::Device(at::kCPU)};
  // CPU float32 products through oneDNN's sgemm (engine/cpu_gemm.h); false: LibTorch's BLAS.
  bool onednn_gemm = true;

  // Loading. Threads that read the checkpoint (0: one per core).
  int load_threads = 0;
  // CPU weights whose bytes lie in the checkpoint as the engine wants them (the load dtype, and
  // for fused projections the parts side by side, as gate/up are in Hugging Face files) are used
  // in place: read-only views of the mapped shards, faulted in at load. They then cost no copy
  // and sit in memory once, as page cache the kernel may drop and re-read under pressure instead
  // of failing. false: copy every weight into anonymous memory (for checkpoints on network file
  // systems, whose pages are slow to re-read). docs/decisions.md, "CPU weights stay in the page
  // cache".
  bool map_cpu_weights = true;
  // Memory each device must keep free beyond the weights and rotary tables, for activations of
  // the requests the server will run. A load that would leave less is refused before reading.
  int64_t reserve_bytes = int64_t{1} << 30;
  // Upper bound on the host memory a CPU load may use, on top of what the kernel reports
  // (MemAvailable, cgroup and rlimits; see host_memory.h). 0: no extra bound.
  int64_t host_memory_limit_bytes = 0;
  // Progress of the read (bytes and files done), at most once a second and at the end.
  std::function<void(const ReadProgress&)> on_progress;
};

// What a load needs on one device, and what that device has.
struct DeviceMemoryNeed {
  std::string device;             // "cpu", "cuda:0", ...
  int64_t weight_bytes = 0;       // weights in the load dtype placed on this device
  int64_t rotary_bytes = 0;       // cos/sin tables, [n_ctx, d_head] float32 each
  int64_t reserve_bytes = 0;      // LoadOptions::reserve_bytes
  std::optional<int64_t> available_bytes;  // unknown where the runtime cannot tell
  std::string available_source;   // "MemAvailable", "cgroup memory.max", "cudaMemGetInfo", ...
  int64_t needed() const { return weight_bytes + rotary_bytes + reserve_bytes; }
};

// Per device the load of `config` under `options` would use, with what each device has free.
absl::StatusOr<std::vector<DeviceMemoryNeed>> PlanLoadMemory(const LlamaConfig& config,
                                                             const LoadOptions& options);

// RESOURCE_EXHAUSTED when some device in the plan lacks room, naming the need, what is available
// and what would fit instead (another dtype, more devices); OK otherwise.
absl::Status CheckLoadFits(const std::string& model_dir, const LlamaConfig& config,
                           const LoadOptions& options);

// Device that block `layer` runs on under `options`.
at::Device LayerDevice(const LoadOptions& options, int64_t layer, int64_t n_layers);

// Loads and validates every tensor. Missing, unexpected and mis-shaped tensors are all listed by
// name in one InvalidArgument error. Memory is checked first (CheckLoadFits); then every weight is
// read once, in parallel, straight into its final tensor (engine/checkpoint_reader.h): nothing of
// the checkpoint stays mapped, so the process holds the weights exactly once.
absl::StatusOr<LlamaWeights> LoadLlamaWeights(const std::string& model_dir,
                                              const LlamaConfig& config,
                                              const LoadOptions& options);

// Hugging Face tensor name -> expected shape, for every tensor a checkpoint of `config` holds.
std::vector<std::pair<std::string, std::vector<int64_t>>> ExpectedCheckpointTensors(
    const LlamaConfig& config);

}  // namespace remotelens

#endif  // REMOTELENS_ENGINE_LLAMA_WEIGHTS_H_
