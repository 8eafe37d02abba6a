"""Declarative hook operations that run on the server, with no round trip per forward pass.

Each op is accepted anywhere a hook function is (run_with_hooks, hooks(), add_hook, generate's
active hooks):

    from remotelens import ops
    model.run_with_hooks(tokens, fwd_hooks=[
        ("blocks.1.attn.hook_z", ops.zero(head=2)),                   # ablate head 1.2
        ("blocks.2.hook_resid_post", ops.add(steering_vector)),       # steer
        ("blocks.0.hook_resid_pre", ops.patch_from(clean_cache, pos=-1)),  # patch
    ])

Selectors: `pos` indexes the position dimension (query positions for attn.hook_attn_scores and
attn.hook_pattern), `head` the head dimension (key/value heads for attn.hook_k, hook_v,
hook_rot_k). Each takes an int or a list of ints; negatives count from the end; None selects
everything. `set` and `add` values broadcast (trailing-aligned) to the selected region, whose
shape is the activation's with the selected dimensions cut down to the selected indices.

An op is also an ordinary TransformerLens hook function: `op(activation, hook)` returns the
edited activation computed locally, so the same hook list runs on a local HookedTransformer.
"""

from typing import List, Optional, Sequence, Union

import torch

from ._wire import tensor_to_proto
from .v1 import hooks_pb2

__all__ = ["HookOperation", "zero", "set", "add", "scale", "mean", "patch_from", "copy_row"]

Index = Optional[Union[int, Sequence[int], torch.Tensor]]

# Hook sites (the part of the name after "blocks.L.") whose activation is
# [batch, n_heads, query_pos, key_pos]: heads index dim 1, positions dim 2.
_HEAD_THEN_POS = ("attn.hook_attn_scores", "attn.hook_pattern")
# [batch, pos, heads, ...]: positions index dim 1, heads dim 2.
_POS_THEN_HEAD = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q",
                  "attn.hook_rot_k", "attn.hook_z", "attn.hook_result", "hook_attn_in",
                  "hook_q_input", "hook_k_input", "hook_v_input")


def site_of(hook_name: str) -> str:
    """The per-block part of a hook name ("blocks.3.attn.hook_z" -> "attn.hook_z")."""
    if hook_name.startswith("blocks."):
        return hook_name.split(".", 2)[2]
    return hook_name


def pos_and_head_dims(hook_name: str):
    """(position dim, head dim or None) of a hook's activation, batch dimension included."""
    site = site_of(hook_name)
    if site in _HEAD_THEN_POS:
        return 2, 1
    if site in _POS_THEN_HEAD:
        return 1, 2
    return 1, None


