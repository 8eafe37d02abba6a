// Fuzzes CheckpointTensors::Open on a directory whose model.safetensors.index.json is the input
// and whose one shard (shard.safetensors, written once) is valid. Invariant: every name of a
// checkpoint that opens has a shape and a tensor of that shape.
#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "engine/safetensors.h"
#include "fuzz/fuzz_util.h"

namespace {

const std::string& CheckpointDir() {
  static const std::string* dir = [] {
    auto* d = new std::string(remotelens_fuzz::ScratchDir() + "/checkpoint");
    std::system(("mkdir -p '" + *d + "'").c_str());
    absl::Status written = remotelens::WriteSafetensors(
        *d + "/shard.safetensors",
        {{"model.embed_tokens.weight", at::arange(12, at::kFloat).reshape({4, 3})},
         {"model.norm.weight", at::ones({3}, at::kBFloat16)}},
        {{"format", "pt"}});
    if (!written.ok()) std::abort();
    return d;
  }();
  return *dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& dir = CheckpointDir();
  remotelens_fuzz::WriteFileOrDie(dir + "/model.safetensors.index.json", data, size);
  absl::StatusOr<std::unique_ptr<remotelens::CheckpointTensors>> checkpoint =
      remotelens::CheckpointTensors::Open(dir);
  if (!checkpoint.ok()) return 0;
  for (const std::string& name : (*checkpoint)->Names()) {
    absl::StatusOr<std::vector<int64_t>> shape = (*checkpoint)->Shape(name);
    absl::StatusOr<at::Tensor> tensor = (*checkpoint)->Tensor(name);
    FUZZ_CHECK(shape.ok() && tensor.ok());
    FUZZ_CHECK(tensor->sizes().vec() == *shape);
  }
  return 0;
}
