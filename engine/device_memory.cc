#include "engine/device_memory.h"

#include <algorithm>

#ifdef REMOTELENS_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#endif

namespace remotelens {

std::optional<int64_t> AllocatedDeviceBytes(const at::Device& device) {
#ifdef REMOTELENS_WITH_CUDA
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(
        static_cast<c10::DeviceIndex>(device.index() < 0 ? 0 : device.index()));
    // Index 0 is StatType::AGGREGATE (all pools) in every LibTorch 2.x; the enum itself moved
    // namespaces (c10::CachingDeviceAllocator in newer releases), so it is not named here.
    return static_cast<int64_t>(stats.allocated_bytes[0].current);
  }
#else
  (void)device;
#endif
  return std::nullopt;
}

std::optional<int64_t> FreeDeviceBytes(const at::Device& device) {
#ifdef REMOTELENS_WITH_CUDA
  if (device.is_cuda()) {
    const c10::DeviceIndex index = static_cast<c10::DeviceIndex>(device.index() < 0 ? 0 : device.index());
    c10::cuda::CUDAGuard guard(index);
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) {
      cudaGetLastError();  // clear the sticky error so later calls are not blamed for it
      return std::nullopt;
    }
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(index);
    const int64_t cached = static_cast<int64_t>(stats.reserved_bytes[0].current) -
                           static_cast<int64_t>(stats.allocated_bytes[0].current);
    return static_cast<int64_t>(free_bytes) + std::max<int64_t>(0, cached);
  }
#else
  (void)device;
#endif
  return std::nullopt;
}

std::map<std::string, int64_t> WeightBytesByDevice(const LlamaWeights& weights) {
  std::map<std::string, int64_t> bytes;
  auto add = [&](const at::Tensor& t) {
    if (t.defined()) bytes[t.device().str()] += t.numel() * t.element_size();
  };
  add(weights.embed);
  add(weights.ln_final);
  if (!weights.unembed.is_same(weights.embed)) add(weights.unembed);
  for (const LayerWeights& l : weights.layers) {
    for (const at::Tensor* t : {&l.ln1, &l.w_qkv, &l.w_o, &l.ln2, &l.w_gate_up, &l.w_down}) add(*t);
  }
  return bytes;
}

}  // namespace remotelens
