#include "server/memory_release.h"

#include <cstdlib>
#include <cstring>
#include <vector>

#include "gtest/gtest.h"

namespace remotelens {
namespace {

TEST(MemoryRelease, FreedLargeBlocksGoBackToTheSystem) {
  // Linked with tcmalloc (see BUILD), as the server is.
  ASSERT_GE(AllocatorFreeBytes(), 0) << "tcmalloc is not the allocator";
  ReleaseFreeMemory(0);  // start from nothing held
  constexpr size_t kBlock = size_t{8} << 20;
  std::vector<void*> blocks;
  for (int i = 0; i < 32; ++i) {
    void* p = std::malloc(kBlock);
    std::memset(p, 1, kBlock);  // touch, so the pages are really resident
    blocks.push_back(p);
  }
  for (void* p : blocks) std::free(p);
  const int64_t held = AllocatorFreeBytes();
  EXPECT_GE(held, int64_t{200} << 20);
  // Below the threshold nothing happens; at it everything held is released.
  EXPECT_EQ(ReleaseFreeMemory(held + 1), 0);
  EXPECT_EQ(AllocatorFreeBytes(), held);
  EXPECT_EQ(ReleaseFreeMemory(64 << 20), held);
  EXPECT_LT(AllocatorFreeBytes(), int64_t{1} << 20);
}

}  // namespace
}  // namespace remotelens
