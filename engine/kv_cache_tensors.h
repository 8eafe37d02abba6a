// A key/value cache as named tensors, and back: how a session keeps a TransformerLens
// past_kv_cache between runs (server/session_store's StoredCache holds the tensors).
//
//   KvCache kv;
//   ASSIGN_OR_RETURN(at::Tensor logits, model.Forward(first_chunk, nullptr, &kv));
//   NamedTensors stored = KvCacheToTensors(kv);             // kept between calls
//   ASSIGN_OR_RETURN(KvCache restored, KvCacheFromTensors(stored, model));
//   ASSIGN_OR_RETURN(logits, model.Forward(next_chunk, nullptr, &restored));
//
// Names and shapes (length: the cached positions, padding included):
//   "kv.mask"          int64 [batch, length]: 1 real token, 0 left padding
//   "kv.{L}.keys"      [batch, n_kv_heads, length, d_head] in the model's dtype, after rotary
//   "kv.{L}.values"    [batch, n_kv_heads, length, d_head]
// for every block L, mask first, then block by block.
#ifndef REMOTELENS_ENGINE_KV_CACHE_TENSORS_H_
#define REMOTELENS_ENGINE_KV_CACHE_TENSORS_H_

#include <string>

#include "absl/status/statusor.h"
#include "engine/llama_model.h"

namespace remotelens {

inline constexpr char kKvMaskName[] = "kv.mask";

// The cache's filled positions as tensors of exactly `length` positions (copies when the cache
// holds spare capacity, so each tensor's nbytes() is what it holds). Empty for an empty cache.
// The tensors stay on the devices of their blocks.
NamedTensors KvCacheToTensors(const KvCache& cache);

// A cache for `model` from KvCacheToTensors' output, on the blocks' devices. The tensors are
// shared, not copied: the next Forward appends by reallocating (the restored cache has no spare
// capacity), so the given tensors are never written. INVALID_ARGUMENT naming the tensor and what
// is valid for a missing or unknown name, a shape that disagrees with the mask or the model's
// dims, a dtype other than the model's (int64 for the mask), mask values other than 0 and 1, or
// a length of 0 or past n_ctx.
absl::StatusOr<KvCache> KvCacheFromTensors(const NamedTensors& tensors, const LlamaModel& model);

// "kv.{layer}.keys" / "kv.{layer}.values".
std::string KvKeysName(int64_t layer);
std::string KvValuesName(int64_t layer);

}  // namespace remotelens

#endif  // REMOTELENS_ENGINE_KV_CACHE_TENSORS_H_
