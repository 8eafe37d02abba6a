"""Model weights in TransformerLens shapes, fetched from the server on first use and kept.

Shapes (stacked over layers, like TransformerLens's HookedTransformer properties):

    W_E     [d_vocab, d_model]                W_U     [d_model, d_vocab]
    W_Q     [n_layers, n_heads, d_model, d_head]
    W_K     [n_layers, n_heads, d_model, d_head]     key/value heads repeated to n_heads
    W_V     [n_layers, n_heads, d_model, d_head]     (TransformerLens's grouped-query W_K/W_V)
    _W_K    [n_layers, n_key_value_heads, d_model, d_head]   the stored, unrepeated heads
    _W_V    [n_layers, n_key_value_heads, d_model, d_head]
    W_O     [n_layers, n_heads, d_head, d_model]
    W_in    [n_layers, d_model, d_mlp]        (up projection)
    W_gate  [n_layers, d_model, d_mlp]        (gate projection)
    W_out   [n_layers, d_mlp, d_model]
    b_*     zeros of TransformerLens's bias shapes (Llama has no biases)

With center_unembed=True (the default, like TransformerLens's from_pretrained) W_U has its mean
over the vocabulary subtracted from each row, and the logits the model returns are shifted by
their per-position mean to match (log-probabilities, the loss and sampling are unchanged).

With fold_ln=True (the default, like TransformerLens's from_pretrained) each RMSNorm weight is
folded into the matrices that read its output: ln1 into W_Q/W_K/W_V, ln2 into W_in/W_gate,
ln_final into W_U. The server's hook_normalized activations are taken before the norm weight,
so with folded weights `cache["normalized", L, "ln1"] @ W_Q[L, h]` equals `cache["q", L][..., h, :]`
and `cache["normalized"] @ W_U` equals the logits. fold_ln=False gives the checkpoint's matrices
unchanged; the norm weights themselves are model.blocks[L].ln1.w, .ln2.w and model.ln_final.w.
"""

from typing import Dict, Optional, Tuple

import torch

from ._run import Progress
from ._wire import ChunkAssembler
from .errors import translate_rpc_errors
from .v1 import remotelens_pb2 as pb

# Per-layer weights that the stacked properties are made of.
_PER_LAYER = ("W_Q", "W_K", "W_V", "_W_K", "_W_V", "W_O", "W_in", "W_gate", "W_out",
              "ln1_w", "ln2_w", "b_Q", "b_K", "b_V", "b_O", "b_in", "b_out")
# Which norm weight folds into which matrix (along its d_model input dimension).
_FOLD = {"W_Q": "ln1_w", "W_K": "ln1_w", "W_V": "ln1_w", "W_in": "ln2_w", "W_gate": "ln2_w"}


