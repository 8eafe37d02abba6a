"""Behaviours taken from TransformerLens's documentation and test suite, checked on remotelens.

Each test names the TransformerLens behaviour it mirrors (test file / docstring it comes from).
The tests are written for remotelens's Llama model: TL's examples on GPT-2-style models
(hook_pos_embed, b_U) are adapted to what a Llama has.
"""
import logging

import pytest
import torch

from remotelens import ops, utils
from client_helpers import assert_close

PROMPT = "Hello World!"


class Counter:
    def __init__(self):
        self.count = 0

    def inc(self, *args, **kwargs):
        self.count += 1


def embed(name):
    return name == "hook_embed"


# ------------------------------------------------------------------ utils.get_act_name

def test_get_act_name_docstring_examples():
    # TL utils.get_act_name docstring, "Full Examples".
    assert utils.get_act_name("k", 6, "a") == "blocks.6.attn.hook_k"
    assert utils.get_act_name("pre", 2) == "blocks.2.mlp.hook_pre"
    assert utils.get_act_name("embed") == "hook_embed"
    assert utils.get_act_name("normalized", 27, "ln2") == "blocks.27.ln2.hook_normalized"
    assert utils.get_act_name("k6") == "blocks.6.attn.hook_k"
    assert utils.get_act_name("scale4ln1") == "blocks.4.ln1.hook_scale"
    assert utils.get_act_name("pre5") == "blocks.5.mlp.hook_pre"


def test_get_act_name_aliases_and_layer_types():
    # TL get_act_name: act_name_alias and layer_type_alias tables; attn/mlp names force their sublayer.
    assert utils.get_act_name("attn", 1) == "blocks.1.attn.hook_pattern"
    assert utils.get_act_name("attn_logits", 1) == "blocks.1.attn.hook_attn_scores"
    assert utils.get_act_name("key", 0) == "blocks.0.attn.hook_k"
    assert utils.get_act_name("query", 0) == "blocks.0.attn.hook_q"
    assert utils.get_act_name("value", 0) == "blocks.0.attn.hook_v"
    assert utils.get_act_name("mlp_post", 3) == "blocks.3.mlp.hook_post"
    assert utils.get_act_name("mlp_pre", 3) == "blocks.3.mlp.hook_pre"
    assert utils.get_act_name("pre_linear", 3) == "blocks.3.mlp.hook_pre_linear"
    assert utils.get_act_name("z", 2, "m") == "blocks.2.attn.hook_z"  # attention names ignore layer_type
    assert utils.get_act_name("resid_pre", 2, "b") == "blocks.2.hook_resid_pre"
    assert utils.get_act_name("resid_mid", 2, "block") == "blocks.2.hook_resid_mid"
    assert utils.get_act_name("rot_q", 1) == "blocks.1.attn.hook_rot_q"
    assert utils.get_act_name("resid_post", 0) == "blocks.0.hook_resid_post"
    assert utils.get_act_name("mlp_out", 1) == "blocks.1.hook_mlp_out"
    assert utils.get_act_name("attn_out", 1) == "blocks.1.hook_attn_out"


def test_get_act_name_full_names_and_final_norm():
    # TL get_act_name: full names pass through; scale/normalized without a layer mean ln_final.
    assert utils.get_act_name("blocks.3.attn.hook_z") == "blocks.3.attn.hook_z"
    assert utils.get_act_name("hook_embed") == "hook_embed"
    assert utils.get_act_name("scale") == "ln_final.hook_scale"
    assert utils.get_act_name("normalized") == "ln_final.hook_normalized"
    assert utils.get_act_name("scale", 2, "ln2") == "blocks.2.ln2.hook_scale"


def test_slice_modes():
    # TL utils.Slice docstring: int drops the dim, tuple is a slice, list takes indices, None is identity.
    x = torch.arange(10)
    assert utils.Slice(0).apply(x).item() == 0
    assert utils.Slice((1, 5)).apply(x).tolist() == [1, 2, 3, 4]
    assert utils.Slice((1, 5, 2)).apply(x).tolist() == [1, 3]
    assert utils.Slice([1, 4, 5]).apply(x).tolist() == [1, 4, 5]
    assert torch.equal(utils.Slice(None).apply(x), x)
    assert utils.Slice.unwrap(3).apply(x).tolist() == [3]  # unwrap keeps the dimension
    assert utils.Slice((2,)).indices(10).tolist() == [0, 1]


# ------------------------------------------------------------------ ActivationCache indexing

