#include "engine/hook_names.h"

#include <algorithm>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/match.h"
#include "absl/strings/strip.h"

namespace remotelens {
namespace {

// Suffix after "blocks.L." (block sites) or the whole name (global sites), indexed by HookSite.
constexpr const char* kSiteNames[kNumHookSites] = {
    "hook_embed",
    "hook_resid_pre",
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_rot_q",
    "attn.hook_rot_k",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
    "attn.hook_result",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_pre_linear",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
    "ln_final.hook_scale",
    "ln_final.hook_normalized",
};

constexpr int kFirstBlockSite = static_cast<int>(HookSite::kResidPre);
constexpr int kNumBlockSites = static_cast<int>(HookSite::kResidPost) - kFirstBlockSite + 1;

size_t EditDistance(absl::string_view a, absl::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] != b[j - 1])});
      diagonal = above;
    }
  }
  return row[b.size()];
}

absl::Status UnknownName(absl::string_view name, int64_t n_layers) {
  std::vector<std::pair<size_t, std::string>> ranked;
  for (HookId id : AllHookIds(n_layers)) {
    std::string candidate = HookName(id);
    ranked.emplace_back(EditDistance(name, candidate), std::move(candidate));
  }
  std::stable_sort(ranked.begin(), ranked.end(),
                   [](const auto& x, const auto& y) { return x.first < y.first; });
  std::vector<std::string> best;
  for (size_t i = 0; i < ranked.size() && i < 3; ++i) best.push_back("\"" + ranked[i].second + "\"");
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown hook name \"", name, "\"; did you mean ", absl::StrJoin(best, ", "), "? (",
      ranked.size(), " hook points: hook_embed, blocks.{0..", n_layers - 1,
      "}.*, ln_final.*; ModelInfo lists them all)"));
}

}  // namespace

bool IsBlockSite(HookSite site) {
  int s = static_cast<int>(site);
  return s >= kFirstBlockSite && s < kFirstBlockSite + kNumBlockSites;
}

absl::StatusOr<HookId> ParseHookName(absl::string_view name, int64_t n_layers) {
  if (name.size() > 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("hook name of ", name.size(), " characters is too long (at most 256)"));
  }
  for (int s = 0; s < kNumHookSites; ++s) {
    if (!IsBlockSite(static_cast<HookSite>(s)) && name == kSiteNames[s]) {
      return HookId{-1, static_cast<HookSite>(s)};
    }
  }
  absl::string_view rest = name;
  if (absl::ConsumePrefix(&rest, "blocks.")) {
    size_t dot = rest.find('.');
    int layer = 0;
    if (dot != absl::string_view::npos && absl::SimpleAtoi(rest.substr(0, dot), &layer) &&
        std::to_string(layer) == rest.substr(0, dot)) {
      absl::string_view suffix = rest.substr(dot + 1);
      for (int s = kFirstBlockSite; s < kFirstBlockSite + kNumBlockSites; ++s) {
        if (suffix != kSiteNames[s]) continue;
        if (layer < 0 || layer >= n_layers) {
          return absl::InvalidArgumentError(absl::StrCat("hook name \"", name, "\" names layer ",
                                                         layer, "; valid layers are 0..",
                                                         n_layers - 1));
        }
        return HookId{layer, static_cast<HookSite>(s)};
      }
    }
  }
  return UnknownName(name, n_layers);
}

std::string HookName(HookId id) {
  const char* site = kSiteNames[static_cast<int>(id.site)];
  if (!IsBlockSite(id.site)) return site;
  return absl::StrCat("blocks.", id.layer, ".", site);
}

std::vector<HookId> AllHookIds(int64_t n_layers) {
  std::vector<HookId> ids;
  ids.reserve(NumHookIds(n_layers));
  ids.push_back({-1, HookSite::kEmbed});
  for (int layer = 0; layer < n_layers; ++layer) {
    for (int s = kFirstBlockSite; s < kFirstBlockSite + kNumBlockSites; ++s) {
      ids.push_back({layer, static_cast<HookSite>(s)});
    }
  }
  ids.push_back({-1, HookSite::kLnFinalScale});
  ids.push_back({-1, HookSite::kLnFinalNormalized});
  return ids;
}

int NumHookIds(int64_t n_layers) { return 3 + static_cast<int>(n_layers) * kNumBlockSites; }

int HookIndex(HookId id, int64_t n_layers) {
  if (id.site == HookSite::kEmbed) return 0;
  if (!IsBlockSite(id.site)) {
    return 1 + static_cast<int>(n_layers) * kNumBlockSites +
           (id.site == HookSite::kLnFinalScale ? 0 : 1);
  }
  return 1 + id.layer * kNumBlockSites + (static_cast<int>(id.site) - kFirstBlockSite);
}

std::vector<int64_t> HookShape(HookId id, const LlamaConfig& c) {
  constexpr int64_t kDyn = -1;
  switch (id.site) {
    case HookSite::kLn1Scale:
    case HookSite::kLn2Scale:
    case HookSite::kLnFinalScale:
      return {kDyn, kDyn, 1};
    case HookSite::kAttnQ:
    case HookSite::kAttnRotQ:
    case HookSite::kAttnZ:
      return {kDyn, kDyn, c.n_heads, c.d_head};
    case HookSite::kAttnK:
    case HookSite::kAttnV:
    case HookSite::kAttnRotK:
      return {kDyn, kDyn, c.n_kv_heads, c.d_head};
    case HookSite::kAttnScores:
    case HookSite::kAttnPattern:
      return {kDyn, c.n_heads, kDyn, kDyn};
    case HookSite::kAttnResult:
      return {kDyn, kDyn, c.n_heads, c.d_model};
    case HookSite::kMlpPre:
    case HookSite::kMlpPreLinear:
    case HookSite::kMlpPost:
      return {kDyn, kDyn, c.d_mlp};
    default:
      return {kDyn, kDyn, c.d_model};
  }
}

int PosDim(HookSite site) {
  return (site == HookSite::kAttnScores || site == HookSite::kAttnPattern) ? 2 : 1;
}

int HeadDim(HookSite site) {
  switch (site) {
    case HookSite::kAttnQ:
    case HookSite::kAttnK:
    case HookSite::kAttnV:
    case HookSite::kAttnRotQ:
    case HookSite::kAttnRotK:
    case HookSite::kAttnZ:
    case HookSite::kAttnResult:
      return 2;
    case HookSite::kAttnScores:
    case HookSite::kAttnPattern:
      return 1;
    default:
      return -1;
  }
}

}  // namespace remotelens