class WeightsMixin:
    """Weight properties for HookedTransformer; needs self.cfg, self._stub, self._call_kwargs()."""

    def _init_weights_cache(self) -> None:
        self._weights: Dict[Tuple[str, Optional[int]], torch.Tensor] = {}

    def _fetch_raw_weight(self, name: str, layer: Optional[int] = None) -> torch.Tensor:
        """A weight exactly as the server stores it (TL shape, one layer), cached."""
        key = ("raw:" + name, layer)
        if key not in self._weights:
            request = pb.GetWeightsRequest(name=name, layer=layer or 0)
            assembler = ChunkAssembler()
            progress = Progress(self.progress_bar_min_bytes, None, desc=name)
            tensor = None
            try:
                with translate_rpc_errors():
                    for chunk in self._stub.GetWeights(request, **self._call_kwargs()):
                        progress.set_total(chunk.total_bytes)
                        progress.update(len(chunk.data))
                        done = assembler.add(chunk)
                        if done is not None:
                            tensor = done[1]
            finally:
                progress.close()
            if tensor is None:
                raise RuntimeError(f"the server sent no data for weight {name}")
            self._weights[key] = tensor
        return self._weights[key]

    def get_weight(self, name: str, layer: Optional[int] = None) -> torch.Tensor:
        """One weight in TransformerLens shape, as the server stores it (never folded).

        Args:
            name: W_E, W_U, W_Q, W_K, W_V (key/value heads, not repeated), W_O, W_in, W_gate,
                W_out, ln1_w, ln2_w or ln_final_w.
            layer: the block, for per-block weights.
        """
        return self._to_device(self._fetch_raw_weight(name, layer))

    def _fold(self, name: str, layer: Optional[int], weight: torch.Tensor) -> torch.Tensor:
        norm = _FOLD.get(name)
        if name == "W_U":
            norm = "ln_final_w"
        if not self.cfg.fold_ln or norm is None:
            return weight
        w = self._fetch_raw_weight(norm, layer)
        if name == "W_U":
            scaled = weight.float() * w.float()[:, None]  # [d_model, d_vocab]
        elif weight.dim() == 3:
            scaled = weight.float() * w.float()[None, :, None]  # [heads, d_model, d_head]
        else:
            scaled = weight.float() * w.float()[:, None]  # [d_model, d_mlp]
        return scaled.to(weight.dtype)

    def _layer_weight(self, name: str, layer: Optional[int]) -> torch.Tensor:
        """One layer of a (folded, TL-shaped) weight; bias names give zeros."""
        key = (name, layer)
        if key in self._weights:
            return self._weights[key]
        c = self.cfg
        zeros = {"b_Q": (c.n_heads, c.d_head), "b_K": (c.n_heads, c.d_head),
                 "b_V": (c.n_heads, c.d_head), "b_O": (c.d_model,), "b_in": (c.d_mlp,),
                 "b_out": (c.d_model,)}
        if name in zeros:
            value = torch.zeros(zeros[name], dtype=c.dtype)
        elif name in ("W_K", "W_V"):
            group = c.n_heads // c.n_key_value_heads
            value = torch.repeat_interleave(self._layer_weight("_" + name, layer), group, dim=0)
        elif name in ("_W_K", "_W_V"):
            value = self._fold(name[1:], layer, self._fetch_raw_weight(name[1:], layer))
        elif name in ("ln1_w", "ln2_w", "ln_final_w"):
            value = self._fetch_raw_weight(name, layer)
        else:
            value = self._fold(name, layer, self._fetch_raw_weight(name, layer))
        self._weights[key] = value
        return value

    def _stacked(self, name: str) -> torch.Tensor:
        key = (name, None)
        if key not in self._weights:
            stacked = torch.stack([self._layer_weight(name, l) for l in range(self.cfg.n_layers)])
            self._weights[key] = stacked
            for l in range(self.cfg.n_layers):  # per-layer entries become views: no duplicates
                self._weights[(name, l)] = stacked[l]
        return self._to_device(self._weights[key])

    def _weight_attr(self, name: str, layer: Optional[int]) -> torch.Tensor:
        """Weight access for the module tree: model.blocks[L].attn.W_Q, model.ln_final.w."""
        if name == "ln_final_w":
            return self._to_device(self._fetch_raw_weight(name))
        if name in ("W_E", "W_U", "b_U"):
            return getattr(self, name)
        return self._to_device(self._layer_weight(name, layer))

    @property
    def W_E(self) -> torch.Tensor:
        """Token embedding [d_vocab, d_model]."""
        return self._to_device(self._fetch_raw_weight("W_E"))

    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding [d_model, d_vocab] (ln_final's weight folded in when fold_ln; each row's
        mean over the vocabulary subtracted when center_unembed)."""
        key = ("W_U", None)
        if key not in self._weights:
            value = self._fold("W_U", None, self._fetch_raw_weight("W_U"))
            if getattr(self.cfg, "center_unembed", False):
                # TransformerLens ProcessWeights.center_unembed: W_U - W_U.mean(-1, keepdim=True)
                # (b_U is zero here), which shifts each position's logits by their mean.
                value = (value.float() - value.float().mean(-1, keepdim=True)).to(value.dtype)
            self._weights[key] = value
        return self._to_device(self._weights[key])

    @property
    def b_U(self) -> torch.Tensor:
        return torch.zeros(self.cfg.d_vocab, dtype=self.cfg.dtype, device=self.cfg.device)

    W_Q = property(lambda self: self._stacked("W_Q"), doc="[n_layers, n_heads, d_model, d_head]")
    W_K = property(lambda self: self._stacked("W_K"), doc="[n_layers, n_heads, d_model, d_head]")
    W_V = property(lambda self: self._stacked("W_V"), doc="[n_layers, n_heads, d_model, d_head]")
    _W_K = property(lambda self: self._stacked("_W_K"), doc="[n_layers, n_kv_heads, d_model, d_head]")
    _W_V = property(lambda self: self._stacked("_W_V"), doc="[n_layers, n_kv_heads, d_model, d_head]")
    W_O = property(lambda self: self._stacked("W_O"), doc="[n_layers, n_heads, d_head, d_model]")
    W_in = property(lambda self: self._stacked("W_in"), doc="[n_layers, d_model, d_mlp]")
    W_gate = property(lambda self: self._stacked("W_gate"), doc="[n_layers, d_model, d_mlp]")
    W_out = property(lambda self: self._stacked("W_out"), doc="[n_layers, d_mlp, d_model]")
    b_Q = property(lambda self: self._stacked("b_Q"), doc="zeros [n_layers, n_heads, d_head]")
    b_K = property(lambda self: self._stacked("b_K"), doc="zeros [n_layers, n_heads, d_head]")
    b_V = property(lambda self: self._stacked("b_V"), doc="zeros [n_layers, n_heads, d_head]")
    b_O = property(lambda self: self._stacked("b_O"), doc="zeros [n_layers, d_model]")
    b_in = property(lambda self: self._stacked("b_in"), doc="zeros [n_layers, d_mlp]")
    b_out = property(lambda self: self._stacked("b_out"), doc="zeros [n_layers, d_model]")

    def tokens_to_residual_directions(self, tokens) -> torch.Tensor:
        """The unembedding direction(s) of token(s): W_U[:, token], [..., d_model].

        Args:
            tokens: a single token (str, int, one-element tensor) or a tensor of tokens.
        """
        if isinstance(tokens, torch.Tensor) and tokens.numel() > 1:
            return self.W_U[:, tokens].movedim(0, -1)
        if isinstance(tokens, str):
            token = self.to_single_token(tokens)
        elif isinstance(tokens, int):
            token = tokens
        elif isinstance(tokens, torch.Tensor) and tokens.numel() == 1:
            token = int(tokens.item())
        else:
            raise ValueError(f"Invalid token type: {type(tokens)}")
        return self.W_U[:, token]
