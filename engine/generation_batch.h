// Continuous batching of generations: requests join at step boundaries, share each decode step's
// forward (one row block per request, with its own key/value rows, sampling, stop conditions and
// hooks) and leave when they finish. Every request's tokens equal Generate() of it alone: the
// prompts of requests joining together share one prefill forward, left-padded to the longest
// with their padding masked, its hooks see only its own rows, and its positions and masked keys
// are its own whatever it shares a forward with.
//
//   GenerationBatch batch(model);
//   batch.Join({.tokens = prompt, .options = options, .plan = &plan, .on_token = stream,
//               .on_done = [](absl::StatusOr<at::Tensor> sequences) { ... }});
//   batch.JoinAll(std::move(arrived));    // several at once: one prefill forward
//   while (!batch.empty()) batch.Step();   // others may join between steps
#ifndef REMOTELENS_ENGINE_GENERATION_BATCH_H_
#define REMOTELENS_ENGINE_GENERATION_BATCH_H_

#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/generator.h"
#include "engine/hook_plan.h"
#include "engine/llama_model.h"

namespace remotelens {

class GenerationBatch {
 public:
  struct Request {
    at::Tensor tokens;          // [batch, pos]
    at::Tensor attention_mask;  // [batch, pos] for left-padded prompts, or undefined
    GenerateOptions options;    // use_past_kv_cache must be set (Join refuses otherwise)
    HookPlan* plan = nullptr;   // the request's own hooks; alive until on_done
    TokenCallback on_token;     // each step's tokens; an error ends this request only
    // Exactly once: the sequences [batch, pos + steps], or the error that ended the request.
    std::function<void(absl::StatusOr<at::Tensor>)> on_done;
  };

  explicit GenerationBatch(const LlamaModel& model) : model_(model) {}

  // Validates the request and runs its prefill (its own forward, with its hooks), which yields
  // its first token; it then joins the decode batch unless it is already done. Errors and a
  // generation of one token end it here (on_done before Join returns).
  void Join(Request request);

  // Join for several requests at once: those that validate share one prefill forward (prompts
  // left-padded to the longest, each request's plan on its own rows). A request whose hooks fail
  // ends alone; an error of the shared forward itself ends every one of them.
  void JoinAll(std::vector<Request> requests);

  // One decode step for every member: one forward over all their rows, each member's plan on its
  // own rows, each sampling with its own options and seed. Members that finish or fail leave;
  // an error of the shared forward itself (e.g. out of memory) ends them all.
  void Step();

  bool empty() const { return members_.empty(); }
  size_t size() const { return members_.size(); }
  int64_t rows() const;

 private:
  struct Member {
    Request request;
    std::unique_ptr<GenerationState> state;
    int64_t length = 0;  // positions in this member's cache: prompt plus tokens fed back
  };

  // Each member's hook status after `shared` ran its plans (OK for members without a plan).
  static std::vector<absl::Status> HookStatuses(const std::vector<Member>& members,
                                                const HookPlan& shared);
  // Samples each member's next token from its rows of `logits` at position `column`. Members
  // whose hooks failed (`hook_status`), whose sampling or token callback failed, or that are done
  // get on_done; the others are returned, in order, and their rows appended to `kept_rows`.
  static std::vector<Member> AdvanceEach(std::vector<Member>& members, const at::Tensor& logits,
                                         int64_t column, const std::vector<int64_t>& row_begin,
                                         const std::vector<absl::Status>& hook_status,
                                         std::vector<int64_t>* kept_rows);
  // Appends new members (in row order) whose prefill rows, in the same order, are `cache`.
  void Admit(std::vector<Member> members, KvCache cache);

  const LlamaModel& model_;
  std::vector<Member> members_;  // in row order
  KvCache kv_;                   // every member's rows, left-padded to the longest
};

}  // namespace remotelens

#endif  // REMOTELENS_ENGINE_GENERATION_BATCH_H_
