#include "server/request_builder.h"

#include <ATen/ATen.h>

#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/kv_cache_tensors.h"
#include "engine/status_macros.h"
#include "server/echo.h"
#include "server/tensor_codec.h"

namespace remotelens {
namespace {

template <typename T>
T Or(T value, T fallback) {
  return value > 0 ? value : fallback;
}

absl::Status Invalid(absl::string_view what, absl::string_view problem) {
  return absl::InvalidArgumentError(absl::StrCat(what, ": ", problem));
}

absl::Status CheckIndexList(const google::protobuf::RepeatedField<int64_t>& list,
                            absl::string_view what) {
  if (list.size() > 65536) {
    return Invalid(what, absl::StrCat(list.size(), " entries; at most 65536"));
  }
  return absl::OkStatus();
}

// Selects the region a selector names from `t` (used to take a stored activation's region).
absl::StatusOr<at::Tensor> SelectRegion(const at::Tensor& t, HookSite site, const Selector& sel,
                                        absl::string_view what) {
  at::Tensor out = t;
  auto select = [&](int dim, const std::vector<int64_t>& indices, const char* kind) -> absl::Status {
    if (indices.empty()) return absl::OkStatus();
    std::vector<int64_t> resolved;
    const int64_t size = out.size(dim);
    for (int64_t i : indices) {
      const int64_t r = i < 0 ? i + size : i;
      if (r < 0 || r >= size) {
        return Invalid(what, absl::StrCat(kind, " ", i, " is out of range for the stored activation with ",
                                          size, " ", kind, "s"));
      }
      resolved.push_back(r);
    }
    out = out.index_select(dim, at::tensor(resolved, at::kLong));
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(select(PosDim(site), sel.positions, "position"));
  if (HeadDim(site) >= 0) RETURN_IF_ERROR(select(HeadDim(site), sel.heads, "head"));
  return out;
}

absl::Status CheckEnumValue(const google::protobuf::EnumDescriptor& type, int value,
                            const std::string& field) {
  if (type.FindValueByNumber(value) != nullptr) return absl::OkStatus();
  std::vector<std::string> valid;
  for (int i = 0; i < type.value_count(); ++i) {
    valid.push_back(absl::StrCat(type.value(i)->name(), " (", type.value(i)->number(), ")"));
  }
  return Invalid(field, absl::StrCat(value, " is not a valid ", type.name(), "; valid: ",
                                     absl::StrJoin(valid, ", ")));
}

absl::Status ValidateEnumsIn(const google::protobuf::Message& message, const std::string& path) {
  const google::protobuf::Reflection& reflection = *message.GetReflection();
  std::vector<const google::protobuf::FieldDescriptor*> fields;
  reflection.ListFields(message, &fields);  // only fields that are set: cheap on big requests
  for (const google::protobuf::FieldDescriptor* field : fields) {
    const std::string name = path.empty() ? field->name() : absl::StrCat(path, ".", field->name());
    if (field->type() == google::protobuf::FieldDescriptor::TYPE_ENUM) {
      if (field->is_repeated()) {
        for (int i = 0; i < reflection.FieldSize(message, field); ++i) {
          RETURN_IF_ERROR(CheckEnumValue(*field->enum_type(),
                                         reflection.GetRepeatedEnumValue(message, field, i),
                                         absl::StrCat(name, "[", i, "]")));
        }
      } else {
        RETURN_IF_ERROR(CheckEnumValue(*field->enum_type(), reflection.GetEnumValue(message, field), name));
      }
    } else if (field->type() == google::protobuf::FieldDescriptor::TYPE_MESSAGE) {
      if (field->is_repeated()) {
        for (int i = 0; i < reflection.FieldSize(message, field); ++i) {
          RETURN_IF_ERROR(ValidateEnumsIn(reflection.GetRepeatedMessage(message, field, i),
                                          absl::StrCat(name, "[", i, "]")));
        }
      } else {
        RETURN_IF_ERROR(ValidateEnumsIn(reflection.GetMessage(message, field), name));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateEnums(const google::protobuf::Message& request) {
  return ValidateEnumsIn(request, "");
}

v1::Limits LimitsWithDefaults(const v1::Limits& in) {
  v1::Limits l = in;
  l.set_max_queue(Or(l.max_queue(), 256));
  l.set_max_batch(Or(l.max_batch(), 64));
  l.set_max_tokens_per_request(Or<int64_t>(l.max_tokens_per_request(), 65536));
  l.set_max_new_tokens(Or<int64_t>(l.max_new_tokens(), 1024));
  l.set_max_request_bytes(Or<int64_t>(l.max_request_bytes(), int64_t{64} << 20));
  l.set_chunk_bytes(Or<int64_t>(l.chunk_bytes(), int64_t{1} << 20));
  l.set_session_ttl_seconds(Or<int64_t>(l.session_ttl_seconds(), 3600));
  l.set_max_session_ttl_seconds(Or<int64_t>(l.max_session_ttl_seconds(), 86400));
  l.set_max_sessions_per_user(Or(l.max_sessions_per_user(), 64));
  l.set_max_hooks_per_session(Or(l.max_hooks_per_session(), 1024));
  l.set_hook_timeout_ms(Or<int64_t>(l.hook_timeout_ms(), 30000));
  l.set_max_text_bytes(Or(l.max_text_bytes(), 1 << 20));
  l.set_max_stored_cache_bytes(Or<int64_t>(l.max_stored_cache_bytes(), int64_t{16} << 30));
  l.set_max_queued_bytes_per_call(Or<int64_t>(l.max_queued_bytes_per_call(), int64_t{1} << 30));
  return l;
}

absl::StatusOr<EncodedBatch> EncodeTexts(const ModelContext& ctx,
                                         const google::protobuf::RepeatedPtrField<std::string>& texts,
                                         bool prepend_bos, v1::PaddingSide side) {
  if (ctx.tokenizer == nullptr) {
    return absl::FailedPreconditionError(
        "this model has no tokenizer.json; send token ids instead of text");
  }
  if (texts.empty()) return Invalid("texts", "empty; send at least one text");
  if (texts.size() > ctx.limits->max_batch()) {
    return Invalid("texts", absl::StrCat(texts.size(), " texts; at most max_batch = ",
                                         ctx.limits->max_batch()));
  }
  std::vector<std::vector<int64_t>> rows;
  size_t pos = 0;
  for (int i = 0; i < texts.size(); ++i) {
    if (static_cast<int64_t>(texts[i].size()) > ctx.limits->max_text_bytes()) {
      return Invalid(absl::StrCat("texts[", i, "]"),
                     absl::StrCat(texts[i].size(), " bytes; at most max_text_bytes = ",
                                  ctx.limits->max_text_bytes()));
    }
    auto ids = ctx.tokenizer->Encode(texts[i], prepend_bos);
    if (!ids.ok()) {
      return absl::Status(ids.status().code(), absl::StrCat("texts[", i, "]: ", ids.status().message()));
    }
    if (ids->empty()) return Invalid(absl::StrCat("texts[", i, "]"), "encodes to no tokens");
    pos = std::max(pos, ids->size());
    rows.push_back(std::move(*ids));
  }
  EncodedBatch batch;
  // Llama 3 has no pad token; padded positions are masked, so any id works. Use eos if known.
  batch.pad_token_id = ctx.tokenizer->eos_token_id().value_or(0);
  const int64_t b = static_cast<int64_t>(rows.size());
  batch.tokens = at::full({b, static_cast<int64_t>(pos)}, batch.pad_token_id, at::kLong);
  batch.attention_mask = at::zeros({b, static_cast<int64_t>(pos)}, at::kLong);
  auto tok = batch.tokens.accessor<int64_t, 2>();
  auto mask = batch.attention_mask.accessor<int64_t, 2>();
  for (int64_t r = 0; r < b; ++r) {
    const size_t offset = side == v1::PADDING_SIDE_RIGHT ? 0 : pos - rows[r].size();
    for (size_t i = 0; i < rows[r].size(); ++i) {
      tok[r][offset + i] = rows[r][i];
      mask[r][offset + i] = 1;
    }
    batch.lengths.push_back(static_cast<int64_t>(rows[r].size()));
  }
  return batch;
}

absl::StatusOr<at::Tensor> DecodeAttentionMask(const v1::Tensor& proto, at::IntArrayRef shape) {
  ASSIGN_OR_RETURN(at::Tensor m, TensorFromProto(proto, "attention_mask"));
  if (m.scalar_type() != at::kLong && m.scalar_type() != at::kInt) {
    return Invalid("attention_mask", absl::StrCat("must be int64 or int32 (1 real, 0 padding), got ",
                                                  c10::toString(m.scalar_type())));
  }
  if (m.sizes() != shape) {
    return Invalid("attention_mask", absl::StrCat("shape [", absl::StrJoin(m.sizes(), ", "),
                                                  "] differs from the input's [",
                                                  absl::StrJoin(shape, ", "), "]"));
  }
  m = m.to(at::kLong);
  if ((m != 0).logical_and(m != 1).any().item<bool>()) {
    return Invalid("attention_mask", "values must be 0 or 1");
  }
  return m;
}

absl::StatusOr<EncodedBatch> BuildTokenInput(const v1::Tensor& tokens,
                                             const google::protobuf::RepeatedPtrField<std::string>& texts,
                                             bool prepend_bos, const v1::Tensor& attention_mask,
                                             const ModelContext& ctx, int64_t max_tokens,
                                             v1::PaddingSide side) {
  const bool has_tokens = tokens.shape_size() > 0 || !tokens.data().empty();
  if (has_tokens == !texts.empty()) {
    return Invalid("input", "send exactly one of tokens or texts");
  }
  EncodedBatch batch;
  if (has_tokens) {
    // Decoding is already bounded by the gRPC message size limit; the token quota is checked
    // below so that an oversized request is RESOURCE_EXHAUSTED, not a malformed tensor.
    ASSIGN_OR_RETURN(at::Tensor t, TensorFromProto(tokens, "tokens"));
    if (t.scalar_type() != at::kLong && t.scalar_type() != at::kInt) {
      return Invalid("tokens", absl::StrCat("dtype must be int64 or int32 (DTYPE_INT64, DTYPE_INT32: token ids), got ",
                                            v1::DType_Name(tokens.dtype())));
    }
    if (t.dim() != 2) {
      return Invalid("tokens", absl::StrCat("must be a [batch, pos] tensor, got ", t.dim(), " dimensions"));
    }
    batch.tokens = t.to(at::kLong);
  } else {
    ASSIGN_OR_RETURN(batch, EncodeTexts(ctx, texts, prepend_bos, side));
  }
  const int64_t b = batch.tokens.size(0), p = batch.tokens.size(1);
  if (b < 1 || p < 1) return Invalid("tokens", "needs at least one row and one position");
  if (b > ctx.limits->max_batch()) {
    return Invalid("tokens", absl::StrCat("batch of ", b, " rows; at most max_batch = ",
                                          ctx.limits->max_batch()));
  }
  if (b * p > max_tokens) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "request has ", b * p, " tokens (batch ", b, " x pos ", p,
        "); your limit is max_tokens_per_request = ", max_tokens));
  }
  const LlamaConfig& c = ctx.model->config();
  if (p > c.n_ctx) {
    return absl::OutOfRangeError(absl::StrCat("sequence of ", p, " positions exceeds the model's maximum of ",
                                              c.n_ctx, " (n_ctx)"));
  }
  const bool has_mask = attention_mask.shape_size() > 0 || !attention_mask.data().empty();
  if (has_mask) {
    ASSIGN_OR_RETURN(batch.attention_mask, DecodeAttentionMask(attention_mask, batch.tokens.sizes()));
  }
  return batch;
}

absl::StatusOr<ForwardInput> BuildForwardInput(const v1::RunRequest& request,
                                               const ModelContext& ctx, int64_t max_tokens) {
  ForwardInput input;
  const LlamaConfig& c = ctx.model->config();
  if (request.has_start_at_layer()) input.start_at_layer = request.start_at_layer();
  if (request.has_stop_at_layer()) input.stop_at_layer = request.stop_at_layer();
  const bool has_residual = request.has_residual() && request.residual().shape_size() > 0;
  const bool has_tokens = request.has_tokens() &&
                          (request.tokens().shape_size() > 0 || !request.tokens().data().empty());
  if (has_residual + has_tokens + !request.texts().empty() > 1) {
    return Invalid("input", "send exactly one of tokens, texts or residual");
  }
  if (has_residual) {
    if (input.start_at_layer == 0) {
      return Invalid("residual", "is only valid with start_at_layer > 0");
    }
    ASSIGN_OR_RETURN(input.residual, TensorFromProto(request.residual(), "residual"));
    if (input.residual.dim() != 3 || input.residual.size(2) != c.d_model) {
      return Invalid("residual", absl::StrCat("must be [batch, pos, ", c.d_model, "]"));
    }
    const int64_t b = input.residual.size(0), p = input.residual.size(1);
    // As for tokens: an empty batch would run and answer OK with empty logits.
    if (b < 1 || p < 1) return Invalid("residual", "needs at least one row and one position");
    if (b * p > max_tokens) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "residual has ", b * p, " positions (batch ", b, " x pos ", p,
          "); your limit is max_tokens_per_request = ", max_tokens));
    }
    if (b > ctx.limits->max_batch()) {
      return Invalid("residual", absl::StrCat("batch of ", b, " rows; at most max_batch = ",
                                              ctx.limits->max_batch()));
    }
    if (request.has_attention_mask() && request.attention_mask().shape_size() > 0) {
      ASSIGN_OR_RETURN(input.attention_mask, DecodeAttentionMask(request.attention_mask(), {b, p}));
    }
    return input;
  }
  if (input.start_at_layer != 0) {
    return Invalid("start_at_layer", "needs the residual stream as input (RunRequest.residual)");
  }
  ASSIGN_OR_RETURN(EncodedBatch batch, BuildTokenInput(request.tokens(), request.texts(),
                                                       request.prepend_bos(), request.attention_mask(),
                                                       ctx, max_tokens, request.padding_side()));
  input.tokens = batch.tokens;
  input.attention_mask = batch.attention_mask;
  return input;
}

absl::StatusOr<ParsedHookOp> ParseHookOp(const v1::HookOp& op, const LlamaConfig& config,
                                         bool allow_callback, absl::string_view what) {
  auto id = ParseHookName(op.hook_name(), config.n_layers);
  if (!id.ok()) return Invalid(absl::StrCat(what, ".hook_name"), id.status().message());
  RETURN_IF_ERROR(CheckIndexList(op.selector().positions(), absl::StrCat(what, ".selector.positions")));
  RETURN_IF_ERROR(CheckIndexList(op.selector().heads(), absl::StrCat(what, ".selector.heads")));
  if (op.selector().heads_size() > 0 && HeadDim(id->site) < 0) {
    return Invalid(absl::StrCat(what, ".selector.heads"),
                   absl::StrCat("hook \"", Echo(op.hook_name()), "\" has no head dimension; head "
                                "selectors are valid on ", SiteNames(HasHeadDim)));
  }
  if (op.backward() && op.op_case() == v1::HookOp::kPatchFromCache) {
    return Invalid(absl::StrCat(what, ".backward"),
                   "backward ops are zero, set, add, scale, mean or client_callback "
                   "(patch_from_cache rewrites activations only)");
  }
  ParsedHookOp parsed;
  InterventionOp& out = parsed.op;
  out.hook = *id;
  out.selector.positions.assign(op.selector().positions().begin(), op.selector().positions().end());
  out.selector.heads.assign(op.selector().heads().begin(), op.selector().heads().end());
  out.backward = op.backward();
  switch (op.op_case()) {
    case v1::HookOp::kZero:
      out.kind = OpKind::kZero;
      return parsed;
    case v1::HookOp::kMean:
      out.kind = OpKind::kMean;
      return parsed;
    case v1::HookOp::kCopyRow:  // the row is checked against the batch when the op runs
      out.kind = OpKind::kCopyRow;
      out.source_row = op.copy_row().source_row();
      return parsed;
    case v1::HookOp::kScale:
      if (!std::isfinite(op.scale().factor())) return Invalid(absl::StrCat(what, ".scale.factor"), "must be finite");
      out.kind = OpKind::kScale;
      out.factor = op.scale().factor();
      return parsed;
    case v1::HookOp::kSet:
    case v1::HookOp::kAdd: {
      const bool is_set = op.op_case() == v1::HookOp::kSet;
      const v1::Tensor& value = is_set ? op.set().value() : op.add().value();
      const std::string field = absl::StrCat(what, is_set ? ".set.value" : ".add.value");
      ASSIGN_OR_RETURN(at::Tensor t, TensorFromProto(value, field));  // decoded once, here
      if (!at::isFloatingType(t.scalar_type())) return Invalid(field, "must be a floating dtype");
      if (!is_set && op.add().scale_by() != v1::SCALE_BY_NONE && !IsResidualShaped(id->site)) {
        return Invalid(absl::StrCat(what, ".add.scale_by"),
                       absl::StrCat("hook \"", Echo(op.hook_name()), "\" is not [batch, pos, d_model]; "
                                    "scale_by is valid on ", SiteNames(IsResidualShaped)));
      }
      // Check what is known before any input exists: the hook's fixed dimensions (heads narrowed
      // by the selector); batch and positions are checked when the op is applied.
      std::vector<int64_t> region = HookShape(*id, config);
      if (op.selector().heads_size() > 0) region[HeadDim(id->site)] = op.selector().heads_size();
      if (t.dim() > static_cast<int64_t>(region.size())) {
        return Invalid(field, absl::StrCat("has ", t.dim(), " dimensions; hook \"", Echo(op.hook_name()),
                                           "\" has ", region.size()));
      }
      const size_t offset = region.size() - t.dim();
      for (int64_t i = 0; i < t.dim(); ++i) {
        const int64_t want = region[offset + i];
        if (want > 0 && t.size(i) != 1 && t.size(i) != want) {
          return Invalid(field, absl::StrCat("shape [", absl::StrJoin(t.sizes(), ", "),
                                             "] does not broadcast to hook \"", Echo(op.hook_name()),
                                             "\" of shape [", absl::StrJoin(region, ", "),
                                             "] (-1: batch or positions)"));
        }
      }
      out.kind = is_set ? OpKind::kSet : OpKind::kAdd;
      out.value = std::move(t);
      if (!is_set) {
        switch (op.add().scale_by()) {
          case v1::SCALE_BY_MEAN_NORM:
            out.scale_by = AddScale::kMeanNorm;
            break;
          case v1::SCALE_BY_TOKEN_NORM:
            out.scale_by = AddScale::kTokenNorm;
            break;
          default:  // ValidateEnums has rejected numbers ScaleBy does not define
            out.scale_by = AddScale::kNone;
            break;
        }
      }
      return parsed;
    }
    case v1::HookOp::kPatchFromCache: {
      if (op.patch_from_cache().cache_handle().empty()) {
        return Invalid(absl::StrCat(what, ".patch_from_cache.cache_handle"), "is empty");
      }
      const std::string& source = op.patch_from_cache().source_hook_name();
      if (!source.empty()) {
        auto src = ParseHookName(source, config.n_layers);
        if (!src.ok()) {
          return Invalid(absl::StrCat(what, ".patch_from_cache.source_hook_name"), src.status().message());
        }
      }
      out.kind = OpKind::kSet;
      parsed.patch = ParsedHookOp::Patch{op.patch_from_cache().cache_handle(),
                                         source.empty() ? op.hook_name() : source};
      return parsed;
    }
    case v1::HookOp::kClientCallback:
      if (!allow_callback) {
        return Invalid(what, "client callbacks are only valid as one-shot hooks of RunInteractive");
      }
      out.kind = OpKind::kCallback;
      return parsed;
    case v1::HookOp::OP_NOT_SET:
      return Invalid(what, "no op set; one of zero, set, add, scale, mean, patch_from_cache, client_callback, copy_row");
  }
  return parsed;
}

absl::Status ValidateHookOp(const v1::HookOp& op, const LlamaConfig& config, bool allow_callback,
                            absl::string_view what) {
  return ParseHookOp(op, config, allow_callback, what).status();
}

absl::StatusOr<InterventionOp> ResolveHookOp(const ParsedHookOp& parsed, const LlamaConfig& config,
                                             const CacheLookup& lookup, const HookCallback& callback,
                                             absl::string_view what) {
  InterventionOp out = parsed.op;
  if (out.kind == OpKind::kCallback) {
    if (!callback) {
      return Invalid(what, "client callbacks are only valid as one-shot hooks of RunInteractive");
    }
    out.callback = callback;
  }
  if (parsed.patch.has_value()) {
    const ParsedHookOp::Patch& patch = *parsed.patch;
    if (!lookup) {
      return Invalid(what, "patch_from_cache needs the session_id that holds the cache");
    }
    ASSIGN_OR_RETURN(std::shared_ptr<const StoredCache> cache, lookup(patch.cache_handle));
    if (cache->kind != StoredCache::Kind::kActivations) {
      return Invalid(absl::StrCat(what, ".patch_from_cache.cache_handle"),
                     absl::StrCat("'", Echo(patch.cache_handle), "' is a key/value cache (past_kv_cache); "
                                  "patch from a cache stored with RunRequest.cache.store"));
    }
    const at::Tensor* stored = cache->Find(patch.source_hook);
    if (stored == nullptr) {
      return absl::NotFoundError(absl::StrCat(what, ": cache '", Echo(patch.cache_handle), "' holds no \"",
                                              Echo(patch.source_hook), "\"; cache it with the run that stores the handle"));
    }
    ASSIGN_OR_RETURN(HookId source_id, ParseHookName(patch.source_hook, config.n_layers));
    ASSIGN_OR_RETURN(out.value, SelectRegion(*stored, source_id.site, out.selector, what));
  }
  return out;
}

absl::StatusOr<InterventionOp> BuildInterventionOp(const v1::HookOp& op, const LlamaConfig& config,
                                                   const CacheLookup& lookup,
                                                   const HookCallback& callback,
                                                   absl::string_view what) {
  ASSIGN_OR_RETURN(ParsedHookOp parsed, ParseHookOp(op, config, static_cast<bool>(callback), what));
  return ResolveHookOp(parsed, config, lookup, callback, what);
}

absl::StatusOr<std::vector<CacheRequest>> BuildCacheRequests(const v1::CacheSelection& selection,
                                                             const LlamaConfig& config) {
  std::vector<bool> wanted(NumHookIds(config.n_layers), false);
  if (selection.names_size() > 4 * NumHookIds(config.n_layers) + 16) {
    return Invalid("cache.names", absl::StrCat(selection.names_size(), " names is more than the model has"));
  }
  for (int i = 0; i < selection.names_size(); ++i) {
    const std::string& name = selection.names(i);
    if (name == "*") {
      std::fill(wanted.begin(), wanted.end(), true);
      continue;
    }
    auto id = ParseHookName(name, config.n_layers);
    if (!id.ok()) return Invalid(absl::StrCat("cache.names[", i, "]"), id.status().message());
    wanted[HookIndex(*id, config.n_layers)] = true;
  }
  std::optional<at::ScalarType> dtype;
  if (selection.dtype() != v1::DTYPE_UNSPECIFIED) {
    ASSIGN_OR_RETURN(at::ScalarType t, ScalarTypeFromProto(selection.dtype()));
    if (!at::isFloatingType(t)) return Invalid("cache.dtype", "must be a floating dtype");
    dtype = t;
  }
  std::vector<CacheRequest> requests;
  for (HookId id : AllHookIds(config.n_layers)) {
    if (!wanted[HookIndex(id, config.n_layers)]) continue;
    CacheRequest r;
    r.hook = id;
    if (selection.has_pos_start()) r.pos_start = selection.pos_start();
    if (selection.has_pos_stop()) r.pos_stop = selection.pos_stop();
    r.dtype = dtype;
    r.to_host = true;
    requests.push_back(r);
  }
  return requests;
}

absl::StatusOr<std::vector<ReadoutRequest>> BuildReadouts(
    const google::protobuf::RepeatedPtrField<v1::Readout>& readouts, const LlamaConfig& config,
    const ForwardInput& input, const LensFn& lens, int64_t max_lens_bytes) {
  constexpr int kMaxReadouts = 64;
  const int64_t batch = input.tokens.defined() ? input.tokens.size(0) : input.residual.size(0);
  const int64_t n_pos = input.tokens.defined() ? input.tokens.size(1) : input.residual.size(1);
  // Blocks [first_block, end_block) run; hooks outside them never fire.
  const int64_t n_layers = config.n_layers;
  const int64_t first_block = input.start_at_layer < 0 ? input.start_at_layer + n_layers : input.start_at_layer;
  int64_t end_block = n_layers;
  if (input.stop_at_layer.has_value()) {
    end_block = *input.stop_at_layer < 0 ? *input.stop_at_layer + n_layers : *input.stop_at_layer;
  }
  if (readouts.size() > kMaxReadouts) {
    return Invalid("readouts", absl::StrCat(readouts.size(), " readouts; at most ", kMaxReadouts));
  }
  std::vector<ReadoutRequest> out;
  for (int i = 0; i < readouts.size(); ++i) {
    const v1::Readout& r = readouts[i];
    const std::string what = absl::StrCat("readouts[", i, "]");
    ReadoutRequest request;
    switch (r.kind_case()) {
      case v1::Readout::kLens:
        request.kind = ReadoutKind::kLens;
        if (r.lens().top_k() < 0 || r.lens().top_k() > config.d_vocab) {
          return Invalid(absl::StrCat(what, ".lens.top_k"),
                         absl::StrCat(r.lens().top_k(), " is out of range; valid: 0 (full logits) or 1..",
                                      config.d_vocab, " (d_vocab)"));
        }
        request.top_k = r.lens().top_k();
        request.lens = lens;
        break;
      case v1::Readout::kNorm:
        request.kind = ReadoutKind::kNorm;
        break;
      case v1::Readout::kMean:
        request.kind = ReadoutKind::kMean;
        break;
      case v1::Readout::KIND_NOT_SET:
        return Invalid(what, "no kind set; one of lens, norm, mean");
    }
    if (r.hook_names().empty()) return Invalid(absl::StrCat(what, ".hook_names"), "is empty; name at least one hook");
    if (r.hook_names_size() > NumHookIds(config.n_layers)) {
      return Invalid(absl::StrCat(what, ".hook_names"),
                     absl::StrCat(r.hook_names_size(), " names; at most ", NumHookIds(config.n_layers),
                                  " (the model's hook points)"));
    }
    std::vector<int64_t> first_shape;
    for (int j = 0; j < r.hook_names_size(); ++j) {
      const std::string field = absl::StrCat(what, ".hook_names[", j, "]");
      auto id = ParseHookName(r.hook_names(j), config.n_layers);
      if (!id.ok()) return Invalid(field, id.status().message());
      if (request.kind == ReadoutKind::kLens && !IsResidualStream(id->site)) {
        return Invalid(field, absl::StrCat("\"", Echo(r.hook_names(j)), "\" is not a residual-stream hook; "
                                           "a lens readout is valid at hook_embed, blocks.L.hook_resid_pre, "
                                           "hook_resid_mid and hook_resid_post"));
      }
      const bool fires = id->layer >= 0 ? (id->layer >= first_block && id->layer < end_block)
                                         : (id->site == HookSite::kEmbed ? first_block == 0
                                                                          : !input.stop_at_layer.has_value());
      if (!fires) {
        return Invalid(field, absl::StrCat("\"", Echo(r.hook_names(j)), "\" does not run in this forward (blocks ",
                                           first_block, "..", end_block - 1,
                                           " run, given start_at_layer / stop_at_layer)"));
      }
      const std::vector<int64_t> shape = HookShape(*id, config);
      if (j == 0) {
        first_shape = shape;
      } else if (shape != first_shape) {
        return Invalid(field, absl::StrCat("\"", Echo(r.hook_names(j)), "\" has shape [",
                                           absl::StrJoin(shape, ", "), "], unlike \"",
                                           Echo(r.hook_names(0)), "\" [", absl::StrJoin(first_shape, ", "),
                                           "]; results are stacked, so one readout's hooks share a shape"));
      }
      request.hooks.push_back(*id);
    }
    RETURN_IF_ERROR(CheckIndexList(r.positions(), absl::StrCat(what, ".positions")));
    for (int64_t p : r.positions()) {
      if (p < -n_pos || p >= n_pos) {
        return Invalid(absl::StrCat(what, ".positions"),
                       absl::StrCat("position ", p, " is out of range for a sequence of ", n_pos,
                                    " positions (valid: ", -n_pos, "..", n_pos - 1, ")"));
      }
    }
    request.positions.assign(r.positions().begin(), r.positions().end());
    if (request.kind == ReadoutKind::kLens) {
      // The lens computes float32 logits for every row before any top-k: bound them up front.
      const int64_t rows = static_cast<int64_t>(request.hooks.size()) * batch *
                           (request.positions.empty() ? n_pos : static_cast<int64_t>(request.positions.size()));
      const int64_t bytes = rows * config.d_vocab * 4;
      if (bytes > max_lens_bytes) {
        return absl::ResourceExhaustedError(absl::StrCat(
            what, ": the lens over ", rows, " rows needs ", bytes, " bytes of float32 logits; your limit is ",
            max_lens_bytes, " (max_streamed_bytes_per_request); select fewer hooks or positions"));
      }
    }
    out.push_back(std::move(request));
  }
  return out;
}

at::Tensor NextTokenLoss(const at::Tensor& logits, const at::Tensor& tokens,
                         const at::Tensor& attention_mask, bool per_token) {
  const int64_t pos = logits.size(1);
  const at::Tensor log_probs = at::log_softmax(logits.narrow(1, 0, pos - 1).to(at::kFloat), -1);
  const at::Tensor targets = tokens.narrow(1, 1, pos - 1).to(log_probs.device(), at::kLong);
  const at::Tensor loss = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1);  // [batch, pos-1]
  if (per_token) return loss;
  if (!attention_mask.defined()) return loss.mean();
  // A target counts when both it and the token predicting it are real.
  const at::Tensor m = attention_mask.to(loss.device(), at::kFloat);
  const at::Tensor valid = m.narrow(1, 1, pos - 1) * m.narrow(1, 0, pos - 1);
  return (loss * valid).sum() / valid.sum().clamp_min(1);
}

