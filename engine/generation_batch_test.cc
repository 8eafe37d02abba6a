// Batching: a forward shared by several requests (HookPlan::AddRequestPlan) and generations
// sharing decode steps (GenerationBatch) give every request what it gets alone.
#include "engine/generation_batch.h"

#include <ATen/ATen.h>

#include <atomic>
#include <map>
#include <string>

#include "engine/test_model.h"
#include "gtest/gtest.h"

namespace remotelens {
namespace {

struct BatchingTestModel {
  static constexpr char kName[] = "generation_batch_test";
  static DemoModelSpec Spec() { return SmallSpec(64, 2, 64); }
};
using BatchingTest = SharedModelTest<BatchingTestModel>;

constexpr double kTol = 1e-5;

void ExpectClose(const at::Tensor& a, const at::Tensor& b, const std::string& what) {
  ASSERT_EQ(a.sizes(), b.sizes()) << what;
  const at::Tensor x = a.to(at::kFloat), y = b.to(at::kFloat);
  // Equal entries (masked scores are -inf in both) count as no difference.
  const at::Tensor diff = at::where(x == y, at::zeros_like(x), (x - y).abs());
  EXPECT_LE(diff.max().item<double>(), kTol) << what;
}

// One request: its tokens, and how to build its plan (ops and caches).
struct Req {
  at::Tensor tokens;  // [rows, pos]
  std::function<void(HookPlan&)> build;
};

at::Tensor Prompt(int64_t rows, int64_t pos, int64_t seed) {
  return (at::arange(rows * pos, at::kLong).view({rows, pos}) * 37 + seed * 11) % 500 + 1;
}

HookId Id(int layer, HookSite site) { return HookId{layer, site}; }

TEST_F(BatchingTest, SharedForwardEqualsEachRequestAlone) {
  const LlamaConfig& c = model_->config();
  std::vector<Req> reqs;
  // Cache only, at every hook kind that has positions or keys.
  reqs.push_back({Prompt(1, 9, 1), [](HookPlan& p) {
                    for (HookId id : AllHookIds(2)) p.AddCache({id});
                  }});
  // A steering vector at a position, and a head zeroed.
  reqs.push_back({Prompt(2, 5, 2), [&](HookPlan& p) {
                    ASSERT_TRUE(p.AddIntervention({Id(0, HookSite::kResidPost), OpKind::kAdd, {{-1}, {}},
                                                   at::full({c.d_model}, 0.5)}).ok());
                    ASSERT_TRUE(p.AddIntervention({Id(1, HookSite::kAttnZ), OpKind::kZero, {{}, {1}}}).ok());
                    p.AddCache({Id(1, HookSite::kAttnPattern)});
                    p.AddCache({Id(1, HookSite::kResidPost)});
                  }});
  // Scale, set at a position, and a batch mean over its own two rows.
  reqs.push_back({Prompt(2, 12, 3), [&](HookPlan& p) {
                    InterventionOp scale{Id(0, HookSite::kMlpPost), OpKind::kScale};
                    scale.factor = 0.25;
                    ASSERT_TRUE(p.AddIntervention(scale).ok());
                    ASSERT_TRUE(p.AddIntervention({Id(1, HookSite::kResidPre), OpKind::kSet, {{2}, {}},
                                                   at::ones({c.d_model})}).ok());
                    ASSERT_TRUE(p.AddIntervention({Id(0, HookSite::kAttnOut), OpKind::kMean}).ok());
                    p.AddCache({Id(0, HookSite::kAttnScores)});
                    p.AddCache({Id(1, HookSite::kMlpOut)});
                  }});
  // A callback that checks the shape it is shown and edits it.
  std::atomic<int> calls{0};
  reqs.push_back({Prompt(1, 3, 4), [&](HookPlan& p) {
                    InterventionOp op{Id(0, HookSite::kAttnPattern), OpKind::kCallback};
                    op.callback = [&calls](HookId, const at::Tensor& a) -> absl::StatusOr<std::optional<at::Tensor>> {
                      ++calls;
                      EXPECT_EQ(a.sizes(), (std::vector<int64_t>{1, 4, 3, 3}));
                      return std::optional<at::Tensor>(a * 0.5);
                    };
                    ASSERT_TRUE(p.AddIntervention(op).ok());
                    p.AddCache({Id(1, HookSite::kResidMid)});
                  }});

  // Alone.
  std::vector<at::Tensor> alone_logits;
  std::vector<std::vector<std::pair<HookId, at::Tensor>>> alone_cache;
  for (Req& r : reqs) {
    HookPlan plan(c.n_layers);
    r.build(plan);
    ForwardInput in;
    in.tokens = r.tokens;
    alone_logits.push_back(model_->Forward(in, &plan).value());
    alone_cache.push_back(plan.TakeCache());
  }
  const int alone_calls = calls.exchange(0);

  // Together: left-padded to the longest, one forward.
  int64_t longest = 0, rows = 0;
  for (Req& r : reqs) longest = std::max(longest, r.tokens.size(1));
  std::vector<at::Tensor> tokens, masks;
  std::vector<std::unique_ptr<HookPlan>> plans;
  HookPlan shared(c.n_layers);
  std::vector<int64_t> begin;
  for (Req& r : reqs) {
    const int64_t n = r.tokens.size(0), pos = r.tokens.size(1);
    tokens.push_back(at::cat({at::zeros({n, longest - pos}, at::kLong), r.tokens}, 1));
    masks.push_back(at::cat({at::zeros({n, longest - pos}, at::kLong), at::ones({n, pos}, at::kLong)}, 1));
    plans.push_back(std::make_unique<HookPlan>(c.n_layers));
    r.build(*plans.back());
    shared.AddRequestPlan(plans.back().get(), RowSlice{rows, n, pos, pos});
    begin.push_back(rows);
    rows += n;
  }
  ForwardInput in;
  in.tokens = at::cat(tokens, 0);
  in.attention_mask = at::cat(masks, 0);
  const at::Tensor logits = model_->Forward(in, &shared).value();
  EXPECT_EQ(calls.load(), alone_calls);
  for (size_t i = 0; i < reqs.size(); ++i) {
    ASSERT_TRUE(shared.request_status(i).ok()) << shared.request_status(i);
    const int64_t n = reqs[i].tokens.size(0), pos = reqs[i].tokens.size(1);
    ExpectClose(logits.narrow(0, begin[i], n).narrow(1, longest - pos, pos), alone_logits[i],
                "logits of request " + std::to_string(i));
    const auto& cache = plans[i]->cache();
    ASSERT_EQ(cache.size(), alone_cache[i].size());
    for (size_t k = 0; k < cache.size(); ++k) {
      EXPECT_EQ(cache[k].first, alone_cache[i][k].first);
      ExpectClose(cache[k].second, alone_cache[i][k].second,
                  "request " + std::to_string(i) + " " + HookName(cache[k].first));
    }
  }
}

TEST_F(BatchingTest, AFailingRequestLeavesTheOthersCorrect) {
  const LlamaConfig& c = model_->config();
  const at::Tensor a = Prompt(1, 6, 5), b = Prompt(1, 6, 6);
  HookPlan alone(c.n_layers);
  alone.AddCache({Id(1, HookSite::kResidPost)});
  ForwardInput in_a;
  in_a.tokens = a;
  const at::Tensor want = model_->Forward(in_a, &alone).value();

  HookPlan good(c.n_layers), bad(c.n_layers), shared(c.n_layers);
  good.AddCache({Id(1, HookSite::kResidPost)});
  // A value that does not broadcast, and a callback that fails: the request ends at the first.
  ASSERT_TRUE(bad.AddIntervention({Id(0, HookSite::kResidPre), OpKind::kAdd, {}, at::ones({3})}).ok());
  shared.AddRequestPlan(&good, RowSlice{0, 1, 6, 6});
  shared.AddRequestPlan(&bad, RowSlice{1, 1, 6, 6});
  ForwardInput in;
  in.tokens = at::cat({a, b}, 0);
  const at::Tensor logits = model_->Forward(in, &shared).value();
  EXPECT_TRUE(shared.request_status(0).ok());
  EXPECT_EQ(shared.request_status(1).code(), absl::StatusCode::kInvalidArgument);
  ExpectClose(logits.narrow(0, 0, 1), want, "logits of the good request");
  ExpectClose(good.cache()[0].second, alone.cache()[0].second, "cache of the good request");
}

TEST_F(BatchingTest, KvCacheStackAndSelectRowsKeepEachRowsKeys) {
  const at::Tensor a = Prompt(1, 4, 7), b = Prompt(2, 7, 8);
  KvCache ka, kb;
  ForwardInput in;
  in.tokens = a;
  ASSERT_TRUE(model_->Forward(in, nullptr, &ka).ok());
  in.tokens = b;
  ASSERT_TRUE(model_->Forward(in, nullptr, &kb).ok());
  KvCache stacked = KvCache::Stack({&ka, &kb}).value();
  EXPECT_EQ(stacked.length(), 7);
  EXPECT_EQ(stacked.rows(), 3);
  EXPECT_TRUE(at::equal(stacked.mask()[0], at::tensor({0, 0, 0, 1, 1, 1, 1}, at::kLong)));
  // Taking row 0 back drops the padding no remaining row needs.
  KvCache back = stacked.SelectRows({0}).value();
  EXPECT_EQ(back.length(), 4);
  EXPECT_TRUE(at::equal(back.mask(), ka.mask()));
  // A next token decoded from the stacked cache equals one decoded from the cache alone.
  in.tokens = at::tensor({5, 6, 7}, at::kLong).view({3, 1});
  in.attention_mask = at::ones({3, 1}, at::kLong);
  const at::Tensor together = model_->Forward(in, nullptr, &stacked).value();
  in.tokens = at::tensor({5}, at::kLong).view({1, 1});
  in.attention_mask = at::ones({1, 1}, at::kLong);
  ExpectClose(together.narrow(0, 0, 1), model_->Forward(in, nullptr, &ka).value(), "row 0");
  in.tokens = at::tensor({6, 7}, at::kLong).view({2, 1});
  in.attention_mask = at::ones({2, 1}, at::kLong);
  ExpectClose(together.narrow(0, 1, 2), model_->Forward(in, nullptr, &kb).value(), "rows 1-2");
  EXPECT_FALSE(KvCache::Stack({}).ok());
  EXPECT_FALSE(stacked.SelectRows({3}).ok());
}

GenerateOptions Options(int64_t n, bool sample, uint64_t seed) {
  GenerateOptions o;
  o.max_new_tokens = n;
  o.sampling.do_sample = sample;
  o.sampling.temperature = 0.8;
  o.sampling.top_k = sample ? 20 : 0;
  o.stop_at_eos = false;
  o.seed = seed;
  return o;
}

TEST_F(BatchingTest, GenerationsSharingStepsEqualEachAlone) {
  const LlamaConfig& c = model_->config();
  struct Gen {
    at::Tensor prompt;
    GenerateOptions options;
    bool steer;
    int join_at;  // decode steps of the batch before this one joins
  };
  // Those joining at the same step share one prefill forward (JoinAll), padded to the longest.
  std::vector<Gen> gens = {{Prompt(1, 5, 9), Options(12, false, 0), true, 0},
                           {Prompt(2, 8, 10), Options(9, true, 42), false, 0},
                           {Prompt(1, 3, 11), Options(6, true, 7), true, 2},
                           {Prompt(1, 10, 12), Options(1, false, 0), false, 3},
                           {Prompt(1, 4, 13), Options(10, false, 0), true, 4},
                           {Prompt(1, 7, 14), Options(5, true, 3), true, 2},
                           {Prompt(1, 2, 15), Options(8, false, 0), false, 2}};
  auto make_plan = [&](bool steer) {
    auto plan = std::make_unique<HookPlan>(c.n_layers);
    if (steer) {
      EXPECT_TRUE(plan->AddIntervention({Id(0, HookSite::kResidPost), OpKind::kAdd, {},
                                         at::linspace(-1, 1, c.d_model)}).ok());
      plan->AddCache({Id(1, HookSite::kAttnPattern)});
    }
    return plan;
  };
  std::vector<at::Tensor> alone;
  std::vector<std::vector<at::Tensor>> alone_patterns(gens.size());
  for (size_t i = 0; i < gens.size(); ++i) {
    auto plan = make_plan(gens[i].steer);
    plan->SetCacheSink([&, i](HookId, at::Tensor t) {
      alone_patterns[i].push_back(t);
      return absl::OkStatus();
    });
    alone.push_back(Generate(*model_, gens[i].prompt, at::Tensor(), gens[i].options, plan.get(), nullptr).value());
  }

  GenerationBatch batch(*model_);
  std::vector<std::unique_ptr<HookPlan>> plans;
  std::vector<std::vector<at::Tensor>> patterns(gens.size());
  std::map<size_t, absl::StatusOr<at::Tensor>> results;
  size_t max_members = 0;
  for (int step = 0; results.size() < gens.size(); ++step) {
    std::vector<GenerationBatch::Request> arriving;
    for (size_t i = 0; i < gens.size(); ++i) {
      if (gens[i].join_at != step) continue;
      plans.push_back(make_plan(gens[i].steer));
      plans.back()->SetCacheSink([&, i](HookId, at::Tensor t) {
        patterns[i].push_back(t);
        return absl::OkStatus();
      });
      GenerationBatch::Request r;
      r.tokens = gens[i].prompt;
      r.options = gens[i].options;
      r.plan = plans.back().get();
      r.on_done = [&results, i](absl::StatusOr<at::Tensor> s) { results.emplace(i, std::move(s)); };
      arriving.push_back(std::move(r));
    }
    if (arriving.size() == 1) {
      batch.Join(std::move(arriving[0]));
    } else if (!arriving.empty()) {
      batch.JoinAll(std::move(arriving));
    }
    max_members = std::max(max_members, batch.size());
    batch.Step();
    ASSERT_LT(step, 100);
  }
  EXPECT_GE(max_members, 4u);  // steps really were shared
  for (size_t i = 0; i < gens.size(); ++i) {
    ASSERT_TRUE(results.at(i).ok()) << results.at(i).status();
    EXPECT_TRUE(at::equal(*results.at(i), alone[i])) << "generation " << i;
    ASSERT_EQ(patterns[i].size(), alone_patterns[i].size());
    for (size_t k = 0; k < patterns[i].size(); ++k) {
      ExpectClose(patterns[i][k], alone_patterns[i][k], "pattern step " + std::to_string(k));
    }
  }
}

TEST_F(BatchingTest, APrefillSharedWithAFailingOrPaddedRequestKeepsTheOthersExact) {
  const LlamaConfig& c = model_->config();
  // A prompt that is itself left-padded (its own mask), one whose hook fails, one that is done
  // after its first token, and a plain one: one prefill forward for all four.
  const at::Tensor padded = Prompt(2, 6, 30);
  const at::Tensor padded_mask = at::tensor({0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}, at::kLong).view({2, 6});
  const GenerateOptions greedy = Options(5, false, 0);
  const at::Tensor want_padded = Generate(*model_, padded, padded_mask, greedy, nullptr, nullptr).value();
  const at::Tensor want_plain = Generate(*model_, Prompt(1, 3, 31), at::Tensor(), greedy, nullptr, nullptr).value();
  const at::Tensor want_one = Generate(*model_, Prompt(1, 9, 32), at::Tensor(), Options(1, false, 0), nullptr, nullptr).value();

  GenerationBatch batch(*model_);
  std::map<int, absl::StatusOr<at::Tensor>> results;
  HookPlan bad(c.n_layers);
  ASSERT_TRUE(bad.AddIntervention({Id(0, HookSite::kResidPre), OpKind::kAdd, {}, at::ones({3})}).ok());
  std::vector<GenerationBatch::Request> arriving(4);
  arriving[0].tokens = padded;
  arriving[0].attention_mask = padded_mask;
  arriving[0].options = greedy;
  arriving[1].tokens = Prompt(1, 4, 33);
  arriving[1].options = greedy;
  arriving[1].plan = &bad;
  arriving[2].tokens = Prompt(1, 9, 32);
  arriving[2].options = Options(1, false, 0);
  arriving[3].tokens = Prompt(1, 3, 31);
  arriving[3].options = greedy;
  for (int i = 0; i < 4; ++i) {
    arriving[i].on_done = [&results, i](absl::StatusOr<at::Tensor> s) { results.emplace(i, std::move(s)); };
  }
  batch.JoinAll(std::move(arriving));
  // The failing and the finished requests left at the prefill; the other two decode together.
  EXPECT_EQ(results.at(1).status().code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(results.at(2).ok());
  EXPECT_TRUE(at::equal(*results.at(2), want_one));
  EXPECT_EQ(batch.size(), 2u);
  EXPECT_EQ(batch.rows(), 3);
  while (!batch.empty()) batch.Step();
  ASSERT_TRUE(results.at(0).ok()) << results.at(0).status();
  EXPECT_TRUE(at::equal(*results.at(0), want_padded));
  ASSERT_TRUE(results.at(3).ok()) << results.at(3).status();
  EXPECT_TRUE(at::equal(*results.at(3), want_plain));
}

TEST_F(BatchingTest, AGenerationThatFailsLeavesAndTheOthersGoOn) {
  GenerationBatch batch(*model_);
  std::map<int, absl::StatusOr<at::Tensor>> results;
  for (int i = 0; i < 2; ++i) {
    GenerationBatch::Request r;
    r.tokens = Prompt(1, 4 + i, 20 + i);
    r.options = Options(6, false, 0);
    r.on_token = [i](int64_t step, const at::Tensor&) {
      return i == 1 && step == 2 ? absl::CancelledError("client went away") : absl::OkStatus();
    };
    r.on_done = [&results, i](absl::StatusOr<at::Tensor> s) { results.emplace(i, std::move(s)); };
    batch.Join(std::move(r));
  }
  while (!batch.empty()) batch.Step();
  EXPECT_EQ(results.at(1).status().code(), absl::StatusCode::kCancelled);
  const at::Tensor want = Generate(*model_, Prompt(1, 4, 20), at::Tensor(), Options(6, false, 0), nullptr, nullptr).value();
  EXPECT_TRUE(at::equal(results.at(0).value(), want));
  // Refused at Join: no key/value cache, or a bad option.
  GenerationBatch::Request r;
  r.tokens = Prompt(1, 4, 1);
  r.options = Options(3, false, 0);
  r.options.use_past_kv_cache = false;
  r.on_done = [&results](absl::StatusOr<at::Tensor> s) { results.emplace(2, std::move(s)); };
  batch.Join(std::move(r));
  EXPECT_EQ(results.at(2).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(batch.empty());
}

}  // namespace
}  // namespace remotelens
