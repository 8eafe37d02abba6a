"""Activation patching sweeps with transformer_lens.patching's functions and shapes.

    from remotelens import patching
    _, clean_cache = model.run_with_cache(clean_tokens)
    metric = lambda logits: logits[0, -1, answer] - logits[0, -1, wrong]
    patching.get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, metric)   # [n_layers, pos]
    patching.get_act_patch_attn_head_out_all_pos(model, corrupted_tokens, clean_cache, metric)  # [n_layers, n_heads]
    patching.get_act_patch_block_every(model, corrupted_tokens, clean_cache, metric)  # [3, n_layers, pos]

Each patch is one forward pass of the corrupted tokens with the clean activation patched in.
The patch setters TransformerLens defines here (layer_pos_patch_setter, ...) run on the server
as remotelens.ops.patch_from ops (by handle when the clean cache was stored with
run_with_cache(store=True), otherwise the selected slice is sent); any other patch_setter runs
as a Python hook, as in TransformerLens. Semantics follow transformer_lens/patching.py.
"""

import itertools
from functools import partial
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from . import ops, utils

__all__ = [
    "generic_activation_patch", "make_df_from_ranges",
    "layer_pos_patch_setter", "layer_pos_head_vector_patch_setter",
    "layer_head_vector_patch_setter", "layer_head_pattern_patch_setter",
    "layer_head_pos_pattern_patch_setter", "layer_head_dest_src_pos_pattern_patch_setter",
    "get_act_patch_resid_pre", "get_act_patch_resid_mid", "get_act_patch_attn_out",
    "get_act_patch_mlp_out", "get_act_patch_attn_head_out_by_pos",
    "get_act_patch_attn_head_q_by_pos", "get_act_patch_attn_head_k_by_pos",
    "get_act_patch_attn_head_v_by_pos", "get_act_patch_attn_head_pattern_by_pos",
    "get_act_patch_attn_head_pattern_dest_src_pos", "get_act_patch_attn_head_out_all_pos",
    "get_act_patch_attn_head_q_all_pos", "get_act_patch_attn_head_k_all_pos",
    "get_act_patch_attn_head_v_all_pos", "get_act_patch_attn_head_pattern_all_pos",
    "get_act_patch_block_every", "get_act_patch_attn_head_all_pos_every",
    "get_act_patch_attn_head_by_pos_every",
]


def make_df_from_ranges(column_max_ranges: Sequence[int], column_names: Sequence[str]):
    """Every index combination, last column fastest: a pandas DataFrame when pandas is
    installed, else a list of tuples (remotelens does not depend on pandas)."""
    rows = list(itertools.product(*[range(n) for n in column_max_ranges]))
    try:
        import pandas as pd
    except ImportError:
        return rows
    return pd.DataFrame(rows, columns=list(column_names))


def _index_rows(index_df) -> List[List[int]]:
    if hasattr(index_df, "iterrows"):
        return [[int(v) for v in row.to_list()] for _, row in index_df.iterrows()]
    return [[int(v) for v in row] for row in index_df]


# ------------------------------------------------------------------ patch setters
# Each is TransformerLens's setter (corrupted, index, clean) -> patched, usable in a Python
# hook; `server_op` gives the same patch as a remotelens op, or None when no op selects it.

def _with_server_op(server_op: Callable[[Sequence[int], Any], Optional[ops.HookOperation]]):
    def mark(setter):
        setter.server_op = server_op
        return setter
    return mark


@_with_server_op(lambda index, cache: ops.patch_from(cache, pos=index[1]))
def layer_pos_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, pos]: corrupted[:, pos] = clean[:, pos]."""
    _, pos = index
    corrupted_activation[:, pos, ...] = clean_activation[:, pos, ...]
    return corrupted_activation


@_with_server_op(lambda index, cache: ops.patch_from(cache, pos=index[1], head=index[2]))
def layer_pos_head_vector_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, pos, head]: corrupted[:, pos, head] = clean[:, pos, head]."""
    _, pos, head = index
    corrupted_activation[:, pos, head] = clean_activation[:, pos, head]
    return corrupted_activation


@_with_server_op(lambda index, cache: ops.patch_from(cache, head=index[1]))
def layer_head_vector_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, head]: corrupted[:, :, head] = clean[:, :, head] (every position)."""
    _, head = index
    corrupted_activation[:, :, head] = clean_activation[:, :, head]
    return corrupted_activation


@_with_server_op(lambda index, cache: ops.patch_from(cache, head=index[1]))
def layer_head_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, head]: the head's whole pattern [:, head, :, :]."""
    _, head = index
    corrupted_activation[:, head, :, :] = clean_activation[:, head, :, :]
    return corrupted_activation


