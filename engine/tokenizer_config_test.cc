#include "engine/tokenizer_config.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "gtest/gtest.h"

namespace remotelens {
namespace {

TEST(TokenizerConfig, ReadsAStringTemplateAndTokenTexts) {
  auto config = ParseTokenizerConfig(
      R"({"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>", "lstrip": false},
          "chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"})");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->bos_token, "<|begin_of_text|>");
  EXPECT_EQ(config->eos_token, "<|eot_id|>");
  ASSERT_EQ(config->chat_templates.size(), 1u);
  EXPECT_EQ(config->chat_templates[0].name, "default");
  EXPECT_EQ(config->chat_templates[0].source,
            "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}");
}

TEST(TokenizerConfig, NamedTemplatesPutDefaultFirst) {
  auto config = ParseTokenizerConfig(
      R"({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]})");
  ASSERT_TRUE(config.ok()) << config.status();
  ASSERT_EQ(config->chat_templates.size(), 2u);
  EXPECT_EQ(config->chat_templates[0].name, "default");
  EXPECT_EQ(config->chat_templates[0].source, "D");
  EXPECT_EQ(config->chat_templates[1].name, "tool_use");
  EXPECT_EQ(config->bos_token, "");
}

TEST(TokenizerConfig, JinjaFileReplacesTheDefaultTemplate) {
  auto config = ParseTokenizerConfig(R"({"chat_template": "old"})", std::string("new"));
  ASSERT_TRUE(config.ok()) << config.status();
  ASSERT_EQ(config->chat_templates.size(), 1u);
  EXPECT_EQ(config->chat_templates[0].source, "new");
  auto only_file = ParseTokenizerConfig("", std::string("file"));
  ASSERT_TRUE(only_file.ok());
  ASSERT_EQ(only_file->chat_templates.size(), 1u);
  EXPECT_EQ(only_file->chat_templates[0].name, "default");
}

TEST(TokenizerConfig, RefusesMalformedFields) {
  for (const char* json : {R"([1, 2])", R"({"chat_template": 3})",
                           R"({"chat_template": [{"name": "x"}]})", R"({"bos_token": 7})", "{"}) {
    auto config = ParseTokenizerConfig(json);
    ASSERT_FALSE(config.ok()) << json;
    EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument) << json;
  }
  auto status = ParseTokenizerConfig(R"({"chat_template": 3})").status();
  EXPECT_NE(status.message().find("chat_template"), absl::string_view::npos) << status;
}

TEST(TokenizerConfig, ReadsADirectoryWithOrWithoutTheFiles) {
  const std::string dir = std::string(std::getenv("TEST_TMPDIR") ? std::getenv("TEST_TMPDIR") : "/tmp") +
                          "/tokenizer_config_test";
  std::filesystem::create_directories(dir);
  std::filesystem::remove(dir + "/tokenizer_config.json");
  std::filesystem::remove(dir + "/chat_template.jinja");
  auto empty = ReadTokenizerConfig(dir);
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_TRUE(empty->chat_templates.empty());
  std::ofstream(dir + "/tokenizer_config.json") << R"({"eos_token": "<|eot_id|>", "chat_template": 1})";
  auto bad = ReadTokenizerConfig(dir);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find(dir), absl::string_view::npos) << bad.status();
  std::ofstream(dir + "/tokenizer_config.json") << R"({"eos_token": "<|eot_id|>"})";
  std::ofstream(dir + "/chat_template.jinja") << "{{ eos_token }}";
  auto good = ReadTokenizerConfig(dir);
  ASSERT_TRUE(good.ok()) << good.status();
  EXPECT_EQ(good->eos_token, "<|eot_id|>");
  ASSERT_EQ(good->chat_templates.size(), 1u);
  EXPECT_EQ(good->chat_templates[0].source, "{{ eos_token }}");
}

}  // namespace
}  // namespace remotelens
