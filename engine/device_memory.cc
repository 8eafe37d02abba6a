#include "engine/device_memory.h"

#ifdef REMOTELENS_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
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
