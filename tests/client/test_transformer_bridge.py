"""TransformerBridge: TransformerLens 4 hook names over the same server hook points.

TransformerLens behaviour cited (TransformerLensOrg/TransformerLens main @4cd36aa):
  - names: transformer_lens/model_bridge/supported_architectures/llama.py (component tree),
    generalized_components/{base,block,attention,gated_mlp,normalization}.py (hook points and
    hook_aliases), bridge.py (TransformerBridge.hook_aliases);
  - HookedTransformer names only after enable_compatibility_mode(), which also folds the norms:
    docs/source/content/compatibility_mode.md, bridge.py enable_compatibility_mode;
  - run_with_cache in compatibility mode returns every selected hook under its TL4 name and its
    HookedTransformer alias; a names_filter string or list may name either (bridge.py
    run_with_cache, create_names_filter_fn).
Values are checked against the HookedTransformer client (same server hook points) and the
independent float32 reference in tests/reference.
"""
import functools

import pytest
import torch

import remotelens
from remotelens import ops
from client_helpers import assert_close, reset_bridge

CLEAN = "The cat sat on the mat."
CORRUPT = "The dog sat on the rug."

# TL4 site -> the server's (TL3) site, per block, as the Llama adapter names them.
BLOCK_SITES = {
    "hook_in": "hook_resid_pre",
    "ln1.hook_scale": "ln1.hook_scale",
    "ln1.hook_normalized": "ln1.hook_normalized",
    "attn.hook_attn_in": "hook_attn_in",
    "attn.hook_q_input": "hook_q_input",
    "attn.hook_k_input": "hook_k_input",
    "attn.hook_v_input": "hook_v_input",
    "attn.q.hook_out": "attn.hook_q",
    "attn.k.hook_out": "attn.hook_k",
    "attn.v.hook_out": "attn.hook_v",
    "attn.hook_rot_q": "attn.hook_rot_q",
    "attn.hook_rot_k": "attn.hook_rot_k",
    "attn.hook_attn_scores": "attn.hook_attn_scores",
    "attn.hook_pattern": "attn.hook_pattern",
    "attn.o.hook_in": "attn.hook_z",
    "attn.hook_result": "attn.hook_result",
    "attn.o.hook_out": "hook_attn_out",
    "attn.hook_out": "hook_attn_out",
    "ln2.hook_in": "hook_resid_mid",
    "hook_mlp_in": "hook_mlp_in",
    "ln2.hook_scale": "ln2.hook_scale",
    "ln2.hook_normalized": "ln2.hook_normalized",
    "mlp.gate.hook_out": "mlp.hook_pre",
    "mlp.in.hook_out": "mlp.hook_pre_linear",
    "mlp.out.hook_in": "mlp.hook_post",
    "mlp.out.hook_out": "hook_mlp_out",
    "mlp.hook_out": "hook_mlp_out",
    "hook_out": "hook_resid_post",
}
# TL4 sites that run only with their flag (use_attn_result, use_attn_in, use_split_qkv_input,
# use_hook_mlp_in; TL4 bridge.py set_use_*).
OPT_IN = ("attn.hook_result", "attn.hook_attn_in", "attn.hook_q_input", "attn.hook_k_input",
          "attn.hook_v_input", "hook_mlp_in")


def tl4_to_tl3(model):
    """Every TL4 name the demo server supports -> its server (TL3) name."""
    last = model.cfg.n_layers - 1
    table = {"embed.hook_out": "hook_embed"}
    for layer in range(model.cfg.n_layers):
        for site, wire in BLOCK_SITES.items():
            table[f"blocks.{layer}.{site}"] = f"blocks.{layer}.{wire}"
    table.update({"ln_final.hook_in": f"blocks.{last}.hook_resid_post",
                  "ln_final.hook_scale": "ln_final.hook_scale",
                  "ln_final.hook_normalized": "ln_final.hook_normalized",
                  "unembed.hook_in": "unembed.hook_in", "unembed.hook_out": "unembed.hook_out"})
    return table


