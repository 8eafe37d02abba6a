// make_demo_model DIR [--d_model N ...]: writes the built-in demo model (a small random
// Llama-3.1-architecture checkpoint in Hugging Face layout) into DIR. Flags override the
// defaults, e.g. a ~100M-parameter model for benchmarks:
//   make_demo_model /tmp/m100 --vocab_size 32000 --d_model 768 --n_layers 12 --n_heads 12
//       --n_kv_heads 4 --d_mlp 2048 --seed 1
// or a tiny model that carries Meta's Llama 3.1 tokenizer (tests/test_llama31_tokenizer.py):
//   make_demo_model /tmp/t --vocab_size 128256 --d_model 16 --tokenizer_dir DIR_WITH_TOKENIZER_JSON
#include <cstdio>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "engine/demo_model.h"

ABSL_FLAG(int64_t, vocab_size, remotelens::DemoModelSpec().vocab_size, "vocabulary size");
ABSL_FLAG(int64_t, d_model, remotelens::DemoModelSpec().d_model, "residual stream width");
ABSL_FLAG(int64_t, n_layers, remotelens::DemoModelSpec().n_layers, "number of blocks");
ABSL_FLAG(int64_t, n_heads, remotelens::DemoModelSpec().n_heads, "query heads");
ABSL_FLAG(int64_t, n_kv_heads, remotelens::DemoModelSpec().n_kv_heads, "key/value heads");
ABSL_FLAG(int64_t, d_mlp, remotelens::DemoModelSpec().d_mlp, "MLP hidden width");
ABSL_FLAG(int64_t, n_ctx, remotelens::DemoModelSpec().n_ctx, "max_position_embeddings");
ABSL_FLAG(int64_t, original_max_position_embeddings,
          remotelens::DemoModelSpec().original_max_position_embeddings,
          "llama3 rope scaling's original context length");
ABSL_FLAG(bool, tie_word_embeddings, false, "share the embedding and unembedding");
ABSL_FLAG(int, shards, 1, "number of safetensors shards (>1 writes an index)");
ABSL_FLAG(std::string, dtype, "float32", "on-disk dtype: float32, bfloat16 or float16");
ABSL_FLAG(uint64_t, seed, 0, "random seed");
ABSL_FLAG(std::string, tokenizer_dir, "",
          "copy tokenizer.json (and tokenizer_config.json, chat_template.jinja) from this directory "
          "instead of generating the demo tokenizer; --vocab_size must cover its ids");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("make_demo_model DIR [flags]: write a random Llama checkpoint");
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  if (args.size() != 2) {
    std::fprintf(stderr, "usage: make_demo_model DIR [--flags]; see --help\n");
    return 2;
  }
  remotelens::DemoModelSpec spec;
  spec.vocab_size = absl::GetFlag(FLAGS_vocab_size);
  spec.d_model = absl::GetFlag(FLAGS_d_model);
  spec.n_layers = absl::GetFlag(FLAGS_n_layers);
  spec.n_heads = absl::GetFlag(FLAGS_n_heads);
  spec.n_kv_heads = absl::GetFlag(FLAGS_n_kv_heads);
  spec.d_mlp = absl::GetFlag(FLAGS_d_mlp);
  spec.n_ctx = absl::GetFlag(FLAGS_n_ctx);
  spec.original_max_position_embeddings = absl::GetFlag(FLAGS_original_max_position_embeddings);
  spec.tie_word_embeddings = absl::GetFlag(FLAGS_tie_word_embeddings);
  spec.num_shards = absl::GetFlag(FLAGS_shards);
  spec.dtype = absl::GetFlag(FLAGS_dtype);
  spec.seed = absl::GetFlag(FLAGS_seed);
  spec.tokenizer_dir = absl::GetFlag(FLAGS_tokenizer_dir);
  absl::Status status = remotelens::WriteDemoModel(args[1], spec);
  if (!status.ok()) {
    std::fprintf(stderr, "make_demo_model: %s\n", status.ToString().c_str());
    return 1;
  }
  std::printf("wrote demo model to %s\n", args[1]);
  return 0;
}
