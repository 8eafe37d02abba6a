#include "engine/forward_memory.h"

#include <algorithm>
#include <vector>

#include "engine/hook_names.h"

namespace remotelens {
namespace {

// Length of a Python slice [start:stop] of a sequence of `n`.
int64_t SliceLength(std::optional<int64_t> start, std::optional<int64_t> stop, int64_t n) {
  auto clamp = [n](int64_t i) { return std::clamp(i < 0 ? i + n : i, int64_t{0}, n); };
  const int64_t begin = start ? clamp(*start) : 0;
  const int64_t end = stop ? clamp(*stop) : n;
  return std::max<int64_t>(0, end - begin);
}

}  // namespace

int64_t BlockActivationBytes(const LlamaConfig& c, at::ScalarType dtype, const ForwardSize& size) {
  const int64_t e = static_cast<int64_t>(c10::elementSize(dtype));
  const int64_t rows = size.batch * size.pos;
  const int64_t keys = size.pos + size.past;
  // resid_pre, normalized, attn_out, resid_mid (and their successors of the next block).
  int64_t block = 4 * rows * c.d_model * e;
  block += 2 * rows * (c.n_heads + 2 * c.n_kv_heads) * c.d_head * e;  // q/k/v, rotated
  block += 2 * size.batch * c.n_heads * size.pos * keys * 4;          // scores, pattern (float32)
  block += rows * c.n_heads * c.d_head * e;                            // z
  block += 3 * rows * c.d_mlp * e;                                     // gate/up, post
  return block;
}

int64_t ForwardWorkingBytes(const LlamaConfig& c, at::ScalarType dtype, const ForwardSize& size) {
  const int64_t e = static_cast<int64_t>(c10::elementSize(dtype));
  const int64_t rows = size.batch * size.pos;
  const int64_t keys = size.pos + size.past;
  int64_t total = BlockActivationBytes(c, dtype, size);
  if (size.past > 0) {
    total += 2 * c.n_layers * size.batch * c.n_kv_heads * c.d_head * keys * e;  // key/value cache
  }
  total += rows * c.d_vocab * (e + 4);  // logits, and their float32 copy
  return total;
}

int64_t CacheRequestBytes(const CacheRequest& request, const LlamaConfig& c,
                          at::ScalarType model_dtype, const ForwardSize& size) {
  const std::vector<int64_t> shape = HookShape(request.hook, c);
  const int pos_dim = PosDim(request.hook.site);
  int64_t numel = 1;
  for (size_t d = 0; d < shape.size(); ++d) {
    int64_t n = shape[d];
    if (n < 0) {
      if (d == 0) n = size.batch;
      else if (static_cast<int>(d) == pos_dim) n = size.pos;
      else n = size.pos + size.past;  // key positions
    }
    if (static_cast<int>(d) == pos_dim) n = SliceLength(request.pos_start, request.pos_stop, n);
    numel *= n;
  }
  return numel * static_cast<int64_t>(c10::elementSize(request.dtype.value_or(model_dtype)));
}

}  // namespace remotelens