@pytest.fixture(scope="module")
def compat_session(demo_server):
    bridge = remotelens.TransformerBridge.from_server(demo_server.address)
    bridge.enable_compatibility_mode()
    yield bridge
    bridge.close()


@pytest.fixture
def compat(compat_session):
    """A TL4 bridge after enable_compatibility_mode()."""
    yield compat_session
    reset_bridge(compat_session)


def test_hook_names_are_the_llama_adapters_tl4_names(bridge, model):
    table = tl4_to_tl3(bridge)
    assert list(bridge.hook_dict) == list(table)  # forward order, nothing else
    for name, hp in bridge.hook_dict.items():
        assert hp.name == name and hp.wire_name == table[name]
        assert hp.shape == model.hook_dict[table[name]].shape, name
    assert bridge.unmapped_server_hooks == []  # every server hook point has a TL4 name
    # HookedTransformer names and TL4 points with no server equivalent are absent.
    for absent in ("hook_embed", "blocks.0.hook_resid_pre", "blocks.0.attn.hook_z",
                   "blocks.0.mlp.hook_in", "blocks.0.ln1.hook_in", "embed.hook_in",
                   "rotary_emb.hook_cos", "ln_final.hook_out"):
        assert absent not in bridge.hook_dict, absent
    assert not bridge.compatibility_mode


def test_full_cache_matches_hooked_transformer_and_reference(bridge, model, reference):
    for m in (bridge, model):
        m.set_use_attn_result(True)
        m.set_use_split_qkv_input(True)
        m.set_use_hook_mlp_in(True)
    tokens = bridge.to_tokens(CLEAN)
    logits, cache = bridge.run_with_cache(tokens)
    ht_logits, ht_cache = model.run_with_cache(tokens)
    ref_logits, ref_cache = reference.forward(tokens, flags=["use_split_qkv_input", "use_hook_mlp_in"])
    table = {k: v for k, v in tl4_to_tl3(bridge).items() if not k.endswith("attn.hook_attn_in")}
    assert list(cache.keys()) == list(table)
    assert torch.equal(logits, ht_logits)
    assert_close(logits, ref_logits, what="logits")
    for name, wire in table.items():
        assert torch.equal(cache[name], ht_cache[wire]), name  # the same server tensor
        assert_close(cache[name], ref_cache[wire], what=name)


def test_default_cache_leaves_out_hook_result_until_enabled(bridge):
    tokens = bridge.to_tokens(CLEAN)
    _, cache = bridge.run_with_cache(tokens)
    assert not any(k.endswith("attn.hook_result") for k in cache.keys())
    assert not any(k.endswith(OPT_IN) for k in cache.keys())
    assert len(cache) == len(bridge.hook_dict) - len(OPT_IN) * bridge.cfg.n_layers


def test_names_filter_forms_with_tl4_names(bridge, model):
    tokens = bridge.to_tokens(CLEAN)
    _, by_str = bridge.run_with_cache(tokens, names_filter="blocks.1.hook_out")
    assert list(by_str.keys()) == ["blocks.1.hook_out"]
    _, by_list = bridge.run_with_cache(tokens, names_filter=["blocks.2.attn.o.hook_in", "embed.hook_out"])
    assert sorted(by_list.keys()) == ["blocks.2.attn.o.hook_in", "embed.hook_out"]
    _, by_fn = bridge.run_with_cache(tokens, names_filter=lambda n: n.endswith("attn.hook_out"))
    assert list(by_fn.keys()) == [f"blocks.{l}.attn.hook_out" for l in range(bridge.cfg.n_layers)]
    _, ht = model.run_with_cache(tokens, names_filter="blocks.2.attn.hook_z")
    assert torch.equal(by_list["blocks.2.attn.o.hook_in"], ht["blocks.2.attn.hook_z"])
    # Without compatibility mode a HookedTransformer name is not a key.
    with pytest.raises(KeyError):
        by_str["blocks.1.hook_resid_post"]


