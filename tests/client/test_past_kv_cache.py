"""past_kv_cache: TransformerLens's HookedTransformerKeyValueCache with the keys and values kept in
the server session, against the independent reference (tests/reference) and TransformerLens's
documented behaviour:
  - transformer_lens/past_key_value_caching.py: init_cache(cfg, device, batch_size), freeze() /
    unfreeze() (a frozen cache is read, not appended to), the cache mutated in place;
  - TransformerLens tests/unit/test_kv_cache.py (test_single_new_token, test_multiple_new_tokens,
    test_freeze_cache): logits of tokens run after a cached prefix equal the full prompt's logits
    at those positions, and frozen caches give the same result twice without growing;
  - HookedTransformer.forward(past_kv_cache=...): hooks and run_with_cache see only the new
    positions; the attention mask of earlier calls is remembered (left padding in the first chunk).
"""

import pytest
import torch

import remotelens
from remotelens.past_key_value_caching import HookedTransformerKeyValueCache
from client_helpers import assert_close

PROMPT = "The cat sat on the mat and looked at the dog."


def new_cache(model, batch_size=1):
    return HookedTransformerKeyValueCache.init_cache(model.cfg, model.cfg.device, batch_size)


def test_importable_as_in_transformer_lens():
    assert remotelens.HookedTransformerKeyValueCache is HookedTransformerKeyValueCache
    assert remotelens.past_key_value_caching.HookedTransformerKeyValueCache is HookedTransformerKeyValueCache
    cache = HookedTransformerKeyValueCache.init_cache(None, "cpu", batch_size=3)
    assert (cache.batch_size, cache.frozen, cache.length, cache.handle) == (3, False, 0, None)
    assert cache.previous_attention_mask.shape == (3, 0)


@pytest.mark.parametrize("cuts", [(5,), (4, 9)], ids=["2 chunks", "3 chunks"])
def test_split_prompt_equals_full_forward_and_reference(model, reference, cuts):
    tokens = model.to_tokens(PROMPT)
    n = tokens.shape[1]
    assert n > cuts[-1] + 1
    full = model(tokens)
    expected, _ = reference.forward(tokens)
    cache = new_cache(model)
    bounds = (0,) + cuts + (n,)
    pieces = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        logits = model(tokens[:, a:b], past_kv_cache=cache)
        assert logits.shape == (1, b - a, model.cfg.d_vocab)
        assert cache.length == b  # extended in place
        pieces.append(logits)
    assert_close(torch.cat(pieces, dim=1), full, what="chunks vs full forward")
    last = n - cuts[-1]
    assert_close(pieces[-1], expected[:, -last:], what="last chunk vs reference")
    handle = cache.handle
    assert handle is not None
    # The loss of a chunk is the loss of its own next-token predictions.
    cache2 = new_cache(model)
    model(tokens[:, :cuts[0]], past_kv_cache=cache2)
    loss = model(tokens[:, cuts[0]:], return_type="loss", loss_per_token=True, past_kv_cache=cache2)
    assert_close(loss, model(tokens, return_type="loss", loss_per_token=True)[:, cuts[0]:], what="loss")
    freed = cache2.free()
    assert freed > 0 and cache2.handle is None and cache2.length == 0


