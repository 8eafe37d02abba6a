"""TransformerBridge: the TransformerLens 4 entry point, with architecture-native hook names.

    from remotelens import TransformerBridge
    model = TransformerBridge.from_server("127.0.0.1:50051")
    logits, cache = model.run_with_cache("The cat sat", names_filter="blocks.1.hook_out")
    cache["blocks.1.hook_out"]                          # what HookedTransformer calls hook_resid_post
    model.run_with_hooks("The cat sat", fwd_hooks=[("blocks.1.attn.o.hook_in", ops.zero(head=2))])
    model.enable_compatibility_mode()                  # HookedTransformer names work too
    cache["blocks.1.hook_resid_post"], cache["resid_post", 1]

TransformerLens 4.0 replaced HookedTransformer with TransformerBridge, whose hook points are named
after the wrapped Hugging Face modules (every component has hook_in/hook_out) and whose
HookedTransformer names are aliases registered by enable_compatibility_mode(). The server keeps
TransformerLens 3 names on the wire; this class only renames: every hook point here stands for
one server hook point (HookPoint.wire_name), so values, shapes and ops are exactly those of
HookedTransformer.from_server.

The TransformerLens 4 name(s) of each server hook point come from the server (ModelInfo's
HookInfo.aliases, from the one hook-site table in engine/hook_names.cc); this module keeps only
TransformerLens 4's compatibility aliases (HookedTransformer name -> TL4 name). The names follow
TransformerLensOrg/TransformerLens (main at 4cd36aa, 2026-07-22):
  transformer_lens/model_bridge/supported_architectures/llama.py      component tree: embed,
      rotary_emb, blocks{ln1, ln2, attn{q,k,v,o}, mlp{gate,in,out}}, ln_final, unembed
  transformer_lens/model_bridge/generalized_components/base.py        hook_in/hook_out everywhere
  transformer_lens/model_bridge/generalized_components/block.py       BlockBridge.hook_aliases
      (hook_resid_pre -> hook_in, hook_resid_mid -> ln2.hook_in, hook_resid_post -> hook_out,
      hook_attn_out -> attn.hook_out, hook_mlp_out -> mlp.hook_out, hook_attn_in/hook_q_input/
      hook_k_input/hook_v_input -> attn.*) and its own hook_mlp_in
  transformer_lens/model_bridge/generalized_components/attention.py   AttentionBridge.hook_aliases
      (hook_q/k/v -> q/k/v.hook_out, reshaped to [batch, pos, heads, d_head]; hook_z -> o.hook_in)
      and hook_attn_scores, hook_pattern, hook_result, hook_rot_q, hook_rot_k
  transformer_lens/model_bridge/generalized_components/gated_mlp.py   GatedMLPBridge.hook_aliases
      (hook_pre -> gate.hook_out, hook_pre_linear -> in.hook_out, hook_post -> out.hook_in)
  transformer_lens/model_bridge/generalized_components/normalization.py  hook_scale, hook_normalized
  transformer_lens/model_bridge/bridge.py   TransformerBridge.hook_aliases (hook_embed ->
      embed.hook_out, hook_unembed -> unembed.hook_out), enable_compatibility_mode()
  docs/source/content/compatibility_mode.md  legacy names only after enable_compatibility_mode()

TransformerLens 4 hook points left out, because no server hook point holds their value (see
docs/decisions.md, "TransformerLens 4 names"): embed.hook_in (token ids); rotary_emb.hook_in,
hook_out, hook_cos, hook_sin (and so hook_pos_embed); blocks.{i}.ln1.hook_in (same value as
blocks.{i}.hook_in, but an edit there would change only the norm's input, which the server cannot
do); ln1.hook_out, ln2.hook_out, ln_final.hook_out and what reads them (attn.hook_in,
attn.q/k/v.hook_in, mlp.hook_in, mlp.gate.hook_in, mlp.in.hook_in): the norm's output after its
weight, where the server has only hook_normalized (before the weight); attn.hook_hidden_states.
attn.hook_attn_in, attn.hook_q_input/k_input/v_input and blocks.{i}.hook_mlp_in run once
set_use_attn_in / set_use_split_qkv_input / set_use_hook_mlp_in turn them on (the first two are
mutually exclusive, as in TransformerLens 4); unembed.hook_in/hook_out always run.
"""

