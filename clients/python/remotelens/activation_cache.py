"""ActivationCache: cached activations with TransformerLens's indexing and analysis helpers.

    logits, cache = model.run_with_cache("The cat sat on the mat")
    cache["blocks.1.hook_resid_post"]      # full names
    cache["resid_post", 1]                 # (name, layer) shorthand, see utils.get_act_name
    cache["pattern", -1]                   # negative layers count from the end
    cache["scale", 0, "ln1"]               # (name, layer, sublayer)
    cache["normalized", "ln_final"]        # "ln_final.hook_normalized" (also cache["normalized"])
    stack, labels = cache.decompose_resid(return_labels=True)

Llama normalises with RMSNorm, so the apply_ln helpers divide by the cached hook_scale
(sqrt(mean(x^2) + eps)) and never centre; accumulated_resid(apply_ln=True) up to the unembed
normalises each layer's stream by its own RMS instead (model.ln_final), as current
TransformerLens does. A cache run with store=True also lives on the server
under `cache.handle`, so remotelens.ops.patch_from(cache) patches from the server's copy; with
download=False its tensors are fetched only when first read.
"""

import logging
from collections.abc import MutableMapping
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch

from . import utils
from .utils import Slice, SliceInput

__all__ = ["ActivationCache"]


class _RemoteTensors(MutableMapping):
    """name -> tensor for a cache stored on the server; missing tensors are fetched on first read."""

    def __init__(self, names: Sequence[str], fetch: Callable[[List[str]], Dict[str, torch.Tensor]],
                 have: Optional[Dict[str, torch.Tensor]] = None):
        self._names = list(names)
        self._fetch = fetch
        self._have: Dict[str, torch.Tensor] = dict(have or {})

    def fetch_all(self) -> None:
        missing = [n for n in self._names if n not in self._have]
        if missing:
            self._have.update(self._fetch(missing))

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._have:
            if name not in self._names:
                raise KeyError(name)
            self._have.update(self._fetch([name]))
        return self._have[name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        if name not in self._names:
            self._names.append(name)
        self._have[name] = value

    def __delitem__(self, name: str) -> None:
        self._names.remove(name)
        self._have.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names))

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names