@_with_server_op(lambda index, cache: ops.patch_from(cache, head=index[1], pos=index[2]))
def layer_head_pos_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, head, dest_pos]: one query row of the head's pattern."""
    _, head, dest_pos = index
    corrupted_activation[:, head, dest_pos, :] = clean_activation[:, head, dest_pos, :]
    return corrupted_activation


@_with_server_op(lambda index, cache: None)  # ops select no key positions: a Python hook
def layer_head_dest_src_pos_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, head, dest_pos, src_pos]: one pattern entry."""
    _, head, dest_pos, src_pos = index
    corrupted_activation[:, head, dest_pos, src_pos] = clean_activation[:, head, dest_pos, src_pos]
    return corrupted_activation


# ------------------------------------------------------------------ the sweep

def generic_activation_patch(model, corrupted_tokens: torch.Tensor, clean_cache,
                             patching_metric: Callable[[torch.Tensor], torch.Tensor],
                             patch_setter: Callable, activation_name: str,
                             index_axis_names: Optional[Sequence[str]] = None,
                             index_df=None, return_index_df: bool = False,
                             patches_per_forward: int = 1):
    """Patches the clean activation into the corrupted run at every index and records the metric.

    Args:
        model: the HookedTransformer.
        corrupted_tokens: [batch, pos] tokens of the corrupted run.
        clean_cache: the clean run's ActivationCache (same batch and pos).
        patching_metric: logits [batch, pos, d_vocab] -> scalar tensor.
        patch_setter: (corrupted_activation, index, clean_activation) -> patched activation;
            the setters of this module run on the server, others as Python hooks.
        activation_name: an act name for utils.get_act_name ("resid_pre", "z", ...); the layer
            is the first element of each index.
        index_axis_names: axes to iterate over fully: "layer", "pos", "head_index"/"head",
            "src_pos", "dest_pos".
        index_df: explicit indices (a DataFrame, or a list of index tuples) instead of
            index_axis_names; the output is then flat, one value per row.
        return_index_df: also return the indices.
        patches_per_forward: remotelens only. 1 (default): one forward per patch, the patch
            applied on the server. k > 1: k patches of the same layer per forward, as k copies
            of the corrupted batch, each patched by one Python callback per forward (the
            server has no per-row selector). On a GPU a batch of k costs about what one row
            does, so a sweep is up to k times faster; values agree to float rounding.

    Returns:
        The metric per patch: one dimension per axis (or flat with index_df), and the indices
        when return_index_df.
    """
    if index_df is None:
        if index_axis_names is None:
            raise ValueError("pass index_axis_names or index_df")
        n_heads = model.cfg.n_heads
        if activation_name in ("k", "v") and model.cfg.n_key_value_heads is not None:
            n_heads = model.cfg.n_key_value_heads
        n_pos = corrupted_tokens.shape[-1]
        ranges = {"layer": model.cfg.n_layers, "pos": n_pos, "src_pos": n_pos, "dest_pos": n_pos,
                  "head_index": n_heads, "head": n_heads}
        unknown = [a for a in index_axis_names if a not in ranges]
        if unknown:
            raise ValueError(f"unknown index axes {unknown}; valid: {sorted(ranges)}")
        axis_ranges = [ranges[a] for a in index_axis_names]
        index_df = make_df_from_ranges(axis_ranges, index_axis_names)
        output = torch.zeros(axis_ranges, device=model.cfg.device)
        flat = False
    else:
        if index_axis_names is not None:
            raise ValueError("pass index_axis_names or index_df, not both")
        flat = True
    rows = _index_rows(index_df)
    if flat:
        output = torch.zeros(len(rows), device=model.cfg.device)
    if patches_per_forward < 1:
        raise ValueError(f"patches_per_forward={patches_per_forward}; valid: 1 or more")
    if patches_per_forward > 1:
        _batched_sweep(model, corrupted_tokens, clean_cache, patching_metric, patch_setter,
                       activation_name, rows, output, flat, patches_per_forward)
        return (output, index_df) if return_index_df else output
    server_op = getattr(patch_setter, "server_op", None)
    for i, index in enumerate(tqdm(rows, disable=len(rows) < 2)):
        name = utils.get_act_name(activation_name, layer=index[0])
        hook = server_op(index, clean_cache) if server_op is not None else None
        if hook is None:
            hook = partial(_python_patch, setter=patch_setter, index=index,
                           clean_activation=clean_cache[name])
        logits = model.run_with_hooks(corrupted_tokens, fwd_hooks=[(name, hook)])
        value = patching_metric(logits).item()
        if flat:
            output[i] = value
        else:
            output[tuple(index)] = value
    return (output, index_df) if return_index_df else output


def _batched_sweep(model, corrupted_tokens, clean_cache, patching_metric, patch_setter,
                   activation_name, rows, output, flat, k) -> None:
    """generic_activation_patch with k patches of one layer per forward (fills `output`)."""
    corrupted_tokens = torch.as_tensor(corrupted_tokens)
    if corrupted_tokens.dim() == 1:
        corrupted_tokens = corrupted_tokens[None]
    b0 = corrupted_tokens.shape[0]
    groups: List[List[Tuple[int, List[int]]]] = []
    for i, index in enumerate(rows):  # consecutive rows of one layer, at most k per group
        if groups and len(groups[-1]) < k and groups[-1][0][1][0] == index[0]:
            groups[-1].append((i, index))
        else:
            groups.append([(i, index)])
    for group in tqdm(groups, disable=len(groups) < 2):
        name = utils.get_act_name(activation_name, layer=group[0][1][0])
        clean_activation = clean_cache[name]

        def hook(activation, hook, group=group, clean_activation=clean_activation):
            clean = clean_activation.to(activation.device, activation.dtype)
            out = activation.clone()
            for j, (_, index) in enumerate(group):
                rows_j = slice(j * b0, (j + 1) * b0)
                out[rows_j] = patch_setter(out[rows_j].clone(), index, clean)
            return out

        logits = model.run_with_hooks(corrupted_tokens.repeat(len(group), 1), fwd_hooks=[(name, hook)])
        for j, (i, index) in enumerate(group):
            value = patching_metric(logits[j * b0:(j + 1) * b0]).item()
            if flat:
                output[i] = value
            else:
                output[tuple(index)] = value


def _python_patch(activation, hook, setter, index, clean_activation):
    return setter(activation.clone(), index, clean_activation.to(activation.device, activation.dtype))


def _sweep(patch_setter, activation_name: str, index_axis_names: Tuple[str, ...], doc: str):
    fn = partial(generic_activation_patch, patch_setter=patch_setter,
                 activation_name=activation_name, index_axis_names=index_axis_names)
    fn.__doc__ = (f"{doc}\n\n    (model, corrupted_tokens, clean_cache, patching_metric) -> tensor; "
                  f"see generic_activation_patch.")
    return fn


get_act_patch_resid_pre = _sweep(layer_pos_patch_setter, "resid_pre", ("layer", "pos"),
                                 "Patches resid_pre per (layer, pos): [n_layers, pos].")
get_act_patch_resid_mid = _sweep(layer_pos_patch_setter, "resid_mid", ("layer", "pos"),
                                 "Patches resid_mid per (layer, pos): [n_layers, pos].")
get_act_patch_attn_out = _sweep(layer_pos_patch_setter, "attn_out", ("layer", "pos"),
                                "Patches attn_out per (layer, pos): [n_layers, pos].")
get_act_patch_mlp_out = _sweep(layer_pos_patch_setter, "mlp_out", ("layer", "pos"),
                               "Patches mlp_out per (layer, pos): [n_layers, pos].")
get_act_patch_attn_head_out_by_pos = _sweep(
    layer_pos_head_vector_patch_setter, "z", ("layer", "pos", "head"),
    "Patches each head's z per (layer, pos, head): [n_layers, pos, n_heads].")
get_act_patch_attn_head_q_by_pos = _sweep(
    layer_pos_head_vector_patch_setter, "q", ("layer", "pos", "head"),
    "Patches each head's q per (layer, pos, head): [n_layers, pos, n_heads].")
get_act_patch_attn_head_k_by_pos = _sweep(
    layer_pos_head_vector_patch_setter, "k", ("layer", "pos", "head"),
    "Patches each key head's k per (layer, pos, head): [n_layers, pos, n_key_value_heads].")
get_act_patch_attn_head_v_by_pos = _sweep(
    layer_pos_head_vector_patch_setter, "v", ("layer", "pos", "head"),
    "Patches each value head's v per (layer, pos, head): [n_layers, pos, n_key_value_heads].")
get_act_patch_attn_head_pattern_by_pos = _sweep(
    layer_head_pos_pattern_patch_setter, "pattern", ("layer", "head_index", "dest_pos"),
    "Patches each head's pattern row per (layer, head, dest_pos): [n_layers, n_heads, pos].")
get_act_patch_attn_head_pattern_dest_src_pos = _sweep(
    layer_head_dest_src_pos_pattern_patch_setter, "pattern",
    ("layer", "head_index", "dest_pos", "src_pos"),
    "Patches each pattern entry: [n_layers, n_heads, pos, pos] (Python hooks).")
get_act_patch_attn_head_out_all_pos = _sweep(
    layer_head_vector_patch_setter, "z", ("layer", "head"),
    "Patches each head's z at every position: [n_layers, n_heads].")
get_act_patch_attn_head_q_all_pos = _sweep(
    layer_head_vector_patch_setter, "q", ("layer", "head"),
    "Patches each head's q at every position: [n_layers, n_heads].")
get_act_patch_attn_head_k_all_pos = _sweep(
    layer_head_vector_patch_setter, "k", ("layer", "head"),
    "Patches each key head's k at every position: [n_layers, n_key_value_heads].")
get_act_patch_attn_head_v_all_pos = _sweep(
    layer_head_vector_patch_setter, "v", ("layer", "head"),
    "Patches each value head's v at every position: [n_layers, n_key_value_heads].")
get_act_patch_attn_head_pattern_all_pos = _sweep(
    layer_head_pattern_patch_setter, "pattern", ("layer", "head_index"),
    "Patches each head's whole pattern: [n_layers, n_heads].")


def get_act_patch_block_every(model, corrupted_tokens: torch.Tensor, clean_cache,
                              metric: Callable[[torch.Tensor], torch.Tensor],
                              patches_per_forward: int = 1) -> torch.Tensor:
    """resid_pre, attn_out and mlp_out patched per (layer, pos): [3, n_layers, pos]."""
    return torch.stack([
        sweep(model, corrupted_tokens, clean_cache, metric, patches_per_forward=patches_per_forward)
        for sweep in (get_act_patch_resid_pre, get_act_patch_attn_out, get_act_patch_mlp_out)
    ], dim=0)


def _pad_heads(results: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Zero-pads the last (head) dim of a key/value sweep to n_heads, as TL does for GQA."""
    return torch.nn.functional.pad(results, (0, n_heads - results.size(-1)))