def test_two_tl4_names_of_one_server_hook(bridge, reference):
    # attn.o.hook_out and attn.hook_out are both the attention output (o_proj has no bias):
    # cached under both names, and hooks on both apply, o.hook_out's first.
    tokens = bridge.to_tokens(CLEAN)
    _, cache = bridge.run_with_cache(tokens, names_filter=["blocks.1.attn.o.hook_out", "blocks.1.attn.hook_out"])
    assert torch.equal(cache["blocks.1.attn.o.hook_out"], cache["blocks.1.attn.hook_out"])
    order = []
    logits = bridge.run_with_hooks(tokens, fwd_hooks=[
        ("blocks.1.attn.hook_out", lambda x, hook: order.append(hook.name) or x * 2),
        ("blocks.1.attn.o.hook_out", lambda x, hook: order.append(hook.name) or x * 2)])
    expected, _ = reference.forward(tokens, ops=[{"hook": "blocks.1.hook_attn_out", "op": "scale", "factor": 4.0}])
    assert_close(logits, expected)
    assert order == ["blocks.1.attn.o.hook_out", "blocks.1.attn.hook_out"]


def test_ln_final_hook_in_is_the_last_blocks_output(bridge, reference):
    tokens = bridge.to_tokens(CLEAN)
    last = bridge.cfg.n_layers - 1
    _, cache = bridge.run_with_cache(tokens, names_filter=["ln_final.hook_in", f"blocks.{last}.hook_out"])
    _, ref_cache = reference.forward(tokens)
    assert_close(cache["ln_final.hook_in"], ref_cache[f"blocks.{last}.hook_resid_post"])
    # Zeroing the final norm's input: every logit is 0 (the norm of 0 is 0; no unembed bias).
    logits = bridge.run_with_hooks(tokens, fwd_hooks=[("ln_final.hook_in", ops.zero())])
    assert_close(logits, torch.zeros_like(logits))


@pytest.mark.parametrize("use_op", [False, True])
def test_head_ablation_by_tl4_name(bridge, reference, use_op):
    tokens = bridge.to_tokens([CLEAN, CORRUPT])
    seen = []

    def ablate(z, hook):
        seen.append((hook.name, tuple(z.shape)))
        z[:, :, 2] = 0

    hook = ops.zero(head=2) if use_op else ablate
    logits = bridge.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.o.hook_in", hook)])
    expected, _ = reference.forward(tokens, ops=[{"hook": "blocks.1.attn.hook_z", "op": "zero", "heads": [2]}])
    assert_close(logits, expected)
    if not use_op:  # the hook sees its TL4 name and TransformerLens's [batch, pos, n_heads, d_head]
        assert seen == [("blocks.1.attn.o.hook_in", (2, tokens.shape[1], bridge.cfg.n_heads, bridge.cfg.d_head))]
    # An op called locally as a Python hook finds the head dimension through the server's name.
    op = ops.zero(head=2)
    local = bridge.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.o.hook_in", lambda z, hook: op(z, hook))])
    assert_close(local, expected)


def test_activation_patching_from_a_tl4_cache(bridge, reference):
    clean, corrupt = bridge.to_tokens(CLEAN), bridge.to_tokens(CORRUPT)
    _, clean_cache = bridge.run_with_cache(clean)
    layer, position = 1, 2
    name = f"blocks.{layer}.hook_in"

    def patch_position(resid, hook, position, clean_cache):
        resid[:, position, :] = clean_cache[hook.name][:, position, :]
        return resid

    _, ref_clean = reference.forward(clean)
    expected, _ = reference.forward(corrupt, ops=[{"hook": f"blocks.{layer}.hook_resid_pre", "op": "set",
                                                   "tensor": "clean", "positions": [position]}],
                                    hook_tensors={"clean": ref_clean[f"blocks.{layer}.hook_resid_pre"][:, [position]]})
    patched = bridge.run_with_hooks(corrupt, fwd_hooks=[(
        name, functools.partial(patch_position, position=position, clean_cache=clean_cache))])
    assert_close(patched, expected, what="python hook")
    by_value = bridge.run_with_hooks(corrupt, fwd_hooks=[(name, ops.patch_from(clean_cache, pos=position))])
    assert_close(by_value, expected, what="patch_from a local TL4 cache")
    _, stored = bridge.run_with_cache(clean, names_filter=name, store=True, download=False)
    proto = ops.patch_from(stored, name=name, pos=position).to_proto(f"blocks.{layer}.hook_resid_pre",
                                                                    bridge.session_id)
    assert proto.WhichOneof("op") == "patch_from_cache"
    assert proto.patch_from_cache.source_hook_name == f"blocks.{layer}.hook_resid_pre"  # the server's name
    by_handle = bridge.run_with_hooks(corrupt, fwd_hooks=[(name, ops.patch_from(stored, name=name, pos=position))])
    assert_close(by_handle, expected, what="patch_from a stored TL4 cache")
    assert_close(stored[name], ref_clean[f"blocks.{layer}.hook_resid_pre"], what="lazy read")


