// Fuzzes Tokenizer::FromJsonString (a model's tokenizer.json) and, for inputs that load, Encode
// and Decode of a fixed text. Invariant: every id Encode returns lies in [0, vocab_size()).
#include <cstddef>
#include <cstdint>

#include "engine/tokenizer.h"
#include "fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::string_view json(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<std::unique_ptr<remotelens::Tokenizer>> tokenizer =
      remotelens::Tokenizer::FromJsonString(json);
  if (!tokenizer.ok()) return 0;
  for (absl::string_view text : {"Hello world", " the  cat's 42\n\xc3\xa9t\xc3\xa9", ""}) {
    absl::StatusOr<std::vector<int64_t>> ids = (*tokenizer)->Encode(text, false);
    if (!ids.ok()) continue;
    for (int64_t id : *ids) FUZZ_CHECK(id >= 0 && id < (*tokenizer)->vocab_size());
    (void)(*tokenizer)->Decode(*ids);
  }
  return 0;
}
