// Fuzzes ParseLlamaConfig (a model's config.json). Invariant: a config that parses serializes
// (LlamaConfigToJson) to text that parses again with the same parameter count.
#include <cstddef>
#include <cstdint>

#include "engine/llama_config.h"
#include "fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::string_view text(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<remotelens::LlamaConfig> config = remotelens::ParseLlamaConfig(text, "fuzz");
  if (!config.ok()) return 0;
  absl::StatusOr<remotelens::LlamaConfig> again =
      remotelens::ParseLlamaConfig(remotelens::LlamaConfigToJson(*config), "fuzz");
  FUZZ_CHECK(again.ok());
  FUZZ_CHECK(remotelens::ParameterCount(*again) == remotelens::ParameterCount(*config));
  return 0;
}