def test_cache_tuple_and_negative_indexing(model):
    # TL ActivationCache.__getitem__: (name, layer[, layer_type]) tuples and negative layers.
    _, cache = model.run_with_cache(PROMPT)
    n = model.cfg.n_layers
    assert cache["pattern", 1] is cache["blocks.1.attn.hook_pattern"]
    assert cache["attn", 1] is cache["blocks.1.attn.hook_pattern"]
    assert cache["resid_post", -1] is cache[f"blocks.{n - 1}.hook_resid_post"]
    assert cache["z", 1, "attn"] is cache["blocks.1.attn.hook_z"]
    assert cache["scale", 0, "ln1"] is cache["blocks.0.ln1.hook_scale"]
    assert cache["normalized"] is cache["ln_final.hook_normalized"]
    # remotelens extension (TL raises here): a sublayer name in place of the layer.
    assert cache["normalized", "ln_final"] is cache["ln_final.hook_normalized"]
    assert cache["scale", "ln_final"] is cache["ln_final.hook_scale"]
    assert cache["embed"] is cache["hook_embed"]
    assert ("resid_pre", 0) in cache and "blocks.0.hook_resid_pre" in cache and "nope" not in cache


def test_cache_keys_are_in_forward_order(model):
    # TL ActivationCache.keys docstring / tests/integration/test_cache_hook_names.py.
    _, cache = model.run_with_cache(PROMPT)
    keys = list(cache.keys())
    assert keys[:3] == ["hook_embed", "blocks.0.hook_resid_pre", "blocks.0.ln1.hook_scale"]
    # TransformerLens >= 3.0 components/unembed.py: unembed.hook_in / hook_out come last.
    assert keys[-4:] == ["ln_final.hook_scale", "ln_final.hook_normalized", "unembed.hook_in",
                         "unembed.hook_out"]
    assert "blocks.0.attn.hook_result" not in keys  # only with use_attn_result, as in TL
    assert len(cache) == len(keys) and list(iter(cache)) == keys
    assert [k for k, _ in cache.items()] == keys and len(list(cache.values())) == len(keys)
    assert repr(cache).startswith("ActivationCache with keys ['hook_embed'")


def test_cache_iteration_filter_example(model):
    # TL ActivationCache.__iter__ docstring: loop over the cache's names.
    _, cache = model.run_with_cache(PROMPT)
    interesting = [k for k in cache if not k.startswith("blocks.") or k.startswith("blocks.0")]
    assert interesting[:3] == ["hook_embed", "blocks.0.hook_resid_pre", "blocks.0.ln1.hook_scale"]


def test_remove_batch_dim_twice_only_warns(model, caplog):
    # TL ActivationCache.remove_batch_dim: a second call logs a warning and changes nothing.
    _, cache = model.run_with_cache(PROMPT, names_filter="hook_embed", remove_batch_dim=True)
    shape = cache["embed"].shape
    with caplog.at_level(logging.WARNING):
        cache.remove_batch_dim()
    assert "already" in caplog.text and cache["embed"].shape == shape and len(shape) == 2


def test_accumulated_resid_and_head_labels(model):
    # TL accumulated_resid docstring (labels "0_pre" ... "final_post") and stack_head_results ("L0H0").
    _, cache = model.run_with_cache(PROMPT)
    _, labels = cache.accumulated_resid(return_labels=True)
    assert labels[0] == "0_pre" and labels[-1] == "final_post" and len(labels) == model.cfg.n_layers + 1
    _, head_labels = cache.stack_head_results(return_labels=True)
    assert head_labels[:2] == ["L0H0", "L0H1"] and head_labels[-1] == f"L{model.cfg.n_layers - 1}H{model.cfg.n_heads - 1}"


# ------------------------------------------------------------------ run_with_cache

def test_names_filter_str_list_function(model):
    # TL HookedRootModule.run_with_cache: names_filter is None, a str, a list of str, or a function.
    name = "blocks.0.hook_resid_post"
    assert list(model.run_with_cache(PROMPT, names_filter=name)[1].keys()) == [name]
    assert list(model.run_with_cache(PROMPT, names_filter=[name])[1].keys()) == [name]
    assert list(model.run_with_cache(PROMPT, names_filter=lambda n: n == name)[1].keys()) == [name]


def test_pos_slice_int_keeps_the_pos_dimension(model):
    # TL tests/integration/test_cache_pos_slice.py: an int pos_slice gives a length-1 pos dimension.
    _, full = model.run_with_cache(PROMPT, return_type=None)
    for i in [0, 2, -1]:
        _, sliced = model.run_with_cache(PROMPT, return_type=None, pos_slice=i)
        assert sliced["embed"].shape == (1, 1, model.cfg.d_model)
        assert sliced["q", 0].shape == (1, 1, model.cfg.n_heads, model.cfg.d_head)
        assert_close(sliced["resid_post", 1][0, 0], full["resid_post", 1][0, i])
        assert_close(sliced["z", 2][0, 0], full["z", 2][0, i])
        assert_close(sliced["pattern", 1][0, :, 0], full["pattern", 1][0, :, i])