absl::StatusOr<PreparedKvCache> BuildPastKvCache(const v1::RunRequest& request,
                                                 const ForwardInput& input, const LlamaModel& model,
                                                 const CacheLookup& lookup) {
  const v1::PastKvCache& kv = request.past_kv_cache();
  if (request.session_id().empty() || !lookup) {
    return Invalid("past_kv_cache", "needs session_id: the key/value cache is kept in a session");
  }
  if (!input.tokens.defined() || input.start_at_layer != 0) {
    return Invalid("past_kv_cache", "needs token input (tokens or texts); residual input with "
                                    "start_at_layer > 0 cannot extend a key/value cache");
  }
  if (input.stop_at_layer.has_value()) {
    return Invalid("past_kv_cache", "needs the full model: stop_at_layer would leave the later "
                                    "blocks' keys and values out of the cache");
  }
  if (request.has_backward()) {
    return Invalid("past_kv_cache", "does not combine with backward (gradients need a forward "
                                    "over the whole sequence)");
  }
  PreparedKvCache out;
  out.handle = kv.handle();
  out.frozen = kv.frozen();
  const int64_t batch = input.tokens.size(0), pos = input.tokens.size(1);
  if (out.handle.empty()) return out;
  ASSIGN_OR_RETURN(out.past, lookup(out.handle));
  if (out.past->kind != StoredCache::Kind::kKeyValues) {
    return Invalid("past_kv_cache.handle",
                   absl::StrCat("'", Echo(out.handle), "' is an activation cache (cache.store); pass a "
                                "handle from an earlier Summary.kv_cache_handle, or none to start one"));
  }
  auto restored = KvCacheFromTensors(out.past->tensors, model);
  if (!restored.ok()) {
    return Invalid("past_kv_cache.handle", absl::StrCat("'", Echo(out.handle), "' does not fit this model: ",
                                                         restored.status().message()));
  }
  out.cache = std::move(*restored);
  out.past_length = out.cache.length();
  if (out.cache.rows() != batch) {
    return Invalid("past_kv_cache", absl::StrCat("the cache '", Echo(out.handle), "' holds ",
                                                 out.cache.rows(), " rows; this input has ", batch,
                                                 " (the batch must stay the same across calls)"));
  }
  const int64_t n_ctx = model.config().n_ctx;
  if (out.cache.length() + pos > n_ctx) {
    return absl::OutOfRangeError(absl::StrCat(
        "past_kv_cache: ", out.cache.length(), " cached positions plus ", pos, " new ones exceed the "
        "model's maximum of ", n_ctx, " (n_ctx); at most ", n_ctx - out.cache.length(), " more fit"));
  }
  return out;
}

