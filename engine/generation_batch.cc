#include "engine/generation_batch.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "engine/status_macros.h"

namespace remotelens {

int64_t GenerationBatch::rows() const {
  int64_t rows = 0;
  for (const Member& m : members_) rows += m.state->next_tokens().size(0);
  return rows;
}

void GenerationBatch::Join(Request request) {
  std::vector<Request> one;
  one.push_back(std::move(request));
  JoinAll(std::move(one));
}

void GenerationBatch::JoinAll(std::vector<Request> requests) {
  std::vector<Member> joining;
  for (Request& request : requests) {
    absl::Status status =
        request.options.use_past_kv_cache
            ? ValidateGenerate(model_.config(), request.tokens, request.options)
            : absl::InvalidArgumentError("GenerationBatch needs use_past_kv_cache");
    if (!status.ok()) {
      request.on_done(std::move(status));
      continue;
    }
    Member member;
    member.state = std::make_unique<GenerationState>(model_.config(), request.tokens,
                                                     request.attention_mask, request.options);
    member.length = request.tokens.size(1);
    member.request = std::move(request);
    joining.push_back(std::move(member));
  }
  if (joining.empty()) return;

  // One prefill forward: a lone request as it is, several left-padded to the longest prompt.
  KvCache cache;
  absl::StatusOr<at::Tensor> logits;
  std::vector<int64_t> row_begin;
  std::vector<absl::Status> hook_status(joining.size());
  if (joining.size() == 1) {
    ForwardInput input;
    input.tokens = joining[0].state->sequence();
    input.attention_mask = joining[0].state->mask();
    row_begin.push_back(0);
    logits = model_.Forward(input, joining[0].request.plan, &cache);
  } else {
    int64_t longest = 0, rows = 0;
    for (const Member& m : joining) longest = std::max(longest, m.length);
    std::vector<at::Tensor> tokens, masks;
    HookPlan shared(model_.config().n_layers);
    for (const Member& m : joining) {
      const at::Tensor& seq = m.state->sequence();  // [n, pos]
      const int64_t n = seq.size(0), pad = longest - m.length;
      const at::Tensor mask = m.state->mask().to(at::kLong);
      tokens.push_back(pad == 0 ? seq : at::cat({at::zeros({n, pad}, at::kLong), seq}, 1));
      masks.push_back(pad == 0 ? mask : at::cat({at::zeros({n, pad}, at::kLong), mask}, 1));
      if (m.request.plan != nullptr) {
        shared.AddRequestPlan(m.request.plan, RowSlice{rows, n, m.length, m.length});
      }
      row_begin.push_back(rows);
      rows += n;
    }
    ForwardInput input;
    input.tokens = at::cat(tokens, 0);
    input.attention_mask = at::cat(masks, 0);
    logits = model_.Forward(input, &shared, &cache);
    hook_status = HookStatuses(joining, shared);
  }
  if (!logits.ok()) {
    for (Member& m : joining) m.request.on_done(logits.status());
    return;
  }

  // Each request's first token; those done or failed leave before the decode batch.
  std::vector<int64_t> kept_rows;
  std::vector<Member> kept =
      AdvanceEach(joining, *logits, logits->size(1) - 1, row_begin, hook_status, &kept_rows);
  if (kept.empty()) return;
  if (static_cast<int64_t>(kept_rows.size()) != cache.rows()) {
    c10::InferenceMode inference;
    absl::StatusOr<KvCache> selected = cache.SelectRows(kept_rows);
    if (!selected.ok()) {
      for (Member& m : kept) m.request.on_done(selected.status());
      return;
    }
    cache = std::move(*selected);
  }
  Admit(std::move(kept), std::move(cache));
}

std::vector<absl::Status> GenerationBatch::HookStatuses(const std::vector<Member>& members,
                                                        const HookPlan& shared) {
  std::vector<absl::Status> statuses(members.size());
  size_t plan_index = 0;  // `shared` numbers only the members that brought a plan
  for (size_t i = 0; i < members.size(); ++i) {
    if (members[i].request.plan != nullptr) statuses[i] = shared.request_status(plan_index++);
  }
  return statuses;
}

std::vector<GenerationBatch::Member> GenerationBatch::AdvanceEach(
    std::vector<Member>& members, const at::Tensor& logits, int64_t column,
    const std::vector<int64_t>& row_begin, const std::vector<absl::Status>& hook_status,
    std::vector<int64_t>* kept_rows) {
  std::vector<Member> kept;
  for (size_t i = 0; i < members.size(); ++i) {
    Member& m = members[i];
    const int64_t n = m.state->sequence().size(0);
    absl::Status status = hook_status[i];
    bool done = false;
    if (status.ok()) {
      absl::StatusOr<bool> advanced =
          m.state->Advance(logits.narrow(0, row_begin[i], n).select(1, column), m.request.on_token);
      if (advanced.ok()) {
        done = *advanced;
      } else {
        status = advanced.status();
      }
    }
    if (!status.ok()) {
      m.request.on_done(std::move(status));
    } else if (done) {
      m.request.on_done(m.state->sequence());
    } else {
      for (int64_t r = 0; r < n; ++r) kept_rows->push_back(row_begin[i] + r);
      kept.push_back(std::move(m));
    }
  }
  return kept;
}

void GenerationBatch::Admit(std::vector<Member> members, KvCache cache) {
  if (members_.empty()) {
    kv_ = std::move(cache);
  } else {
    c10::InferenceMode inference;
    absl::StatusOr<KvCache> stacked = KvCache::Stack({&kv_, &cache});
    if (!stacked.ok()) {
      for (Member& m : members) m.request.on_done(stacked.status());
      return;
    }
    kv_ = std::move(*stacked);
  }
  for (Member& m : members) members_.push_back(std::move(m));
}

void GenerationBatch::Step() {
  if (members_.empty()) return;
  const LlamaConfig& config = model_.config();
  std::vector<at::Tensor> next;
  HookPlan shared(config.n_layers);
  std::vector<int64_t> row_begin;
  int64_t rows = 0;
  for (Member& m : members_) {
    const int64_t n = m.state->next_tokens().size(0);
    next.push_back(m.state->next_tokens());
    row_begin.push_back(rows);
    if (m.request.plan != nullptr) {
      shared.AddRequestPlan(m.request.plan, RowSlice{rows, n, 1, m.length + 1});
    }
    rows += n;
  }
  ForwardInput input;
  input.tokens = at::cat(next, 0).unsqueeze(1);
  input.attention_mask = at::ones({rows, 1}, at::kLong);
  absl::StatusOr<at::Tensor> logits = model_.Forward(input, &shared, &kv_);
  if (!logits.ok()) {
    std::vector<Member> ended = std::move(members_);
    members_.clear();
    kv_ = KvCache();
    for (Member& m : ended) m.request.on_done(logits.status());
    return;
  }
  std::vector<int64_t> kept_rows;
  std::vector<Member> kept =
      AdvanceEach(members_, *logits, 0, row_begin, HookStatuses(members_, shared), &kept_rows);
  for (Member& m : kept) m.length += 1;  // the token this step fed in is in the cache now
  if (kept.size() != members_.size()) {
    if (kept.empty()) {
      kv_ = KvCache();
    } else {
      c10::InferenceMode inference;
      absl::StatusOr<KvCache> selected = kv_.SelectRows(kept_rows);
      if (!selected.ok()) {
        for (Member& m : kept) m.request.on_done(selected.status());
        kept.clear();
        kv_ = KvCache();
      } else {
        kv_ = std::move(*selected);
      }
    }
  }
  members_ = std::move(kept);
}

}  // namespace remotelens
