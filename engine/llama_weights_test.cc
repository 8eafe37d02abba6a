#include "engine/llama_weights.h"

#include <ATen/ATen.h>

#include <cstdlib>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "engine/demo_model.h"
#include "engine/host_memory.h"
#include "engine/llama_config.h"
#include "engine/safetensors.h"
#include "gtest/gtest.h"

namespace remotelens {
namespace {

std::string TempDir(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return absl::StrCat(dir != nullptr ? dir : "/tmp", "/", name);
}

DemoModelSpec ShardedBf16(int64_t d_model, int64_t n_layers) {
  DemoModelSpec spec;
  spec.vocab_size = 1024;
  spec.d_model = d_model;
  spec.n_layers = n_layers;
  spec.n_heads = 8;
  spec.n_kv_heads = 2;
  spec.d_mlp = 3 * d_model;
  spec.num_shards = 3;
  spec.dtype = "bfloat16";
  return spec;
}

// Writes `spec` once per directory name and returns its config.
LlamaConfig Written(const std::string& dir, const DemoModelSpec& spec) {
  EXPECT_TRUE(WriteDemoModel(dir, spec).ok());
  auto config = ReadLlamaConfig(dir);
  EXPECT_TRUE(config.ok()) << config.status();
  return *config;
}

int64_t Bytes(const at::Tensor& t) { return t.numel() * static_cast<int64_t>(t.element_size()); }

int64_t WeightBytes(const LlamaWeights& w) {
  int64_t total = Bytes(w.embed) + Bytes(w.ln_final);
  if (!w.unembed.is_same(w.embed)) total += Bytes(w.unembed);
  for (const LayerWeights& l : w.layers) {
    total += Bytes(l.ln1) + Bytes(l.w_qkv) + Bytes(l.w_o) + Bytes(l.ln2) + Bytes(l.w_gate_up) +
             Bytes(l.w_down);
  }
  return total;
}

TEST(LlamaWeights, ShardedBf16LoadsEveryTensorExactlyInEachDtype) {
  const std::string dir = TempDir("sharded_bf16");
  const LlamaConfig config = Written(dir, ShardedBf16(64, 2));
  auto checkpoint = CheckpointTensors::Open(dir);
  ASSERT_TRUE(checkpoint.ok());
  auto source = [&](const std::string& name) { return (*checkpoint)->Tensor(name).value(); };
  for (at::ScalarType dtype : {at::kBFloat16, at::kFloat}) {
    LoadOptions options;
    options.dtype = dtype;
    options.load_threads = 2;
    auto weights = LoadLlamaWeights(dir, config, options);
    ASSERT_TRUE(weights.ok()) << weights.status();
    EXPECT_TRUE(at::equal(weights->embed, source("model.embed_tokens.weight").to(dtype)));
    EXPECT_TRUE(at::equal(weights->unembed, source("lm_head.weight").to(dtype)));
    EXPECT_TRUE(at::equal(weights->ln_final, source("model.norm.weight").to(dtype)));
    for (int64_t layer = 0; layer < config.n_layers; ++layer) {
      const std::string p = absl::StrCat("model.layers.", layer, ".");
      const LayerWeights& l = weights->layers[layer];
      EXPECT_EQ(l.w_qkv.scalar_type(), dtype);
      EXPECT_TRUE(at::equal(l.w_qkv, at::cat({source(p + "self_attn.q_proj.weight"),
                                              source(p + "self_attn.k_proj.weight"),
                                              source(p + "self_attn.v_proj.weight")})
                                         .to(dtype)));
      EXPECT_TRUE(at::equal(l.w_gate_up, at::cat({source(p + "mlp.gate_proj.weight"),
                                                  source(p + "mlp.up_proj.weight")})
                                             .to(dtype)));
      EXPECT_TRUE(at::equal(l.w_o, source(p + "self_attn.o_proj.weight").to(dtype)));
      EXPECT_TRUE(at::equal(l.w_down, source(p + "mlp.down_proj.weight").to(dtype)));
      EXPECT_TRUE(at::equal(l.ln1, source(p + "input_layernorm.weight").to(dtype)));
      EXPECT_TRUE(at::equal(l.ln2, source(p + "post_attention_layernorm.weight").to(dtype)));
    }
  }
}

TEST(LlamaWeights, TiedEmbeddingsShareOneTensor) {
  DemoModelSpec spec = ShardedBf16(32, 1);
  spec.tie_word_embeddings = true;
  const std::string dir = TempDir("tied");
  const LlamaConfig config = Written(dir, spec);
  auto weights = LoadLlamaWeights(dir, config, LoadOptions());
  ASSERT_TRUE(weights.ok()) << weights.status();
  EXPECT_TRUE(weights->unembed.is_same(weights->embed));
}

// Whether `t`'s bytes lie in a mapping of a file under `dir` (/proc/self/maps).
bool MapsFileUnder(const at::Tensor& t, const std::string& dir) {
  std::ifstream maps("/proc/self/maps");
  const uintptr_t address = reinterpret_cast<uintptr_t>(t.data_ptr());
  for (std::string line; std::getline(maps, line);) {
    const size_t path_at = line.find('/');
    if (path_at == std::string::npos || line.compare(path_at, dir.size(), dir) != 0) continue;
    const uintptr_t begin = std::stoull(line.substr(0, line.find('-')), nullptr, 16);
    const uintptr_t end = std::stoull(line.substr(line.find('-') + 1), nullptr, 16);
    if (address >= begin && address < end) return true;
  }
  return false;
}

// CPU weights whose bytes lie in the file as the engine wants them are used in place: single
// tensors in the load dtype, and gate/up, which Hugging Face files store side by side. q/k/v are
// not adjacent there (k, o, q, v by name), so the fused QKV is a copy; so is every weight of a
// load that converts dtypes, or that asks for copies.
TEST(LlamaWeights, CpuWeightsStoredAsTheEngineWantsThemAreUsedInPlace) {
  const std::string dir = TempDir("in_place");
  const LlamaConfig config = Written(dir, ShardedBf16(64, 4));
  auto checkpoint = CheckpointTensors::Open(dir);
  ASSERT_TRUE(checkpoint.ok());
  LoadOptions options;
  options.dtype = at::kBFloat16;
  auto weights = LoadLlamaWeights(dir, config, options);
  ASSERT_TRUE(weights.ok()) << weights.status();
  EXPECT_TRUE(MapsFileUnder(weights->embed, dir));
  EXPECT_TRUE(MapsFileUnder(weights->unembed, dir));
  int gate_up_in_place = 0;
  for (int64_t layer = 0; layer < config.n_layers; ++layer) {
    SCOPED_TRACE(layer);
    const std::string p = absl::StrCat("model.layers.", layer, ".");
    const LayerWeights& l = weights->layers[layer];
    EXPECT_TRUE(MapsFileUnder(l.w_o, dir));
    EXPECT_TRUE(MapsFileUnder(l.w_down, dir));
    EXPECT_TRUE(MapsFileUnder(l.ln1, dir));
    EXPECT_FALSE(MapsFileUnder(l.w_qkv, dir));
    // Shards split the tensor list by count, so a layer's gate and up may sit in two files.
    const auto gate = (*checkpoint)->Locate(p + "mlp.gate_proj.weight").value();
    const auto up = (*checkpoint)->Locate(p + "mlp.up_proj.weight").value();
    const bool adjacent = *gate.path == *up.path && up.offset == gate.offset + gate.nbytes;
    EXPECT_EQ(MapsFileUnder(l.w_gate_up, dir), adjacent);
    gate_up_in_place += adjacent;
  }
  EXPECT_GE(gate_up_in_place, config.n_layers - 1);

  for (bool convert : {true, false}) {
    LoadOptions copies = options;
    if (convert) copies.dtype = at::kFloat;
    else copies.map_cpu_weights = false;
    auto copied = LoadLlamaWeights(dir, config, copies);
    ASSERT_TRUE(copied.ok()) << copied.status();
    EXPECT_FALSE(MapsFileUnder(copied->embed, dir));
    EXPECT_FALSE(MapsFileUnder(copied->layers[0].w_gate_up, dir));
    EXPECT_FALSE(MapsFileUnder(copied->layers[0].w_o, dir));
    EXPECT_TRUE(at::equal(copied->layers[1].w_gate_up.to(at::kFloat),
                          weights->layers[1].w_gate_up.to(at::kFloat)));
  }
}

// The weights are held once: resident memory grows by their bytes, whether they are used in
// place (file-backed pages) or copied (anonymous memory), and the pages copies were made from do
// not stay mapped (the first mmap'd loader kept them resident beside the fused copies, 1.4x).
TEST(LlamaWeights, ResidentMemoryGrowsByTheWeightBytesOnly) {
  const std::string dir = TempDir("resident");
  const LlamaConfig config = Written(dir, ShardedBf16(512, 4));  // ~30 MB of bfloat16
  for (bool map : {true, false}) {
    SCOPED_TRACE(map ? "in place" : "copied");
    LoadOptions options;
    options.dtype = at::kBFloat16;
    options.map_cpu_weights = map;
    const ProcessMemory before = ReadProcessMemory();
    auto weights = LoadLlamaWeights(dir, config, options);
    ASSERT_TRUE(weights.ok()) << weights.status();
    const ProcessMemory after = ReadProcessMemory();
    const int64_t weight_bytes = WeightBytes(*weights);
    int64_t copied_bytes = 0;
    for (const LayerWeights& l : weights->layers) copied_bytes += Bytes(l.w_qkv);
    if (!map) copied_bytes = weight_bytes;
    ASSERT_GT(weight_bytes, int64_t{20} << 20);
    // Huge pages may round each large tensor up to 2 MiB; allow that plus 5%.
    const int64_t slack = weight_bytes / 20 + int64_t{2} * (2 << 20);
    EXPECT_LE(after.rss_bytes - before.rss_bytes, weight_bytes + slack)
        << "RSS grew by " << after.rss_bytes - before.rss_bytes << " for " << weight_bytes
        << " bytes of weights";
    EXPECT_GE(after.rss_bytes - before.rss_bytes, weight_bytes * 9 / 10)
        << "weights were not faulted in at load";
    EXPECT_GE(after.anon_bytes - before.anon_bytes, copied_bytes * 9 / 10);
    EXPECT_LE(after.file_bytes - before.file_bytes, weight_bytes - copied_bytes + slack)
        << "pages that copies were made from stayed mapped";
  }
}

TEST(LlamaWeights, RefusesALoadThatDoesNotFitBeforeReading) {
  const std::string dir = TempDir("too_big");
  const LlamaConfig config = Written(dir, ShardedBf16(64, 2));
  LoadOptions options;
  options.dtype = at::kFloat;
  options.reserve_bytes = 0;
  auto plan = PlanLoadMemory(config, options);
  ASSERT_TRUE(plan.ok());
  ASSERT_EQ(plan->size(), 1u);
  const DeviceMemoryNeed& need = plan->front();
  EXPECT_EQ(need.device, "cpu");
  int64_t params = 0;
  for (const auto& [name, shape] : ExpectedCheckpointTensors(config)) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    params += n;
  }
  EXPECT_EQ(need.weight_bytes, params * 4);
  EXPECT_EQ(need.rotary_bytes, 2 * config.n_ctx * config.d_head * 4);