def test_conditional_hook_result(model):
    # TL tests/integration/test_hooks.py::test_conditional_hooks: hook_result needs set_use_attn_result.
    with pytest.raises(AssertionError):
        model.add_hook("blocks.0.attn.hook_result", lambda z, hook: z)
    model.set_use_attn_result(True)
    model.add_hook("blocks.0.attn.hook_result", lambda z, hook: z)
    model.reset_hooks()
    cache = model.run_with_cache(PROMPT, names_filter=lambda n: n == "blocks.0.attn.hook_result")[1]
    assert list(cache.keys()) == ["blocks.0.attn.hook_result"]
    pos = model.to_tokens(PROMPT).shape[1]
    assert cache["blocks.0.attn.hook_result"].shape == (1, pos, model.cfg.n_heads, model.cfg.d_model)


# ------------------------------------------------------------------ hook lifecycle (tests/integration/test_hooks.py)

def test_hook_attaches_normally(model):
    # TL test_hook_attaches_normally.
    c = Counter()
    model.run_with_hooks(PROMPT, fwd_hooks=[(embed, c.inc)])
    assert all(len(hp.fwd_hooks) == 0 for hp in model.hook_dict.values())
    assert c.count == 1


def test_perma_hook_attaches_normally(model):
    # TL test_perma_hook_attaches_normally.
    c = Counter()
    model.add_perma_hook(embed, c.inc)
    assert len(model.hook_dict["hook_embed"].fwd_hooks) == 1
    model.run_with_hooks(PROMPT, fwd_hooks=[])
    assert len(model.hook_dict["hook_embed"].fwd_hooks) == 1
    assert c.count == 1


def test_hook_context_manager(model):
    # TL test_hook_context_manager.
    c = Counter()
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        assert len(model.hook_dict["hook_embed"].fwd_hooks) == 1
        model.forward(PROMPT)
    assert len(model.hook_dict["hook_embed"].fwd_hooks) == 0
    assert c.count == 1


def test_nested_hook_context_manager(model):
    # TL test_nested_hook_context_manager.
    c = Counter()
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        model.forward(PROMPT)
        assert c.count == 1
        with model.hooks(fwd_hooks=[(embed, c.inc)]):
            assert len(model.hook_dict["hook_embed"].fwd_hooks) == 2
            model.forward(PROMPT)
            assert c.count == 3
        assert len(model.hook_dict["hook_embed"].fwd_hooks) == 1
    assert len(model.hook_dict["hook_embed"].fwd_hooks) == 0
    assert c.count == 3


def test_context_manager_run_with_cache(model):
    # TL test_context_manager_run_with_cache.
    c = Counter()
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        model.run_with_cache(PROMPT)
        assert len(model.hook_dict["hook_embed"].fwd_hooks) == 1
    assert len(model.hook_dict["hook_embed"].fwd_hooks) == 0
    assert c.count == 1


def test_hook_context_manager_with_permanent_hook(model):
    # TL test_hook_context_manager_with_permanent_hook.
    c = Counter()
    model.add_perma_hook(embed, c.inc)
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        assert len(model.hook_dict["hook_embed"].fwd_hooks) == 2
        model.forward(PROMPT)
    assert len(model.hook_dict["hook_embed"].fwd_hooks) == 1
    assert c.count == 2


def test_nested_context_manager_with_failure(model):
    # TL test_nested_context_manager_with_failure: the hook's exception reaches the caller.
    def fail_hook(z, hook):
        raise ValueError("fail")

    c = Counter()
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        with pytest.raises(ValueError, match="fail"):
            with model.hooks(fwd_hooks=[(embed, fail_hook)]):
                assert len(model.hook_dict["hook_embed"].fwd_hooks) == 2
                model.forward(PROMPT)
        assert len(model.hook_dict["hook_embed"].fwd_hooks) == 1
        assert c.count == 1
    assert len(model.hook_dict["hook_embed"].fwd_hooks) == 0


def test_reset_hooks_in_context_manager(model):
    # TL test_reset_hooks_in_context_manager.
    c = Counter()
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        model.reset_hooks()
        assert len(model.hook_dict["hook_embed"].fwd_hooks) == 0
    assert len(model.hook_dict["hook_embed"].fwd_hooks) == 0


