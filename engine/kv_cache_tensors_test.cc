#include "engine/kv_cache_tensors.h"

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "engine/test_model.h"
#include "gtest/gtest.h"

namespace remotelens {
namespace {

struct KvCacheTensorsTestModel {
  static constexpr char kName[] = "kv_cache_tensors_test";
  static DemoModelSpec Spec() { return SmallSpec(64, 2, 32); }
};
using KvCacheTensorsTest = SharedModelTest<KvCacheTensorsTestModel>;

ForwardInput Tokens(const at::Tensor& tokens, const at::Tensor& mask = at::Tensor()) {
  ForwardInput input;
  input.tokens = tokens;
  input.attention_mask = mask;
  return input;
}

// Two rows: the second left-padded by two positions in the first chunk.
const at::Tensor& FirstChunk() {
  static const at::Tensor t = at::tensor({3, 14, 15, 92, 65, 0, 0, 35, 89, 79}, at::kLong).view({2, 5});
  return t;
}
const at::Tensor& FirstMask() {
  static const at::Tensor m = at::tensor({1, 1, 1, 1, 1, 0, 0, 1, 1, 1}, at::kLong).view({2, 5});
  return m;
}
const at::Tensor& SecondChunk() {
  static const at::Tensor t = at::tensor({26, 53, 58, 97, 93, 23}, at::kLong).view({2, 3});
  return t;
}

TEST_F(KvCacheTensorsTest, RoundTripsNamesShapesAndValues) {
  KvCache kv;
  ASSERT_TRUE(model_->Forward(Tokens(FirstChunk(), FirstMask()), nullptr, &kv).ok());
  const NamedTensors tensors = KvCacheToTensors(kv);
  const LlamaConfig& c = model_->config();
  ASSERT_EQ(tensors.size(), 1u + 2 * c.n_layers);
  EXPECT_EQ(tensors[0].first, "kv.mask");
  EXPECT_TRUE(at::equal(tensors[0].second, FirstMask()));
  EXPECT_EQ(tensors[1].first, "kv.0.keys");
  EXPECT_EQ(tensors[2].first, "kv.0.values");
  EXPECT_EQ(tensors[4].first, "kv.1.values");
  for (size_t i = 1; i < tensors.size(); ++i) {
    EXPECT_EQ(tensors[i].second.sizes(), (std::vector<int64_t>{2, c.n_kv_heads, 5, c.d_head}));
    // Compact: what it holds is what it occupies (the cache's spare capacity is cut off).
    EXPECT_TRUE(tensors[i].second.is_contiguous());
  }
  absl::StatusOr<KvCache> restored = KvCacheFromTensors(tensors, *model_);
  ASSERT_TRUE(restored.ok()) << restored.status();
  EXPECT_EQ(restored->length(), 5);
  EXPECT_EQ(restored->rows(), 2);
  const NamedTensors again = KvCacheToTensors(*restored);
  ASSERT_EQ(again.size(), tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    EXPECT_EQ(again[i].first, tensors[i].first);
    EXPECT_TRUE(at::equal(again[i].second, tensors[i].second)) << tensors[i].first;
  }
  EXPECT_TRUE(KvCacheToTensors(KvCache()).empty());
}

TEST_F(KvCacheTensorsTest, ForwardOnRestoredCacheEqualsOriginalAndFullForward) {
  KvCache original;
  ASSERT_TRUE(model_->Forward(Tokens(FirstChunk(), FirstMask()), nullptr, &original).ok());
  const NamedTensors stored = KvCacheToTensors(original);
  std::vector<at::Tensor> before;
  for (const auto& [name, t] : stored) before.push_back(t.clone());
  KvCache restored = KvCacheFromTensors(stored, *model_).value();

  const at::Tensor on_original = model_->Forward(Tokens(SecondChunk()), nullptr, &original).value();
  const at::Tensor on_restored = model_->Forward(Tokens(SecondChunk()), nullptr, &restored).value();
  EXPECT_TRUE(at::equal(on_original, on_restored));
  EXPECT_EQ(restored.length(), 8);
  // The stored tensors were read, never written (the restored cache reallocated to append).
  for (size_t i = 0; i < stored.size(); ++i) {
    EXPECT_TRUE(at::equal(stored[i].second, before[i])) << stored[i].first;
  }
  // Both equal one forward over the whole sequence at the new positions.
  const at::Tensor full_tokens = at::cat({FirstChunk(), SecondChunk()}, 1);
  const at::Tensor full_mask = at::cat({FirstMask(), at::ones({2, 3}, at::kLong)}, 1);
  const at::Tensor full = model_->Forward(Tokens(full_tokens, full_mask)).value();
  EXPECT_TRUE(at::allclose(on_restored, full.narrow(1, 5, 3), 1e-4, 1e-4))
      << (on_restored - full.narrow(1, 5, 3)).abs().max().item<float>();
}

NamedTensors Valid(LlamaModel* model) {
  KvCache kv;
  EXPECT_TRUE(model->Forward(Tokens(FirstChunk(), FirstMask()), nullptr, &kv).ok());
  return KvCacheToTensors(kv);
}

void ExpectInvalid(const NamedTensors& tensors, const LlamaModel& model, const std::string& needle) {
  absl::StatusOr<KvCache> restored = KvCacheFromTensors(tensors, model);
  ASSERT_FALSE(restored.ok()) << "expected an error mentioning " << needle;
  EXPECT_EQ(restored.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(restored.status().message(), needle)) << restored.status();
}

TEST_F(KvCacheTensorsTest, RefusesMalformedTensorsNamingThem) {
  {
    NamedTensors t = Valid(model_);
    t.pop_back();  // kv.1.values
    ExpectInvalid(t, *model_, "\"kv.1.values\" is missing");
  }
  {
    NamedTensors t = Valid(model_);
    t[1].second = t[1].second.narrow(2, 0, 4).contiguous();  // fewer positions than the mask
    ExpectInvalid(t, *model_, "\"kv.0.keys\" must be [batch, n_kv_heads, length, d_head] = [2, 2, 5, 16]");
  }
  {
    NamedTensors t = Valid(model_);
    t[2].second = t[2].second.to(at::kDouble);
    ExpectInvalid(t, *model_, "\"kv.0.values\" must be in the model's dtype");
  }
  {
    NamedTensors t = Valid(model_);
    t[0].second = t[0].second * 2;
    ExpectInvalid(t, *model_, "values must be 0 (padding) or 1");
  }
  {
    NamedTensors t = Valid(model_);
    t[0].second = t[0].second.to(at::kFloat);
    ExpectInvalid(t, *model_, "\"kv.mask\" must be int64 [batch, length]");
  }
  {
    NamedTensors t = Valid(model_);
    t.emplace_back("kv.2.keys", t[1].second);
    ExpectInvalid(t, *model_, "\"kv.2.keys\" is not part of a key/value cache of this 2-block model");
  }
  {
    NamedTensors t = Valid(model_);
    t.push_back(t[0]);
    ExpectInvalid(t, *model_, "\"kv.mask\" appears twice");
  }
  {
    // Longer than the model's n_ctx (32).
    NamedTensors t;
    const LlamaConfig& c = model_->config();
    t.emplace_back("kv.mask", at::ones({1, 33}, at::kLong));
    for (int64_t layer = 0; layer < c.n_layers; ++layer) {
      t.emplace_back(KvKeysName(layer), at::zeros({1, c.n_kv_heads, 33, c.d_head}));
      t.emplace_back(KvValuesName(layer), at::zeros({1, c.n_kv_heads, 33, c.d_head}));
    }
    ExpectInvalid(t, *model_, "holds 33 positions; the model's maximum is 32");
  }
}

}  // namespace
}  // namespace remotelens
