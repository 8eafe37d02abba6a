"""Client-side hook points: where hook functions live between forward passes.

As in TransformerLens, hooks belong to the model object in the notebook (not to the server): a
HookPoint per hook name keeps its list of hook functions, permanent or not, with the context
level that added it. At each forward pass the model turns every active hook into a HookOp: a
remotelens.ops op runs on the server; a Python callable becomes a client callback that the
server calls back over RunInteractive.

The module tree (model.blocks[3].attn.hook_z, model.ln_final.hook_scale) is built from the
server's hook list, so attribute access works like on a local HookedTransformer.
"""

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["HookPoint", "HookPointInfo", "LensHandle", "build_module_tree"]


# remotelens.ops kinds the server can apply to gradients (HookOp.backward).
_BACKWARD_OPS = frozenset({"zero", "set", "add", "scale", "mean"})


@dataclasses.dataclass(frozen=True)
class HookPointInfo:
    """What the server lists about one hook point (ModelInfo.hooks; engine/hook_names).

    Attributes:
        name: the name in this model's naming scheme.
        wire_name: the server's (TransformerLens 3) name, used in requests.
        aliases: other names of the same hook point (TransformerLens 4 bridge names for a
            HookedTransformer; HookedTransformer names for a TransformerBridge in compatibility
            mode).
        shape: -1 for batch, pos, query_pos and key_pos.
        dims: TransformerLens's word for each dimension ("batch", "pos", "head_index",
            "kv_head_index", "d_head", "d_model", "d_mlp", "d_vocab", "query_pos", "key_pos", "1").
        pos_dim: which dimension holds positions (query positions for patterns).
        head_dim: which dimension holds heads, or None.
        enabled_by: the TransformerLens flag it needs ("use_attn_result", "use_split_qkv_input",
            "use_attn_in", "use_hook_mlp_in"), or "" when it always runs.
        enabled: whether it runs now (its flag, if any, is on).
        supports_backward: backward hooks and gradients may name it.
    """

    name: str
    wire_name: str
    aliases: Tuple[str, ...]
    shape: Tuple[int, ...]
    dims: Tuple[str, ...]
    pos_dim: int
    head_dim: Optional[int]
    enabled_by: str
    enabled: bool
    supports_backward: bool

    @classmethod
    def from_proto(cls, h) -> "HookPointInfo":
        return cls(name=h.name, wire_name=h.name, aliases=tuple(h.aliases), shape=tuple(h.shape),
                   dims=tuple(h.dims), pos_dim=int(h.pos_dim),
                   head_dim=None if h.head_dim < 0 else int(h.head_dim), enabled_by=h.enabled_by,
                   enabled=not h.enabled_by, supports_backward=bool(h.supports_backward))

    def renamed(self, name: str, aliases, enabled: bool) -> "HookPointInfo":
        return dataclasses.replace(self, name=name, aliases=tuple(aliases), enabled=enabled)


@dataclasses.dataclass
class LensHandle:
    """One hook function registered on a HookPoint."""

    hook: Callable
    is_permanent: bool = False
    context_level: Optional[int] = None