from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from collections.abc import MutableMapping

import torch

from ._hooks import HookPoint, build_module_tree
from .activation_cache import ActivationCache
from .hooked_transformer import HookedTransformer

__all__ = ["TransformerBridge"]

# The TransformerLens 4 names of each server hook point come from the server (HookInfo.aliases,
# from engine/hook_names' table), so they are defined once.

# HookedTransformer (TL3) site -> the TL4 site it aliases, where the strings differ
# (BlockBridge, AttentionBridge and GatedMLPBridge hook_aliases).
_BLOCK_ALIASES: Dict[str, str] = {
    "hook_resid_pre": "hook_in",
    "hook_resid_mid": "ln2.hook_in",
    "hook_resid_post": "hook_out",
    "hook_attn_in": "attn.hook_attn_in",
    "hook_q_input": "attn.hook_q_input",
    "hook_k_input": "attn.hook_k_input",
    "hook_v_input": "attn.hook_v_input",
    "hook_attn_out": "attn.hook_out",
    "hook_mlp_out": "mlp.hook_out",
    "attn.hook_q": "attn.q.hook_out",
    "attn.hook_k": "attn.k.hook_out",
    "attn.hook_v": "attn.v.hook_out",
    "attn.hook_z": "attn.o.hook_in",
    "mlp.hook_pre": "mlp.gate.hook_out",
    "mlp.hook_pre_linear": "mlp.in.hook_out",
    "mlp.hook_post": "mlp.out.hook_in",
}

# TransformerBridge.hook_aliases (bridge.py) that have a target here.
_TOP_ALIASES: Dict[str, str] = {"hook_embed": "embed.hook_out", "hook_unembed": "unembed.hook_out"}

# TL4 hook points of the Llama bridge with no server hook point (per block with "blocks.{i}.").
LEFT_OUT = (
    "embed.hook_in", "rotary_emb.hook_in", "rotary_emb.hook_out", "rotary_emb.hook_cos",
    "rotary_emb.hook_sin", "hook_pos_embed", "blocks.{i}.ln1.hook_in", "blocks.{i}.ln1.hook_out",
    "blocks.{i}.attn.hook_in", "blocks.{i}.attn.q.hook_in", "blocks.{i}.attn.k.hook_in",
    "blocks.{i}.attn.v.hook_in", "blocks.{i}.attn.hook_hidden_states", "blocks.{i}.ln2.hook_out",
    "blocks.{i}.mlp.hook_in", "blocks.{i}.mlp.gate.hook_in", "blocks.{i}.mlp.in.hook_in",
    "ln_final.hook_out",
)


