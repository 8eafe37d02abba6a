// The built-in demo model: a small random Llama-3.1-architecture checkpoint directory in Hugging
// Face layout (config.json with llama3 rope scaling and grouped-query attention,
// model.safetensors or shards, tokenizer.json). Deterministic for a given spec, so tests and
// benchmarks can regenerate it instead of committing binaries.
//
//   DemoModelSpec spec;          // defaults: the demo model the server starts on
//   spec.n_layers = 12;          // or a ~100M-parameter model for benchmarks
//   RETURN_IF_ERROR(WriteDemoModel("/tmp/demo", spec));
#ifndef REMOTELENS_ENGINE_DEMO_MODEL_H_
#define REMOTELENS_ENGINE_DEMO_MODEL_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "engine/llama_config.h"

namespace remotelens {

struct DemoModelSpec {
  int64_t vocab_size = 512;
  int64_t d_model = 128;
  int64_t n_layers = 4;
  int64_t n_heads = 8;
  int64_t n_kv_heads = 2;       // grouped-query attention: 4 query heads per key/value head
  int64_t d_mlp = 384;
  int64_t n_ctx = 512;          // max_position_embeddings
  // llama3 scaling starts to matter past this many positions; small so tests exercise it.
  int64_t original_max_position_embeddings = 64;
  bool tie_word_embeddings = false;
  int num_shards = 1;           // > 1 writes model.safetensors.index.json and shards
  std::string dtype = "float32";  // on-disk dtype: float32, bfloat16 or float16
  uint64_t seed = 0;
  // Matrices tile one random block instead of drawing every element: writes a multi-gigabyte
  // checkpoint (load benchmarks) in seconds. Fine for timing and memory, not for numerics.
  bool tile_random = false;
  // A directory with a real tokenizer.json (and optionally tokenizer_config.json and
  // chat_template.jinja, copied as they are) to use instead of the generated demo tokenizer, e.g.
  // Meta's Llama 3.1 tokenizer for tests. vocab_size must cover its ids (128256 for Llama 3).
  std::string tokenizer_dir;
};

// The config a spec describes (name "remotelens-demo"); WriteDemoModel adds the special token
// ids, which come from the generated tokenizer.
LlamaConfig DemoModelConfig(const DemoModelSpec& spec);

// Creates `dir` if needed and writes config.json, the weights and tokenizer.json (and the
// tokenizer_dir's tokenizer_config.json and chat_template.jinja when it has them). One shard's
// tensors are in memory at a time.
absl::Status WriteDemoModel(const std::string& dir, const DemoModelSpec& spec);

}  // namespace remotelens

#endif  // REMOTELENS_ENGINE_DEMO_MODEL_H_
