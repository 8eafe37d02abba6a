#include "server/request_builder.h"

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "engine/kv_cache_tensors.h"
#include "engine/status_macros.h"
#include "engine/test_model.h"
#include "gtest/gtest.h"
#include "server/tensor_codec.h"

namespace remotelens {
namespace {

class RequestBuilderTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    test_model_ = new TestModel(MakeTestModel("request_builder_test", SmallSpec(32, 2, 16)));
    model_ = test_model_->model.get();
    tokenizer_ = Tokenizer::FromJsonFile(test_model_->dir + "/tokenizer.json").value().release();
    v1::Limits limits;
    limits.set_max_batch(4);
    limits_ = new v1::Limits(LimitsWithDefaults(limits));
  }
  static ModelContext Ctx() { return {model_, tokenizer_, limits_}; }
  static v1::Tensor Proto(const at::Tensor& t) { return TensorToProto(t).value(); }

  static TestModel* test_model_;
  static LlamaModel* model_;
  static Tokenizer* tokenizer_;
  static v1::Limits* limits_;
};
TestModel* RequestBuilderTest::test_model_ = nullptr;
LlamaModel* RequestBuilderTest::model_ = nullptr;
Tokenizer* RequestBuilderTest::tokenizer_ = nullptr;
v1::Limits* RequestBuilderTest::limits_ = nullptr;

TEST_F(RequestBuilderTest, LimitsDefaultsFillOnlyUnsetFields) {
  EXPECT_EQ(limits_->max_batch(), 4);
  EXPECT_EQ(limits_->chunk_bytes(), 1 << 20);
  EXPECT_EQ(limits_->max_queue(), 256);
  EXPECT_EQ(limits_->hook_timeout_ms(), 30000);
  EXPECT_EQ(limits_->max_stored_cache_bytes(), int64_t{16} << 30);
  EXPECT_EQ(limits_->max_queued_bytes_per_call(), int64_t{1} << 30);
  v1::Limits set;
  set.set_max_stored_cache_bytes(1234);
  EXPECT_EQ(LimitsWithDefaults(set).max_stored_cache_bytes(), 1234);
}

TEST_F(RequestBuilderTest, CacheSelectionExpandsStarInForwardOrderOnce) {
  v1::CacheSelection selection;
  selection.add_names("blocks.1.hook_resid_post");
  selection.add_names("*");
  selection.set_dtype(v1::DTYPE_BFLOAT16);
  selection.set_pos_start(-2);
  auto requests = BuildCacheRequests(selection, model_->config());
  ASSERT_TRUE(requests.ok()) << requests.status();
  ASSERT_EQ(requests->size(), static_cast<size_t>(NumHookIds(2)));
  EXPECT_EQ(HookName(requests->front().hook), "hook_embed");
  EXPECT_EQ(HookName(requests->back().hook), "unembed.hook_out");
  EXPECT_EQ(requests->front().dtype, at::kBFloat16);
  EXPECT_EQ(requests->front().pos_start, -2);
  EXPECT_FALSE(requests->front().pos_stop.has_value());

  v1::CacheSelection bad;
  bad.add_names("blocks.0.hook_resid_pre");
  bad.add_names("blocks.0.hook_resid_pr");
  auto error = BuildCacheRequests(bad, model_->config());
  ASSERT_FALSE(error.ok());
  EXPECT_NE(error.status().message().find("cache.names[1]"), std::string::npos) << error.status();
}