def _pattern(name: str) -> str:
    """'blocks.3.attn.hook_z' -> 'blocks.{i}.attn.hook_z'."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
        return ".".join(["blocks", "{i}"] + parts[2:])
    return name


class _RenamedTensors(MutableMapping):
    """A cache's tensors under the notebook's names, read through to the server-named tensors.

    Several names may stand for one server tensor (blocks.1.hook_out and its alias
    blocks.1.hook_resid_post); a name written to (remove_batch_dim, compute_head_results) gets
    its own entry, so its aliases are not changed twice.
    """

    def __init__(self, wire_tensors: MutableMapping, wire_of: Dict[str, str]):
        self._wire_tensors = wire_tensors
        self._wire_of = dict(wire_of)  # name -> server name, in the cache's order
        self._own: Dict[str, torch.Tensor] = {}

    def fetch_all(self) -> None:
        fetch = getattr(self._wire_tensors, "fetch_all", None)
        if fetch is not None:
            fetch()

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._own:
            return self._own[name]
        if name not in self._wire_of:
            raise KeyError(name)
        return self._wire_tensors[self._wire_of[name]]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self._wire_of.setdefault(name, name)
        self._own[name] = value

    def __delitem__(self, name: str) -> None:
        del self._wire_of[name]
        self._own.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._wire_of))

    def __len__(self) -> int:
        return len(self._wire_of)

    def __contains__(self, name: object) -> bool:
        return name in self._wire_of


class TransformerBridge(HookedTransformer):
    """A Llama model on a remotelens server, driven with TransformerLens 4's TransformerBridge API.

    Hook points carry TransformerLens 4 names (module path + hook_in/hook_out); after
    enable_compatibility_mode() the HookedTransformer names are aliases of the same hook points,
    in hook_dict, names_filter, hooks and cache keys. Everything else (run_with_cache,
    run_with_hooks, hooks(), add_hook, generate, weights, ActivationCache) is HookedTransformer's.

    Attributes:
        compatibility_mode: whether HookedTransformer names are registered.
        unmapped_server_hooks: server hook points with no TransformerLens 4 name here (none for
            the servers this client knows; listed rather than guessed at).
    """

    def __init__(self, *args, **kwargs):
        self.compatibility_mode = False
        super().__init__(*args, **kwargs)

    @classmethod
    def from_server(cls, address: Optional[str] = None, api_key: Optional[str] = None,
                    root_certificates: Optional[Union[bytes, str]] = None,
                    timeout: Optional[float] = None, fold_ln: bool = False,
                    session_ttl_seconds: int = 0,
                    channel_options: Sequence[Tuple[str, Any]] = ()) -> "TransformerBridge":
        """Connects to a remotelens server, as HookedTransformer.from_server does.

        Args:
            address, api_key, root_certificates, timeout, session_ttl_seconds, channel_options:
                as for HookedTransformer.from_server.
            fold_ln: fold RMSNorm weights into the weight properties. Default False: a
                TransformerBridge starts with the checkpoint's own weights, and
                enable_compatibility_mode() folds them (TransformerLens 4's behaviour).
                Activations never change.

        Returns:
            The model.
        """
        return super().from_server(address, api_key, root_certificates, timeout, fold_ln,
                                   session_ttl_seconds, channel_options, center_unembed=False)

    def __repr__(self) -> str:
        return (f"TransformerBridge(model_name={self.cfg.model_name!r}, address={self.address!r}, "
                f"n_layers={self.cfg.n_layers}, compatibility_mode={self.compatibility_mode})")

    # ------------------------------------------------------------------ the name tables

    def _native_sites(self) -> List[Tuple[str, str]]:
        """(TL4 name, server name) for every hook point the server has, in forward order: the
        server lists each hook point's TransformerLens 4 names."""
        pairs = [(alias, wire) for wire, info in self._hook_infos.items() for alias in info.aliases]
        if not pairs and self._hook_infos:
            raise RuntimeError("this server does not list TransformerLens 4 hook names (HookInfo."
                               "aliases); TransformerBridge needs a newer server, HookedTransformer "
                               "works with this one")
        return pairs

    def _legacy_aliases(self) -> Dict[str, str]:
        """HookedTransformer name -> the TL4 name it aliases (only those that differ)."""
        aliases = {a: t for a, t in _TOP_ALIASES.items() if t in self._native_hooks}
        for layer in range(self.cfg.n_layers):
            for alias, target in _BLOCK_ALIASES.items():
                target = f"blocks.{layer}.{target}"
                if target in self._native_hooks:
                    aliases[f"blocks.{layer}.{alias}"] = target
        return aliases

    def _make_hook_dict(self) -> Dict[str, HookPoint]:
        pairs = self._native_sites()
        self._native_hooks: Dict[str, HookPoint] = {
            name: self._new_hook_point(name, wire) for name, wire in pairs}
        mapped = {wire for _, wire in pairs}
        self.unmapped_server_hooks = [w for w in self._wire_shapes if w not in mapped]
        hook_dict = dict(self._native_hooks)
        if self.compatibility_mode:
            for alias, target in self._legacy_aliases().items():
                hook_dict[alias] = self._native_hooks[target]
        return hook_dict

    def hook_points(self):
        """Every hook point once (aliases share their target's HookPoint), in forward order."""
        return self._native_hooks.values()

    def enable_compatibility_mode(self, disable_warnings: bool = False, no_processing: bool = False,
                                  fold_ln: bool = True, center_writing_weights: bool = True,
                                  center_unembed: bool = True, fold_value_biases: bool = True,
                                  refactor_factored_attn_matrices: bool = False) -> None:
        """Registers the HookedTransformer names as aliases and folds the norms into the weights.

        Arguments are TransformerLens 4's (bridge.py). fold_ln folds RMSNorm weights into the
        weight properties (W_Q ... W_U), as HookedTransformer.from_server(fold_ln=True) does;
        center_unembed centres W_U and shifts returned logits by their per-position mean, as
        from_server(center_unembed=True) does. Writing weights have no mean to centre under
        RMSNorm and Llama has no value biases; refactor_factored_attn_matrices is not supported.
        Activations are never changed: the server runs the checkpoint's weights.

        Args:
            disable_warnings: accepted (no warnings are issued).
            no_processing: register the names only; leave the weight properties unfolded.
            fold_ln: fold RMSNorm weights into the weight properties.
            center_unembed: centre W_U (and so the logits).
            center_writing_weights, fold_value_biases: accepted; no effect on an RMSNorm model
                without biases.
            refactor_factored_attn_matrices: must be False.
        """
        if refactor_factored_attn_matrices and not no_processing:
            raise NotImplementedError("refactor_factored_attn_matrices is not supported by remotelens")
        self.compatibility_mode = True
        self._set_fold_ln(bool(fold_ln) and not no_processing)
        centre = bool(center_unembed) and not no_processing
        if centre != self.cfg.center_unembed:
            self.cfg.center_unembed = centre
            self._weights.pop(("W_U", None), None)
        self.hook_dict = self._make_hook_dict()
        self.mod_dict = build_module_tree(self, self.hook_dict, self.cfg.n_layers, self._weight_attr)

    def _set_fold_ln(self, fold_ln: bool) -> None:
        if fold_ln == self.cfg.fold_ln:
            return
        self.cfg.fold_ln = fold_ln
        self.cfg.normalization_type = "RMSPre" if fold_ln else "RMS"
        # Folded weights were cached under their plain names; the raw ones stay valid.
        self._weights = {k: v for k, v in self._weights.items() if k[0].startswith("raw:")}

    # ------------------------------------------------------------------ name resolution

    def _other_names(self, name: str, hook_point: HookPoint) -> List[str]:
        """Other names of this hook point here: its other TL4 names and, in compatibility mode,
        its HookedTransformer names."""
        return [n for n, hp in self.hook_dict.items()
                if n != name and (hp is hook_point or (n in self._native_hooks
                                                       and hp.wire_name == hook_point.wire_name))]

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """TransformerLens 4 (bridge.py): as HookedTransformer's, but not together with
        use_attn_in."""
        if use_split_qkv_input and self.cfg.use_attn_in:
            raise ValueError("use_split_qkv_input and use_attn_in are mutually exclusive. "
                             "Call set_use_attn_in(False) before enabling use_split_qkv_input.")
        super().set_use_split_qkv_input(use_split_qkv_input)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """TransformerLens 4 (bridge.py): attn.hook_attn_in, resid_pre repeated per query head
        [batch, pos, n_heads, d_model], feeding queries, keys and values; with grouped-query
        attention keys and values read its first n_key_value_heads copies. Not together with
        use_split_qkv_input."""
        if use_attn_in and self.cfg.use_split_qkv_input:
            raise ValueError("use_attn_in and use_split_qkv_input are mutually exclusive. "
                             "Call set_use_split_qkv_input(False) before enabling use_attn_in.")
        self.cfg.use_attn_in = bool(use_attn_in)

    def _unknown_name_message(self, names: Sequence[str]) -> str:
        patterns = list(dict.fromkeys(_pattern(n) for n in self.hook_dict))
        hints = []
        for name in names:
            pattern = _pattern(name)
            if pattern in LEFT_OUT:
                hints.append(f"{name!r} is a TransformerLens 4 hook point that this server does "
                             f"not expose (no server hook point holds its value)")
            elif not self.compatibility_mode and (name in self._wire_shapes
                                                  or name in self._legacy_aliases()):
                hints.append(f"{name!r} is a HookedTransformer name: call "
                             f"model.enable_compatibility_mode() to use it, or use its "
                             f"TransformerLens 4 name")
        blocks = f"{{i}} in 0..{self.cfg.n_layers - 1}"
        return (f"{', '.join(repr(n) for n in names)} {'is not a hook point' if len(names) == 1 else 'are not hook points'} "
                f"of this TransformerBridge. {' '.join(h + '.' for h in hints)} Valid names ({blocks}): "
                f"{', '.join(patterns)}")

    def _hook_point(self, name: str) -> HookPoint:
        try:
            return self.hook_dict[name]
        except KeyError:
            raise KeyError(self._unknown_name_message([name])) from None

    def _selected_names(self, names_filter) -> List[str]:
        """The cache keys names_filter selects: in compatibility mode every name of each selected
        hook point (TL4 and HookedTransformer), as TransformerLens 4's run_with_cache returns."""
        if names_filter is None:
            chosen = self._firing_names()
        elif isinstance(names_filter, str):
            chosen = [names_filter]
        elif isinstance(names_filter, (list, tuple, set, frozenset)):
            chosen = list(names_filter)
        elif callable(names_filter):
            chosen = [n for n in self._firing_names() if names_filter(n)]
        else:
            raise ValueError("names_filter must be a string, list of strings, or function")
        unknown = [n for n in chosen if n not in self.hook_dict]
        if unknown:
            raise ValueError(self._unknown_name_message(unknown))
        if not self.compatibility_mode:
            return list(dict.fromkeys(chosen))
        points = {id(self.hook_dict[n]) for n in chosen}
        return [n for n, hp in self.hook_dict.items() if id(hp) in points]

    # ------------------------------------------------------------------ caching

    def run_with_cache(self, *model_args, names_filter=None, return_cache_object: bool = True,
                       incl_bwd: bool = False, **kwargs):
        """HookedTransformer.run_with_cache with this model's names as cache keys.

        names_filter takes TL4 names (and HookedTransformer names after
        enable_compatibility_mode()), a list of them, or a function of a name. Gradients
        (incl_bwd=True) are keyed "<name>_grad". The server runs and streams each selected hook
        point once, whatever number of names it has.
        """
        keys = self._selected_names(names_filter)
        wire_of = {k: self.hook_dict[k].wire_name for k in keys}
        wires = list(dict.fromkeys(wire_of.values()))
        out, cache = super().run_with_cache(*model_args, names_filter=wires,
                                            return_cache_object=True, incl_bwd=incl_bwd, **kwargs)
        # Hook points that could not fire (before start_at_layer) are not in the cache.
        wire_of = {k: w for k, w in wire_of.items() if w in cache.cache_dict}
        if incl_bwd:
            wire_of.update({f"{k}_grad": f"{w}_grad" for k, w in list(wire_of.items())
                            if f"{w}_grad" in cache.cache_dict})
        renamed = _RenamedTensors(cache.cache_dict, wire_of)
        if not return_cache_object:
            return out, {k: renamed[k] for k in renamed}
        return out, ActivationCache(renamed, self, has_batch_dim=cache.has_batch_dim,
                                    handle=cache.handle, session_id=cache.session_id,
                                    wire_names=wire_of)