def get_act_patch_attn_head_all_pos_every(model, corrupted_tokens: torch.Tensor, clean_cache,
                                          metric: Callable[[torch.Tensor], torch.Tensor],
                                          patches_per_forward: int = 1) -> torch.Tensor:
    """z, q, k, v and pattern of each head patched at every position: [5, n_layers, n_heads]
    (k and v have n_key_value_heads entries, zero-padded to n_heads)."""
    kw = {"patches_per_forward": patches_per_forward}
    n_heads = model.cfg.n_heads
    return torch.stack([
        get_act_patch_attn_head_out_all_pos(model, corrupted_tokens, clean_cache, metric, **kw),
        get_act_patch_attn_head_q_all_pos(model, corrupted_tokens, clean_cache, metric, **kw),
        _pad_heads(get_act_patch_attn_head_k_all_pos(model, corrupted_tokens, clean_cache, metric, **kw), n_heads),
        _pad_heads(get_act_patch_attn_head_v_all_pos(model, corrupted_tokens, clean_cache, metric, **kw), n_heads),
        get_act_patch_attn_head_pattern_all_pos(model, corrupted_tokens, clean_cache, metric, **kw),
    ], dim=0)


def get_act_patch_attn_head_by_pos_every(model, corrupted_tokens: torch.Tensor, clean_cache,
                                         metric: Callable[[torch.Tensor], torch.Tensor],
                                         patches_per_forward: int = 1) -> torch.Tensor:
    """z, q, k, v and pattern of each head patched per position: [5, n_layers, pos, n_heads]
    (k and v zero-padded to n_heads; the pattern sweep's [layer, head, pos] moved to
    [layer, pos, head])."""
    kw = {"patches_per_forward": patches_per_forward}
    n_heads = model.cfg.n_heads
    return torch.stack([
        get_act_patch_attn_head_out_by_pos(model, corrupted_tokens, clean_cache, metric, **kw),
        get_act_patch_attn_head_q_by_pos(model, corrupted_tokens, clean_cache, metric, **kw),
        _pad_heads(get_act_patch_attn_head_k_by_pos(model, corrupted_tokens, clean_cache, metric, **kw), n_heads),
        _pad_heads(get_act_patch_attn_head_v_by_pos(model, corrupted_tokens, clean_cache, metric, **kw), n_heads),
        get_act_patch_attn_head_pattern_by_pos(model, corrupted_tokens, clean_cache, metric,
                                               **kw).transpose(1, 2),
    ], dim=0)