TEST_F(RequestBuilderTest, HookOpsConvertAndNameTheFieldOnError) {
  const LlamaConfig& c = model_->config();
  v1::HookOp op;
  op.set_hook_name("blocks.0.attn.hook_z");
  op.mutable_zero();
  op.mutable_selector()->add_heads(1);
  auto built = BuildInterventionOp(op, c, nullptr, nullptr, "hooks[0]");
  ASSERT_TRUE(built.ok()) << built.status();
  EXPECT_EQ(built->kind, OpKind::kZero);
  EXPECT_EQ(built->selector.heads, std::vector<int64_t>{1});

  v1::HookOp on_resid;
  on_resid.set_hook_name("blocks.0.hook_resid_post");
  on_resid.mutable_zero();
  on_resid.mutable_selector()->add_heads(1);
  auto error = BuildInterventionOp(on_resid, c, nullptr, nullptr, "hooks[3]");
  EXPECT_EQ(error.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(error.status().message().find("hooks[3].selector.heads"), std::string::npos) << error.status();

  v1::HookOp add;
  add.set_hook_name("blocks.1.hook_resid_post");
  *add.mutable_add()->mutable_value() = Proto(at::ones({32}, at::kLong));
  error = BuildInterventionOp(add, c, nullptr, nullptr, "hooks[1]");
  EXPECT_NE(error.status().message().find("hooks[1].add.value"), std::string::npos) << error.status();

  v1::HookOp wrong_width;
  wrong_width.set_hook_name("blocks.1.hook_resid_post");
  *wrong_width.mutable_add()->mutable_value() = Proto(at::ones({5}));
  auto status = ValidateHookOp(wrong_width, c, false, "op");
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("does not broadcast"), std::string::npos) << status;
  v1::HookOp one_head;  // a [d_head] value for one selected head of z broadcasts
  one_head.set_hook_name("blocks.0.attn.hook_z");
  one_head.mutable_selector()->add_heads(1);
  *one_head.mutable_set()->mutable_value() = Proto(at::ones({1, 8}));
  EXPECT_TRUE(ValidateHookOp(one_head, c, false, "op").ok());

  v1::HookOp empty;
  empty.set_hook_name("hook_embed");
  EXPECT_NE(ValidateHookOp(empty, c, false, "op").message().find("no op set"), std::string::npos);

  v1::HookOp callback;
  callback.set_hook_name("hook_embed");
  callback.mutable_client_callback()->set_callback_id(3);
  EXPECT_NE(ValidateHookOp(callback, c, false, "op").message().find("only valid as one-shot hooks"),
            std::string::npos);
}

