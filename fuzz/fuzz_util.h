// Helpers shared by the libFuzzer targets in fuzz/ (built by scripts/fuzz.sh, not by Bazel).
#ifndef REMOTELENS_FUZZ_FUZZ_UTIL_H_
#define REMOTELENS_FUZZ_FUZZ_UTIL_H_

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

namespace remotelens_fuzz {

// A private directory for one fuzzer process, made once. Parsers that take a path (safetensors,
// the users file) read their input from a file written here.
inline const std::string& ScratchDir() {
  static const std::string* dir = [] {
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern = std::string(tmp != nullptr && *tmp ? tmp : "/tmp") + "/rlfuzz.XXXXXX";
    if (mkdtemp(pattern.data()) == nullptr) std::abort();
    return new std::string(pattern);
  }();
  return *dir;
}

inline void WriteFileOrDie(const std::string& path, const uint8_t* data, size_t size) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) std::abort();
  if (size > 0 && std::fwrite(data, 1, size, f) != size) std::abort();
  std::fclose(f);
}

// An invariant the code under test promises; a violation is a finding, like a crash.
#define FUZZ_CHECK(cond)                                                      \
  do {                                                                        \
    if (!(cond)) {                                                            \
      std::fprintf(stderr, "%s:%d: FUZZ_CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                           \
    }                                                                         \
  } while (0)

}  // namespace remotelens_fuzz

#endif  // REMOTELENS_FUZZ_FUZZ_UTIL_H_
