// Upper estimates of the memory one forward pass takes, so that a request that cannot fit is
// refused before it runs (RESOURCE_EXHAUSTED naming what it needs and what there is) instead of
// failing halfway, or taking the host's memory from every other user of the server.
//
//   ForwardSize size{.batch = 4, .pos = 512};
//   int64_t need = ForwardWorkingBytes(config, at::kBFloat16, size);
//   for (const CacheRequest& r : cache) need += CacheRequestBytes(r, config, at::kBFloat16, size);
//
// The estimates assume every intermediate of one block is alive at once, with attention scores
// and pattern materialised in float32 (what a hooked forward does); the true peak is lower. They
// are for refusing what cannot fit, not for accounting.
#ifndef REMOTELENS_ENGINE_FORWARD_MEMORY_H_
#define REMOTELENS_ENGINE_FORWARD_MEMORY_H_

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "engine/hook_plan.h"
#include "engine/llama_config.h"

namespace remotelens {

struct ForwardSize {
  int64_t batch = 1;
  int64_t pos = 1;   // positions this forward computes
  int64_t past = 0;  // positions already in the key/value cache (generation)
};

// Peak activation bytes of one forward of `size` in `dtype`: residual stream and norms, q/k/v
// before and after rotary, scores and pattern, z, MLP intermediates, the key/value cache of
// every layer when `size.past` > 0, and the logits in `dtype` and float32.
int64_t ForwardWorkingBytes(const LlamaConfig& config, at::ScalarType dtype,
                            const ForwardSize& size);

// Activation bytes of one block of that forward (the block term above): what autograd keeps
// per layer until the backward of a differentiable forward.
int64_t BlockActivationBytes(const LlamaConfig& config, at::ScalarType dtype,
                             const ForwardSize& size);

// Bytes of the copy a cache request makes: its hook's shape for `size`, its position slice
// applied, in its dtype (else `model_dtype`).
int64_t CacheRequestBytes(const CacheRequest& request, const LlamaConfig& config,
                          at::ScalarType model_dtype, const ForwardSize& size);

}  // namespace remotelens

#endif  // REMOTELENS_ENGINE_FORWARD_MEMORY_H_
