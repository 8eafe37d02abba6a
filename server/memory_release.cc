#include "server/memory_release.h"

#include <malloc.h>

#include <cstddef>

// gperftools' C interface, declared here because Debian's runtime package has no headers. Weak:
// binaries without tcmalloc (tools, CMake builds) link and see null.
extern "C" {
int MallocExtension_GetNumericProperty(const char* property, size_t* value) __attribute__((weak));
void MallocExtension_ReleaseFreeMemory() __attribute__((weak));
}

namespace remotelens {

int64_t AllocatorFreeBytes() {
  if (MallocExtension_GetNumericProperty == nullptr) return -1;
  size_t free_bytes = 0;
  if (!MallocExtension_GetNumericProperty("tcmalloc.pageheap_free_bytes", &free_bytes)) return -1;
  return static_cast<int64_t>(free_bytes);
}

int64_t ReleaseFreeMemory(int64_t min_free_bytes) {
  const int64_t free_bytes = AllocatorFreeBytes();
  if (free_bytes < 0) {
    malloc_trim(0);
    return 0;
  }
  if (free_bytes < min_free_bytes || MallocExtension_ReleaseFreeMemory == nullptr) return 0;
  MallocExtension_ReleaseFreeMemory();
  return free_bytes;
}

}  // namespace remotelens
