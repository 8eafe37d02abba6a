#include "server/forward_threads.h"

#include <ATen/Parallel.h>
#include <sched.h>

#include <fstream>
#include <set>
#include <utility>

namespace remotelens {

double MatmulFlopsPerToken(const LlamaConfig& c) {
  const double attention = static_cast<double>(c.d_model) * (c.n_heads + 2 * c.n_kv_heads) * c.d_head +
                           static_cast<double>(c.n_heads) * c.d_head * c.d_model;
  const double mlp = 3.0 * static_cast<double>(c.d_model) * c.d_mlp;
  return 2.0 * (static_cast<double>(c.n_layers) * (attention + mlp) +
                static_cast<double>(c.d_model) * c.d_vocab);
}

int PhysicalCores(const std::string& sysfs_cpu_root) {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
  std::set<std::pair<long, long>> cores;
  int logical = 0;
  bool topology = true;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (!CPU_ISSET(cpu, &set)) continue;
    ++logical;
    const std::string dir = sysfs_cpu_root + "/cpu" + std::to_string(cpu) + "/topology/";
    std::ifstream package(dir + "physical_package_id"), core(dir + "core_id");
    long p = 0, c = 0;
    if (!(package >> p) || !(core >> c)) {
      topology = false;
      continue;
    }
    cores.insert({p, c});
  }
  const int n = topology ? static_cast<int>(cores.size()) : logical;
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
