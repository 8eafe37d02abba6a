#include "server/forward_threads.h"

#include <ATen/Parallel.h>
#include <sched.h>

namespace remotelens {

int AvailableCpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
  const int n = CPU_COUNT(&set);
  return n > 0 ? n : 1;
}

int UseForwardThreads(const ForwardThreadPolicy& policy, int64_t tokens) {
  const int want = policy.ThreadsFor(tokens);
  // Changing the count is cheap but not free (LibTorch also resizes a small thread pool of its
  // own), so only on a change.
  if (want > 0 && want != at::get_num_threads()) at::set_num_threads(want);
  return at::get_num_threads();
}

}  // namespace remotelens
