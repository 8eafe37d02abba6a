#include "engine/kv_cache_tensors.h"

#include <ATen/ATen.h>

#include <map>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace remotelens {
namespace {

std::string Shape(const at::Tensor& t) { return absl::StrCat("[", absl::StrJoin(t.sizes(), ", "), "]"); }

absl::Status Invalid(absl::string_view name, absl::string_view problem) {
  return absl::InvalidArgumentError(absl::StrCat("key/value cache tensor \"", name, "\" ", problem));
}

}  // namespace

std::string KvKeysName(int64_t layer) { return absl::StrCat("kv.", layer, ".keys"); }
std::string KvValuesName(int64_t layer) { return absl::StrCat("kv.", layer, ".values"); }

NamedTensors KvCacheToTensors(const KvCache& cache) {
  NamedTensors out;
  if (cache.length_ == 0) return out;
  const int64_t length = cache.length_;
  out.emplace_back(kKvMaskName, cache.mask_.narrow(1, 0, length).contiguous());
  for (size_t layer = 0; layer < cache.keys_.size(); ++layer) {
    // [batch, n_kv_heads, capacity, d_head] -> the first `length` positions, compact.
    out.emplace_back(KvKeysName(layer), cache.keys_[layer].narrow(2, 0, length).contiguous());
    out.emplace_back(KvValuesName(layer), cache.values_[layer].narrow(2, 0, length).contiguous());
  }
  return out;
}

absl::StatusOr<KvCache> KvCacheFromTensors(const NamedTensors& tensors, const LlamaModel& model) {
  const LlamaConfig& c = model.config();
  const at::ScalarType dtype = model.weights().embed.scalar_type();
  std::map<std::string, const at::Tensor*> by_name;
  for (const auto& [name, tensor] : tensors) {
    if (!by_name.emplace(name, &tensor).second) return Invalid(name, "appears twice");
  }
  const size_t expected = 1 + 2 * static_cast<size_t>(c.n_layers);
  auto find = [&](const std::string& name) -> absl::StatusOr<const at::Tensor*> {
    auto it = by_name.find(name);
    if (it == by_name.end() || !it->second->defined()) {
      return Invalid(name, absl::StrCat("is missing; a cache of this model holds kv.mask and ",
                                        "kv.{L}.keys / kv.{L}.values for L in 0..", c.n_layers - 1));
    }
    return it->second;
  };

  auto mask_or = find(kKvMaskName);
  if (!mask_or.ok()) return mask_or.status();
  const at::Tensor& mask = **mask_or;
  if (mask.dim() != 2 || mask.size(0) < 1 || mask.size(1) < 1 || mask.scalar_type() != at::kLong) {
    return Invalid(kKvMaskName, absl::StrCat("must be int64 [batch, length] with batch, length >= 1; got ",
                                             c10::toString(mask.scalar_type()), " ", Shape(mask)));
  }
  const int64_t batch = mask.size(0), length = mask.size(1);
  if (length > c.n_ctx) {
    return Invalid(kKvMaskName, absl::StrCat("holds ", length, " positions; the model's maximum is ",
                                             c.n_ctx, " (n_ctx)"));
  }
  const at::Tensor mask_cpu = mask.to(at::kCPU);
  if ((mask_cpu != 0).logical_and(mask_cpu != 1).any().item<bool>()) {
    return Invalid(kKvMaskName, "values must be 0 (padding) or 1 (real token)");
  }

  KvCache out;
  out.length_ = length;
  out.mask_ = mask_cpu;
  const std::vector<int64_t> want{batch, c.n_kv_heads, length, c.d_head};
  for (int64_t layer = 0; layer < c.n_layers; ++layer) {
    const at::Device device = model.weights().layers[layer].w_qkv.device();
    for (const std::string& name : {KvKeysName(layer), KvValuesName(layer)}) {
      auto t_or = find(name);
      if (!t_or.ok()) return t_or.status();
      const at::Tensor& t = **t_or;
      if (t.sizes() != at::IntArrayRef(want)) {
        return Invalid(name, absl::StrCat("must be [batch, n_kv_heads, length, d_head] = [",
                                          absl::StrJoin(want, ", "), "]; got ", Shape(t)));
      }
      if (t.scalar_type() != dtype) {
        return Invalid(name, absl::StrCat("must be in the model's dtype ", c10::toString(dtype), "; got ",
                                          c10::toString(t.scalar_type())));
      }
      (name == KvKeysName(layer) ? out.keys_ : out.values_).push_back(t.to(device));
    }
  }
  if (by_name.size() != expected) {
    for (const auto& [name, tensor] : by_name) {
      bool known = name == kKvMaskName;
      for (int64_t layer = 0; layer < c.n_layers && !known; ++layer) {
        known = name == KvKeysName(layer) || name == KvValuesName(layer);
      }
      if (!known) {
        return Invalid(name, absl::StrCat("is not part of a key/value cache of this ", c.n_layers,
                                          "-block model"));
      }
    }
  }
  return out;
}

}  // namespace remotelens
