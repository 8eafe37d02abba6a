#include "engine/llama_config.h"

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace remotelens {
namespace {

// The shape of Meta-Llama-3.1-8B's config.json.
constexpr char kLlama31_8B[] = R"({
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "bos_token_id": 128000,
  "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
  "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": false,
  "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
  "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "vocab_size": 128256})";

TEST(LlamaConfig, ParsesLlama31) {
  auto c = ParseLlamaConfig(kLlama31_8B, "Llama-3.1-8B");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_name, "Llama-3.1-8B");
  EXPECT_EQ(c->d_model, 4096);
  EXPECT_EQ(c->d_mlp, 14336);
  EXPECT_EQ(c->n_layers, 32);
  EXPECT_EQ(c->n_heads, 32);
  EXPECT_EQ(c->n_kv_heads, 8);
  EXPECT_EQ(c->d_head, 128);
  EXPECT_EQ(c->d_vocab, 128256);
  EXPECT_EQ(c->n_ctx, 131072);
  EXPECT_DOUBLE_EQ(c->rope_theta, 500000.0);
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_DOUBLE_EQ(c->rope_scaling.factor, 8.0);
  EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_EQ(c->bos_token_id, 128000);
  EXPECT_EQ(c->eos_token_ids, (std::vector<int64_t>{128001, 128008, 128009}));
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_EQ(ParameterCount(*c), 8030261248);  // the published 8.03B
}

TEST(LlamaConfig, RoundTripsThroughJson) {
  auto c = ParseLlamaConfig(kLlama31_8B);
  ASSERT_TRUE(c.ok());
  c->model_name = "x";
  auto again = ParseLlamaConfig(LlamaConfigToJson(*c));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->d_head, c->d_head);
  EXPECT_EQ(again->eos_token_ids, c->eos_token_ids);
  EXPECT_EQ(again->rope_scaling.high_freq_factor, c->rope_scaling.high_freq_factor);
  EXPECT_EQ(again->model_name, "x");
}

TEST(LlamaConfig, DefaultsHeadDimAndKvHeads) {
  auto c = ParseLlamaConfig(R"({"hidden_size": 64, "intermediate_size": 128,
      "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100,
      "max_position_embeddings": 32, "rope_scaling": null, "tie_word_embeddings": true})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->d_head, 16);
  EXPECT_EQ(c->n_kv_heads, 4);
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kNone);
  EXPECT_TRUE(c->tie_word_embeddings);
}

struct BadCase {
  const char* json;
  const char* expected_in_message;
};

TEST(LlamaConfig, RejectsUnsupportedWithFieldNamed) {
  const std::string base = R"("hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
      "num_attention_heads": 4, "vocab_size": 100, "max_position_embeddings": 32)";
  const BadCase cases[] = {
      {"not json", "not a JSON object"},
      {R"({"model_type": "mistral"})", "model_type"},
      {R"({"architectures": ["GPT2LMHeadModel"]})", "architectures"},
      {R"({"hidden_act": "gelu"})", "hidden_act"},
      {R"({"attention_bias": true})", "attention_bias"},
      {R"({"rope_scaling": {"rope_type": "yarn", "factor": 4}})", "yarn"},
      {R"({"num_key_value_heads": 3})", "num_key_value_heads"},
      {R"({"hidden_size": -1})", "hidden_size"},
      {R"({"vocab_size": "many"})", "vocab_size"},
      {R"({"rms_norm_eps": 0})", "rms_norm_eps"},
      {R"({"eos_token_id": 1000})", "eos_token_id"},
  };
  for (const BadCase& bad : cases) {
    std::string json = bad.json;
    if (json.front() == '{' && json.size() > 2) {
      // nlohmann::json keeps the last of duplicate keys, so the override follows the base.
      json = "{" + base + "," + json.substr(1);
    }
    auto c = ParseLlamaConfig(json);
    ASSERT_FALSE(c.ok()) << bad.json;
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(c.status().message().find(bad.expected_in_message), std::string::npos)
        << c.status();
  }
  auto missing = ParseLlamaConfig("{}");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("hidden_size is missing"), std::string::npos);
}

// Regression (fuzz/corpus/llama_config_fuzz/crash-name-not-string): a non-string name or dtype
// threw nlohmann::json::type_error out of ParseLlamaConfig and killed the process.
TEST(LlamaConfig, NonStringNameOrDtypeIsInvalidArgumentNamingTheField) {
  const std::string with_list_name = absl::StrCat("{\"_name_or_path\": [\"x\"], ",
                                                  std::string(kLlama31_8B).substr(1));
  std::string with_list_dtype(kLlama31_8B);
  const size_t dtype_at = with_list_dtype.find("\"bfloat16\"");
  ASSERT_NE(dtype_at, std::string::npos);
  with_list_dtype.replace(dtype_at, 10, "[\"bfloat16\"]");
  for (const auto& [key, text] : {std::pair<std::string, std::string>{"_name_or_path", with_list_name},
                                  {"torch_dtype", with_list_dtype}}) {
    auto c = ParseLlamaConfig(text, "m");
    ASSERT_FALSE(c.ok()) << key;
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(c.status().message().find(key), std::string::npos) << c.status();
  }
  auto c = ParseLlamaConfig(absl::StrCat("{\"_name_or_path\": null, ", std::string(kLlama31_8B).substr(1)), "m");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_name, "m");
  EXPECT_EQ(c->torch_dtype, "bfloat16");
}

TEST(LlamaConfig, MissingFileIsNotFound) {
  auto c = ReadLlamaConfig("/nonexistent/dir");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace remotelens
