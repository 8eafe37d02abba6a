#include "engine/sampler.h"

#include <cmath>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace remotelens {
namespace {

using ::testing::HasSubstr;

at::Generator Seeded(uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

at::Tensor Sample(const at::Tensor& logits, const SamplingOptions& options,
                  at::Generator& generator) {
  absl::StatusOr<at::Tensor> ids = SampleNextTokens(logits, options, generator);
  EXPECT_TRUE(ids.ok()) << ids.status();
  return ids.ok() ? *ids : at::Tensor();
}

std::vector<int64_t> ToVector(const at::Tensor& ids) {
  const at::Tensor contiguous = ids.contiguous();
  return std::vector<int64_t>(contiguous.data_ptr<int64_t>(),
                              contiguous.data_ptr<int64_t>() + contiguous.numel());
}

// The same 4-way row repeated `rows` times: one call then draws `rows` independent samples.
at::Tensor RepeatedRow(const std::vector<float>& row, int64_t rows) {
  return at::tensor(row).unsqueeze(0).expand({rows, static_cast<int64_t>(row.size())}).clone();
}

std::vector<double> Frequencies(const at::Tensor& ids, int64_t d_vocab) {
  std::vector<double> counts(d_vocab, 0.0);
  for (int64_t id : ToVector(ids)) counts.at(id) += 1;
  for (double& count : counts) count /= ids.numel();
  return counts;
}

TEST(Sampler, GreedyPicksArgmaxPerRow) {
  const at::Tensor logits = at::tensor({0.1f, 2.0f, -1.0f, 1.9f, 5.0f, 4.0f, 3.0f, -2.0f})
                                .reshape({2, 4});
  SamplingOptions options;
  options.do_sample = false;
  at::Generator generator = Seeded(1);
  const at::Tensor ids = Sample(logits, options, generator);
  EXPECT_EQ(ids.scalar_type(), at::kLong);
  EXPECT_EQ(ids.sizes(), (std::vector<int64_t>{2}));
  EXPECT_EQ(ToVector(ids), (std::vector<int64_t>{1, 0}));
}

TEST(Sampler, AcceptsHalfPrecisionLogits) {
  const at::Tensor logits =
      at::tensor({0.0f, 3.0f, 1.0f}).reshape({1, 3}).to(at::kBFloat16);
  SamplingOptions options;
  options.do_sample = false;
  at::Generator generator = Seeded(1);
  EXPECT_EQ(ToVector(Sample(logits, options, generator)), (std::vector<int64_t>{1}));
}

TEST(Sampler, TopKOneEqualsGreedyWhileSampling) {
  at::Generator generator = Seeded(7);
  const at::Tensor logits = at::randn({64, 50}, generator);
  SamplingOptions greedy;
  greedy.do_sample = false;
  SamplingOptions top1;
  top1.top_k = 1;
  top1.temperature = 5.0;  // flat enough that any leak past top-k would show
  const std::vector<int64_t> expected = ToVector(Sample(logits, greedy, generator));
  for (int draw = 0; draw < 20; ++draw) {
    EXPECT_EQ(ToVector(Sample(logits, top1, generator)), expected);
  }
}

TEST(Sampler, TinyTopPKeepsOnlyTheTopToken) {
  at::Generator generator = Seeded(8);
  const at::Tensor logits = at::randn({64, 50}, generator);
  SamplingOptions greedy;
  greedy.do_sample = false;
  SamplingOptions nucleus;
  nucleus.top_p = 1e-6;
  nucleus.temperature = 5.0;
  const std::vector<int64_t> expected = ToVector(Sample(logits, greedy, generator));
  for (int draw = 0; draw < 20; ++draw) {
    EXPECT_EQ(ToVector(Sample(logits, nucleus, generator)), expected);
  }
}

TEST(Sampler, SameSeedSameSequenceDifferentSeedDiffers) {
  const at::Tensor logits = at::zeros({4, 100});  // uniform: every draw is informative
  SamplingOptions options;
  auto draw_sequence = [&](uint64_t seed) {
    at::Generator generator = Seeded(seed);
    std::vector<int64_t> sequence;
    for (int step = 0; step < 50; ++step) {
      for (int64_t id : ToVector(Sample(logits, options, generator))) sequence.push_back(id);
    }
    return sequence;
  };
  const std::vector<int64_t> first = draw_sequence(42);
  EXPECT_EQ(first, draw_sequence(42));
  const std::vector<int64_t> other = draw_sequence(43);
  int differing = 0;
  for (size_t i = 0; i < first.size(); ++i) differing += first[i] != other[i];
  // Independent uniform draws over 100 ids agree ~1% of the time.
  EXPECT_GT(differing, static_cast<int>(first.size()) * 9 / 10);
}

TEST(Sampler, EmpiricalFrequenciesMatchTemperedSoftmax) {
  const std::vector<float> row = {1.0f, 0.5f, -0.5f, 0.0f};
  const double temperature = 0.7;
  SamplingOptions options;
  options.temperature = temperature;
  at::Generator generator = Seeded(2024);
  const std::vector<double> observed =
      Frequencies(Sample(RepeatedRow(row, 20000), options, generator), 4);
  double total = 0;
  for (float logit : row) total += std::exp(logit / temperature);
  for (int i = 0; i < 4; ++i) {
    EXPECT_NEAR(observed[i], std::exp(row[i] / temperature) / total, 0.02) << "token " << i;
  }
}

TEST(Sampler, TopKAndTopPRenormaliseOverTheKeptTokens) {
  // Probabilities 0.5, 0.3, 0.15, 0.05.
  const std::vector<float> row = {std::log(0.5f), std::log(0.3f), std::log(0.15f),
                                  std::log(0.05f)};
  at::Generator generator = Seeded(5);
  SamplingOptions top2;
  top2.top_k = 2;
  std::vector<double> observed = Frequencies(Sample(RepeatedRow(row, 20000), top2, generator), 4);
  EXPECT_NEAR(observed[0], 0.625, 0.02);
  EXPECT_NEAR(observed[1], 0.375, 0.02);
  EXPECT_EQ(observed[2] + observed[3], 0.0);

  // 0.5 < 0.7 needs the second token; 0.8 >= 0.7 stops there.
  SamplingOptions nucleus;
  nucleus.top_p = 0.7;
  observed = Frequencies(Sample(RepeatedRow(row, 20000), nucleus, generator), 4);
  EXPECT_NEAR(observed[0], 0.625, 0.02);
  EXPECT_NEAR(observed[1], 0.375, 0.02);
  EXPECT_EQ(observed[2] + observed[3], 0.0);
}

TEST(Sampler, SmallTemperatureDoesNotOverflow) {
  const at::Tensor logits = at::tensor({3.0e4f, 2.9e4f, 0.0f}).reshape({1, 3});
  SamplingOptions options;
  options.temperature = 1e-36;  // 3e4 / 1e-36 is past float32 max unless rows are shifted
  at::Generator generator = Seeded(3);
  EXPECT_EQ(ToVector(Sample(logits, options, generator)), (std::vector<int64_t>{0}));
}

TEST(Sampler, InvalidOptionsNameTheField) {
  struct Case {
    SamplingOptions options;
    const char* field;
  };
  std::vector<Case> cases;
  SamplingOptions options;
  options.temperature = 0;
  cases.push_back({options, "temperature"});
  options = {};
  options.temperature = std::nan("");
  cases.push_back({options, "temperature"});
  options = {};
  options.top_p = 0;
  cases.push_back({options, "top_p"});
  options = {};
  options.top_p = 1.5;
  cases.push_back({options, "top_p"});
  options = {};
  options.top_k = -1;
  cases.push_back({options, "top_k"});
  // Positive doubles that are zero in float32, where the sampler computes.
  options = {};
  options.temperature = 1e-300;
  cases.push_back({options, "temperature"});
  options = {};
  options.top_p = 5e-324;
  cases.push_back({options, "top_p"});
  options = {};
  options.temperature = 1e300;
  cases.push_back({options, "temperature"});

  const at::Tensor logits = at::zeros({1, 4});
  at::Generator generator = Seeded(1);
  for (const Case& c : cases) {
    const absl::Status status = ValidateSamplingOptions(c.options);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << c.field;
    EXPECT_THAT(status.message(), HasSubstr(c.field));
    const auto sampled = SampleNextTokens(logits, c.options, generator);
    EXPECT_EQ(sampled.status().code(), absl::StatusCode::kInvalidArgument) << c.field;
    EXPECT_THAT(sampled.status().message(), HasSubstr(c.field));
  }
  EXPECT_TRUE(ValidateSamplingOptions(SamplingOptions{}).ok());
}

TEST(Sampler, RejectsBadLogits) {
  SamplingOptions options;
  at::Generator generator = Seeded(1);
  auto sampled = SampleNextTokens(at::zeros({4}), options, generator);
  EXPECT_EQ(sampled.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(sampled.status().message(), HasSubstr("rank 1"));
  sampled = SampleNextTokens(at::zeros({1, 2, 4}), options, generator);
  EXPECT_THAT(sampled.status().message(), HasSubstr("rank 3"));
  EXPECT_FALSE(SampleNextTokens(at::zeros({1, 4}, at::kLong), options, generator).ok());
  EXPECT_FALSE(SampleNextTokens(at::zeros({1, 0}), options, generator).ok());
  sampled = SampleNextTokens(at::tensor({0.0f, NAN}).reshape({1, 2}), options, generator);
  EXPECT_THAT(sampled.status().message(), HasSubstr("NaN"));
  sampled = SampleNextTokens(at::full({2, 3}, -INFINITY).index_fill_(0, at::tensor({0L}), 0.0f),
                             options, generator);
  EXPECT_THAT(sampled.status().message(), HasSubstr("entirely -inf"));
  // -inf entries that leave something to sample are fine and never chosen.
  const at::Tensor masked = at::tensor({-INFINITY, 0.0f, -INFINITY}).reshape({1, 3});
  for (int draw = 0; draw < 50; ++draw) {
    EXPECT_EQ(ToVector(Sample(masked, options, generator)), (std::vector<int64_t>{1}));
  }
}

}  // namespace
}  // namespace remotelens