  // Room for the bfloat16 weights but not the float32 ones.
  options.host_memory_limit_bytes = params * 3 + need.rotary_bytes;
  int progress_calls = 0;
  options.on_progress = [&](const ReadProgress&) { ++progress_calls; };
  auto weights = LoadLlamaWeights(dir, config, options);
  ASSERT_EQ(weights.status().code(), absl::StatusCode::kResourceExhausted) << weights.status();
  const std::string message(weights.status().message());
  EXPECT_NE(message.find("as float32 needs"), std::string::npos) << message;
  EXPECT_NE(message.find("the configured host memory limit"), std::string::npos) << message;
  EXPECT_NE(message.find("bfloat16 would need"), std::string::npos) << message;
  EXPECT_EQ(progress_calls, 0) << "nothing may be read before the check";

  options.dtype = at::kBFloat16;
  auto fits = LoadLlamaWeights(dir, config, options);
  EXPECT_TRUE(fits.ok()) << fits.status();
  EXPECT_GE(progress_calls, 1);
}

TEST(LlamaWeights, ReportsProgressToTheLastByte) {
  const std::string dir = TempDir("progress");
  const LlamaConfig config = Written(dir, ShardedBf16(64, 2));
  LoadOptions options;
  ReadProgress last;
  options.on_progress = [&](const ReadProgress& p) { last = p; };
  ASSERT_TRUE(LoadLlamaWeights(dir, config, options).ok());
  auto checkpoint = CheckpointTensors::Open(dir);
  ASSERT_TRUE(checkpoint.ok());
  int64_t data_bytes = 0;
  for (const std::string& name : (*checkpoint)->Names()) {
    data_bytes += static_cast<int64_t>((*checkpoint)->Locate(name)->nbytes);
  }
  EXPECT_EQ(last.bytes_total, data_bytes);
  EXPECT_EQ(last.bytes_done, data_bytes);
  EXPECT_EQ(last.files_total, 3);
  EXPECT_EQ(last.files_done, 3);
}

}  // namespace
}  // namespace remotelens
