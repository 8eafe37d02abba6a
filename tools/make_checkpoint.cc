// make_checkpoint --preset NAME --out DIR: writes a random checkpoint of a known shape in
// Hugging Face layout (config.json, model.safetensors or shards with
// model.safetensors.index.json, tokenizer.json), for load and memory benchmarks. Nothing is
// downloaded and nothing large is committed: the 8B-shaped checkpoint is made where it is needed.
//
//   make_checkpoint --preset llama3.1-8b --dtype bfloat16 --shards 4 --out /tmp/llama8b
//
// Presets: llama3.1-8b (Llama 3.1 8B's config.json: 32 layers, d_model 4096, 32 heads, 8 kv
// heads, d_mlp 14336, vocab 128256, 131072 positions; 16.1 GB in bfloat16), 100m (the ~100M
// benchmark model), demo (the server's built-in demo model).
#include <cstdio>
#include <map>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "engine/demo_model.h"

ABSL_FLAG(std::string, preset, "demo", "llama3.1-8b, 100m or demo");
ABSL_FLAG(std::string, dtype, "bfloat16", "on-disk dtype: float32, bfloat16 or float16");
ABSL_FLAG(int, shards, 4, "safetensors shards (1 writes model.safetensors)");
ABSL_FLAG(std::string, out, "", "directory to write (created if absent)");
ABSL_FLAG(uint64_t, seed, 0, "random seed");
ABSL_FLAG(std::string, tokenizer_dir, "",
          "copy a real tokenizer.json (and tokenizer_config.json, chat_template.jinja) from this "
          "directory, e.g. Meta's Llama 3.1 files for the llama3.1-8b preset");

namespace {

std::map<std::string, remotelens::DemoModelSpec> Presets() {
  std::map<std::string, remotelens::DemoModelSpec> presets;
  remotelens::DemoModelSpec llama8b;
  llama8b.vocab_size = 128256;
  llama8b.d_model = 4096;
  llama8b.n_layers = 32;
  llama8b.n_heads = 32;
  llama8b.n_kv_heads = 8;
  llama8b.d_mlp = 14336;
  llama8b.n_ctx = 131072;
  llama8b.original_max_position_embeddings = 8192;
  llama8b.tile_random = true;
  presets["llama3.1-8b"] = llama8b;
  remotelens::DemoModelSpec m100;  // as BENCHMARKS.md's ~100M model
  m100.vocab_size = 32000;
  m100.d_model = 768;
  m100.n_layers = 12;
  m100.n_heads = 12;
  m100.n_kv_heads = 4;
  m100.d_mlp = 2048;
  m100.seed = 1;
  presets["100m"] = m100;
  presets["demo"] = remotelens::DemoModelSpec();
  return presets;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "make_checkpoint --preset llama3.1-8b|100m|demo --out DIR [--dtype bfloat16] [--shards 4]");
  absl::ParseCommandLine(argc, argv);
  const auto presets = Presets();
  const std::string name = absl::GetFlag(FLAGS_preset);
  auto it = presets.find(name);
  if (it == presets.end() || absl::GetFlag(FLAGS_out).empty()) {
    std::vector<std::string> names;
    for (const auto& entry : presets) names.push_back(entry.first);
    std::fprintf(stderr, "make_checkpoint: need --out DIR and --preset one of %s (got \"%s\")\n",
                 absl::StrJoin(names, ", ").c_str(), name.c_str());
    return 2;
  }
  remotelens::DemoModelSpec spec = it->second;
  spec.dtype = absl::GetFlag(FLAGS_dtype);
  spec.num_shards = absl::GetFlag(FLAGS_shards);
  if (absl::GetFlag(FLAGS_seed) != 0) spec.seed = absl::GetFlag(FLAGS_seed);
  spec.tokenizer_dir = absl::GetFlag(FLAGS_tokenizer_dir);
  const absl::Time start = absl::Now();
  absl::Status status = remotelens::WriteDemoModel(absl::GetFlag(FLAGS_out), spec);
  if (!status.ok()) {
    std::fprintf(stderr, "make_checkpoint: %s\n", status.ToString().c_str());
    return 1;
  }
  std::printf("make_checkpoint: wrote %s (%s, %d shards) to %s in %.1f s\n", name.c_str(),
              spec.dtype.c_str(), spec.num_shards, absl::GetFlag(FLAGS_out).c_str(),
              absl::ToDoubleSeconds(absl::Now() - start));
  return 0;
}
