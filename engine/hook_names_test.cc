#include "engine/hook_names.h"

#include <set>

#include "gtest/gtest.h"

namespace remotelens {
namespace {

TEST(HookNames, RoundTripsEveryHook) {
  const int64_t n_layers = 3;
  std::set<std::string> names;
  for (HookId id : AllHookIds(n_layers)) {
    const std::string name = HookName(id);
    auto parsed = ParseHookName(name, n_layers);
    ASSERT_TRUE(parsed.ok()) << name << ": " << parsed.status();
    EXPECT_EQ(*parsed, id) << name;
    names.insert(name);
  }
  EXPECT_EQ(names.size(), static_cast<size_t>(NumHookIds(n_layers)));
  EXPECT_EQ(NumHookIds(n_layers), 5 + 3 * 26);
}

TEST(HookNames, UsesTransformerLensSpelling) {
  EXPECT_EQ(HookName({-1, HookSite::kEmbed}), "hook_embed");
  EXPECT_EQ(HookName({2, HookSite::kLn1Scale}), "blocks.2.ln1.hook_scale");
  EXPECT_EQ(HookName({0, HookSite::kAttnScores}), "blocks.0.attn.hook_attn_scores");
  EXPECT_EQ(HookName({1, HookSite::kMlpPreLinear}), "blocks.1.mlp.hook_pre_linear");
  EXPECT_EQ(HookName({1, HookSite::kAttnOut}), "blocks.1.hook_attn_out");
  EXPECT_EQ(HookName({-1, HookSite::kLnFinalNormalized}), "ln_final.hook_normalized");
  EXPECT_EQ(HookName({0, HookSite::kQInput}), "blocks.0.hook_q_input");
  EXPECT_EQ(HookName({2, HookSite::kAttnIn}), "blocks.2.hook_attn_in");
  EXPECT_EQ(HookName({1, HookSite::kMlpIn}), "blocks.1.hook_mlp_in");
  EXPECT_EQ(HookName({-1, HookSite::kUnembedIn}), "unembed.hook_in");
  EXPECT_EQ(HookName({-1, HookSite::kUnembedOut}), "unembed.hook_out");
}

TEST(HookNames, ListsOptInFlagsAndBridgeNames) {
  // TransformerLens HookedTransformer.check_hooks_to_add: which flag each opt-in hook needs.
  EXPECT_EQ(EnablingFlag(HookSite::kAttnResult), "use_attn_result");
  EXPECT_EQ(EnablingFlag(HookSite::kQInput), "use_split_qkv_input");
  EXPECT_EQ(EnablingFlag(HookSite::kVInput), "use_split_qkv_input");
  EXPECT_EQ(EnablingFlag(HookSite::kAttnIn), "use_attn_in");
  EXPECT_EQ(EnablingFlag(HookSite::kMlpIn), "use_hook_mlp_in");
  EXPECT_EQ(EnablingFlag(HookSite::kResidPost), "");
  EXPECT_EQ(EnablingFlag(HookSite::kUnembedOut), "");
  // TransformerLens 4 block.py / attention.py / gated_mlp.py hook_aliases, Llama adapter.
  EXPECT_EQ(HookAliases({1, HookSite::kResidPre}, 3), (std::vector<std::string>{"blocks.1.hook_in"}));
  EXPECT_EQ(HookAliases({1, HookSite::kAttnZ}, 3), (std::vector<std::string>{"blocks.1.attn.o.hook_in"}));
  EXPECT_EQ(HookAliases({0, HookSite::kMlpOut}, 3),
            (std::vector<std::string>{"blocks.0.mlp.out.hook_out", "blocks.0.mlp.hook_out"}));
  EXPECT_EQ(HookAliases({1, HookSite::kResidPost}, 3), (std::vector<std::string>{"blocks.1.hook_out"}));
  EXPECT_EQ(HookAliases({2, HookSite::kResidPost}, 3),
            (std::vector<std::string>{"blocks.2.hook_out", "ln_final.hook_in"}));
  EXPECT_EQ(HookAliases({-1, HookSite::kEmbed}, 3), (std::vector<std::string>{"embed.hook_out"}));
  EXPECT_EQ(HookAliases({-1, HookSite::kUnembedIn}, 3), (std::vector<std::string>{"unembed.hook_in"}));
  // Every bridge name is unique across the model.
  std::set<std::string> seen;
  for (HookId id : AllHookIds(3)) {
    EXPECT_EQ(HookDims(id.site).size(), HookShape(id, LlamaConfig()).size()) << HookName(id);
    for (const std::string& alias : HookAliases(id, 3)) EXPECT_TRUE(seen.insert(alias).second) << alias;
  }
}

TEST(HookNames, SiteNamesListMatchingSitesInForwardOrder) {
  const std::string all = SiteNames([](HookSite) { return true; });
  EXPECT_EQ(all.rfind("hook_embed, blocks.L.hook_resid_pre, blocks.L.ln1.hook_scale", 0), 0u) << all;
  EXPECT_NE(all.find("ln_final.hook_normalized, unembed.hook_in, unembed.hook_out"), std::string::npos)
      << all;
  EXPECT_EQ(SiteNames([](HookSite s) { return s == HookSite::kAttnZ; }), "blocks.L.attn.hook_z");
  EXPECT_EQ(SiteNames([](HookSite) { return false; }), "");
}

TEST(HookNames, DenseIndexIsForwardOrder) {
  const int64_t n_layers = 4;
  int expected = 0;
  for (HookId id : AllHookIds(n_layers)) EXPECT_EQ(HookIndex(id, n_layers), expected++);
}

TEST(HookNames, UnknownNameSuggestsClosest) {
  auto parsed = ParseHookName("blocks.1.attn.hook_zz", 4);
  ASSERT_FALSE(parsed.ok());
  EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(parsed.status().message().find("\"blocks.1.attn.hook_z\""), std::string::npos)
      << parsed.status();
  EXPECT_NE(parsed.status().message().find("did you mean"), std::string::npos);
}

TEST(HookNames, RejectsLayerOutOfRange) {
  auto parsed = ParseHookName("blocks.4.hook_resid_pre", 4);
  ASSERT_FALSE(parsed.ok());
  EXPECT_NE(parsed.status().message().find("valid layers are 0..3"), std::string::npos)
      << parsed.status();
}

TEST(HookNames, RejectsMalformedLayers) {
  for (const char* name : {"blocks.01.hook_resid_pre", "blocks.-1.hook_resid_pre",
                           "blocks..hook_resid_pre", "blocks.1", "blocks.1.hook_embed",
                           "hook_resid_pre", "", "ln_final.hook_scale.x"}) {
    EXPECT_FALSE(ParseHookName(name, 4).ok()) << name;
  }
  EXPECT_FALSE(ParseHookName(std::string(1000, 'a'), 4).ok());
}

TEST(HookNames, ShapesFollowTransformerLens) {
  LlamaConfig c;
  c.d_model = 64;
  c.n_heads = 8;
  c.n_kv_heads = 2;
  c.d_head = 8;
  c.d_mlp = 100;
  EXPECT_EQ(HookShape({0, HookSite::kAttnK}, c), (std::vector<int64_t>{-1, -1, 2, 8}));
  EXPECT_EQ(HookShape({0, HookSite::kAttnQ}, c), (std::vector<int64_t>{-1, -1, 8, 8}));
  EXPECT_EQ(HookShape({0, HookSite::kAttnPattern}, c), (std::vector<int64_t>{-1, 8, -1, -1}));
  EXPECT_EQ(HookShape({0, HookSite::kAttnResult}, c), (std::vector<int64_t>{-1, -1, 8, 64}));
  EXPECT_EQ(HookShape({0, HookSite::kMlpPost}, c), (std::vector<int64_t>{-1, -1, 100}));
  EXPECT_EQ(HookShape({-1, HookSite::kLnFinalScale}, c), (std::vector<int64_t>{-1, -1, 1}));
  EXPECT_EQ(PosDim(HookSite::kAttnPattern), 2);
  EXPECT_EQ(HeadDim(HookSite::kAttnPattern), 1);
  EXPECT_EQ(HeadDim(HookSite::kAttnZ), 2);
  EXPECT_EQ(HeadDim(HookSite::kResidPost), -1);
  EXPECT_EQ(HookShape({0, HookSite::kQInput}, c), (std::vector<int64_t>{-1, -1, 8, 64}));
  EXPECT_EQ(HookShape({0, HookSite::kAttnIn}, c), (std::vector<int64_t>{-1, -1, 8, 64}));
  EXPECT_EQ(HookShape({0, HookSite::kKInput}, c), (std::vector<int64_t>{-1, -1, 2, 64}));
  EXPECT_EQ(HookShape({0, HookSite::kMlpIn}, c), (std::vector<int64_t>{-1, -1, 64}));
  c.d_vocab = 500;
  EXPECT_EQ(HookShape({-1, HookSite::kUnembedOut}, c), (std::vector<int64_t>{-1, -1, 500}));
  EXPECT_EQ(HookShape({-1, HookSite::kUnembedIn}, c), (std::vector<int64_t>{-1, -1, 64}));
  EXPECT_EQ(HeadDim(HookSite::kKInput), 2);
  EXPECT_EQ(PosDim(HookSite::kQInput), 1);
  EXPECT_EQ(HookDims(HookSite::kKInput),
            (std::vector<std::string>{"batch", "pos", "kv_head_index", "d_model"}));
  EXPECT_EQ(HookDims(HookSite::kAttnPattern),
            (std::vector<std::string>{"batch", "head_index", "query_pos", "key_pos"}));
}

}  // namespace
}  // namespace remotelens