def test_add_hook_and_hooks_context_with_tl4_names(bridge, reference):
    tokens = bridge.to_tokens(CLEAN)
    clean, _ = reference.forward(tokens)
    zeroed, _ = reference.forward(tokens, ops=[{"hook": "blocks.0.hook_mlp_out", "op": "zero"}])
    bridge.add_hook("blocks.0.mlp.hook_out", ops.zero())
    assert_close(bridge(tokens), zeroed)
    bridge.reset_hooks()
    assert_close(bridge(tokens), clean)
    with bridge.hooks(fwd_hooks=[(lambda n: n == "blocks.0.mlp.hook_out", lambda x, hook: torch.zeros_like(x))]):
        assert len(bridge.hook_dict["blocks.0.mlp.hook_out"].fwd_hooks) == 1
        assert_close(bridge(tokens), zeroed)
    assert not bridge.hook_dict["blocks.0.mlp.hook_out"].fwd_hooks
    assert bridge.blocks[0].mlp.hook_out is bridge.hook_dict["blocks.0.mlp.hook_out"]  # module tree
    assert getattr(bridge.blocks[1].attn, "o").hook_in is bridge.hook_dict["blocks.1.attn.o.hook_in"]


def test_unknown_names_give_a_clear_error(bridge):
    tokens = bridge.to_tokens(CLEAN)
    with pytest.raises(KeyError) as legacy:
        bridge.add_hook("blocks.0.hook_resid_pre", ops.zero())
    message = str(legacy.value)
    assert "enable_compatibility_mode()" in message and "blocks.{i}.hook_in" in message
    assert "blocks.{i}.attn.o.hook_in" in message and "{i} in 0..3" in message
    with pytest.raises(ValueError) as left_out:
        bridge.run_with_cache(tokens, names_filter=["blocks.0.mlp.hook_in"])
    assert "does not expose" in str(left_out.value) and "blocks.{i}.mlp.hook_out" in str(left_out.value)
    with pytest.raises(KeyError) as typo:
        bridge.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_zz", ops.zero())])
    assert "'blocks.0.attn.hook_zz' is not a hook point" in str(typo.value)
    assert "enable_compatibility_mode" not in str(typo.value)
    # A TL4 name whose server hook point this server does not list (issue 12 item 1 adds it).
    if "blocks.0.hook_mlp_in" not in bridge._wire_shapes:
        with pytest.raises(KeyError) as unlisted:
            bridge.add_hook("blocks.0.hook_mlp_in", ops.zero())
        assert "stands for the server hook point 'blocks.0.hook_mlp_in'" in str(unlisted.value)
    assert not any(hp.fwd_hooks for hp in bridge.hook_points())  # nothing half-added


