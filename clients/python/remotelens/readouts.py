"""Readouts and reductions computed on the server, so a small answer crosses the wire.

A readout runs at hook points during the forward pass, after that hook's interventions (so it
sees steering, patching and ablation), and its result is stacked over the hooks it names:

    from remotelens import ops, readouts
    layers = [f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)]
    _, (lens,) = model.run_with_readouts("The Eiffel Tower is in", [
        readouts.lens(layers, pos=-1, top_k=10),        # top-10 of every layer's logit lens
    ], return_type=None)
    lens.indices   # int64 [n_layers, batch, 1, 10] token ids, best first
    lens.values    # float32 [n_layers, batch, 1, 10] their logits

    _, (norms, means) = model.run_with_readouts(tokens, [
        readouts.norm("blocks.3.hook_resid_post"),      # [1, batch, pos]
        readouts.mean("blocks.3.hook_resid_post"),      # [1, batch, d_model]
    ])

Every readout also runs as plain Python on a cache (`readout.compute(...)`) for checking.
"""

from typing import Callable, List, NamedTuple, Optional, Sequence, Union

import torch

from .ops import Index, _as_index_list, pos_and_head_dims
from .v1 import remotelens_pb2 as pb

__all__ = ["Readout", "LensTopK", "lens", "norm", "mean"]

Names = Union[str, Sequence[str]]


class LensTopK(NamedTuple):
    """The k largest lens logits, best first: values float32 and indices (token ids) int64,
    both [n_hooks, batch, n_positions, k]."""
    values: torch.Tensor
    indices: torch.Tensor


class Readout:
    """One server-side readout; build it with lens(), norm() or mean()."""

    def __init__(self, kind: str, names: Names, pos: Index = None, top_k: int = 0):
        self.kind = kind
        self.names: List[str] = [names] if isinstance(names, str) else list(names)
        if not self.names:
            raise ValueError("a readout needs at least one hook name")
        self.pos = _as_index_list(pos, "pos")
        self.top_k = int(top_k)
        if self.top_k < 0:
            raise ValueError(f"top_k={top_k}; valid: 0 (full logits) or 1..d_vocab")

    def __repr__(self) -> str:
        extra = f", top_k={self.top_k}" if self.kind == "lens" else ""
        pos = f", pos={self.pos}" if self.pos else ""
        return f"readouts.{self.kind}({self.names!r}{pos}{extra})"

    def to_proto(self) -> pb.Readout:
        """The Readout message of a RunRequest."""
        message = pb.Readout(hook_names=self.names, positions=self.pos)
        if self.kind == "lens":
            message.lens.top_k = self.top_k
        elif self.kind == "norm":
            message.norm.SetInParent()
        elif self.kind == "mean":
            message.mean.SetInParent()
        else:
            raise ValueError(f"unknown readout kind {self.kind!r}")
        return message

    def decode(self, outputs: dict, index: int):
        """This readout's result from a run's streamed tensors (named readouts.{index})."""
        values = outputs[f"readouts.{index}"]
        if self.kind == "lens" and self.top_k > 0:
            return LensTopK(values, outputs[f"readouts.{index}.indices"])
        return values

    def compute(self, activations: Callable[[str], torch.Tensor],
                unembed: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        """The same readout computed locally (for checking a server's answer).

        Args:
            activations: hook name -> its activation with the batch dimension (e.g. a cache's
                __getitem__).
            unembed: for lens: residual [..., d_model] -> logits [..., d_vocab] (final norm and
                unembedding).

        Returns:
            What the server returns for this readout.
        """
        parts, ids = [], []
        for name in self.names:
            act = activations(name)
            pos_dim, _ = pos_and_head_dims(name)
            if self.pos:
                size = act.shape[pos_dim]
                bad = [p for p in self.pos if not -size <= p < size]
                if bad:
                    raise IndexError(f"position {bad[0]} is out of range for {size} positions")
                act = act.index_select(pos_dim, torch.tensor([p % size for p in self.pos]))
            if self.kind == "lens":
                logits = unembed(act).float()
                if self.top_k:
                    top = logits.topk(self.top_k, dim=-1)
                    parts.append(top.values)
                    ids.append(top.indices)
                else:
                    parts.append(logits)
            elif self.kind == "norm":
                parts.append(act.float().norm(dim=-1))
            else:
                parts.append(act.float().mean(dim=pos_dim))
        if ids:
            return LensTopK(torch.stack(parts), torch.stack(ids))
        return torch.stack(parts)


def lens(names: Names, pos: Index = None, top_k: int = 0) -> Readout:
    """Logit lens on the server: the final RMSNorm and the unembedding applied to residual-stream
    activations.

    Args:
        names: hook_embed or blocks.L.hook_resid_pre / hook_resid_mid / hook_resid_post names
            (one, or a list; results are stacked in this order).
        pos: positions to read (int or list; negatives count from the end); None: all.
        top_k: 0 returns full logits float32 [n_hooks, batch, n_pos, d_vocab]; k > 0 returns a
            LensTopK of [n_hooks, batch, n_pos, k] (values best first, and token ids).

    Returns:
        The readout, for HookedTransformer.run_with_readouts.
    """
    return Readout("lens", names, pos=pos, top_k=top_k)


def norm(names: Names, pos: Index = None) -> Readout:
    """L2 norm over the activation's last dimension (d_model for the residual stream).

    Args:
        names: hook names with one shape (results are stacked).
        pos: positions to read; None: all.

    Returns:
        The readout; its result is float32 [n_hooks, <activation shape without its last
        dimension>] ([n_hooks, batch, n_pos] for the residual stream).
    """
    return Readout("norm", names, pos=pos)


def mean(names: Names, pos: Index = None) -> Readout:
    """Mean over the selected positions.

    Args:
        names: hook names with one shape (results are stacked).
        pos: positions to average; None: all.

    Returns:
        The readout; its result is float32 [n_hooks, <activation shape without the position
        dimension>] ([n_hooks, batch, d_model] for the residual stream).
    """
    return Readout("mean", names, pos=pos)
