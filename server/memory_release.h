// Returning freed memory to the operating system. tcmalloc (linked into the server) keeps the
// pages of freed large blocks for reuse: after one legal 64 x 512 Run the server stayed at
// 1.8 GiB although nothing was live. The server's janitor calls this every second; it releases
// only when enough is free to be worth the system calls.
//
//   ReleaseFreeMemory(/*min_free_bytes=*/64 << 20);
#ifndef REMOTELENS_SERVER_MEMORY_RELEASE_H_
#define REMOTELENS_SERVER_MEMORY_RELEASE_H_

#include <cstdint>

namespace remotelens {

// Bytes the allocator holds free for reuse (tcmalloc's page heap), or -1 when the process does
// not run on tcmalloc.
int64_t AllocatorFreeBytes();

// When at least `min_free_bytes` are held free, gives them back to the system and returns how
// many were held; otherwise (or without tcmalloc, where glibc's malloc_trim is used instead and
// nothing is measured) returns 0.
int64_t ReleaseFreeMemory(int64_t min_free_bytes);

}  // namespace remotelens

#endif  // REMOTELENS_SERVER_MEMORY_RELEASE_H_
