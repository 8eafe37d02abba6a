// How many CPU threads one forward uses. A forward with little arithmetic (a short prompt of a
// tiny model) is bound by synchronisation and loses to a second thread; one with more (a decode
// step or a 16-token prompt of a 100M model, a batch shared by several users) gains from every
// core. The policy picks per forward from its matrix-product work; the model thread applies it
// before each forward. See docs/decisions.md, "CPU threads per forward".
#ifndef REMOTELENS_SERVER_FORWARD_THREADS_H_
#define REMOTELENS_SERVER_FORWARD_THREADS_H_

#include <cstdint>
#include <string>

#include "engine/llama_config.h"

namespace remotelens {

struct ForwardThreadPolicy {
  int small_threads = 1;        // forwards below min_large_flops; <= 0: leave the count alone
  int large_threads = 0;        // forwards of min_large_flops or more; <= 0: small_threads
  double flops_per_token = 0;   // the model's matrix-product work per position
  double min_large_flops = 1e8;

  // The thread count for a forward over `tokens` rows x positions.
  int ThreadsFor(int64_t tokens) const {
    const bool large = static_cast<double>(tokens) * flops_per_token >= min_large_flops;
    return large && large_threads > 0 ? large_threads : small_threads;
  }
};

// 2 x the weights one position multiplies by: q/k/v/o and the gated MLP of every block, and the
// unembedding (the embedding is a lookup).
double MatmulFlopsPerToken(const LlamaConfig& config);

// Physical cores among the CPUs this process may run on: logical CPUs in its affinity mask that
// share a (package, core) in `sysfs_cpu_root` (/sys/devices/system/cpu) count once. Where the
// topology cannot be read, the logical CPU count. At least 1.
int PhysicalCores(const std::string& sysfs_cpu_root = "/sys/devices/system/cpu");

// Sets LibTorch's (and so OpenMP's and oneDNN's) intra-op thread count on the calling thread to
// policy.ThreadsFor(tokens) when that is positive and differs from the current count; returns
// the count in use.
int UseForwardThreads(const ForwardThreadPolicy& policy, int64_t tokens);

}  // namespace remotelens

#endif  // REMOTELENS_SERVER_FORWARD_THREADS_H_
