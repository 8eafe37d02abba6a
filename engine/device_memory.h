// Device memory as the allocator sees it, for remotelens_device_memory_bytes and the benches.
//
//   std::optional<int64_t> bytes = AllocatedDeviceBytes(at::Device("cuda:0"));
//   if (!bytes) bytes = WeightBytesOn(model.weights(), "cuda:0");   // CPU, or a CPU-only build
//
// On CUDA (builds with REMOTELENS_WITH_CUDA, i.e. a CUDA LibTorch) the answer is the caching
// allocator's current allocated bytes on that device: weights, key/value caches and whatever a
// request holds, not the allocator's reserved-but-free blocks. Elsewhere there is no allocator to
// ask and the answer is nullopt.
#ifndef REMOTELENS_ENGINE_DEVICE_MEMORY_H_
#define REMOTELENS_ENGINE_DEVICE_MEMORY_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>

#include "engine/llama_weights.h"

namespace remotelens {

// Bytes the CUDA caching allocator holds allocated on `device`; nullopt for a non-CUDA device
// or a build without CUDA.
std::optional<int64_t> AllocatedDeviceBytes(const at::Device& device);

// Bytes a request could still allocate on a CUDA `device`: what the driver reports free plus
// what the caching allocator holds reserved but unused. nullopt for a non-CUDA device, a build
// without CUDA, or a driver that cannot tell (CPU: see host_memory.h).
std::optional<int64_t> FreeDeviceBytes(const at::Device& device);

// Resident weight bytes per device string ("cpu", "cuda:0"); tied embeddings counted once.
std::map<std::string, int64_t> WeightBytesByDevice(const LlamaWeights& weights);

}  // namespace remotelens

#endif  // REMOTELENS_ENGINE_DEVICE_MEMORY_H_