absl::StatusOr<BackwardSpec> BuildBackwardSpec(const v1::BackwardRequest& request,
                                               const ForwardInput& input, const LlamaConfig& config) {
  BackwardSpec spec;
  const bool full_model = !input.stop_at_layer.has_value();
  switch (request.metric_case()) {
    case v1::BackwardRequest::kLoss:
      if (!full_model || !input.tokens.defined() || input.start_at_layer != 0) {
        return Invalid("backward.loss", "needs token input and the full model (no start_at_layer or "
                                        "stop_at_layer); send output_grad for other outputs");
      }
      if (input.tokens.size(1) < 2) return Invalid("backward.loss", "needs at least 2 positions");
      spec.metric = BackwardSpec::Metric::kLoss;
      break;
    case v1::BackwardRequest::kLogitDiff: {
      const v1::LogitDiffMetric& m = request.logit_diff();
      if (!full_model) return Invalid("backward.logit_diff", "needs the full model (no stop_at_layer)");
      const int64_t batch = input.tokens.defined() ? input.tokens.size(0) : input.residual.size(0);
      const int64_t pos = input.tokens.defined() ? input.tokens.size(1) : input.residual.size(1);
      for (const auto& [field, ids] :
           {std::make_pair("backward.logit_diff.correct", &m.correct()),
            std::make_pair("backward.logit_diff.incorrect", &m.incorrect())}) {
        if (ids->size() != 1 && ids->size() != batch) {
          return Invalid(field, absl::StrCat("has ", ids->size(), " ids; send one, or one per row (",
                                             batch, ")"));
        }
        for (int64_t id : *ids) {
          if (id < 0 || id >= config.d_vocab) {
            return Invalid(field, absl::StrCat("token id ", id, " is outside the vocabulary (0..",
                                               config.d_vocab - 1, ")"));
          }
        }
      }
      spec.correct.assign(m.correct().begin(), m.correct().end());
      spec.incorrect.assign(m.incorrect().begin(), m.incorrect().end());
      spec.position = m.has_position() ? m.position() : -1;
      if (spec.position < -pos || spec.position >= pos) {
        return Invalid("backward.logit_diff.position",
                       absl::StrCat(spec.position, " is outside the sequence (valid: ", -pos, "..",
                                    pos - 1, ")"));
      }
      spec.metric = BackwardSpec::Metric::kLogitDiff;
      break;
    }
    case v1::BackwardRequest::kOutputGrad: {
      ASSIGN_OR_RETURN(spec.output_grad, TensorFromProto(request.output_grad(), "backward.output_grad"));
      if (!at::isFloatingType(spec.output_grad.scalar_type())) {
        return Invalid("backward.output_grad", "must be a floating dtype");
      }
      spec.metric = BackwardSpec::Metric::kOutputGrad;
      break;
    }
    case v1::BackwardRequest::METRIC_NOT_SET:
      return Invalid("backward", "no metric set; one of loss, logit_diff, output_grad");
  }
  if (request.cache().store()) {
    return Invalid("backward.cache.store", "gradients are streamed; storing them is not supported");
  }
  if (request.has_metric_grad()) {
    if (spec.metric == BackwardSpec::Metric::kOutputGrad) {
      return Invalid("backward.metric_grad", "applies to loss and logit_diff, not output_grad");
    }
    if (!std::isfinite(request.metric_grad())) return Invalid("backward.metric_grad", "must be finite");
    spec.metric_grad = request.metric_grad();
  }
  ASSIGN_OR_RETURN(spec.gradients, BuildCacheRequests(request.cache(), config));
  for (CacheRequest& r : spec.gradients) r.gradient = true;
  return spec;
}

at::Tensor LogitDifference(const at::Tensor& logits, const std::vector<int64_t>& correct,
                           const std::vector<int64_t>& incorrect, int64_t position) {
  const int64_t batch = logits.size(0), pos = logits.size(1);
  const at::Tensor row = logits.select(1, position < 0 ? position + pos : position).to(at::kFloat);
  auto ids = [&](const std::vector<int64_t>& v) {
    const at::Tensor t = at::tensor(v, at::kLong).to(row.device());
    return (v.size() == 1 ? t.expand({batch}) : t).unsqueeze(1);
  };
  return (row.gather(1, ids(correct)) - row.gather(1, ids(incorrect))).mean();
}

}  // namespace remotelens
