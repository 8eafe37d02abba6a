"""TransformerLens-compatible helpers: activation-name shorthand, slices, loss and sampling.

    from remotelens import utils
    utils.get_act_name("resid_post", 3)        # "blocks.3.hook_resid_post"
    utils.get_act_name("scale4ln1")            # "blocks.4.ln1.hook_scale"
    utils.Slice((2, 5)).apply(x, dim=-2)       # x[..., 2:5, :]
"""

import re
from typing import List, Optional, Union

import numpy as np
import torch

from .factored_matrix import composition_scores

__all__ = ["get_act_name", "Slice", "SliceInput", "lm_cross_entropy_loss", "lm_accuracy",
           "sample_logits", "to_numpy", "composition_scores"]

# Shorthand activation names and the canonical names they stand for.
_ACT_NAME_ALIASES = {
    "attn": "pattern",
    "attn_logits": "attn_scores",
    "key": "k",
    "query": "q",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_mid": "mid",
    "mlp_post": "post",
}
# Shorthand sublayer names; "" means the hook sits directly on the block.
_LAYER_TYPE_ALIASES = {
    "a": "attn",
    "m": "mlp",
    "b": "",
    "block": "",
    "blocks": "",
    "attention": "attn",
}
_ATTN_ACTS = ("k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores")
_MLP_ACTS = ("pre", "post", "mid", "pre_linear")
_NORM_ACTS = ("scale", "normalized")
_COMPACT_NAME = re.compile(r"([a-z]+)(\d+)([a-z]?.*)")


def get_act_name(name: str, layer: Optional[Union[int, str]] = None,
                 layer_type: Optional[str] = None) -> str:
    """Expands shorthand into a full hook name, exactly as TransformerLens does.

    A full name (one containing "." or starting with "hook_") with no layer or layer_type is
    returned unchanged. Otherwise a compact form "<name><layer><layer_type>" ("k6", "scale4ln1")
    is split first; aliases are resolved ("attn" -> "pattern", "attn_logits" -> "attn_scores",
    "key"/"query"/"value" -> "k"/"q"/"v", "mlp_pre"/"mlp_mid"/"mlp_post" -> "pre"/"mid"/"post");
    attention and MLP activations get their sublayer whatever layer_type says; layer_type
    shorthand "a"/"attention" -> "attn", "m" -> "mlp", "b"/"block"/"blocks" -> none; and "scale"
    or "normalized" without a layer mean the final norm ("ln_final.hook_scale").

    Args:
        name: a full hook name or shorthand ("resid_pre", "pattern", "k6", "scale4ln1").
        layer: the block index, for activations that occur in every block.
        layer_type: the sublayer, for names that occur more than once in a block ("ln1", "ln2").

    Returns:
        The full hook name, e.g. get_act_name("k", 6, "a") == "blocks.6.attn.hook_k".
    """
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    match = _COMPACT_NAME.match(name)
    if match is not None:
        name, layer, layer_type = match.groups()
    name = _ACT_NAME_ALIASES.get(name, name)
    full = "" if layer is None else f"blocks.{layer}."
    if name in _ATTN_ACTS:
        layer_type = "attn"
    elif name in _MLP_ACTS:
        layer_type = "mlp"
    elif layer_type in _LAYER_TYPE_ALIASES:
        layer_type = _LAYER_TYPE_ALIASES[layer_type]
    if layer_type:
        full += f"{layer_type}."
    full += f"hook_{name}"
    if name in _NORM_ACTS and layer is None:
        full = f"ln_final.{full}"
    return full


SliceInput = Optional[Union[int, tuple, list, slice, torch.Tensor, np.ndarray]]


def to_numpy(tensor) -> np.ndarray:
    """A numpy array of a tensor, array, list or scalar."""
    if isinstance(tensor, np.ndarray):
        return tensor
    if isinstance(tensor, torch.Tensor):
        return tensor.detach().cpu().numpy()
    return np.array(tensor)