class HookPoint:
    """A named hook point of the remote model.

    Attributes:
        name: the hook name the notebook uses (what hook functions see as hook.name).
        wire_name: the server's hook point it stands for (its TransformerLens 3 name); equal to
            name except for TransformerBridge's TransformerLens 4 names.
        shape: the activation's shape from the server, -1 for batch and position dimensions.
        pos_dim, head_dim: which dimensions hold positions and heads (None: no heads), as the
            server lists them; None when the server does not say.
        fwd_hooks: the registered hook functions, in application order.
        bwd_hooks: backward hooks: fn(grad, hook) returning None or a replacement gradient, or
            remotelens.ops zero/set/add/scale/mean (run on the server); they fire when a backward
            pass runs (output.backward(), run_with_cache(incl_bwd=True)).
        ctx: a dict hook functions may use to keep state between calls (clear_contexts empties it).
    """

    def __init__(self, name: str, shape=(), wire_name: Optional[str] = None,
                 pos_dim: Optional[int] = None, head_dim: Optional[int] = None):
        self.name = name
        self.wire_name = wire_name or name
        self.shape = tuple(shape)
        self.pos_dim = pos_dim
        self.head_dim = head_dim
        self.fwd_hooks: List[LensHandle] = []
        self.bwd_hooks: List[LensHandle] = []
        self.ctx: Dict[Any, Any] = {}

    def __repr__(self) -> str:
        extra = f", {len(self.fwd_hooks)} fwd" if self.fwd_hooks else ""
        return f"HookPoint(name={self.name!r}{extra})"

    def add_hook(self, hook: Callable, dir: str = "fwd", is_permanent: bool = False,
                 level: Optional[int] = None, prepend: bool = False) -> None:
        """Registers `hook` (fn(activation, hook) or a remotelens.ops op) at this point.

        Args:
            hook: the hook function or op.
            dir: "fwd", or "bwd" for a hook on the gradient at this point (fn(grad, hook), or a
                remotelens.ops op), fired when a backward pass runs.
            is_permanent: survive reset_hooks() unless including_permanent=True.
            level: the hooks() context level that owns it (None: added directly).
            prepend: run before the hooks already registered here.
        """
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"Invalid direction {dir!r}")
        if dir == "bwd" and hasattr(hook, "to_proto") and getattr(hook, "kind", None) not in _BACKWARD_OPS:
            raise ValueError(f"ops.{hook.kind} cannot be a backward hook; backward ops are "
                             f"{', '.join(sorted(_BACKWARD_OPS))}, or a Python function")
        if not callable(hook):
            raise TypeError(f"hook for {self.name} must be callable or a remotelens.ops op, "
                            f"got {type(hook).__name__}")
        handle = LensHandle(hook, is_permanent, level)
        hooks = self.fwd_hooks if dir == "fwd" else self.bwd_hooks
        if prepend:
            hooks.insert(0, handle)
        else:
            hooks.append(handle)

    def add_perma_hook(self, hook: Callable, dir: str = "fwd") -> None:
        """add_hook with is_permanent=True."""
        self.add_hook(hook, dir=dir, is_permanent=True)

    def remove_hooks(self, dir: str = "fwd", including_permanent: bool = False,
                     level: Optional[int] = None) -> None:
        """Removes hooks: all non-permanent ones (of `level`, when given), or every one."""
        if dir not in ("fwd", "bwd", "both"):
            raise ValueError(f"Invalid direction {dir!r}")

        def keep(handle: LensHandle) -> bool:
            if including_permanent:
                return False
            return handle.is_permanent or (level is not None and handle.context_level != level)

        if dir in ("fwd", "both"):
            self.fwd_hooks = [h for h in self.fwd_hooks if keep(h)]
        if dir in ("bwd", "both"):
            self.bwd_hooks = [h for h in self.bwd_hooks if keep(h)]

    def has_hooks(self, dir: str = "both", including_permanent: bool = True,
                  level: Optional[int] = None) -> bool:
        """True when any hook matching the filters is registered."""
        handles = (self.fwd_hooks if dir in ("fwd", "both") else []) + (
            self.bwd_hooks if dir in ("bwd", "both") else [])
        return any((including_permanent or not h.is_permanent)
                   and (level is None or h.context_level == level) for h in handles)

    def clear_context(self) -> None:
        self.ctx = {}

    def layer(self) -> int:
        """The block index of a "blocks.L...." hook; ValueError otherwise."""
        parts = self.name.split(".")
        if len(parts) < 2 or parts[0] != "blocks":
            raise ValueError(f"hook {self.name!r} is not inside a block")
        return int(parts[1])


class Module:
    """A node of the model's module tree: attributes are child modules and hook points."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        children = [k for k in vars(self) if not k.startswith("_") and k != "name"]
        return f"{type(self).__name__}(name={self.name!r}, children={children})"


class _WeightModule(Module):
    """A module whose weight attributes (attn.W_Q, mlp.W_out, ln1.w) are fetched from the server."""

    def __init__(self, name: str, layer: Optional[int], weights: Dict[str, str], fetch):
        super().__init__(name)
        self._layer = layer
        self._weights = weights  # attribute -> model attribute that stacks it over layers
        self._fetch = fetch

    def __getattr__(self, attr: str):
        weights = self.__dict__.get("_weights", {})
        if attr in weights:
            return self._fetch(weights[attr], self._layer)
        raise AttributeError(f"{type(self).__name__} {self.__dict__.get('name')!r} has no "
                             f"attribute {attr!r}")


class _Norm(_WeightModule):
    """An RMSNorm (ln1, ln2, ln_final): model.ln_final(resid) normalises here, like
    TransformerLens's RMSNorm (fold_ln=False: times the weight) or RMSNormPre (fold_ln=True)."""

    def __call__(self, x):
        return self._root._apply_norm(self._weights["w"], self._layer, x)


class _Attention(_WeightModule):
    """A block's attention: weights (W_Q ... b_O) and its QK / OV circuits."""

    @property
    def QK(self):
        """FactoredMatrix(W_Q, W_K^T) [n_heads, d_model, d_model] (TransformerLens attn.QK)."""
        from .factored_matrix import FactoredMatrix
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self):
        """FactoredMatrix(W_V, W_O) [n_heads, d_model, d_model] (TransformerLens attn.OV)."""
        from .factored_matrix import FactoredMatrix
        return FactoredMatrix(self.W_V, self.W_O)


