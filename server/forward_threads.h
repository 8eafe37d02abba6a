// How many CPU threads one forward uses. A small forward (one user's 16-token prompt, a decode
// step) is bound by synchronisation and by the gRPC threads sharing the cores: one thread is
// fastest there (docs/decisions.md, "One intra-op thread"). A large one (a shared batch of many
// users' rows, a long prompt) is bound by arithmetic and gains from every core. The policy picks
// per forward; the model thread applies it before each forward.
#ifndef REMOTELENS_SERVER_FORWARD_THREADS_H_
#define REMOTELENS_SERVER_FORWARD_THREADS_H_

#include <cstdint>

namespace remotelens {

struct ForwardThreadPolicy {
  int small_threads = 1;  // forwards below large_tokens: the model thread's intra_op_threads
  int large_threads = 0;  // forwards of large_tokens or more; 0: same as small_threads
  int64_t large_tokens = 128;

  // The thread count for a forward of `tokens` rows x positions.
  int ThreadsFor(int64_t tokens) const {
    return large_threads > 0 && tokens >= large_tokens ? large_threads : small_threads;
  }
};

// The CPUs this process may run on (its affinity mask), at least 1.
int AvailableCpus();

// Sets LibTorch's (and so OpenMP's and oneDNN's) intra-op thread count on the calling thread to
// policy.ThreadsFor(tokens) when it differs from the current count; returns the count in use.
int UseForwardThreads(const ForwardThreadPolicy& policy, int64_t tokens);

}  // namespace remotelens

#endif  // REMOTELENS_SERVER_FORWARD_THREADS_H_