def test_hooks_and_run_with_cache_see_only_new_positions(model, reference):
    tokens = model.to_tokens(PROMPT)
    n, cut = tokens.shape[1], 6
    new = n - cut
    names = ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_k", "blocks.2.hook_resid_post"]
    _, full_cache = model.run_with_cache(tokens, names_filter=names)
    cache = new_cache(model)
    model(tokens[:, :cut], past_kv_cache=cache)
    cache.freeze()
    _, act_cache = model.run_with_cache(tokens[:, cut:], names_filter=names, past_kv_cache=cache)
    assert act_cache["blocks.0.attn.hook_pattern"].shape == (1, model.cfg.n_heads, new, n)
    assert act_cache["blocks.1.attn.hook_k"].shape == (1, new, model.cfg.n_key_value_heads, model.cfg.d_head)
    assert act_cache["blocks.2.hook_resid_post"].shape == (1, new, model.cfg.d_model)
    assert_close(act_cache["blocks.0.attn.hook_pattern"], full_cache["blocks.0.attn.hook_pattern"][:, :, cut:],
                 what="pattern")
    for name in names[1:]:
        assert_close(act_cache[name], full_cache[name][:, cut:], what=name)
    _, ref_cache = reference.forward(tokens)
    assert_close(act_cache["blocks.2.hook_resid_post"], ref_cache["blocks.2.hook_resid_post"][:, cut:],
                 what="resid_post vs reference")

    # A Python hook (RunInteractive) sees the new positions and its edit applies to them only.
    seen = []

    def double(act, hook):
        seen.append(tuple(act.shape))
        return act * 2

    def double_new(act, hook):
        act = act.clone()
        act[:, cut:] *= 2
        return act

    name = "blocks.1.hook_resid_pre"
    hooked = model.run_with_hooks(tokens[:, cut:], fwd_hooks=[(name, double)], past_kv_cache=cache)
    assert seen == [(1, new, model.cfg.d_model)]
    want = model.run_with_hooks(tokens, fwd_hooks=[(name, double_new)])[:, cut:]
    assert_close(hooked, want, what="hooked new positions")
    assert cache.length == cut  # frozen all along
    cache.free()


def test_frozen_cache_gives_identical_results_without_growing(model, reference):
    tokens = model.to_tokens(PROMPT)
    cut = 5
    cache = new_cache(model)
    model(tokens[:, :cut], past_kv_cache=cache)
    cache.freeze()
    assert cache.frozen
    first = model(tokens[:, cut:], past_kv_cache=cache)
    second = model(tokens[:, cut:], past_kv_cache=cache)
    assert torch.equal(first, second)
    assert cache.length == cut
    expected, _ = reference.forward(tokens)
    assert_close(first, expected[:, cut:], what="frozen vs reference")
    # A different continuation from the same frozen prefix.
    other = model(tokens[:, cut:cut + 2], past_kv_cache=cache)
    assert_close(other, expected[:, cut:cut + 2], what="other continuation")
    cache.unfreeze()
    model(tokens[:, cut:], past_kv_cache=cache)
    assert cache.length == tokens.shape[1]
    cache.free()


def test_left_padded_first_chunk_then_continuation(model, reference):
    prompts = ["Hello", "A dog ran to the park"]
    tokens, mask = model._encode(prompts, padding_side="left")
    assert not bool(mask.all())
    cache = new_cache(model, batch_size=2)
    first = model(tokens, attention_mask=mask, past_kv_cache=cache)
    cont = torch.tensor([[65, 66, 67], [70, 71, 72]])
    logits = model(cont, past_kv_cache=cache)
    assert torch.equal(cache.previous_attention_mask, torch.cat([mask, torch.ones(2, 3, dtype=torch.int64)], 1))
    for row in range(2):
        real = tokens[row][mask[row].bool()]
        alone, _ = reference.forward(torch.cat([real, cont[row]])[None])
        assert_close(logits[row], alone[0, -3:], what=f"row {row} continuation")
        assert_close(first[row][mask[row].bool()], alone[0, :-3], what=f"row {row} prompt")
    # The same with the mask inferred from left padding of token input.
    model.tokenizer.padding_side = "left"
    cache2 = new_cache(model, batch_size=2)
    model(tokens, past_kv_cache=cache2)
    assert_close(model(cont, past_kv_cache=cache2), logits, what="inferred mask")
    cache.free()
    cache2.free()


