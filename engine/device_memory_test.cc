#include "engine/device_memory.h"

#include <gtest/gtest.h>

#include "engine/test_model.h"

namespace remotelens {
namespace {

TEST(DeviceMemory, CpuHasNoAllocatorToAsk) {
  EXPECT_FALSE(AllocatedDeviceBytes(at::Device("cpu")).has_value());
}

TEST(DeviceMemory, WeightBytesCountEveryTensorOnce) {
  static TestModel* m = new TestModel(MakeTestModel("device_memory_test", SmallSpec(64, 2, 32)));
  const LlamaWeights& w = m->model->weights();
  int64_t expected = 0;
  auto add = [&](const at::Tensor& t) { expected += t.numel() * t.element_size(); };
  add(w.embed);
  add(w.ln_final);
  if (!w.unembed.is_same(w.embed)) add(w.unembed);
  for (const LayerWeights& l : w.layers) {
    for (const at::Tensor* t : {&l.ln1, &l.w_qkv, &l.w_o, &l.ln2, &l.w_gate_up, &l.w_down}) add(*t);
  }
  const auto bytes = WeightBytesByDevice(w);
  ASSERT_EQ(bytes.size(), 1u);
  ASSERT_EQ(bytes.count("cpu"), 1u);
  EXPECT_EQ(bytes.at("cpu"), expected);
  // float32 test model: 64-wide embedding over the 512-token vocabulary alone is 128 KiB.
  EXPECT_GE(bytes.at("cpu"), 512 * 64 * 4);
}

}  // namespace
}  // namespace remotelens