class ActivationCache:
    """Activations from one forward pass, keyed by hook name, in forward order.

    Args:
        cache_dict: hook name -> tensor.
        model: the HookedTransformer that produced them (for cfg, weights and tokens).
        has_batch_dim: False after remove_batch_dim().
        handle: the server-side cache handle when stored with store=True.
        session_id: the session that holds `handle`.
        wire_names: key -> the server's hook name, when keys are not the server's names
            (TransformerBridge's TransformerLens 4 names); None: keys are the server's names.
    """

    def __init__(self, cache_dict: Union[Dict[str, torch.Tensor], MutableMapping], model: Any,
                 has_batch_dim: bool = True, handle: Optional[str] = None,
                 session_id: Optional[str] = None, wire_names: Optional[Dict[str, str]] = None):
        self.cache_dict = cache_dict
        self.model = model
        self.has_batch_dim = has_batch_dim
        self.handle = handle
        self.session_id = session_id
        self.wire_names = dict(wire_names or {})

    def wire_name_of(self, key: str) -> str:
        """The server's hook name behind a cache key (the key itself for HookedTransformer)."""
        return self.wire_names.get(key, key)

    def tensor_for_wire_name(self, wire_name: str) -> torch.Tensor:
        """The cached activation of a server hook point, whatever key it is cached under."""
        for key, wire in self.wire_names.items():
            if wire == wire_name and key in self.cache_dict:
                return self.cache_dict[key]
        return self[wire_name]

    @property
    def has_embed(self) -> bool:
        return "hook_embed" in self.cache_dict

    @property
    def has_pos_embed(self) -> bool:
        return "hook_pos_embed" in self.cache_dict

    # ------------------------------------------------------------------ mapping protocol

    def __repr__(self) -> str:
        return f"ActivationCache with keys {list(self.cache_dict.keys())}"

    def _resolve_key(self, key) -> str:
        if isinstance(key, str):
            return key if key in self.cache_dict else utils.get_act_name(key)
        key = tuple(key)
        if len(key) == 2 and isinstance(key[1], str) and not key[1].isdigit():
            key = (key[0], None, key[1])  # ("normalized", "ln_final"): a sublayer, no layer
        if len(key) == 3 and key[1] is None and key[2] == "ln_final":
            return f"ln_final.hook_{key[0]}"
        if len(key) > 1 and isinstance(key[1], int) and key[1] < 0:
            key = (key[0], self.model.cfg.n_layers + key[1], *key[2:])
        return utils.get_act_name(*key)

    def __getitem__(self, key) -> torch.Tensor:
        """A cached activation by full name, shorthand, or (name, layer[, layer_type]) tuple."""
        name = self._resolve_key(key)
        if name not in self.cache_dict:
            raise KeyError(f"{name!r} is not in this cache (from key {key!r}); it holds "
                           f"{len(self.cache_dict)} activations, e.g. "
                           f"{list(self.cache_dict.keys())[:4]}")
        return self.cache_dict[name]

    def __contains__(self, key) -> bool:
        """Full names as in a dict; (name, layer, ...) tuples are resolved first."""
        if isinstance(key, str):
            return key in self.cache_dict
        try:
            return self._resolve_key(key) in self.cache_dict
        except (TypeError, ValueError):
            return False

    def __len__(self) -> int:
        return len(self.cache_dict)

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def keys(self):
        return self.cache_dict.keys()

    def values(self):
        self._fetch_all()
        return self.cache_dict.values()

    def items(self):
        self._fetch_all()
        return self.cache_dict.items()

    def _fetch_all(self) -> None:
        fetch_all = getattr(self.cache_dict, "fetch_all", None)  # a stored cache's lazy tensors
        if fetch_all is not None:
            fetch_all()

    # ------------------------------------------------------------------ whole-cache transforms

    def remove_batch_dim(self) -> "ActivationCache":
        """Drops the batch dimension in place (the batch must have one row)."""
        if not self.has_batch_dim:
            logging.warning("Tried removing batch dimension after already having removed it.")
            return self
        self._fetch_all()
        for key in list(self.cache_dict.keys()):
            value = self.cache_dict[key]
            if value.size(0) != 1:
                raise ValueError(f"Cannot remove batch dimension from cache with batch size > 1, "
                                 f"for key {key} with shape {tuple(value.shape)}")
            self.cache_dict[key] = value[0]
        self.has_batch_dim = False
        return self

    def to(self, device: Union[str, torch.device]) -> "ActivationCache":
        """Moves every tensor to `device` (in place; returns self)."""
        self._fetch_all()
        self.cache_dict = {k: v.to(device) for k, v in self.cache_dict.items()}
        return self

    def toggle_autodiff(self, mode: bool = False) -> None:
        """torch.set_grad_enabled(mode), as TransformerLens offers (global state)."""
        logging.warning("Changed the global state, set autodiff to %s", mode)
        torch.set_grad_enabled(mode)

    def apply_slice_to_batch_dim(self, batch_slice: Union[Slice, SliceInput]) -> "ActivationCache":
        """A new cache with `batch_slice` applied to every tensor's batch dimension."""
        if not isinstance(batch_slice, Slice):
            batch_slice = Slice(batch_slice)
        if not (self.has_batch_dim or batch_slice.mode == "identity"):
            raise ValueError("Cannot index into a cache without a batch dim")
        self._fetch_all()
        still_batched = batch_slice.mode != "int" and self.has_batch_dim
        return ActivationCache({k: batch_slice.apply(v, dim=0) for k, v in self.cache_dict.items()},
                               self.model, has_batch_dim=still_batched)

    def delete(self) -> int:
        """Frees the server's copy of a stored cache; returns the bytes freed (0 if none)."""
        if self.handle is None:
            return 0
        freed = self.model._delete_cache(self.session_id, self.handle)
        if isinstance(self.cache_dict, _RemoteTensors):
            self.cache_dict = dict(self.cache_dict._have)
        self.handle = None
        return freed

    # ------------------------------------------------------------------ residual stream views

    @property
    def _n_layers(self) -> int:
        return self.model.cfg.n_layers

    def _normalise_layer(self, layer: Optional[int]) -> int:
        if layer is None or layer == -1:
            return self._n_layers
        if not isinstance(layer, int):
            raise TypeError(f"layer must be an int or None, got {type(layer).__name__}")
        return layer

    def accumulated_resid(self, layer: Optional[int] = None, incl_mid: bool = False,
                          apply_ln: bool = False, pos_slice: Union[Slice, SliceInput] = None,
                          mlp_input: bool = False, return_labels: bool = False):
        """The residual stream at each layer boundary, stacked (logit-lens style).

        Args:
            layer: stack up to the input of this block (resid_pre of blocks < layer); None, -1 or
                n_layers also includes the final resid_post ("final_post").
            incl_mid: also include resid_mid of each earlier block.
            apply_ln: normalise the stack as the norm it feeds would. Up to the unembed (layer
                None / -1 / n_layers) each component goes through model.ln_final with its own
                RMS (a logit lens of every layer); for an earlier layer each is divided by the
                cached scale of that block's ln1 (ln2 with mlp_input). As TransformerLens's
                ActivationCache.accumulated_resid (transformer_lens/ActivationCache.py at
                TransformerLensOrg/TransformerLens@4cd36aaeb5dad931d085bd5d46a12b402fe15272:
                recompute_ln = layer == n_layers).
            pos_slice: positions to keep (utils.Slice input).
            mlp_input: also include resid_mid of `layer` (the MLP's input).
            return_labels: also return labels like "0_pre", "1_mid", "final_post".

        Returns:
            [components, *batch_and_pos, d_model], and the labels when return_labels.
        """
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        layer = self._normalise_layer(layer)
        components, labels = [], []
        for l in range(layer + 1):
            if l == self._n_layers:
                components.append(self[("resid_post", self._n_layers - 1)])
                labels.append("final_post")
                continue
            components.append(self[("resid_pre", l)])
            labels.append(f"{l}_pre")
            if (incl_mid and l < layer) or (mlp_input and l == layer):
                components.append(self[("resid_mid", l)])
                labels.append(f"{l}_mid")
        stack = torch.stack([pos_slice.apply(c, dim=-2) for c in components], dim=0)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice,
                                           recompute_ln=layer == self._n_layers)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: Optional[int] = None, mlp_input: bool = False,
                        mode: str = "all", apply_ln: bool = False,
                        pos_slice: Union[Slice, SliceInput] = None, incl_embeds: bool = True,
                        return_labels: bool = False):
        """The residual stream entering `layer`, split into the outputs that were summed into it.

        Args:
            layer: decompose the input of this block; None, -1 or n_layers: the final residual.
            mlp_input: decompose the MLP's input instead (adds attn_out of `layer`).
            mode: "all", "attn" (attention outputs only) or "mlp" (MLP outputs only).
            apply_ln: divide by the cached scale of the norm the stack feeds (one scale for
                every component, so the components still sum to that norm's output).
            pos_slice: positions to keep.
            incl_embeds: include hook_embed (label "embed").
            return_labels: also return labels like "embed", "0_attn_out", "0_mlp_out".

        Returns:
            [components, *batch_and_pos, d_model] summing to the residual stream, and labels.
        """
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        layer = self._normalise_layer(layer)
        incl_attn, incl_mlp = mode != "mlp", mode != "attn"
        components, labels = [], []
        if incl_embeds:
            if self.has_embed:
                components.append(self["hook_embed"])
                labels.append("embed")
            if self.has_pos_embed:
                components.append(self["hook_pos_embed"])
                labels.append("pos_embed")
        for l in range(layer):
            if incl_attn:
                components.append(self[("attn_out", l)])
                labels.append(f"{l}_attn_out")
            if incl_mlp:
                components.append(self[("mlp_out", l)])
                labels.append(f"{l}_mlp_out")
        if mlp_input and incl_attn:
            components.append(self[("attn_out", layer)])
            labels.append(f"{layer}_attn_out")
        return self._stacked(components, labels, layer, apply_ln, pos_slice, mlp_input, return_labels)

    # ------------------------------------------------------------------ heads and neurons

    def compute_head_results(self) -> None:
        """Fills attn.hook_result for every block from hook_z and W_O, unless already cached."""
        if "blocks.0.attn.hook_result" in self.cache_dict:
            logging.warning("Tried to compute head results when they were already cached")
            return
        for l in range(self._n_layers):
            z = self[("z", l, "attn")]  # [*batch_and_pos, n_heads, d_head]
            W_O = self.model._layer_weight("W_O", l).to(z.device, z.dtype)  # [n_heads, d_head, d_model]
            self.cache_dict[f"blocks.{l}.attn.hook_result"] = torch.einsum("...hd,hdm->...hm", z, W_O)

    def stack_head_results(self, layer: int = -1, return_labels: bool = False,
                           incl_remainder: bool = False,
                           pos_slice: Union[Slice, SliceInput] = None, apply_ln: bool = False):
        """Every head's output (its contribution to the residual stream) for blocks < layer.

        Head results are computed from hook_z and W_O when hook_result was not cached.

        Args:
            layer: include heads of blocks before this one; -1/None/n_layers: all blocks.
            return_labels: also return labels "L{layer}H{head}".
            incl_remainder: append resid_post[layer - 1] minus the sum of the heads ("remainder").
            pos_slice: positions to keep.
            apply_ln: divide by the cached scale of the norm the stack feeds.

        Returns:
            [layer * n_heads (+1), *batch_and_pos, d_model], and labels when return_labels.
        """
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        layer = self._normalise_layer(layer)
        if layer > 0 and ("blocks.0.attn.hook_result" not in self.cache_dict):
            self.compute_head_results()
        components: List[torch.Tensor] = []
        labels: List[str] = []
        for l in range(layer):
            components.append(pos_slice.apply(self[("result", l, "attn")], dim=-3))
            labels.extend(f"L{l}H{h}" for h in range(self.model.cfg.n_heads))
        return self._finish_component_stack(components, labels, layer, pos_slice,
                                            return_labels, incl_remainder, apply_ln)

    def stack_activation(self, activation_name: str, layer: int = -1,
                         sublayer_type: Optional[str] = None) -> torch.Tensor:
        """cache[activation_name, l, sublayer_type] for every block l < layer, stacked."""
        layer = self._normalise_layer(layer)
        return torch.stack([self[(activation_name, l, sublayer_type)] for l in range(layer)], dim=0)

    def get_neuron_results(self, layer: int, neuron_slice: Union[Slice, SliceInput] = None,
                           pos_slice: Union[Slice, SliceInput] = None) -> torch.Tensor:
        """Each MLP neuron's contribution to the residual stream: post activation x W_out row.

        Returns:
            [*batch_and_pos, n_neurons, d_model].
        """
        neuron_slice = neuron_slice if isinstance(neuron_slice, Slice) else Slice(neuron_slice)
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        acts = neuron_slice.apply(pos_slice.apply(self[("post", layer, "mlp")], dim=-2), dim=-1)
        W_out = neuron_slice.apply(self.model._layer_weight("W_out", layer), dim=0)
        return acts[..., None] * W_out.to(acts.device, acts.dtype)

    def stack_neuron_results(self, layer: int, pos_slice: Union[Slice, SliceInput] = None,
                             neuron_slice: Union[Slice, SliceInput] = None,
                             return_labels: bool = False, incl_remainder: bool = False,
                             apply_ln: bool = False):
        """Every neuron's output for blocks < layer, stacked, with labels "L{layer}N{neuron}"."""
        layer = self._normalise_layer(layer)
        neuron_slice = neuron_slice if isinstance(neuron_slice, Slice) else Slice(neuron_slice)
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        neurons = neuron_slice.apply(torch.arange(self.model.cfg.d_mlp), dim=0)
        neurons = [int(neurons)] if neurons.dim() == 0 else neurons.tolist()
        labels = [f"L{l}N{n}" for l in range(layer) for n in neurons]
        parts = [self.get_neuron_results(l, neuron_slice, pos_slice) for l in range(layer)]
        return self._finish_component_stack(parts, labels, layer, pos_slice,
                                            return_labels, incl_remainder, apply_ln)

    def get_full_resid_decomposition(self, layer: Optional[int] = None, mlp_input: bool = False,
                                     expand_neurons: bool = True, apply_ln: bool = False,
                                     pos_slice: Union[Slice, SliceInput] = None,
                                     return_labels: bool = False,
                                     project_output_onto: Optional[torch.Tensor] = None):
        """The residual stream entering `layer`, split into every head, every neuron (or MLP
        layer), the embedding and the accumulated bias (TransformerLens's order and labels).

        Args:
            layer: the block whose input is decomposed; None, -1 or n_layers: the unembed's.
            mlp_input: decompose the MLP's input of `layer` (adds that block's heads).
            expand_neurons: one component per neuron ("L{l}N{n}"); False: per MLP ("{l}_mlp_out").
            apply_ln: divide every component by the cached scale of the norm it feeds.
            pos_slice: positions to keep.
            return_labels: also return the labels.
            project_output_onto: [d_model] or [d_model, n] directions to project every
                component onto (e.g. W_U[:, token]); the last dim is then 1-less or n.

        Returns:
            [components, *batch_and_pos, d_model (or projection)] summing to the decomposed
            residual stream: heads (L*n_heads, "L{l}H{h}"), neurons or MLPs, "embed", "bias".
        """
        layer = self._normalise_layer(layer)
        if mlp_input and layer >= self._n_layers:
            raise ValueError("mlp_input needs a layer before the unembed")
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        heads, labels = self.stack_head_results(layer + (1 if mlp_input else 0), pos_slice=pos_slice,
                                                return_labels=True)
        components = [heads]
        if layer > 0:
            if expand_neurons:
                neurons, neuron_labels = self.stack_neuron_results(layer, pos_slice=pos_slice,
                                                                   return_labels=True)
            else:
                neurons, neuron_labels = self.decompose_resid(layer, mlp_input=mlp_input,
                                                              pos_slice=pos_slice, mode="mlp",
                                                              incl_embeds=False, return_labels=True)
            components.append(neurons.to(heads.dtype))
            labels.extend(neuron_labels)
        embed = pos_slice.apply(self["hook_embed"], dim=-2)[None]
        components.append(embed.to(heads.dtype))
        labels.append("embed")
        bias = self.model.accumulated_bias(layer, mlp_input, include_mlp_biases=expand_neurons)
        components.append(bias.to(heads.device, heads.dtype).expand((1,) + tuple(heads.shape[1:])))
        labels.append("bias")
        stack = torch.cat(components, dim=0)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        if project_output_onto is not None:
            directions = project_output_onto.to(stack.device, stack.dtype)
            stack = stack @ directions
        return (stack, labels) if return_labels else stack

    def _finish_component_stack(self, components: List[torch.Tensor], labels: List[str],
                                layer: int, pos_slice: Slice, return_labels: bool,
                                incl_remainder: bool, apply_ln: bool):
        """Stacks per-block components [..., n, d_model] into [components, ..., d_model].

        Shared by stack_head_results and stack_neuron_results: optionally appends the remainder
        (resid_post of the last block minus the components' sum) and applies the final norm.
        """
        if components:
            stack = torch.cat(components, dim=-2).movedim(-2, 0)
            if incl_remainder:
                remainder = pos_slice.apply(self[("resid_post", layer - 1)], dim=-2) - stack.sum(dim=0)
                stack = torch.cat([stack, remainder[None]], dim=0)
                labels.append("remainder")
        elif incl_remainder:
            stack = pos_slice.apply(self[("resid_post", layer - 1)], dim=-2)[None]
            labels.append("remainder")
        else:
            stack = torch.zeros(0, *pos_slice.apply(self["hook_embed"], dim=-2).shape)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    # ------------------------------------------------------------------ normalisation and logits

    def _cached_scale(self, layer: int, mlp_input: bool, pos_slice: Slice,
                      batch_slice: Optional[Slice]) -> torch.Tensor:
        if layer == self._n_layers:
            key = "ln_final.hook_scale"
        else:
            key = f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_scale"
        if key not in self.cache_dict:
            raise KeyError(f"apply_ln needs {key!r} in the cache; include it in names_filter")
        scale = pos_slice.apply(self.cache_dict[key], dim=-2)
        if batch_slice is not None and self.has_batch_dim:
            scale = batch_slice.apply(scale, dim=0)
        return scale

    def _stacked(self, components, labels, layer, apply_ln, pos_slice, mlp_input, return_labels):
        """The tail of accumulated_resid and decompose_resid: slice, stack, optionally apply ln."""
        stack = torch.stack([pos_slice.apply(c, dim=-2) for c in components], dim=0)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def apply_ln_to_stack(self, residual_stack: torch.Tensor, layer: Optional[int] = None,
                          mlp_input: bool = False, pos_slice: Union[Slice, SliceInput] = None,
                          batch_slice: Union[Slice, SliceInput] = None, has_batch_dim: bool = True,
                          recompute_ln: bool = False) -> torch.Tensor:
        """Scales each component as the norm feeding `layer` scaled the whole residual stream.

        RMSNorm: component / cached hook_scale, no centering; the norm's weight is not applied
        (it is folded into the weights, see HookedTransformer.from_server(fold_ln=...)).

        Args:
            residual_stack: [components, *batch_and_pos, d_model].
            layer: the block whose input the stack is (ln1, or ln2 with mlp_input); None, -1 or
                n_layers: ln_final.
            mlp_input: use ln2 of `layer` instead of ln1.
            pos_slice: the positions already sliced out of the stack (applied to the scale).
            batch_slice: a batch slice applied to the stack (dim 1) and the scale.
            has_batch_dim: whether the stack has a batch dimension.
            recompute_ln: with the final layer, normalise each component by its own RMS instead
                of the cached scale (a logit lens of each component on its own).

        Returns:
            The scaled stack, same shape (batch-sliced).
        """
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        batch_slice = batch_slice if isinstance(batch_slice, Slice) else Slice(batch_slice)
        layer = self._normalise_layer(layer)
        if has_batch_dim:
            residual_stack = batch_slice.apply(residual_stack, dim=1)
        if recompute_ln and layer == self._n_layers:
            # Each component through ln_final with its own RMS (times ln_final's weight when it
            # is not folded into W_U), as TransformerLens's apply_ln_to_stack(recompute_ln=True).
            return self.model.ln_final(residual_stack)
        scale = self._cached_scale(layer, mlp_input, pos_slice, batch_slice)
        return residual_stack / scale

    def logit_attrs(self, residual_stack: torch.Tensor, tokens, incorrect_tokens=None,
                    pos_slice: Union[Slice, SliceInput] = None,
                    batch_slice: Union[Slice, SliceInput] = None,
                    has_batch_dim: bool = True) -> torch.Tensor:
        """How much each component of a residual stack pushes up the logit of `tokens`.

        Each component is scaled by ln_final's cached scale and dotted with the tokens' unembed
        directions (W_U columns). With fold_ln (the default) the attributions of a full
        decomposition sum to the logits.

        Args:
            residual_stack: [components, *batch_and_pos, d_model].
            tokens: a token (str, int, 0-d tensor) or tokens broadcasting against the stack's
                batch/pos dims ([batch] or [batch, pos]).
            incorrect_tokens: same shape as tokens; attribute the logit difference instead.
            pos_slice: positions already sliced out of the stack.
            batch_slice: batch rows to keep.
            has_batch_dim: whether the stack has a batch dimension.

        Returns:
            [components, *batch_and_pos].
        """
        def shape_of(t):
            if isinstance(t, str):
                return torch.Size([])
            return torch.as_tensor(t).shape

        directions = self.model.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            if shape_of(tokens) != shape_of(incorrect_tokens):
                raise ValueError(f"tokens and incorrect_tokens must have the same shape! "
                                 f"(tokens.shape={shape_of(tokens)}, "
                                 f"incorrect_tokens.shape={shape_of(incorrect_tokens)})")
            directions = directions - self.model.tokens_to_residual_directions(incorrect_tokens)
        scaled = self.apply_ln_to_stack(residual_stack, layer=-1, pos_slice=pos_slice,
                                        batch_slice=batch_slice, has_batch_dim=has_batch_dim)
        return (scaled * directions.to(scaled.device, scaled.dtype)).sum(dim=-1)