class Slice:
    """TransformerLens's slice along one dimension.

    Modes (from the input):
      None          identity: the tensor is returned unchanged
      int i         index: x[i], dropping the dimension
      tuple         a Python slice: (k,) -> [:k], (m, k) -> [m:k], (m, k, s) -> [m:k:s]
      slice         used as given
      list / Tensor / ndarray of ints   take those indices (the dimension stays)
    """

    def __init__(self, input_slice: SliceInput = None):
        if isinstance(input_slice, tuple):
            self.slice = slice(*input_slice)
            self.mode = "slice"
        elif isinstance(input_slice, int):
            self.slice = input_slice
            self.mode = "int"
        elif isinstance(input_slice, slice):
            self.slice = input_slice
            self.mode = "slice"
        elif isinstance(input_slice, (list, torch.Tensor, np.ndarray)):
            self.slice = to_numpy(input_slice)
            self.mode = "array"
        elif input_slice is None:
            self.slice = slice(None)
            self.mode = "identity"
        else:
            raise ValueError(f"Invalid input_slice {input_slice!r}")

    def apply(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Slices `tensor` along `dim` (negative dims count from the end)."""
        index: List[object] = [slice(None)] * tensor.ndim
        index[dim] = self.slice
        return tensor[tuple(index)]

    def indices(self, max_ctx: Optional[int] = None) -> np.ndarray:
        """The indices this slice selects from an axis of length max_ctx."""
        if self.mode == "int":
            return np.array([self.slice], dtype=np.int64)
        if max_ctx is None:
            raise ValueError("max_ctx must be specified if slice is not an integer")
        return np.arange(max_ctx, dtype=np.int64)[self.slice]

    @classmethod
    def unwrap(cls, slice_input: Union["Slice", SliceInput]) -> "Slice":
        """A Slice of the input; an int becomes [int] so the dimension is kept."""
        if isinstance(slice_input, Slice):
            return slice_input
        if isinstance(slice_input, int):
            slice_input = [slice_input]
        return Slice(slice_input)

    def __repr__(self) -> str:
        return f"Slice: {self.slice} Mode: {self.mode} "


def lm_cross_entropy_loss(logits: torch.Tensor, tokens: torch.Tensor,
                          attention_mask: Optional[torch.Tensor] = None,
                          per_token: bool = False) -> torch.Tensor:
    """Next-token cross-entropy.

    Args:
        logits: [batch, pos, d_vocab].
        tokens: [batch, pos] int64.
        attention_mask: optional [batch, pos]; a target counts only when it and the token that
            predicts it are both real.
        per_token: return the loss per position [batch, pos - 1] (zero where masked) instead of
            the mean.

    Returns:
        A scalar, or [batch, pos - 1].
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    target = tokens[..., 1:].to(log_probs.device)
    predicted = log_probs[..., :-1, :].gather(-1, target[..., None])[..., 0]
    if attention_mask is not None:
        valid = torch.logical_and(attention_mask[:, :-1], attention_mask[:, 1:]).to(predicted.device)
        predicted = predicted * valid
        n_tokens = int(valid.sum().item())
    else:
        n_tokens = predicted.numel()
    if per_token:
        return -predicted
    return -predicted.sum() / max(n_tokens, 1)


def lm_accuracy(logits: torch.Tensor, tokens: torch.Tensor, per_token: bool = False) -> torch.Tensor:
    """Top-1 next-token accuracy: per position [batch, pos - 1] or the mean."""
    correct = logits.argmax(dim=-1)[:, :-1] == tokens[:, 1:].to(logits.device)
    return correct if per_token else correct.sum() / correct.numel()


def sample_logits(final_logits: torch.Tensor, top_k: Optional[int] = None,
                  top_p: Optional[float] = None, temperature: float = 1.0,
                  freq_penalty: float = 0.0, tokens: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Samples one token per row from [batch, d_vocab] logits.

    Temperature 0 is greedy. Otherwise: divide by temperature, subtract freq_penalty times each
    token's count in `tokens`, keep the top_k most likely, keep the smallest set whose
    probability reaches top_p, and sample from what is left.

    Returns:
        int64 [batch].
    """
    if temperature == 0.0:
        return final_logits.argmax(dim=-1)
    logits = final_logits.float() / temperature
    if freq_penalty > 0:
        if tokens is None or tokens.dim() != 2:
            raise ValueError("freq_penalty needs the [batch, pos] tokens generated so far")
        for row in range(logits.shape[0]):
            counts = torch.bincount(tokens[row].cpu(), minlength=logits.shape[-1])
            logits[row] -= freq_penalty * counts[:logits.shape[-1]].to(logits.device)
    if top_k is not None and top_k > 0:
        k = min(int(top_k), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