def test_remove_hook(model):
    # TL test_remove_hook: permanent hooks survive remove_all_hook_fns without the flag.
    c = Counter()
    model.add_perma_hook(embed, c.inc)
    model.remove_all_hook_fns()
    assert len(model.hook_dict["hook_embed"].fwd_hooks) == 1
    model.remove_all_hook_fns(including_permanent=True)
    assert len(model.hook_dict["hook_embed"].fwd_hooks) == 0
    model.run_with_hooks(PROMPT, fwd_hooks=[])
    assert c.count == 0


@pytest.mark.parametrize("zero_attach_pos,prepend", [(z, p) for z in range(2) for p in (True, False)])
def test_prepending_hooks(model, zero_attach_pos, prepend):
    # TL test_prepending_hooks, on the last block: when the zeroing hook runs last the final
    # residual is zero, and an RMSNorm model's logits are then exactly zero.
    def set_to_zero(z, hook):
        z[:] = 0.0
        return z

    def set_to_randn(z, hook):
        return torch.randn_like(z) * 0.1

    name = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    for hook_idx in range(2):
        model.add_hook(name, set_to_zero if hook_idx == zero_attach_pos else set_to_randn, prepend=prepend)
    logits = model(torch.arange(5)[None, :])
    logits_are_zero = (zero_attach_pos == 1) != prepend
    assert bool(torch.all(logits == 0)) == logits_are_zero


def test_hook_function_signature_and_context(model):
    # TL HookPoint: hooks are called fn(activation, hook=hook_point); hook.ctx persists until
    # clear_contexts; hook.layer() gives the block index.
    seen = []

    def remember(x, hook):
        hook.ctx["calls"] = hook.ctx.get("calls", 0) + 1
        seen.append((hook.name, hook.layer(), hook.ctx["calls"]))

    model.add_hook("blocks.2.hook_resid_pre", remember)
    model(PROMPT)
    model(PROMPT)
    assert seen == [("blocks.2.hook_resid_pre", 2, 1), ("blocks.2.hook_resid_pre", 2, 2)]
    model.reset_hooks()  # clear_contexts=True by default
    assert model.hook_dict["blocks.2.hook_resid_pre"].ctx == {}


# ------------------------------------------------------------------ forward and tokens

def test_forward_return_types(model):
    # TL HookedTransformer.forward docstring: return_type None / "loss" / "both" / loss_per_token.
    tokens = model.to_tokens(PROMPT)
    assert model(tokens, return_type=None) is None
    logits, loss = model(tokens, return_type="both")
    assert logits.shape == (1, tokens.shape[1], model.cfg.d_vocab) and loss.shape == ()
    assert model(tokens, return_type="loss", loss_per_token=True).shape == (1, tokens.shape[1] - 1)


def test_stop_and_start_at_layer(model):
    # TL forward docstring: stop_at_layer=0 only runs the embedding; start_at_layer=-1 runs
    # only the final block (and unembed) from that block's input residual.
    tokens = model.to_tokens(PROMPT)
    logits, cache = model.run_with_cache(tokens)
    assert_close(model(tokens, stop_at_layer=0), cache["embed"])
    assert_close(model(cache["resid_pre", -1], start_at_layer=-1), logits)


def test_to_single_token_and_str_tokens(model):
    # TL to_single_token (asserts on multi-token strings) and to_str_tokens (prepend_bos).
    with pytest.raises(AssertionError, match="not a single token"):
        model.to_single_token("Hello World, this is several tokens")
    with_bos = model.to_str_tokens(PROMPT)
    without = model.to_str_tokens(PROMPT, prepend_bos=False)
    assert with_bos[1:] == without and len(with_bos) == model.to_tokens(PROMPT).shape[1]
    assert model.to_single_token(without[0]) == model.to_tokens(PROMPT, prepend_bos=False)[0, 0]


def test_gqa_w_k_is_repeated_per_query_head(model):
    # TL GroupedQueryAttention: W_K/W_V are _W_K/_W_V repeat_interleave'd to n_heads.
    group = model.cfg.n_heads // model.cfg.n_key_value_heads
    assert torch.equal(model.W_K, torch.repeat_interleave(model._W_K, group, dim=1))
    assert torch.equal(model.W_V, torch.repeat_interleave(model._W_V, group, dim=1))


def test_ops_are_plain_hook_functions_too(model):
    # TL hook semantics: a hook returning a tensor replaces the activation; remotelens.ops ops
    # follow the same contract when called locally, so the same list runs on TL.
    x = torch.ones(1, 3, model.cfg.n_heads, model.cfg.d_head)
    out = ops.zero(head=1)(x, model.hook_dict["blocks.0.attn.hook_z"])
    assert out[:, :, 1].abs().sum() == 0 and out[:, :, 0].sum() == 3 * model.cfg.d_head and x.sum() == x.numel()