def test_compatibility_mode_aliases_resolve_both_ways(compat, model, reference):
    assert compat.compatibility_mode
    layer = 1
    for tl3, tl4 in [("hook_embed", "embed.hook_out"),
                     (f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_in"),
                     (f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.ln2.hook_in"),
                     (f"blocks.{layer}.hook_resid_post", f"blocks.{layer}.hook_out"),
                     (f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.attn.hook_out"),
                     (f"blocks.{layer}.hook_mlp_out", f"blocks.{layer}.mlp.hook_out"),
                     (f"blocks.{layer}.attn.hook_q", f"blocks.{layer}.attn.q.hook_out"),
                     (f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.attn.o.hook_in"),
                     (f"blocks.{layer}.mlp.hook_pre", f"blocks.{layer}.mlp.gate.hook_out"),
                     (f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.mlp.out.hook_in")]:
        assert compat.hook_dict[tl3] is compat.hook_dict[tl4], tl3
    # Every HookedTransformer name of the server is a name here.
    assert set(model.hook_dict) <= set(compat.hook_dict)
    assert compat.blocks[layer].attn.hook_z is compat.blocks[layer].attn.o.hook_in
    # A hook added by one name is seen under the other; the hook gets the TL4 name.
    tokens = compat.to_tokens(CLEAN)
    names = []
    compat.add_hook(f"blocks.{layer}.attn.hook_z", lambda z, hook: names.append(hook.name))
    assert len(compat.hook_dict[f"blocks.{layer}.attn.o.hook_in"].fwd_hooks) == 1
    compat(tokens)
    assert names == [f"blocks.{layer}.attn.o.hook_in"]
    compat.reset_hooks()
    # A filter matching both names of one hook point adds the hook once (scale 2, not 4).
    compat.add_hook(lambda n: n.endswith((f"{layer}.hook_resid_post", f"{layer}.hook_out")), ops.scale(2.0))
    expected, _ = reference.forward(tokens, ops=[{"hook": f"blocks.{layer}.hook_resid_post", "op": "scale", "factor": 2.0}])
    # enable_compatibility_mode() centres W_U (TL4 bridge.py process_weights, center_unembed=True).
    assert_close(compat(tokens), expected - expected.mean(-1, keepdim=True))


def test_compatibility_mode_cache_has_both_schemes(compat, model):
    tokens = compat.to_tokens([CLEAN, CORRUPT])
    _, ht = model.run_with_cache(tokens)
    _, full = compat.run_with_cache(tokens)
    for name, tensor in ht.items():  # every HookedTransformer key, same values
        assert torch.equal(full[name], tensor), name
    for name, wire in tl4_to_tl3(compat).items():
        if not name.endswith(OPT_IN):
            assert torch.equal(full[name], ht[wire]), name
    # A TL3 name in names_filter brings its TL4 name too, and the reverse (bridge.py run_with_cache).
    _, by_tl3 = compat.run_with_cache(tokens, names_filter="blocks.2.hook_resid_post")
    assert sorted(by_tl3.keys()) == ["blocks.2.hook_out", "blocks.2.hook_resid_post"]
    _, by_tl4 = compat.run_with_cache(tokens, names_filter=["blocks.0.attn.o.hook_in"])
    assert sorted(by_tl4.keys()) == ["blocks.0.attn.hook_z", "blocks.0.attn.o.hook_in"]
    _, by_fn = compat.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_mid"))
    assert sorted(by_fn.keys()) == sorted([f"blocks.{l}.hook_resid_mid" for l in range(compat.cfg.n_layers)]
                                          + [f"blocks.{l}.ln2.hook_in" for l in range(compat.cfg.n_layers)])
    # Shorthand indexing (utils.get_act_name) and the analysis helpers work on the TL3 keys.
    assert torch.equal(full["resid_post", 1], full["blocks.1.hook_out"])
    assert torch.equal(full["z", 0], full["blocks.0.attn.o.hook_in"])
    assert_close(full.accumulated_resid(apply_ln=True), ht.accumulated_resid(apply_ln=True))
    assert_close(full.decompose_resid().sum(0), full["blocks.3.hook_out"])


def test_remove_batch_dim_with_aliases(compat):
    tokens = compat.to_tokens(CLEAN)
    _, cache = compat.run_with_cache(tokens, names_filter="blocks.1.hook_out", remove_batch_dim=True)
    assert cache["blocks.1.hook_out"].shape == (tokens.shape[1], compat.cfg.d_model)
    _, later = compat.run_with_cache(tokens, names_filter="blocks.1.hook_out")
    later.remove_batch_dim()  # each name is sliced once, though both read one tensor
    assert later["blocks.1.hook_out"].shape == later["blocks.1.hook_resid_post"].shape == (
        tokens.shape[1], compat.cfg.d_model)


def test_weights_fold_only_in_compatibility_mode(demo_server, bridge, compat, model):
    # TL4: a bridge starts with the checkpoint's weights; enable_compatibility_mode() folds the
    # norms (fold_ln=True), no_processing=True only registers the names.
    raw = remotelens.HookedTransformer.from_server_no_processing(demo_server.address)
    try:
        assert torch.equal(bridge.W_Q, raw.W_Q) and not bridge.cfg.fold_ln
        assert torch.equal(compat.W_Q, model.W_Q) and compat.cfg.fold_ln
        assert compat.cfg.center_unembed and not bridge.cfg.center_unembed
        assert torch.allclose(compat.W_U.mean(-1), torch.zeros(compat.cfg.d_model), atol=1e-6)
        assert not torch.equal(model.W_Q, raw.W_Q)  # the demo's norm weights are not all 1
        names_only = remotelens.TransformerBridge.from_server(demo_server.address)
        try:
            names_only.enable_compatibility_mode(no_processing=True)
            assert "blocks.0.hook_resid_pre" in names_only.hook_dict
            assert torch.equal(names_only.W_U, raw.W_U)
        finally:
            names_only.close()
    finally:
        raw.close()


def test_gradients_keyed_by_tl4_names(bridge, model):
    tokens = bridge.to_tokens(CLEAN)
    names = ["blocks.1.hook_in", "blocks.2.attn.o.hook_in"]
    loss, cache = bridge.run_with_cache(tokens, return_type="loss", incl_bwd=True, names_filter=names)
    ht_loss, ht = model.run_with_cache(tokens, return_type="loss", incl_bwd=True,
                                       names_filter=["blocks.1.hook_resid_pre", "blocks.2.attn.hook_z"])
    assert_close(loss, ht_loss)
    assert_close(cache["blocks.1.hook_in_grad"], ht["blocks.1.hook_resid_pre_grad"])
    assert_close(cache["blocks.2.attn.o.hook_in_grad"], ht["blocks.2.attn.hook_z_grad"])
    assert cache["blocks.1.hook_in_grad"].abs().sum() > 0


def test_start_at_layer_caches_only_hooks_that_fire(bridge, reference):
    # TransformerLens skips the embedding's hooks when the residual stream is fed in.
    tokens = bridge.to_tokens(CLEAN)
    _, ref_cache = reference.forward(tokens)
    resid = ref_cache["blocks.0.hook_resid_pre"]
    logits, cache = bridge.run_with_cache(resid, start_at_layer=0,
                                          names_filter=["embed.hook_out", "blocks.0.hook_in"])
    assert list(cache.keys()) == ["blocks.0.hook_in"] and "embed.hook_out" not in cache
    assert_close(cache["blocks.0.hook_in"], resid)
    assert_close(logits, reference.forward(tokens)[0])


def test_readme_snippet_runs(demo_server, model):
    # README's Python section shows both entry points; the TransformerBridge block must run.
    import os
    import re
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "TransformerBridge.from_server" in b]
    assert len(blocks) == 1
    namespace = {}
    exec(blocks[0].replace("127.0.0.1:50051", demo_server.address), namespace)
    bridge, cache = namespace["bridge"], namespace["cache"]
    try:
        assert bridge.compatibility_mode
        assert sorted(cache.keys()) == ["blocks.1.hook_out", "blocks.1.hook_resid_post"]
        _, ht = model.run_with_cache("The cat sat", names_filter="blocks.1.hook_resid_post")
        assert torch.equal(namespace["resid"], ht["blocks.1.hook_resid_post"])
    finally:
        bridge.close()


def test_generate_with_a_hook_on_a_tl4_name(bridge, model):
    # Ops registered by TL4 name run on the server at every decode step, as by the TL3 name.
    tokens = bridge.to_tokens(CLEAN)
    steer = torch.linspace(-1, 1, bridge.cfg.d_model)
    with bridge.hooks(fwd_hooks=[("blocks.1.hook_out", ops.add(steer))]):
        got = bridge.generate(tokens, max_new_tokens=4, do_sample=False, verbose=False)
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", ops.add(steer))]):
        want = model.generate(tokens, max_new_tokens=4, do_sample=False, verbose=False)
    plain = model.generate(tokens, max_new_tokens=4, do_sample=False, verbose=False)
    assert torch.equal(got, want)
    assert got.shape == (1, tokens.shape[1] + 4)
    assert not torch.equal(got, plain)  # the hook did change what was generated


def test_tl4_names_come_from_the_servers_listing():
    # One source of truth: the TL4 names are the server's HookInfo.aliases (engine/hook_names).
    # A server hook point without TL4 names is listed as unmapped, not guessed at; a server that
    # sends no aliases at all cannot serve a bridge. No server needed: a fake listing.
    from types import SimpleNamespace
    from remotelens._hooks import HookPointInfo
    from remotelens.transformer_bridge import TransformerBridge

    def info(name, *aliases):
        return HookPointInfo(name, name, aliases, (-1, -1, 8), ("batch", "pos", "d_model"), 1, None,
                             "", True, True)
    fake = object.__new__(TransformerBridge)
    fake.cfg = SimpleNamespace(n_layers=1)
    fake.compatibility_mode = True
    fake._hook_infos = {i.name: i for i in [
        info("hook_embed", "embed.hook_out"), info("blocks.0.hook_q_input", "blocks.0.attn.hook_q_input"),
        info("blocks.0.hook_resid_post", "blocks.0.hook_out", "ln_final.hook_in"),
        info("blocks.0.hook_something_new"), info("unembed.hook_out", "unembed.hook_out")]}
    fake._wire_shapes = {w: i.shape for w, i in fake._hook_infos.items()}
    hook_dict = fake._make_hook_dict()
    assert list(fake._native_hooks) == ["embed.hook_out", "blocks.0.attn.hook_q_input", "blocks.0.hook_out",
                                        "ln_final.hook_in", "unembed.hook_out"]
    assert hook_dict["blocks.0.hook_q_input"] is hook_dict["blocks.0.attn.hook_q_input"]  # BlockBridge alias
    assert hook_dict["hook_unembed"] is hook_dict["unembed.hook_out"]  # bridge.py hook_unembed
    assert hook_dict["ln_final.hook_in"].wire_name == "blocks.0.hook_resid_post"
    assert fake.unmapped_server_hooks == ["blocks.0.hook_something_new"]
    fake._hook_infos = {n: info(n) for n in fake._hook_infos}
    with pytest.raises(RuntimeError, match="aliases"):
        fake._make_hook_dict()


def test_backward_hooks_by_tl4_name(bridge, model):
    # A backward op on blocks.1.hook_in (hook_resid_pre) zeroes every gradient upstream; a Python
    # backward hook sees the gradient under its TL4 name, equal to HookedTransformer's.
    tokens = bridge.to_tokens(CLEAN)
    names = ["embed.hook_out", "blocks.0.hook_out", "blocks.1.ln2.hook_in"]
    bridge.add_hook("blocks.1.hook_in", ops.zero(), dir="bwd")
    _, cache = bridge.run_with_cache(tokens, return_type="loss", incl_bwd=True, names_filter=names)
    assert float(cache["embed.hook_out_grad"].abs().max()) == 0
    assert float(cache["blocks.0.hook_out_grad"].abs().max()) == 0
    assert float(cache["blocks.1.ln2.hook_in_grad"].abs().max()) > 0
    bridge.reset_hooks()
    seen = {}
    bridge.add_hook("blocks.2.attn.o.hook_in", lambda g, hook: seen.__setitem__(hook.name, g.clone()), dir="bwd")
    bridge.run_with_cache(tokens, return_type="loss", incl_bwd=True, names_filter=[])
    _, ht = model.run_with_cache(tokens, return_type="loss", incl_bwd=True, names_filter="blocks.2.attn.hook_z")
    assert list(seen) == ["blocks.2.attn.o.hook_in"]
    assert_close(seen["blocks.2.attn.o.hook_in"], ht["blocks.2.attn.hook_z_grad"])
