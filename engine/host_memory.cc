#include "engine/host_memory.h"

#include <sys/resource.h>

#include <cstdio>
#include <fstream>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"

namespace remotelens {
namespace {

bool ReadText(const std::string& path, std::string* text) {
  std::ifstream in(path);
  if (!in) return false;
  std::stringstream buffer;
  buffer << in.rdbuf();
  *text = buffer.str();
  return true;
}

// A file holding one number (cgroup files); -1 when absent or "max".
int64_t ReadNumberFile(const std::string& path) {
  std::string text;
  if (!ReadText(path, &text)) return -1;
  int64_t value = 0;
  if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(text), &value)) return -1;
  return value;
}

}  // namespace

int64_t ProcKilobyteField(absl::string_view text, absl::string_view key) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::ConsumePrefix(&line, key) || !absl::ConsumePrefix(&line, ":")) continue;
    line = absl::StripAsciiWhitespace(line);
    const bool kilobytes = absl::ConsumeSuffix(&line, "kB");
    int64_t value = 0;
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(line), &value)) return -1;
    return kilobytes ? value * 1024 : value;
  }
  return -1;
}

absl::StatusOr<HostMemory> AvailableHostMemory() {
  std::string meminfo;
  if (!ReadText("/proc/meminfo", &meminfo)) {
    return absl::UnavailableError("cannot read /proc/meminfo to size the host's free memory");
  }
  HostMemory best;
  best.bytes = ProcKilobyteField(meminfo, "MemAvailable");
  best.limited_by = "MemAvailable";
  if (best.bytes < 0) {
    return absl::UnavailableError("/proc/meminfo has no MemAvailable field");
  }
  auto consider = [&best](int64_t bytes, std::string why) {
    if (bytes >= 0 && bytes < best.bytes) {
      best.bytes = bytes;
      best.limited_by = std::move(why);
    }
  };
  // cgroup v2, then v1. An unlimited v1 group reports a huge number, which never wins.
  const int64_t max2 = ReadNumberFile("/sys/fs/cgroup/memory.max");
  if (max2 >= 0) {
    const int64_t current = ReadNumberFile("/sys/fs/cgroup/memory.current");
    consider(max2 - std::max<int64_t>(current, 0), "cgroup memory.max");
  } else {
    const int64_t max1 = ReadNumberFile("/sys/fs/cgroup/memory/memory.limit_in_bytes");
    const int64_t usage1 = ReadNumberFile("/sys/fs/cgroup/memory/memory.usage_in_bytes");
    if (max1 >= 0) consider(max1 - std::max<int64_t>(usage1, 0), "cgroup memory.limit_in_bytes");
  }
  std::string status;
  ReadText("/proc/self/status", &status);
  struct rlimit limit;
  if (getrlimit(RLIMIT_AS, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY) {
    const int64_t used = std::max<int64_t>(ProcKilobyteField(status, "VmSize"), 0);
    consider(static_cast<int64_t>(limit.rlim_cur) - used, "RLIMIT_AS");
  }
  if (getrlimit(RLIMIT_DATA, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY) {
    const int64_t used = std::max<int64_t>(ProcKilobyteField(status, "VmData"), 0);
    consider(static_cast<int64_t>(limit.rlim_cur) - used, "RLIMIT_DATA");
  }
  best.bytes = std::max<int64_t>(best.bytes, 0);
  return best;
}

ProcessMemory ReadProcessMemory() {
  ProcessMemory memory;
  std::string status;
  if (!ReadText("/proc/self/status", &status)) return memory;
  memory.rss_bytes = std::max<int64_t>(ProcKilobyteField(status, "VmRSS"), 0);
  memory.anon_bytes = std::max<int64_t>(ProcKilobyteField(status, "RssAnon"), 0);
  memory.file_bytes = std::max<int64_t>(ProcKilobyteField(status, "RssFile"), 0);
  memory.peak_rss_bytes = std::max<int64_t>(ProcKilobyteField(status, "VmHWM"), 0);
  return memory;
}

std::string HumanBytes(int64_t bytes) {
  const double b = static_cast<double>(bytes);
  if (b >= 1e9) return absl::StrFormat("%.1f GB", b / 1e9);
  if (b >= 1e6) return absl::StrFormat("%.1f MB", b / 1e6);
  if (b >= 1e3) return absl::StrFormat("%.1f kB", b / 1e3);
  return absl::StrCat(bytes, " bytes");
}

}  // namespace remotelens
