#include "engine/hook_names.h"

#include <algorithm>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/match.h"
#include "absl/strings/strip.h"

namespace remotelens {
namespace {

// One row per HookSite, in enum order: the site's TransformerLens 3 name (the suffix after
// "blocks.L." for block sites, the whole name otherwise), the HookedTransformer flag that enables
// it, and its TransformerLens 4 bridge names (same convention, comma-separated). The hook listing
// (ModelInfo) and the clients' name tables come from here.
struct SiteRow {
  const char* name;
  const char* enabled_by;
  const char* bridge_names;
};

constexpr SiteRow kSites[kNumHookSites] = {
    {"hook_embed", "", "embed.hook_out"},
    {"hook_resid_pre", "", "hook_in"},
    {"ln1.hook_scale", "", "ln1.hook_scale"},
    {"ln1.hook_normalized", "", "ln1.hook_normalized"},
    {"hook_attn_in", "use_attn_in", "attn.hook_attn_in"},
    {"hook_q_input", "use_split_qkv_input", "attn.hook_q_input"},
    {"hook_k_input", "use_split_qkv_input", "attn.hook_k_input"},
    {"hook_v_input", "use_split_qkv_input", "attn.hook_v_input"},
    {"attn.hook_q", "", "attn.q.hook_out"},
    {"attn.hook_k", "", "attn.k.hook_out"},
    {"attn.hook_v", "", "attn.v.hook_out"},
    {"attn.hook_rot_q", "", "attn.hook_rot_q"},
    {"attn.hook_rot_k", "", "attn.hook_rot_k"},
    {"attn.hook_attn_scores", "", "attn.hook_attn_scores"},
    {"attn.hook_pattern", "", "attn.hook_pattern"},
    {"attn.hook_z", "", "attn.o.hook_in"},
    {"attn.hook_result", "use_attn_result", "attn.hook_result"},
    // o_proj and down_proj have no bias in Llama: their outputs are the sublayers' outputs.
    {"hook_attn_out", "", "attn.o.hook_out,attn.hook_out"},
    {"hook_resid_mid", "", "ln2.hook_in"},
    {"hook_mlp_in", "use_hook_mlp_in", "hook_mlp_in"},
    {"ln2.hook_scale", "", "ln2.hook_scale"},
    {"ln2.hook_normalized", "", "ln2.hook_normalized"},
    {"mlp.hook_pre", "", "mlp.gate.hook_out"},
    {"mlp.hook_pre_linear", "", "mlp.in.hook_out"},
    {"mlp.hook_post", "", "mlp.out.hook_in"},
    {"hook_mlp_out", "", "mlp.out.hook_out,mlp.hook_out"},
    {"hook_resid_post", "", "hook_out"},
    {"ln_final.hook_scale", "", "ln_final.hook_scale"},
    {"ln_final.hook_normalized", "", "ln_final.hook_normalized"},
    {"unembed.hook_in", "", "unembed.hook_in"},
    {"unembed.hook_out", "", "unembed.hook_out"},
};

const char* SiteName(int s) { return kSites[s].name; }

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
      "}.*, ln_final.*, unembed.*; ModelInfo lists them all)"));
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
    if (!IsBlockSite(static_cast<HookSite>(s)) && name == SiteName(s)) {
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
        if (suffix != SiteName(s)) continue;
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
  const char* site = SiteName(static_cast<int>(id.site));
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
  for (int s = kFirstBlockSite + kNumBlockSites; s < kNumHookSites; ++s) {
    ids.push_back({-1, static_cast<HookSite>(s)});
  }
  return ids;
}

int NumHookIds(int64_t n_layers) {
  return kNumHookSites - kNumBlockSites + static_cast<int>(n_layers) * kNumBlockSites;
}

int HookIndex(HookId id, int64_t n_layers) {
  if (id.site == HookSite::kEmbed) return 0;
  if (!IsBlockSite(id.site)) {
    return 1 + static_cast<int>(n_layers) * kNumBlockSites +
           (static_cast<int>(id.site) - kFirstBlockSite - kNumBlockSites);
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
    case HookSite::kAttnIn:
    case HookSite::kQInput:
      return {kDyn, kDyn, c.n_heads, c.d_model};
    case HookSite::kKInput:
    case HookSite::kVInput:
      return {kDyn, kDyn, c.n_kv_heads, c.d_model};
    case HookSite::kUnembedOut:
      return {kDyn, kDyn, c.d_vocab};
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
    case HookSite::kAttnIn:
    case HookSite::kQInput:
    case HookSite::kKInput:
    case HookSite::kVInput:
      return 2;
    case HookSite::kAttnScores:
    case HookSite::kAttnPattern:
      return 1;
    default:
      return -1;
  }
}

std::string SiteNames(bool (*pred)(HookSite)) {
  std::vector<std::string> names;
  for (int i = 0; i < kNumHookSites; ++i) {
    const HookSite site = static_cast<HookSite>(i);
    if (!pred(site)) continue;
    std::string name = HookName(HookId{IsBlockSite(site) ? 0 : -1, site});
    if (IsBlockSite(site)) name.replace(0, std::string("blocks.0").size(), "blocks.L");
    names.push_back(std::move(name));
  }
  return absl::StrJoin(names, ", ");
}

std::vector<std::string> HookDims(HookSite site) {
  switch (site) {
    case HookSite::kLn1Scale:
    case HookSite::kLn2Scale:
    case HookSite::kLnFinalScale:
      return {"batch", "pos", "1"};
    case HookSite::kAttnQ:
    case HookSite::kAttnRotQ:
    case HookSite::kAttnZ:
      return {"batch", "pos", "head_index", "d_head"};
    case HookSite::kAttnK:
    case HookSite::kAttnV:
    case HookSite::kAttnRotK:
      return {"batch", "pos", "kv_head_index", "d_head"};
    case HookSite::kAttnScores:
    case HookSite::kAttnPattern:
      return {"batch", "head_index", "query_pos", "key_pos"};
    case HookSite::kAttnResult:
    case HookSite::kAttnIn:
    case HookSite::kQInput:
      return {"batch", "pos", "head_index", "d_model"};
    case HookSite::kKInput:
    case HookSite::kVInput:
      return {"batch", "pos", "kv_head_index", "d_model"};
    case HookSite::kMlpPre:
    case HookSite::kMlpPreLinear:
    case HookSite::kMlpPost:
      return {"batch", "pos", "d_mlp"};
    case HookSite::kUnembedOut:
      return {"batch", "pos", "d_vocab"};
    default:
      return {"batch", "pos", "d_model"};
  }
}

absl::string_view EnablingFlag(HookSite site) { return kSites[static_cast<int>(site)].enabled_by; }

std::vector<std::string> HookAliases(HookId id, int64_t n_layers) {
  std::vector<std::string> names;
  for (absl::string_view name :
       absl::StrSplit(kSites[static_cast<int>(id.site)].bridge_names, ',', absl::SkipEmpty())) {
    names.push_back(IsBlockSite(id.site) ? absl::StrCat("blocks.", id.layer, ".", name)
                                         : std::string(name));
  }
  // TransformerLens 4's ln_final.hook_in is the last block's output: nothing else reads it.
  if (id.site == HookSite::kResidPost && id.layer == n_layers - 1) {
    names.push_back("ln_final.hook_in");
  }
  return names;
}

}  // namespace remotelens
