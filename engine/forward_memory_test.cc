#include "engine/forward_memory.h"

#include "engine/hook_names.h"
#include "gtest/gtest.h"

namespace remotelens {
namespace {

LlamaConfig Config() {
  LlamaConfig c;
  c.d_model = 64;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.d_head = 16;
  c.d_mlp = 128;
  c.d_vocab = 1000;
  c.n_ctx = 256;
  return c;
}

TEST(ForwardMemory, CacheRequestBytesFollowTheHookShapeSliceAndDtype) {
  const LlamaConfig c = Config();
  const ForwardSize size{3, 10, 0};
  CacheRequest resid;
  resid.hook = HookId{1, HookSite::kResidPost};
  EXPECT_EQ(CacheRequestBytes(resid, c, at::kBFloat16, size), 3 * 10 * 64 * 2);
  resid.dtype = at::kFloat;
  resid.pos_start = -1;  // the last position only
  EXPECT_EQ(CacheRequestBytes(resid, c, at::kBFloat16, size), 3 * 1 * 64 * 4);
  resid.pos_start = 2;
  resid.pos_stop = -3;  // [2:7]
  EXPECT_EQ(CacheRequestBytes(resid, c, at::kBFloat16, size), 3 * 5 * 64 * 4);
  resid.pos_start = 8;
  resid.pos_stop = 4;  // empty
  EXPECT_EQ(CacheRequestBytes(resid, c, at::kBFloat16, size), 0);

  CacheRequest pattern;
  pattern.hook = HookId{0, HookSite::kAttnPattern};
  // [batch, heads, query_pos, key_pos]: key positions include the cached ones.
  EXPECT_EQ(CacheRequestBytes(pattern, c, at::kFloat, ForwardSize{2, 1, 9}), 2 * 4 * 1 * 10 * 4);
  CacheRequest k;
  k.hook = HookId{0, HookSite::kAttnK};
  EXPECT_EQ(CacheRequestBytes(k, c, at::kFloat, size), 3 * 10 * 2 * 16 * 4);
  CacheRequest scale;
  scale.hook = HookId{-1, HookSite::kLnFinalScale};
  EXPECT_EQ(CacheRequestBytes(scale, c, at::kFloat, size), 3 * 10 * 1 * 4);
}

TEST(ForwardMemory, WorkingBytesCoverLogitsScoresAndTheKeyValueCache) {
  const LlamaConfig c = Config();
  const int64_t one = ForwardWorkingBytes(c, at::kFloat, ForwardSize{1, 16, 0});
  // At least the float32 logits and the float32 scores and pattern of one block.
  EXPECT_GE(one, 16 * 1000 * 4 + 2 * 4 * 16 * 16 * 4);
  // Rows scale it linearly; positions at least linearly (scores quadratically).
  EXPECT_EQ(ForwardWorkingBytes(c, at::kFloat, ForwardSize{4, 16, 0}), 4 * one);
  EXPECT_GT(ForwardWorkingBytes(c, at::kFloat, ForwardSize{1, 64, 0}), 4 * one);
  // One block's activations are part of it, without the logits.
  const int64_t block = BlockActivationBytes(c, at::kFloat, ForwardSize{1, 16, 0});
  EXPECT_GE(block, 2 * 4 * 16 * 16 * 4);
  EXPECT_LE(block + 16 * 1000 * 8, one);
  // A narrower dtype needs less; a key/value cache needs more.
  EXPECT_LT(ForwardWorkingBytes(c, at::kBFloat16, ForwardSize{1, 16, 0}), one);
  EXPECT_GE(ForwardWorkingBytes(c, at::kFloat, ForwardSize{1, 1, 100}) -
                ForwardWorkingBytes(c, at::kFloat, ForwardSize{1, 1, 0}),
            2 * 2 * 2 * 16 * 100 * 4);
}

}  // namespace
}  // namespace remotelens
