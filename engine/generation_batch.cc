#include "engine/generation_batch.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <utility>

#include "engine/status_macros.h"

namespace remotelens {

int64_t GenerationBatch::rows() const {
  int64_t rows = 0;
  for (const Member& m : members_) rows += m.state->next_tokens().size(0);
  return rows;
}

void GenerationBatch::Join(Request request) {
  auto fail = [&request](absl::Status status) { request.on_done(std::move(status)); };
  if (!request.options.use_past_kv_cache) {
    return fail(absl::InvalidArgumentError("GenerationBatch needs use_past_kv_cache"));
  }
  if (absl::Status s = ValidateGenerate(model_.config(), request.tokens, request.options); !s.ok()) {
    return fail(s);
  }
  Member member;
  member.state = std::make_unique<GenerationState>(model_.config(), request.tokens,
                                                   request.attention_mask, request.options);
  KvCache own;
  ForwardInput input;
  input.tokens = member.state->sequence();
  input.attention_mask = member.state->mask();
  absl::StatusOr<at::Tensor> logits = model_.Forward(input, request.plan, &own);
  if (!logits.ok()) return fail(logits.status());
  absl::StatusOr<bool> done =
      member.state->Advance(logits->select(1, logits->size(1) - 1), request.on_token);
  if (!done.ok()) return fail(done.status());
  if (*done) return request.on_done(member.state->sequence());
  member.length = own.length();
  if (members_.empty()) {
    kv_ = std::move(own);
  } else {
    c10::InferenceMode inference;
    absl::StatusOr<KvCache> stacked = KvCache::Stack({&kv_, &own});
    if (!stacked.ok()) return fail(stacked.status());
    kv_ = std::move(*stacked);
  }
  member.request = std::move(request);
  members_.push_back(std::move(member));
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
  std::vector<Member> kept;
  std::vector<int64_t> kept_rows;
  size_t plan_index = 0;
  for (size_t i = 0; i < members_.size(); ++i) {
    Member& m = members_[i];
    const int64_t n = m.state->next_tokens().size(0);
    absl::Status status;
    if (m.request.plan != nullptr) status = shared.request_status(plan_index++);
    bool done = false;
    if (status.ok()) {
      absl::StatusOr<bool> advanced =
          m.state->Advance(logits->narrow(0, row_begin[i], n).select(1, 0), m.request.on_token);
      if (advanced.ok()) {
        done = *advanced;
      } else {
        status = advanced.status();
      }
    }
    m.length += 1;
    if (!status.ok()) {
      m.request.on_done(status);
    } else if (done) {
      m.request.on_done(m.state->sequence());
    } else {
      for (int64_t r = 0; r < n; ++r) kept_rows.push_back(row_begin[i] + r);
      kept.push_back(std::move(m));
    }
  }
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
