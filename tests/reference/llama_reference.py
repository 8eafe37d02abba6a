"""Independent float32 reference implementation of Llama 3.1, with TransformerLens hook points.

This is the spec the C++ engine is tested against, so it is written for obviousness rather than
speed: explicit repeat of the key/value heads for grouped-query attention, explicit cos/sin for
rotary embeddings (rotate-half layout, as Hugging Face checkpoints expect), explicit softmax,
explicit per-head attention output. It has no KV cache: every call runs the whole sequence.

Hook points use TransformerLens names and shapes (see DESIGN.md). Interventions ("ops") are
applied at a hook right after its value is computed and before anything downstream reads it,
exactly as a TransformerLens forward hook that returns a replacement.

Example:
    model = LlamaReference.from_pretrained("/path/to/model_dir")
    logits, cache = model.forward(torch.tensor([[1, 2, 3]]))
    cache["blocks.0.attn.hook_pattern"].shape        # [1, n_heads, 3, 3]
    ops = [{"hook": "blocks.0.attn.hook_z", "op": "zero", "heads": [1]}]
    ablated_logits, _ = model.forward(torch.tensor([[1, 2, 3]]), ops=ops)
"""

import json
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import safetensors_io

# Hook sites inside block L, in the order the forward pass computes them.
BLOCK_SITES = (
    "hook_resid_pre",
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "hook_attn_in",
    "hook_q_input",
    "hook_k_input",
    "hook_v_input",
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
    "hook_mlp_in",
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_pre_linear",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)
# Sites whose activation is [batch, pos, heads, ...]: positions index dim 1, heads dim 2.
_POS_THEN_HEAD_SITES = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q",
                        "attn.hook_rot_k", "attn.hook_z", "attn.hook_result", "hook_attn_in",
                        "hook_q_input", "hook_k_input", "hook_v_input")
# TransformerLens HookedTransformer flags that switch on a block's opt-in hook points, and the
# sites each enables (HookedTransformer.check_hooks_to_add, components/transformer_block.py).
FLAG_SITES = {
    "use_attn_in": ("hook_attn_in",),
    "use_split_qkv_input": ("hook_q_input", "hook_k_input", "hook_v_input"),
    "use_hook_mlp_in": ("hook_mlp_in",),
}
ALL_FLAGS = tuple(FLAG_SITES)
# Sites whose activation is [batch, n_heads, query_pos, key_pos]: heads dim 1, positions dim 2.
_HEAD_THEN_POS_SITES = ("attn.hook_attn_scores", "attn.hook_pattern")

OP_KINDS = ("zero", "set", "add", "scale", "mean")


class ReferenceError(ValueError):
    """Invalid input to the reference (bad hook name, op, token, shape)."""


@dataclass
class LlamaConfig:
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    eps: float
    rope_theta: float
    rope_scaling: Optional[dict]
    max_position_embeddings: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf_dict(cls, hf: dict) -> "LlamaConfig":
        n_heads = hf["num_attention_heads"]
        d_head = hf.get("head_dim") or hf["hidden_size"] // n_heads
        return cls(
            d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            d_head=d_head,
            d_mlp=hf["intermediate_size"],
            d_vocab=hf["vocab_size"],
            eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=hf.get("rope_theta", 10000.0),
            rope_scaling=hf.get("rope_scaling"),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )


def rotary_inverse_frequencies(config: LlamaConfig) -> torch.Tensor:
    """Per-pair rotation frequencies [d_head / 2], float64, with "llama3" scaling when configured.

    Computed in float64 so the reference is as close to the exact math as possible.
    """
    exponents = np.arange(0, config.d_head, 2, dtype=np.float64) / config.d_head
    inv_freq = 1.0 / (float(config.rope_theta) ** exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return torch.from_numpy(inv_freq)
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type in (None, "default"):
        return torch.from_numpy(inv_freq)
    if rope_type != "llama3":
        raise ReferenceError(f"unsupported rope_scaling type {rope_type!r}")
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    original_context = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = original_context / low_freq_factor
    high_freq_wavelen = original_context / high_freq_factor
    scaled = np.empty_like(inv_freq)
    for i, freq in enumerate(inv_freq):
        wavelen = 2.0 * math.pi / freq
        if wavelen < high_freq_wavelen:  # fast rotations: left alone
            scaled[i] = freq
        elif wavelen > low_freq_wavelen:  # slow rotations: stretched by the full factor
            scaled[i] = freq / factor
        else:  # in between: interpolate between stretched and unchanged
            smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            scaled[i] = (1.0 - smooth) * freq / factor + smooth * freq
    return torch.from_numpy(scaled)


def rope_regions(config: LlamaConfig) -> Tuple[int, int, int]:
    """(unchanged, interpolated, divided) counts of rotary frequencies under llama3 scaling."""
    scaling = config.rope_scaling
    exponents = np.arange(0, config.d_head, 2, dtype=np.float64) / config.d_head
    wavelens = 2.0 * math.pi * (float(config.rope_theta) ** exponents)
    original = float(scaling["original_max_position_embeddings"])
    high = original / float(scaling["high_freq_factor"])
    low = original / float(scaling["low_freq_factor"])
    unchanged = int(np.sum(wavelens < high))
    divided = int(np.sum(wavelens > low))
    return unchanged, len(wavelens) - unchanged - divided, divided


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., d_head] -> [..., d_head]: (x1, x2) -> (-x2, x1) with x1, x2 the two halves."""
    half = x.shape[-1] // 2
    x1 = x[..., :half]
    x2 = x[..., half:]
    return torch.cat([-x2, x1], dim=-1)


def silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def all_hook_names(n_layers: int) -> List[str]:
    names = ["hook_embed"]
    for layer in range(n_layers):
        names += [f"blocks.{layer}.{site}" for site in BLOCK_SITES]
    names += ["ln_final.hook_scale", "ln_final.hook_normalized", "unembed.hook_in", "unembed.hook_out"]
    return names


def _site_of(name: str) -> str:
    if name.startswith("blocks."):
        return name.split(".", 2)[2]
    return name


class LlamaReference:
    """Float32 Llama 3.1 forward pass with TransformerLens hook points and interventions."""

    def __init__(self, config: LlamaConfig, weights: Dict[str, torch.Tensor]):
        self.config = config
        self.hook_names = all_hook_names(config.n_layers)
        self._hook_name_set = set(self.hook_names)
        c = config
        expected = {"model.embed_tokens.weight": (c.d_vocab, c.d_model),
                    "model.norm.weight": (c.d_model,)}
        for layer in range(c.n_layers):
            p = f"model.layers.{layer}."
            expected.update({
                p + "input_layernorm.weight": (c.d_model,),
                p + "self_attn.q_proj.weight": (c.n_heads * c.d_head, c.d_model),
                p + "self_attn.k_proj.weight": (c.n_kv_heads * c.d_head, c.d_model),
                p + "self_attn.v_proj.weight": (c.n_kv_heads * c.d_head, c.d_model),
                p + "self_attn.o_proj.weight": (c.d_model, c.n_heads * c.d_head),
                p + "post_attention_layernorm.weight": (c.d_model,),
                p + "mlp.gate_proj.weight": (c.d_mlp, c.d_model),
                p + "mlp.up_proj.weight": (c.d_mlp, c.d_model),
                p + "mlp.down_proj.weight": (c.d_model, c.d_mlp),
            })
        if not c.tie_word_embeddings:
            expected["lm_head.weight"] = (c.d_vocab, c.d_model)
        for name, shape in expected.items():
            if name not in weights:
                raise ReferenceError(f"checkpoint is missing tensor {name}")
            if tuple(weights[name].shape) != shape:
                raise ReferenceError(f"tensor {name} has shape {tuple(weights[name].shape)}, "
                                     f"expected {shape}")
        self.w = {name: weights[name].to(torch.float32).contiguous() for name in expected}
        self.W_U = self.w["model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"]
        if c.n_heads % c.n_kv_heads != 0:
            raise ReferenceError("n_heads must be a multiple of n_kv_heads")
        self.inv_freq = rotary_inverse_frequencies(c)  # [d_head / 2] float64

    @classmethod
    def from_pretrained(cls, model_dir: str) -> "LlamaReference":
        with open(os.path.join(model_dir, "config.json")) as f:
            config = LlamaConfig.from_hf_dict(json.load(f))
        arrays = safetensors_io.read_checkpoint(model_dir)
        weights = {name: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
                   for name, a in arrays.items()}
        return cls(config, weights)

    # ----------------------------------------------------------------- interventions

    def validate_ops(self, ops: Sequence[dict], hook_tensors: Dict[str, torch.Tensor]) -> None:
        for op in ops:
            name = op.get("hook")
            if name not in self._hook_name_set:
                raise ReferenceError(f"unknown hook name {name!r}")
            kind = op.get("op")
            if kind not in OP_KINDS:
                raise ReferenceError(f"unknown op {kind!r}; valid: {OP_KINDS}")
            site = _site_of(name)
            if "heads" in op and site not in _POS_THEN_HEAD_SITES + _HEAD_THEN_POS_SITES:
                raise ReferenceError(f"hook {name} has no head dimension; 'heads' is not allowed")
            if kind in ("set", "add") and op.get("tensor") not in hook_tensors:
                raise ReferenceError(f"op on {name} names tensor {op.get('tensor')!r} "
                                     f"that is not in hook_tensors")
            if op.get("scale_by") not in (None, "mean_norm", "token_norm"):
                raise ReferenceError(f"scale_by {op['scale_by']!r}; valid: mean_norm, token_norm")
            if op.get("scale_by") is not None and kind != "add":
                raise ReferenceError("scale_by is only valid on an add op")
            if kind == "scale" and "factor" not in op:
                raise ReferenceError(f"scale op on {name} needs 'factor'")

    def _apply_op(self, name: str, act: torch.Tensor, op: dict,
                  hook_tensors: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Returns a new tensor with op applied to the selected region of act."""
        site = _site_of(name)
        if site in _HEAD_THEN_POS_SITES:
            pos_dim, head_dim = 2, 1
        elif site in _POS_THEN_HEAD_SITES:
            pos_dim, head_dim = 1, 2
        else:
            pos_dim, head_dim = 1, None

        def resolve(indices, size, what):
            out = []
            for i in indices:
                j = i + size if i < 0 else i
                if not 0 <= j < size:
                    raise ReferenceError(f"{what} index {i} out of range for size {size} at {name}")
                out.append(j)
            return torch.tensor(out, dtype=torch.int64)

        pos_index = (resolve(op["positions"], act.shape[pos_dim], "position")
                     if "positions" in op else torch.arange(act.shape[pos_dim]))
        index: List[object] = [slice(None)] * act.dim()
        if head_dim is None:
            index[pos_dim] = pos_index
        else:
            head_index = (resolve(op["heads"], act.shape[head_dim], "head")
                          if "heads" in op else torch.arange(act.shape[head_dim]))
            # Outer product of the two selections (np.ix_ style) on adjacent dims 1 and 2.
            if pos_dim == 1:
                index[1], index[2] = pos_index[:, None], head_index[None, :]
            else:
                index[1], index[2] = head_index[:, None], pos_index[None, :]
        index = tuple(index)
        region = act[index]
        kind = op["op"]
        if kind == "zero":
            new_region = torch.zeros_like(region)
        elif kind in ("set", "add"):
            tensor = hook_tensors[op["tensor"]].to(torch.float32)
            try:
                value = torch.broadcast_to(tensor, region.shape)
            except RuntimeError as e:
                raise ReferenceError(f"tensor {op['tensor']} of shape {tuple(tensor.shape)} does "
                                     f"not broadcast to region {tuple(region.shape)} of {name}") from e
            if kind == "add" and op.get("scale_by") == "token_norm":
                # Each position's L2 norm over d_model, before the op.
                value = value * torch.sqrt((region * region).sum(dim=-1, keepdim=True))
            elif kind == "add" and op.get("scale_by") == "mean_norm":
                # The mean over the row's positions of those norms.
                value = value * torch.sqrt((act * act).sum(dim=-1, keepdim=True)).mean(dim=1, keepdim=True)
            new_region = value.clone() if kind == "set" else region + value
        elif kind == "scale":
            new_region = region * float(op["factor"])
        else:  # mean over the batch
            new_region = region.mean(dim=0, keepdim=True).expand_as(region)
        out = act.clone()
        out[index] = new_region
        return out

    def lens(self, residual: torch.Tensor) -> torch.Tensor:
        """Logit lens: the final RMSNorm and the unembedding of residual rows [..., d_model]."""
        x = residual.to(torch.float32)
        x = x / torch.sqrt(torch.mean(x * x, dim=-1, keepdim=True) + self.config.eps)
        return (x * self.w["model.norm.weight"]) @ self.W_U.T  # [..., d_vocab]

    # ----------------------------------------------------------------- forward

    def forward(self, tokens: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                ops: Optional[Sequence[dict]] = None,
                hook_tensors: Optional[Dict[str, torch.Tensor]] = None,
                stop_at_layer: Optional[int] = None,
                collect: bool = True,
                flags: Optional[Sequence[str]] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Runs the model.

        Args:
          tokens: [batch, pos] int64 token ids.
          attention_mask: optional [batch, pos] 0/1, 0 marking LEFT padding. Padded positions are
            never attended to; position ids count from each row's first real token.
          ops: interventions, each {"hook", "op", optional "positions", "heads", "tensor", "factor",
            "scale_by" ("mean_norm" | "token_norm": an add value times the activation's L2 norm)}.
          hook_tensors: tensors named by "set"/"add" ops.
          stop_at_layer: run blocks 0..N-1 only and return the residual stream after block N-1
            in place of the logits (TransformerLens semantics).
          collect: when False, no cache is built and the per-head result is not materialised
            (the fast path for benchmarks).
          flags: the TransformerLens flags on (keys of FLAG_SITES; ALL_FLAGS for every one);
            None: none, TransformerLens's default. Their hook
            points run only when on. With use_attn_in, attention reads hook_attn_in's copies
            (keys and values of grouped-query attention the first n_kv_heads of them, as the
            TransformerLens 4 bridge does); with use_split_qkv_input it reads hook_q/k/v_input,
            fresh copies of resid_pre, whatever hook_attn_in did; each copy goes through ln1
            on its own, then its own head's projection.

        Returns:
          (logits [batch, pos, d_vocab] float32, cache {hook name: activation}).
        """
        c = self.config
        ops = list(ops or [])
        hook_tensors = dict(hook_tensors or {})
        flags = set(flags or ())
        if flags - set(FLAG_SITES):
            raise ReferenceError(f"unknown flags {sorted(flags - set(FLAG_SITES))}; valid: {sorted(FLAG_SITES)}")
        self.validate_ops(ops, hook_tensors)
        disabled = {site for flag, sites in FLAG_SITES.items() if flag not in flags for site in sites}
        for op in ops:
            if _site_of(op["hook"]) in disabled:
                raise ReferenceError(f"op on {op['hook']} needs its TransformerLens flag on")
        ops_by_hook: Dict[str, List[dict]] = {}
        for op in ops:
            ops_by_hook.setdefault(op["hook"], []).append(op)
        cache: Dict[str, torch.Tensor] = {}

        def hook(name: str, act: torch.Tensor) -> torch.Tensor:
            for op in ops_by_hook.get(name, ()):
                act = self._apply_op(name, act, op, hook_tensors)
            if collect:
                cache[name] = act
            return act

        tokens = torch.as_tensor(tokens, dtype=torch.int64)
        if tokens.dim() != 2:
            raise ReferenceError("tokens must be [batch, pos]")
        batch, n_pos = tokens.shape
        if n_pos > c.max_position_embeddings:
            raise ReferenceError(f"sequence length {n_pos} exceeds max_position_embeddings "
                                 f"{c.max_position_embeddings}")
        if tokens.numel() and (int(tokens.max()) >= c.d_vocab or int(tokens.min()) < 0):
            raise ReferenceError(f"token id out of range for vocab size {c.d_vocab}")
        if attention_mask is None:
            attention_mask = torch.ones(batch, n_pos, dtype=torch.int64)
        attention_mask = torch.as_tensor(attention_mask).to(torch.int64)
        is_real = attention_mask == 1  # [batch, pos]

        # Position ids count real tokens so a left-padded row sees the same positions as unpadded.
        position_ids = torch.clamp(torch.cumsum(attention_mask, dim=1) - 1, min=0)  # [batch, pos]
        angles = position_ids.to(torch.float64)[:, :, None] * self.inv_freq[None, None, :]
        cos = torch.cos(torch.cat([angles, angles], dim=-1)).to(torch.float32)  # [batch, pos, d_head]
        sin = torch.sin(torch.cat([angles, angles], dim=-1)).to(torch.float32)  # [batch, pos, d_head]

        # allowed[b, q, k]: causal and the key is a real token.
        causal = torch.tril(torch.ones(n_pos, n_pos, dtype=torch.bool))  # [query_pos, key_pos]
        allowed = causal[None, :, :] & is_real[:, None, :]  # [batch, query_pos, key_pos]

        group = c.n_heads // c.n_kv_heads
        kv_head_of = torch.tensor([h // group for h in range(c.n_heads)], dtype=torch.int64)

        def rms_norm(x: torch.Tensor, prefix: str, weight: torch.Tensor) -> torch.Tensor:
            scale = hook(prefix + "hook_scale", torch.sqrt(torch.mean(x * x, dim=-1, keepdim=True) + c.eps))
            normalized = hook(prefix + "hook_normalized", x / scale)  # [batch, pos, d_model]
            return normalized * weight

        def apply_rotary(x: torch.Tensor) -> torch.Tensor:
            # x: [batch, pos, heads, d_head]
            return x * cos[:, :, None, :] + rotate_half(x) * sin[:, :, None, :]

        residual = hook("hook_embed", self.w["model.embed_tokens.weight"][tokens])  # [batch, pos, d_model]
        n_blocks = c.n_layers if stop_at_layer is None else stop_at_layer
        if not 0 <= n_blocks <= c.n_layers:
            raise ReferenceError(f"stop_at_layer {stop_at_layer} out of range")
        for layer in range(n_blocks):
            p = f"blocks.{layer}."
            w = f"model.layers.{layer}."
            resid_pre = hook(p + "hook_resid_pre", residual)  # [batch, pos, d_model]

            ln1_weight = self.w[w + "input_layernorm.weight"]
            x = rms_norm(resid_pre, p + "ln1.", ln1_weight)

            def copies(heads: int) -> torch.Tensor:  # [batch, pos, heads, d_model]
                return resid_pre[:, :, None, :].repeat(1, 1, heads, 1)

            # Per-head inputs (None: every head reads x).
            q_in = k_in = v_in = None
            if "use_attn_in" in flags:
                attn_in = hook(p + "hook_attn_in", copies(c.n_heads))
                q_in, k_in, v_in = attn_in, attn_in[:, :, :c.n_kv_heads], attn_in[:, :, :c.n_kv_heads]
            if "use_split_qkv_input" in flags:
                q_in = hook(p + "hook_q_input", copies(c.n_heads))
                k_in = hook(p + "hook_k_input", copies(c.n_kv_heads))
                v_in = hook(p + "hook_v_input", copies(c.n_kv_heads))

            def project(inputs: Optional[torch.Tensor], weight: str, heads: int) -> torch.Tensor:
                W = self.w[w + weight]  # [heads * d_head, d_model]
                if inputs is None:
                    return (x @ W.T).reshape(batch, n_pos, heads, c.d_head)
                normed = inputs / torch.sqrt(torch.mean(inputs * inputs, dim=-1, keepdim=True) + c.eps)
                return torch.einsum("bphm,hdm->bphd", normed * ln1_weight,
                                    W.reshape(heads, c.d_head, c.d_model))

            q = hook(p + "attn.hook_q", project(q_in, "self_attn.q_proj.weight", c.n_heads))
            k = hook(p + "attn.hook_k", project(k_in, "self_attn.k_proj.weight", c.n_kv_heads))
            v = hook(p + "attn.hook_v", project(v_in, "self_attn.v_proj.weight", c.n_kv_heads))
            rot_q = hook(p + "attn.hook_rot_q", apply_rotary(q))  # [batch, pos, n_heads, d_head]
            rot_k = hook(p + "attn.hook_rot_k", apply_rotary(k))  # [batch, pos, n_kv_heads, d_head]

            # Grouped-query attention: query head h reads key/value head h // group.
            k_per_head = rot_k[:, :, kv_head_of, :]  # [batch, pos, n_heads, d_head]
            v_per_head = v[:, :, kv_head_of, :]  # [batch, pos, n_heads, d_head]
            scores = torch.einsum("bqhd,bkhd->bhqk", rot_q, k_per_head) / math.sqrt(c.d_head)
            scores = torch.where(allowed[:, None, :, :], scores,
                                 torch.tensor(float("-inf"), dtype=torch.float32))
            scores = hook(p + "attn.hook_attn_scores", scores)  # [batch, n_heads, query_pos, key_pos]

            # Softmax over keys; a row with every key masked (a pad query) gets an all-zero pattern.
            row_max = scores.amax(dim=-1, keepdim=True)
            row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
            exp = torch.exp(scores - row_max)
            denom = exp.sum(dim=-1, keepdim=True)
            pattern = torch.where(denom > 0, exp / torch.where(denom > 0, denom, torch.ones_like(denom)),
                                  torch.zeros_like(exp))
            pattern = hook(p + "attn.hook_pattern", pattern)  # [batch, n_heads, query_pos, key_pos]

            z = hook(p + "attn.hook_z", torch.einsum("bhqk,bkhd->bqhd", pattern, v_per_head))
            W_O = self.w[w + "self_attn.o_proj.weight"]  # [d_model, n_heads * d_head]
            if collect or (p + "attn.hook_result") in ops_by_hook:
                W_O_per_head = W_O.reshape(c.d_model, c.n_heads, c.d_head).permute(1, 0, 2)  # [n_heads, d_model, d_head]
                result = torch.einsum("bphd,hmd->bphm", z, W_O_per_head)  # [batch, pos, n_heads, d_model]
                result = hook(p + "attn.hook_result", result)
                attn_out = result.sum(dim=2)
            else:
                attn_out = z.reshape(batch, n_pos, c.n_heads * c.d_head) @ W_O.T
            attn_out = hook(p + "hook_attn_out", attn_out)  # [batch, pos, d_model]
            resid_mid = hook(p + "hook_resid_mid", resid_pre + attn_out)

            # A copy (TL: resid_mid.clone()): its gradient is the MLP's alone, not the residual's.
            mlp_in = hook(p + "hook_mlp_in", resid_mid.clone()) if "use_hook_mlp_in" in flags else resid_mid
            x = rms_norm(mlp_in, p + "ln2.", self.w[w + "post_attention_layernorm.weight"])
            gate = hook(p + "mlp.hook_pre", x @ self.w[w + "mlp.gate_proj.weight"].T)  # [batch, pos, d_mlp]
            up = hook(p + "mlp.hook_pre_linear", x @ self.w[w + "mlp.up_proj.weight"].T)  # [batch, pos, d_mlp]
            post = hook(p + "mlp.hook_post", silu(gate) * up)  # [batch, pos, d_mlp]
            mlp_out = hook(p + "hook_mlp_out", post @ self.w[w + "mlp.down_proj.weight"].T)
            residual = hook(p + "hook_resid_post", resid_mid + mlp_out)  # [batch, pos, d_model]

        if stop_at_layer is not None:
            return residual, cache
        x = hook("unembed.hook_in", rms_norm(residual, "ln_final.", self.w["model.norm.weight"]))
        logits = hook("unembed.hook_out", x @ self.W_U.T)  # [batch, pos, d_vocab]
        return logits, cache


def left_pad(rows: Sequence[Sequence[int]], pad_id: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Left-pads token rows to a common length: (tokens [batch, pos], attention_mask [batch, pos])."""
    n_pos = max(len(r) for r in rows)
    tokens = torch.full((len(rows), n_pos), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), n_pos), dtype=torch.int64)
    for i, row in enumerate(rows):
        if row:
            tokens[i, n_pos - len(row):] = torch.tensor(list(row), dtype=torch.int64)
            mask[i, n_pos - len(row):] = 1
    return tokens, mask