class _Block(Module):
    """A transformer block: model.blocks[L](resid_pre) runs it on the server (resid_post)."""

    def __init__(self, name: str, layer: int, root: Any):
        super().__init__(name)
        self._layer = layer
        self._root = root

    def __call__(self, resid_pre, shortformer_pos_embed=None, past_kv_cache_entry=None,
                 attention_mask=None):
        """TransformerBlock.forward's signature; resid_pre [batch, pos, d_model] -> resid_post."""
        if shortformer_pos_embed is not None or past_kv_cache_entry is not None:
            raise NotImplementedError("a remotelens block takes no shortformer_pos_embed (Llama is "
                                      "rotary) and no past_kv_cache_entry")
        return self._root._block_forward(self._layer, resid_pre, attention_mask)


class _Embed(_WeightModule):
    """model.embed(tokens) -> W_E[tokens] [batch, pos, d_model] (TransformerLens Embed)."""

    def __call__(self, tokens):
        return self._root._embed_tokens(tokens)


class _Unembed(_WeightModule):
    """model.unembed(x) -> x @ W_U + b_U [..., d_vocab] (TransformerLens Unembed), with the
    model's processed W_U (ln_final folded with fold_ln, centred with center_unembed)."""

    def __call__(self, x):
        return self._root._unembed(x)


# Per-block weights each sublayer exposes, as in TransformerLens (attn.W_Q, mlp.W_in, ln1.w).
_SUBLAYER_WEIGHTS = {
    "attn": {"W_Q": "W_Q", "W_K": "W_K", "W_V": "W_V", "W_O": "W_O", "_W_K": "_W_K",
             "_W_V": "_W_V", "b_Q": "b_Q", "b_K": "b_K", "b_V": "b_V", "b_O": "b_O"},
    "mlp": {"W_in": "W_in", "W_gate": "W_gate", "W_out": "W_out", "b_in": "b_in", "b_out": "b_out"},
    "ln1": {"w": "ln1_w"},
    "ln2": {"w": "ln2_w"},
}
_SUBLAYER_CLASS = {"attn": _Attention, "ln1": _Norm, "ln2": _Norm}


def build_module_tree(root: Any, hook_points: Dict[str, HookPoint], n_layers: int,
                      fetch_weight: Callable[[str, Optional[int]], Any]) -> Dict[str, Any]:
    """Attaches blocks, sublayers and hook points to `root` as attributes.

    Args:
        root: the model object; gets .blocks (a list), .embed, .unembed, .ln_final,
            .hook_embed, ... Calling a module calls back root._embed_tokens, _unembed,
            _apply_norm or _block_forward.
        hook_points: name -> HookPoint, in forward order.
        n_layers: number of blocks.
        fetch_weight: fetch_weight(stacked attribute name, layer) -> tensor for one layer.

    Returns:
        mod_dict: every module and hook point by its dotted name.
    """
    mod_dict: Dict[str, Any] = {}
    blocks = [_Block(f"blocks.{i}", i, root) for i in range(n_layers)]
    for i, block in enumerate(blocks):
        mod_dict[block.name] = block
        for sub, weights in _SUBLAYER_WEIGHTS.items():
            module = _SUBLAYER_CLASS.get(sub, _WeightModule)(f"blocks.{i}.{sub}", i, weights, fetch_weight)
            module._root = root
            setattr(block, sub, module)
            mod_dict[module.name] = module
    root.blocks = blocks
    for name, cls, weights in (("ln_final", _Norm, {"w": "ln_final_w"}),
                               ("embed", _Embed, {"W_E": "W_E"}),
                               ("unembed", _Unembed, {"W_U": "W_U", "b_U": "b_U"})):
        module = cls(name, None, weights, fetch_weight)
        module._root = root
        setattr(root, name, module)
        mod_dict[name] = module
    for name, hp in hook_points.items():
        parts = name.split(".")
        if parts[0] == "blocks":
            parent: Any = blocks[int(parts[1])]
            path = parts[2:]
        else:
            parent, path = root, parts
        prefix = parts[:len(parts) - len(path)]
        for part in path[:-1]:
            prefix = prefix + [part]
            child = getattr(parent, part, None)
            if child is None:
                child = Module(".".join(prefix))
                setattr(parent, part, child)
                mod_dict[child.name] = child
            parent = child
        setattr(parent, path[-1], hp)
        mod_dict[name] = hp
    return mod_dict
