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

#include <string>
#include <vector>

#include "absl/status/statusor.h"
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
};

// Device that block `layer` runs on under `options`.
at::Device LayerDevice(const LoadOptions& options, int64_t layer, int64_t n_layers);

// Loads and validates every tensor. Missing, unexpected and mis-shaped tensors are all listed by
// name in one InvalidArgument error.
absl::StatusOr<LlamaWeights> LoadLlamaWeights(const std::string& model_dir,
                                              const LlamaConfig& config,
                                              const LoadOptions& options);

// Hugging Face tensor name -> expected shape, for every tensor a checkpoint of `config` holds.
std::vector<std::pair<std::string, std::vector<int64_t>>> ExpectedCheckpointTensors(
    const LlamaConfig& config);

}  // namespace remotelens

#endif  // REMOTELENS_ENGINE_LLAMA_WEIGHTS_H_