TEST_F(RequestBuilderTest, PatchFromCacheBecomesSetWithTheStoredRegion) {
  auto stored = std::make_shared<StoredCache>();
  const at::Tensor resid = at::arange(2 * 5 * 32, at::kFloat).view({2, 5, 32});
  stored->tensors.emplace_back("blocks.1.hook_resid_pre", resid);
  CacheLookup lookup = [&](const std::string& handle) -> absl::StatusOr<std::shared_ptr<const StoredCache>> {
    if (handle != "c1") return absl::NotFoundError("cache 'c9' not found");
    return std::shared_ptr<const StoredCache>(stored);
  };
  v1::HookOp op;
  op.set_hook_name("blocks.1.hook_resid_pre");
  op.mutable_patch_from_cache()->set_cache_handle("c1");
  op.mutable_selector()->add_positions(-1);
  auto built = BuildInterventionOp(op, model_->config(), lookup, nullptr, "hooks[0]");
  ASSERT_TRUE(built.ok()) << built.status();
  EXPECT_EQ(built->kind, OpKind::kSet);
  EXPECT_TRUE(at::equal(built->value, resid.narrow(1, 4, 1)));

  op.mutable_patch_from_cache()->set_source_hook_name("blocks.0.hook_resid_pre");
  EXPECT_EQ(BuildInterventionOp(op, model_->config(), lookup, nullptr, "h").status().code(),
            absl::StatusCode::kNotFound);
  op.mutable_patch_from_cache()->set_cache_handle("c9");
  EXPECT_EQ(BuildInterventionOp(op, model_->config(), lookup, nullptr, "h").status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(RequestBuilderTest, TokenInputBoundsAndTexts) {
  google::protobuf::RepeatedPtrField<std::string> no_texts;
  v1::Tensor none;
  auto ok = BuildTokenInput(Proto(at::ones({2, 3}, at::kLong)), no_texts, false, none, Ctx(), 100);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->tokens.sizes(), (std::vector<int64_t>{2, 3}));

  EXPECT_EQ(BuildTokenInput(none, no_texts, false, none, Ctx(), 100).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto too_many = BuildTokenInput(Proto(at::ones({2, 3}, at::kLong)), no_texts, false, none, Ctx(), 5);
  EXPECT_EQ(too_many.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(too_many.status().message().find("max_tokens_per_request = 5"), std::string::npos);
  EXPECT_EQ(BuildTokenInput(Proto(at::ones({5, 1}, at::kLong)), no_texts, false, none, Ctx(), 100)
                .status().code(),
            absl::StatusCode::kInvalidArgument);  // max_batch 4
  EXPECT_EQ(BuildTokenInput(Proto(at::ones({1, 17}, at::kLong)), no_texts, false, none, Ctx(), 100)
                .status().code(),
            absl::StatusCode::kOutOfRange);  // n_ctx 16
  auto bad_mask = BuildTokenInput(Proto(at::ones({1, 3}, at::kLong)), no_texts, false,
                                  Proto(at::ones({1, 2}, at::kLong)), Ctx(), 100);
  EXPECT_NE(bad_mask.status().message().find("attention_mask"), std::string::npos);

  google::protobuf::RepeatedPtrField<std::string> texts;
  *texts.Add() = "the cat";
  *texts.Add() = "a";
  auto encoded = BuildTokenInput(none, texts, true, none, Ctx(), 100);
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  // Left padding: the shorter row's mask starts with zeros, and both rows start with bos.
  EXPECT_EQ(encoded->attention_mask[1][0].item<int64_t>(), 0);
  EXPECT_EQ(encoded->attention_mask[0][0].item<int64_t>(), 1);
  EXPECT_EQ(encoded->tokens[0][0].item<int64_t>(), model_->config().bos_token_id);
  EXPECT_EQ(encoded->tokens[1].index({encoded->attention_mask[1].argmax()}).item<int64_t>(),
            model_->config().bos_token_id);
}

TEST_F(RequestBuilderTest, NextTokenLossMatchesCrossEntropyAndMasksPadding) {
  const at::Tensor logits = at::randn({2, 4, 7});
  const at::Tensor tokens = at::randint(0, 7, {2, 4}, at::kLong);
  const at::Tensor per_token = NextTokenLoss(logits, tokens, at::Tensor(), true);
  ASSERT_EQ(per_token.sizes(), (std::vector<int64_t>{2, 3}));
  const float manual = -at::log_softmax(logits[1][2], -1)[tokens[1][3]].item<float>();
  EXPECT_NEAR(per_token[1][2].item<float>(), manual, 1e-5);
  EXPECT_NEAR(NextTokenLoss(logits, tokens, at::Tensor(), false).item<float>(),
              per_token.mean().item<float>(), 1e-5);
  at::Tensor mask = at::ones({2, 4}, at::kLong);
  mask[1][0] = 0;  // row 1 left-padded by one: its first target does not count
  const float expected = (per_token[0].sum() + per_token[1].narrow(0, 1, 2).sum()).item<float>() / 5;
  EXPECT_NEAR(NextTokenLoss(logits, tokens, mask, false).item<float>(), expected, 1e-5);
}

TEST_F(RequestBuilderTest, UnknownEnumValuesAreRejectedNamingFieldAndValidValues) {
  v1::RunRequest run;
  EXPECT_TRUE(ValidateEnums(run).ok());
  run.set_return_type(static_cast<v1::ReturnType>(7));
  absl::Status status = ValidateEnums(run);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("return_type: 7 is not a valid ReturnType"), std::string::npos) << status;
  EXPECT_NE(status.message().find("RETURN_TYPE_LOSS (1)"), std::string::npos) << status;

  run = v1::RunRequest();
  run.set_padding_side(static_cast<v1::PaddingSide>(-3));
  status = ValidateEnums(run);
  EXPECT_NE(status.message().find("padding_side: -3 is not a valid PaddingSide"), std::string::npos) << status;

  // Nested and repeated messages are walked too.
  run = v1::RunRequest();
  run.mutable_cache()->set_dtype(static_cast<v1::DType>(42));
  EXPECT_NE(ValidateEnums(run).message().find("cache.dtype: 42"), std::string::npos);
  run = v1::RunRequest();
  run.add_hooks();
  run.add_hooks()->mutable_add()->mutable_value()->set_dtype(static_cast<v1::DType>(9));
  EXPECT_NE(ValidateEnums(run).message().find("hooks[1].add.value.dtype: 9"), std::string::npos)
      << ValidateEnums(run);

  v1::TokenizeRequest tokenize;
  tokenize.set_padding_side(v1::PADDING_SIDE_RIGHT);
  EXPECT_TRUE(ValidateEnums(tokenize).ok());
  tokenize.set_padding_side(static_cast<v1::PaddingSide>(3));
  EXPECT_EQ(ValidateEnums(tokenize).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(RequestBuilderTest, EmptyResidualIsRejectedLikeEmptyTokens) {
  const int64_t d_model = model_->config().d_model;
  for (const auto& shape : {std::vector<int64_t>{0, 3, d_model}, std::vector<int64_t>{1, 0, d_model}}) {
    v1::RunRequest run;
    run.set_start_at_layer(1);
    *run.mutable_residual() = Proto(at::zeros(shape));
    auto input = BuildForwardInput(run, Ctx(), 1000);
    EXPECT_EQ(input.status().code(), absl::StatusCode::kInvalidArgument) << shape[0] << "x" << shape[1];
    EXPECT_NE(input.status().message().find("at least one row and one position"), std::string::npos)
        << input.status();
  }
}

TEST_F(RequestBuilderTest, FloatTokensNameTheDtype) {
  v1::RunRequest run;
  *run.mutable_tokens() = Proto(at::zeros({1, 3}));
  auto input = BuildForwardInput(run, Ctx(), 1000);
  EXPECT_EQ(input.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(input.status().message().find("dtype"), std::string::npos) << input.status();
  EXPECT_NE(input.status().message().find("DTYPE_FLOAT32"), std::string::npos) << input.status();
}

TEST_F(RequestBuilderTest, AddScaleByConvertsAndIsOnlyValidOnResidualShapedHooks) {
  const LlamaConfig& c = model_->config();
  v1::HookOp add;
  add.set_hook_name("blocks.1.hook_resid_pre");
  *add.mutable_add()->mutable_value() = Proto(at::ones({c.d_model}));
  add.mutable_add()->set_scale_by(v1::SCALE_BY_TOKEN_NORM);
  auto built = BuildInterventionOp(add, c, nullptr, nullptr, "hooks[0]");
  ASSERT_TRUE(built.ok()) << built.status();
  EXPECT_EQ(built->scale_by, AddScale::kTokenNorm);
  add.mutable_add()->set_scale_by(v1::SCALE_BY_MEAN_NORM);
  EXPECT_EQ(BuildInterventionOp(add, c, nullptr, nullptr, "hooks[0]")->scale_by, AddScale::kMeanNorm);

  v1::HookOp on_mlp;
  on_mlp.set_hook_name("blocks.0.mlp.hook_post");
  *on_mlp.mutable_add()->mutable_value() = Proto(at::ones({1}));
  on_mlp.mutable_add()->set_scale_by(v1::SCALE_BY_MEAN_NORM);
  absl::Status status = ValidateHookOp(on_mlp, c, false, "op");
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("op.add.scale_by"), std::string::npos) << status;
  EXPECT_NE(status.message().find("hook_resid_post"), std::string::npos) << status;
}

TEST_F(RequestBuilderTest, ReadoutsValidateHooksTopKAndPositions) {
  const LlamaConfig& c = model_->config();
  ForwardInput input;
  input.tokens = at::zeros({1, 5}, at::kLong);
  const LensFn lens = [](const at::Tensor& r) { return r; };
  google::protobuf::RepeatedPtrField<v1::Readout> readouts;
  v1::Readout* lens_readout = readouts.Add();
  for (int layer = 0; layer < c.n_layers; ++layer) {
    lens_readout->add_hook_names(absl::StrCat("blocks.", layer, ".hook_resid_post"));
  }
  lens_readout->add_positions(-1);
  lens_readout->mutable_lens()->set_top_k(10);
  v1::Readout* norm = readouts.Add();
  norm->add_hook_names("blocks.0.attn.hook_z");
  norm->mutable_norm();
  auto built = BuildReadouts(readouts, c, input, lens, int64_t{1} << 30);
  ASSERT_TRUE(built.ok()) << built.status();
  ASSERT_EQ(built->size(), 2u);
  EXPECT_EQ((*built)[0].kind, ReadoutKind::kLens);
  EXPECT_EQ((*built)[0].top_k, 10);
  EXPECT_EQ((*built)[0].hooks.size(), static_cast<size_t>(c.n_layers));
  EXPECT_EQ((*built)[0].positions, std::vector<int64_t>{-1});
  EXPECT_EQ((*built)[1].kind, ReadoutKind::kNorm);

  auto expect_invalid = [&](const google::protobuf::RepeatedPtrField<v1::Readout>& r,
                            const ForwardInput& in, const std::string& needle) {
    auto result = BuildReadouts(r, c, in, lens, int64_t{1} << 30);
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << needle;
    EXPECT_NE(result.status().message().find(needle), std::string::npos) << result.status();
  };
  auto one = [](const std::string& hook) {
    google::protobuf::RepeatedPtrField<v1::Readout> r;
    r.Add()->add_hook_names(hook);
    return r;
  };
  auto r = one("blocks.0.hook_resid_post");
  r[0].mutable_lens()->set_top_k(c.d_vocab + 1);
  expect_invalid(r, input, absl::StrCat("readouts[0].lens.top_k: ", c.d_vocab + 1,
                                        " is out of range; valid: 0 (full logits) or 1..", c.d_vocab));
  r[0].mutable_lens()->set_top_k(-1);
  expect_invalid(r, input, "readouts[0].lens.top_k");
  r[0].mutable_lens()->set_top_k(3);
  r[0].add_positions(5);
  expect_invalid(r, input, "position 5 is out of range for a sequence of 5 positions (valid: -5..4)");
  r = one("blocks.0.hook_resid_postt");
  r[0].mutable_norm();
  expect_invalid(r, input, "readouts[0].hook_names[0]");
  r = one("blocks.0.hook_mlp_out");
  r[0].mutable_lens();
  expect_invalid(r, input, "not a residual-stream hook");
  r = one("blocks.0.hook_resid_post");
  r[0].add_hook_names("blocks.0.attn.hook_z");
  r[0].mutable_mean();
  expect_invalid(r, input, "readouts[0].hook_names[1]");
  r = one("blocks.0.hook_resid_post");
  expect_invalid(r, input, "no kind set");
  r = google::protobuf::RepeatedPtrField<v1::Readout>();
  r.Add()->mutable_norm();
  expect_invalid(r, input, "readouts[0].hook_names: is empty");
  r = one("blocks.1.hook_resid_post");
  r[0].mutable_norm();
  ForwardInput stopped = input;
  stopped.stop_at_layer = 1;
  expect_invalid(r, stopped, "does not run in this forward");
  google::protobuf::RepeatedPtrField<v1::Readout> many;
  for (int i = 0; i < 65; ++i) {
    v1::Readout* m = many.Add();
    m->add_hook_names("hook_embed");
    m->mutable_norm();
  }
  expect_invalid(many, input, "65 readouts; at most 64");

  // Five positions of every layer's lens: n_layers * 5 rows of float32 logits, bounded up front.
  r = one("blocks.0.hook_resid_post");
  r[0].add_hook_names("blocks.1.hook_resid_post");
  r[0].mutable_lens()->set_top_k(1);
  const int64_t need = 2 * 5 * c.d_vocab * 4;
  EXPECT_TRUE(BuildReadouts(r, c, input, lens, need).ok());
  auto too_big = BuildReadouts(r, c, input, lens, need - 1);
  EXPECT_EQ(too_big.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(too_big.status().message().find(absl::StrCat("needs ", need, " bytes")), std::string::npos)
      << too_big.status();
}

}  // namespace
}  // namespace remotelens

namespace remotelens {
namespace {

// RunRequest.past_kv_cache: validated once, the stored cache restored for the model.
TEST_F(RequestBuilderTest, PastKvCacheIsCheckedAgainstRequestAndStoredCache) {
  // A stored key/value cache of 2 rows and 3 positions (n_ctx 16), and an activation cache.
  KvCache kv;
  ForwardInput first;
  first.tokens = at::tensor({1, 2, 3, 4, 5, 6}, at::kLong).view({2, 3});
  ASSERT_TRUE(model_->Forward(first, nullptr, &kv).ok());
  auto kv_stored = std::make_shared<StoredCache>();
  kv_stored->kind = StoredCache::Kind::kKeyValues;
  kv_stored->tensors = KvCacheToTensors(kv);
  auto activations = std::make_shared<StoredCache>();
  activations->tensors.emplace_back("hook_embed", at::zeros({2, 3, 32}));
  CacheLookup lookup = [&](const std::string& handle) -> absl::StatusOr<std::shared_ptr<const StoredCache>> {
    if (handle == "c1") return kv_stored;
    if (handle == "c2") return activations;
    return absl::NotFoundError(absl::StrCat("cache '", handle, "' not found"));
  };
  auto request_for = [&](const std::string& handle, int64_t rows, int64_t pos) {
    v1::RunRequest r;
    r.set_session_id("s");
    r.mutable_past_kv_cache()->set_handle(handle);
    *r.mutable_tokens() = Proto(at::ones({rows, pos}, at::kLong));
    return r;
  };
  auto build = [&](const v1::RunRequest& r) -> absl::StatusOr<PreparedKvCache> {
    ASSIGN_OR_RETURN(ForwardInput input, BuildForwardInput(r, Ctx(), 1000));
    return BuildPastKvCache(r, input, *model_, lookup);
  };

  absl::StatusOr<PreparedKvCache> ok = build(request_for("c1", 2, 4));
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->past, kv_stored);
  EXPECT_EQ(ok->past_length, 3);
  EXPECT_EQ(ok->cache.length(), 3);
  EXPECT_EQ(ok->cache.rows(), 2);
  absl::StatusOr<PreparedKvCache> fresh = build(request_for("", 3, 4));
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  EXPECT_EQ(fresh->past, nullptr);
  EXPECT_EQ(fresh->cache.length(), 0);

  auto expect = [&](const v1::RunRequest& r, absl::StatusCode code, const std::string& needle) {
    absl::StatusOr<PreparedKvCache> got = build(r);
    ASSERT_FALSE(got.ok()) << needle;
    EXPECT_EQ(got.status().code(), code) << got.status();
    EXPECT_NE(got.status().message().find(needle), std::string::npos) << got.status();
  };
  expect(request_for("c1", 3, 4), absl::StatusCode::kInvalidArgument, "holds 2 rows; this input has 3");
  expect(request_for("c1", 2, 14), absl::StatusCode::kOutOfRange,
         "3 cached positions plus 14 new ones exceed the model's maximum of 16 (n_ctx); at most 13 more fit");
  expect(request_for("c2", 2, 1), absl::StatusCode::kInvalidArgument, "'c2' is an activation cache");
  expect(request_for("c9", 2, 1), absl::StatusCode::kNotFound, "cache 'c9' not found");
  v1::RunRequest no_session = request_for("c1", 2, 1);
  no_session.clear_session_id();
  expect(no_session, absl::StatusCode::kInvalidArgument, "past_kv_cache: needs session_id");
  v1::RunRequest stop = request_for("c1", 2, 1);
  stop.set_stop_at_layer(1);
  expect(stop, absl::StatusCode::kInvalidArgument, "stop_at_layer");
  v1::RunRequest backward = request_for("c1", 2, 2);
  backward.mutable_backward()->mutable_loss();
  expect(backward, absl::StatusCode::kInvalidArgument, "does not combine with backward");
  v1::RunRequest residual;
  residual.set_session_id("s");
  residual.mutable_past_kv_cache();
  residual.set_start_at_layer(1);
  *residual.mutable_residual() = Proto(at::zeros({2, 1, 32}));
  expect(residual, absl::StatusCode::kInvalidArgument, "residual input with start_at_layer > 0");
  // A stored cache whose tensors do not fit the model (one layer's keys lost).
  auto broken = std::make_shared<StoredCache>(*kv_stored);
  broken->tensors.pop_back();
  kv_stored = broken;
  expect(request_for("c1", 2, 1), absl::StatusCode::kInvalidArgument,
         "'c1' does not fit this model: key/value cache tensor \"kv.1.values\" is missing");
}

}  // namespace
}  // namespace remotelens
