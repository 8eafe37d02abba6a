// Host memory the process may still take, and what it holds now, read from the kernel.
//
// The weight loader asks for AvailableHostMemory() before it allocates a byte, so a checkpoint
// that cannot fit is refused with a message instead of the kernel's OOM killer ending the process
// halfway through a load.
//
//   ASSIGN_OR_RETURN(HostMemory available, AvailableHostMemory());
//   if (need > available.bytes) ... available.limited_by names the binding limit
//   ProcessMemory now = ReadProcessMemory();  // VmRSS split into anonymous and file-backed
#ifndef REMOTELENS_ENGINE_HOST_MEMORY_H_
#define REMOTELENS_ENGINE_HOST_MEMORY_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace remotelens {

struct HostMemory {
  int64_t bytes = 0;        // the smallest of the limits below
  std::string limited_by;   // which limit that was, e.g. "MemAvailable" or "cgroup memory.max"
};

// The least of: the kernel's MemAvailable (free plus reclaimable page cache), the cgroup's
// memory.max less memory.current (v2; v1's limit_in_bytes less usage_in_bytes), RLIMIT_AS less
// the process's VmSize and RLIMIT_DATA less its VmData. Limits that are absent or unlimited are
// skipped. Fails only when /proc/meminfo cannot be read.
absl::StatusOr<HostMemory> AvailableHostMemory();

struct ProcessMemory {
  int64_t rss_bytes = 0;       // VmRSS
  int64_t anon_bytes = 0;      // RssAnon: heap, anonymous mappings
  int64_t file_bytes = 0;      // RssFile: pages of mapped files (e.g. mmapped checkpoints)
  int64_t peak_rss_bytes = 0;  // VmHWM
};

// This process's resident memory from /proc/self/status (zeros where it cannot be read).
ProcessMemory ReadProcessMemory();

// Parsers, exposed for tests: a "Key:   123 kB" field of /proc/meminfo or /proc/self/status text
// in bytes, or -1 when absent.
int64_t ProcKilobyteField(absl::string_view text, absl::string_view key);

// "16.1 GB": bytes for people, in decimal units (as disk and memory sizes are sold).
std::string HumanBytes(int64_t bytes);

}  // namespace remotelens

#endif  // REMOTELENS_ENGINE_HOST_MEMORY_H_