def test_refusals(model):
    tokens = model.to_tokens(PROMPT)
    cache = new_cache(model)
    model(tokens[:, :4], past_kv_cache=cache)
    with pytest.raises(remotelens.InvalidArgumentError, match="residual input"):
        model(torch.zeros(1, 2, model.cfg.d_model), start_at_layer=1, past_kv_cache=cache)
    with pytest.raises(remotelens.InvalidArgumentError, match="stop_at_layer"):
        model(tokens[:, 4:], stop_at_layer=2, past_kv_cache=cache)
    with pytest.raises(remotelens.InvalidArgumentError, match="backward"):
        model.run_with_cache(tokens[:, 4:], return_type="loss", incl_bwd=True, past_kv_cache=cache)
    with pytest.raises(ValueError, match="made for batch_size=1"):
        model(torch.cat([tokens, tokens])[:, 4:], past_kv_cache=cache)
    cache.batch_size = 2  # past the client's check: the server knows the cache's rows
    with pytest.raises(remotelens.InvalidArgumentError, match="holds 1 rows; this input has 2"):
        model(torch.cat([tokens, tokens])[:, 4:], past_kv_cache=cache)
    cache.batch_size = 1
    with pytest.raises(remotelens.OutOfRangeError, match="n_ctx"):
        model(torch.ones(1, model.cfg.n_ctx - 2, dtype=torch.int64), past_kv_cache=cache)
    with pytest.raises(TypeError, match="HookedTransformerKeyValueCache"):
        model(tokens, past_kv_cache=[])
    model.add_hook("blocks.0.hook_resid_post", lambda grad, hook: None, dir="bwd")
    with pytest.raises(ValueError, match="does not combine with backward hooks"):
        model(tokens[:, 4:], past_kv_cache=cache)
    model.reset_hooks(including_permanent=True)
    assert cache.length == 4  # nothing above changed it
    _, stored = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post", store=True)
    wrong = new_cache(model)
    wrong._model, wrong._handle = model, stored.handle
    with pytest.raises(remotelens.InvalidArgumentError, match="is an activation cache"):
        model(tokens, past_kv_cache=wrong)
    cache.free()
    gone = new_cache(model)
    gone._model, gone._handle = model, "c99999"
    with pytest.raises(remotelens.NotFoundError, match="c99999"):
        model(tokens, past_kv_cache=gone)


def test_quota_exhaustion_leaves_the_cache(demo_model_dir):
    import server_harness
    # 1024 bytes of keys and values per position (4 blocks x 2 x 2 heads x 16 x float32) + mask.
    per_position = 4 * 2 * 2 * 16 * 4 + 8
    config = "limits { max_stored_cache_bytes: %d }" % (6 * per_position)
    with server_harness.ServerProcess(demo_model_dir, config=config) as server:
        model = remotelens.HookedTransformer.from_server(server.address, center_unembed=False)
        try:
            cache = new_cache(model)
            model(torch.tensor([[1, 2, 3, 4]]), past_kv_cache=cache)
            with pytest.raises(remotelens.ResourceExhaustedError, match="would exceed"):
                model(torch.tensor([[5, 6, 7]]), past_kv_cache=cache)
            assert cache.length == 4
            model(torch.tensor([[5, 6]]), past_kv_cache=cache)
            assert cache.length == 6
            cache.free()
            model(torch.tensor([[1, 2, 3, 4, 5, 6]]), past_kv_cache=cache)  # fits again once freed
        finally:
            model.close()
        assert server.stop() == 0, "".join(server.stderr_lines)


def test_cache_belongs_to_one_model(model, demo_server):
    other = remotelens.HookedTransformer.from_server(demo_server.address, center_unembed=False)
    try:
        cache = new_cache(model)
        model(torch.tensor([[1, 2]]), past_kv_cache=cache)
        with pytest.raises(ValueError, match="belongs to another model"):
            other(torch.tensor([[3]]), past_kv_cache=cache)
        cache.free()
    finally:
        other.close()


def test_transformer_bridge_takes_past_kv_cache(demo_server, reference):
    # TransformerBridge shares HookedTransformer's forward, so TL4-style notebooks get it too; its
    # architecture-native hook names see the new positions only.
    bridge = remotelens.TransformerBridge.from_server(demo_server.address)  # raw logits
    try:
        tokens = bridge.to_tokens(PROMPT)
        cache = HookedTransformerKeyValueCache.init_cache(bridge.cfg, bridge.cfg.device, 1)
        bridge(tokens[:, :5], past_kv_cache=cache)
        logits, act = bridge.run_with_cache(tokens[:, 5:], names_filter="blocks.1.hook_out",
                                            past_kv_cache=cache)
        expected, ref_cache = reference.forward(tokens)
        assert_close(logits, expected[:, 5:], what="bridge logits")
        assert_close(act["blocks.1.hook_out"], ref_cache["blocks.1.hook_resid_post"][:, 5:], what="hook_out")
        assert cache.length == tokens.shape[1]
        cache.free()
    finally:
        bridge.close()