def _as_index_list(value: Index, what: str) -> List[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    if isinstance(value, int):
        return [int(value)]
    out = [int(v) for v in value]
    if not out:
        raise ValueError(f"{what}=[] selects nothing; use None to select everything")
    return out


class HookOperation:
    """One declarative op; build it with zero(), set(), add(), scale(), mean() or patch_from()."""

    def __init__(self, kind: str, pos: Index = None, head: Index = None,
                 value: Optional[torch.Tensor] = None, factor: Optional[float] = None,
                 cache=None, name: Optional[str] = None, scale_by: Optional[str] = None,
                 source_row: int = 0):
        if scale_by not in _SCALE_BY:
            raise ValueError(f"scale_by={scale_by!r}; valid: None, 'mean_norm', 'token_norm'")
        if scale_by is not None and kind != "add":
            raise ValueError("scale_by applies to ops.add only")
        self.kind = kind
        self.scale_by = scale_by
        self.source_row = int(source_row)
        self.pos = _as_index_list(pos, "pos")
        self.head = _as_index_list(head, "head")
        self.value = value
        self.factor = factor
        self.cache = cache
        self.source_name = name

    def __repr__(self) -> str:
        parts = []
        if self.kind in ("set", "add") and self.value is not None:
            parts.append(f"value shape={list(self.value.shape)}")
        if self.scale_by:
            parts.append(f"scale_by={self.scale_by!r}")
        if self.kind == "scale":
            parts.append(f"factor={self.factor}")
        if self.kind == "copy_row":
            parts.append(f"source_row={self.source_row}")
        if self.kind == "patch_from" and self.source_name:
            parts.append(f"name={self.source_name!r}")
        if self.pos:
            parts.append(f"pos={self.pos}")
        if self.head:
            parts.append(f"head={self.head}")
        return f"ops.{self.kind}({', '.join(parts)})"

    # ------------------------------------------------------------------ on the server

    def to_proto(self, hook_name: str, session_id: Optional[str] = None) -> hooks_pb2.HookOp:
        """The HookOp message that applies this op at `hook_name`.

        Args:
            hook_name: the hook point the op is attached to.
            session_id: the session of the model sending the request; a patch_from op whose
                cache is stored in this session is sent by handle, otherwise as a set op with
                the cached values.
        """
        op = hooks_pb2.HookOp(hook_name=hook_name,
                              selector=hooks_pb2.Selector(positions=self.pos, heads=self.head))
        if self.kind == "zero":
            op.zero.SetInParent()
        elif self.kind == "mean":
            op.mean.SetInParent()
        elif self.kind == "copy_row":
            op.copy_row.source_row = self.source_row
        elif self.kind == "scale":
            op.scale.factor = float(self.factor)
        elif self.kind == "set":
            op.set.value.CopyFrom(tensor_to_proto(self.value, float_only=True))
        elif self.kind == "add":
            op.add.value.CopyFrom(tensor_to_proto(self.value, float_only=True))
            op.add.scale_by = _SCALE_BY[self.scale_by]
        elif self.kind == "patch_from":
            handle = getattr(self.cache, "handle", None)
            if handle and session_id and getattr(self.cache, "session_id", None) == session_id:
                op.patch_from_cache.cache_handle = handle
                op.patch_from_cache.source_hook_name = (
                    _wire_name(self.cache, self.source_name) if self.source_name else "")
            else:
                source = self._patch_source(hook_name)
                op.set.value.CopyFrom(tensor_to_proto(source, float_only=True))
        else:
            raise ValueError(f"unknown op kind {self.kind!r}")
        return op

    def needs_session(self, session_id: Optional[str]) -> bool:
        """True when the op refers to a cache stored in `session_id`."""
        return (self.kind == "patch_from" and session_id is not None
                and getattr(self.cache, "handle", None) is not None
                and getattr(self.cache, "session_id", None) == session_id)

    def _patch_source(self, hook_name: str) -> torch.Tensor:
        """The selected region of the cached activation this op patches in.

        Args:
            hook_name: the server's name of the hook point the op is attached to.
        """
        if self.source_name:
            source = self.cache[self.source_name]
            wire = _wire_name(self.cache, self.source_name)
        else:
            # A TransformerBridge cache is keyed by TransformerLens 4 names; find the tensor of
            # the server's hook point through the cache's own name table.
            by_wire = getattr(self.cache, "tensor_for_wire_name", None)
            source = by_wire(hook_name) if by_wire is not None else self.cache[hook_name]
            wire = hook_name
        pos_dim, head_dim = pos_and_head_dims(wire)
        has_batch = getattr(self.cache, "has_batch_dim", True)
        if not has_batch:
            pos_dim, head_dim = pos_dim - 1, (None if head_dim is None else head_dim - 1)
        if self.pos:
            source = source.index_select(pos_dim, _resolve(self.pos, source.shape[pos_dim], "position"))
        if self.head and head_dim is not None:
            source = source.index_select(head_dim, _resolve(self.head, source.shape[head_dim], "head"))
        return source

    # ------------------------------------------------------------------ locally

    def __call__(self, activation: torch.Tensor, hook=None) -> torch.Tensor:
        """Applies the op locally, as a TransformerLens hook function would.

        Args:
            activation: the hook's activation (with its batch dimension).
            hook: the HookPoint; its name tells which dimensions hold positions and heads.

        Returns:
            A new tensor with the op applied to the selected region.
        """
        # The server's name tells the dimensions (a TransformerBridge hook's name is a TL4 name).
        name = getattr(hook, "wire_name", None) or getattr(hook, "name", None) or ""
        if getattr(hook, "pos_dim", None) is not None:  # as the server lists the hook point
            pos_dim, head_dim = hook.pos_dim, hook.head_dim
        else:
            pos_dim, head_dim = pos_and_head_dims(name)
        if self.head and head_dim is None:
            raise ValueError(f"hook {name!r} has no head dimension; head= is not allowed")
        out = activation.clone()
        pos_index = (_resolve(self.pos, out.shape[pos_dim], "position") if self.pos
                     else torch.arange(out.shape[pos_dim]))
        index: List[object] = [slice(None)] * out.dim()
        if head_dim is None:
            index[pos_dim] = pos_index
        else:
            head_index = (_resolve(self.head, out.shape[head_dim], "head") if self.head
                          else torch.arange(out.shape[head_dim]))
            index[min(pos_dim, head_dim)] = (pos_index if pos_dim < head_dim else head_index)[:, None]
            index[max(pos_dim, head_dim)] = (head_index if pos_dim < head_dim else pos_index)[None, :]
        index = tuple(index)
        region = out[index]
        if self.kind == "zero":
            new = torch.zeros_like(region)
        elif self.kind == "scale":
            new = region * float(self.factor)
        elif self.kind == "mean":
            new = region.mean(dim=0, keepdim=True).expand_as(region)
        elif self.kind == "copy_row":
            batch = region.shape[0]
            if not -batch <= self.source_row < batch:
                raise IndexError(f"source_row {self.source_row} is out of range for a batch of {batch}")
            new = region[self.source_row:self.source_row + 1 or None].expand_as(region).clone()
        elif self.kind in ("set", "add", "patch_from"):
            value = (self._patch_source(name) if self.kind == "patch_from"
                     else torch.as_tensor(self.value))
            value = torch.broadcast_to(value.to(region.dtype), region.shape)
            if self.kind == "add" and self.scale_by is not None:
                value = value * _norm_scale(activation, region, self.scale_by, name)
            new = region + value if self.kind == "add" else value
        else:
            raise ValueError(f"unknown op kind {self.kind!r}")
        out[index] = new
        return out


# ops.add's scale_by -> AddOp.scale_by.
_SCALE_BY = {None: hooks_pb2.SCALE_BY_NONE, "mean_norm": hooks_pb2.SCALE_BY_MEAN_NORM,
             "token_norm": hooks_pb2.SCALE_BY_TOKEN_NORM}


def _norm_scale(activation: torch.Tensor, region: torch.Tensor, scale_by: str,
                hook_name: str) -> torch.Tensor:
    """The L2 norm over d_model that scale_by multiplies an add's value by (float32)."""
    if activation.dim() != 3:
        raise ValueError(f"scale_by needs a [batch, pos, d_model] hook, not {hook_name!r}")
    if scale_by == "token_norm":
        norms = region.float().norm(dim=-1, keepdim=True)                   # [batch, n_pos, 1]
    else:
        norms = activation.float().norm(dim=-1, keepdim=True).mean(dim=-2, keepdim=True)  # [batch, 1, 1]
    return norms.to(region.dtype)


def _wire_name(cache, name: str) -> str:
    """The server's name for a cache key (a TransformerBridge cache maps TL4 names)."""
    lookup = getattr(cache, "wire_name_of", None)
    return lookup(name) if lookup is not None else name


def _resolve(indices: List[int], size: int, what: str) -> torch.Tensor:
    out = []
    for i in indices:
        j = i + size if i < 0 else i
        if not 0 <= j < size:
            raise IndexError(f"{what} index {i} is out of range for size {size}")
        out.append(j)
    return torch.tensor(out, dtype=torch.int64)


def zero(pos: Index = None, head: Index = None) -> HookOperation:
    """Zero-ablation: region = 0."""
    return HookOperation("zero", pos=pos, head=head)


def set(value, pos: Index = None, head: Index = None) -> HookOperation:  # noqa: A001
    """region = value, broadcast to the region's shape."""
    return HookOperation("set", pos=pos, head=head, value=torch.as_tensor(value))


def add(value, pos: Index = None, head: Index = None,
        scale_by: Optional[str] = None) -> HookOperation:
    """region += value (a [d_model] steering vector is added at every selected position).

    Args:
        value: broadcast (trailing-aligned) to the selected region.
        pos: positions to add at (default all).
        head: heads to add at (default all).
        scale_by: None adds `value` as is. "token_norm" multiplies it, at each position, by
            that position's L2 norm over d_model; "mean_norm" by the mean of those norms over
            every position of the row in this forward (during generation with the KV cache a
            step's forward holds only the new token). Norms are of the activation before this
            op. So `add(alpha * unit_direction, scale_by="mean_norm")` steers with a strength
            relative to the stream's own scale, as nnbench's steering cells do. Only on
            [batch, pos, d_model] hooks (residual stream, attn_out, mlp_out, ln*.hook_normalized).

    Returns:
        The op.
    """
    return HookOperation("add", pos=pos, head=head, value=torch.as_tensor(value), scale_by=scale_by)


def scale(factor: float, pos: Index = None, head: Index = None) -> HookOperation:
    """region *= factor."""
    factor = float(factor)
    if factor != factor or factor in (float("inf"), float("-inf")):
        raise ValueError(f"scale factor must be finite, got {factor}")
    return HookOperation("scale", pos=pos, head=head, factor=factor)


def mean(pos: Index = None, head: Index = None) -> HookOperation:
    """Mean-ablation: region = its mean over the batch."""
    return HookOperation("mean", pos=pos, head=head)


def copy_row(source_row: int = 0, pos: Index = None, head: Index = None) -> HookOperation:
    """Activation patching in one forward: region = the region of batch row `source_row`, in
    every row. Run [clean, corrupt] as one batch with copy_row(0) and the corrupt row sees the
    clean activation (one call and one batched forward instead of two).

    Args:
        source_row: the batch row to copy from (negative counts from the end).
        pos: positions to copy (default all).
        head: heads to copy (default all).

    Returns:
        The op.
    """
    return HookOperation("copy_row", pos=pos, head=head, source_row=source_row)


def patch_from(cache, name: Optional[str] = None, pos: Index = None,
               head: Index = None) -> HookOperation:
    """Activation patching: region = the same region of a cached activation.

    Args:
        cache: an ActivationCache (or a dict of tensors). When it was stored on the server
            (run_with_cache(..., store=True)) by the same model object, the server patches from
            its own copy and nothing is re-sent; otherwise the cached tensor is sent as a set op.
        name: the hook to read from the cache; default: the hook the op is attached to.
        pos: positions to patch (default all).
        head: heads to patch (default all).
    """
    return HookOperation("patch_from", pos=pos, head=head, cache=cache, name=name)

