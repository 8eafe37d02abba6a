// Fuzzes SafetensorsFile::Open, the reader of untrusted checkpoint shards: the input is written
// to a file and opened. Invariant: every entry of a file that opens can be read as a tensor of
// its declared shape, and reading every byte of it stays inside the mapping (ASan would see).
#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

#include "engine/safetensors.h"
#include "fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = remotelens_fuzz::ScratchDir() + "/input.safetensors";
  remotelens_fuzz::WriteFileOrDie(path, data, size);
  absl::StatusOr<std::unique_ptr<remotelens::SafetensorsFile>> file =
      remotelens::SafetensorsFile::Open(path);
  if (!file.ok()) {
    FUZZ_CHECK(!absl::IsNotFound(file.status()));
    return 0;
  }
  for (const auto& [name, entry] : (*file)->entries()) {
    absl::StatusOr<at::Tensor> tensor = (*file)->Tensor(name);
    FUZZ_CHECK(tensor.ok());
    FUZZ_CHECK(tensor->sizes().vec() == entry.shape);
    FUZZ_CHECK(static_cast<uint64_t>(tensor->nbytes()) == entry.end - entry.begin);
    if (tensor->numel() > 0 && tensor->numel() < (1 << 16)) {
      (void)tensor->to(at::kFloat).sum().item<float>();  // touches every element
    }
  }
  return 0;
}
