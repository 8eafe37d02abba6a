"""Opt-in hook points and the server's hook listing, from the Python client.

TransformerLens behaviour cited (TransformerLensOrg/TransformerLens main @4cd36aa):
  - transformer_lens/HookedTransformer.py: set_use_split_qkv_input, set_use_hook_mlp_in,
    set_use_attn_in (asserts no grouped-query attention), check_hooks_to_add (an opt-in hook
    point refuses hooks while its flag is off);
  - transformer_lens/components/transformer_block.py: hook_q/k/v_input are resid_pre repeated
    per head (k and v over n_key_value_heads), each through ln1 on its own; hook_mlp_in is
    resid_mid before ln2;
  - transformer_lens/components/unembed.py: unembed.hook_in (ln_final's output) and
    unembed.hook_out (the logits);
  - transformer_lens/model_bridge/bridge.py: TransformerBridge.set_use_attn_in and
    set_use_split_qkv_input are mutually exclusive; attn_in works with grouped-query attention.
Values are checked against the independent float32 reference in tests/reference.
"""
import pytest
import torch

import remotelens
from remotelens import ops
from client_helpers import assert_close

PROMPT = "The cat sat on the mat."




def test_split_qkv_input_needs_its_flag(model):
    tokens = model.to_tokens(PROMPT)
    with pytest.raises(AssertionError, match="use_split_qkv_input is False"):
        model.add_hook("blocks.0.hook_q_input", lambda x, hook: x)
    _, cache = model.run_with_cache(tokens)
    assert not any(k.endswith(("hook_q_input", "hook_k_input", "hook_v_input")) for k in cache.keys())
    model.set_use_split_qkv_input(True)
    model.add_hook("blocks.0.hook_q_input", lambda x, hook: x)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith("blocks.1.hook_"))
    c, pos = model.cfg, tokens.shape[1]
    assert cache["blocks.1.hook_q_input"].shape == (1, pos, c.n_heads, c.d_model)
    assert cache["blocks.1.hook_k_input"].shape == (1, pos, c.n_key_value_heads, c.d_model)
    for head in range(c.n_heads):
        assert torch.equal(cache["blocks.1.hook_q_input"][:, :, head], cache["blocks.1.hook_resid_pre"])


def test_split_qkv_edits_match_the_reference(model, reference):
    model.set_use_split_qkv_input(True)
    tokens = model.to_tokens(PROMPT)

    def double_k_head_1(k_input, hook):  # a Python hook, called back by the server
        k_input[:, :, 1] = 2 * k_input[:, :, 1] + 1.0
        return k_input

    logits = model.run_with_hooks(tokens, fwd_hooks=[
        ("blocks.1.hook_k_input", double_k_head_1),
        ("blocks.2.hook_v_input", ops.zero(head=0)),
        ("blocks.0.hook_q_input", ops.scale(-1.0, pos=[1, 2], head=[3]))])
    d = torch.zeros(model.cfg.n_key_value_heads, model.cfg.d_model)
    d[1] = 1.0
    expected, _ = reference.forward(tokens, flags=["use_split_qkv_input"], hook_tensors={"d": d}, ops=[
        {"hook": "blocks.1.hook_k_input", "op": "scale", "factor": 2.0, "heads": [1]},
        {"hook": "blocks.1.hook_k_input", "op": "add", "tensor": "d"},
        {"hook": "blocks.2.hook_v_input", "op": "zero", "heads": [0]},
        {"hook": "blocks.0.hook_q_input", "op": "scale", "factor": -1.0, "positions": [1, 2], "heads": [3]}])
    clean, _ = reference.forward(tokens)
    assert (expected - clean).abs().max() > 1e-3
    assert_close(logits, expected, what="split-qkv edits")


def test_hook_mlp_in_edits_reach_only_the_mlp(model, reference):
    tokens = model.to_tokens(PROMPT)
    with pytest.raises(AssertionError, match="use_hook_mlp_in is False"):
        model.add_hook("blocks.2.hook_mlp_in", ops.scale(0.0))
    model.set_use_hook_mlp_in(True)
    model.add_hook("blocks.2.hook_mlp_in", ops.scale(0.5, pos=-1))
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith("blocks.2.hook_"))
    expected, ref_cache = reference.forward(tokens, flags=["use_hook_mlp_in"], ops=[
        {"hook": "blocks.2.hook_mlp_in", "op": "scale", "factor": 0.5, "positions": [-1]}])
    assert_close(logits, expected)
    assert torch.equal(cache["blocks.2.hook_mlp_in"][:, :-1], cache["blocks.2.hook_resid_mid"][:, :-1])
    assert_close(cache["blocks.2.hook_resid_mid"], ref_cache["blocks.2.hook_resid_mid"])


def test_attn_in_follows_each_transformer_lens_version(model, bridge, reference):
    # TL3 refuses use_attn_in with grouped-query attention; TL4's bridge allows it, keys and
    # values reading the first n_key_value_heads copies; TL4 refuses it together with split inputs.
    assert model.cfg.n_key_value_heads < model.cfg.n_heads
    with pytest.raises(AssertionError, match="GroupedQueryAttention"):
        model.set_use_attn_in(True)
    tokens = bridge.to_tokens(PROMPT)
    bridge.set_use_attn_in(True)
    with pytest.raises(ValueError, match="mutually exclusive"):
        bridge.set_use_split_qkv_input(True)
    logits = bridge.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_attn_in", ops.zero(head=[0, 5]))])
    expected, _ = reference.forward(tokens, flags=["use_attn_in"], ops=[
        {"hook": "blocks.1.hook_attn_in", "op": "zero", "heads": [0, 5]}])
    assert_close(logits, expected, what="attn_in")
    bridge.set_use_attn_in(False)
    bridge.set_use_split_qkv_input(True)
    with pytest.raises(ValueError, match="mutually exclusive"):
        bridge.set_use_attn_in(True)


def test_unembed_hooks_are_the_final_norm_output_and_the_logits(model, reference):
    tokens = model.to_tokens(PROMPT)
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith(("unembed", "ln_final")))
    assert torch.equal(cache["unembed.hook_out"], logits)
    assert_close(cache["unembed.hook_in"], cache["ln_final.hook_normalized"] * reference.w["model.norm.weight"])
    doubled = model.run_with_hooks(tokens, fwd_hooks=[("unembed.hook_out", lambda x, hook: 2 * x)])
    assert_close(doubled, 2 * logits)


def test_supported_hook_points_list_the_servers_hook_points(model, bridge):
    listed = {h.name: h for h in model.supported_hook_points()}
    assert list(listed) == list(model.hook_dict)  # every hook point once, forward order
    q_input = listed["blocks.0.hook_q_input"]
    assert q_input.aliases == ("blocks.0.attn.hook_q_input",)
    assert q_input.dims == ("batch", "pos", "head_index", "d_model")
    assert (q_input.pos_dim, q_input.head_dim) == (1, 2)
    assert q_input.shape == (-1, -1, model.cfg.n_heads, model.cfg.d_model)
    assert q_input.enabled_by == "use_split_qkv_input" and not q_input.enabled
    model.set_use_split_qkv_input(True)
    assert {h.name: h for h in model.supported_hook_points()}["blocks.0.hook_q_input"].enabled
    assert listed["blocks.1.attn.hook_pattern"].dims == ("batch", "head_index", "query_pos", "key_pos")
    assert listed["blocks.1.attn.hook_pattern"].pos_dim == 2
    assert listed["hook_embed"].head_dim is None and listed["hook_embed"].enabled
    assert all(h.supports_backward for h in listed.values())
    # The bridge lists its TL4 names, with the other TL4 name of the same server hook point.
    by_tl4 = {h.name: h for h in bridge.supported_hook_points()}
    assert by_tl4["blocks.0.attn.o.hook_in"].wire_name == "blocks.0.attn.hook_z"
    assert by_tl4["blocks.0.attn.hook_out"].aliases == ("blocks.0.attn.o.hook_out",)
    assert "blocks.0.hook_resid_pre" not in by_tl4


def test_gradients_at_opt_in_hook_points_match_the_reference(model, reference):
    # TransformerLens run_with_cache(incl_bwd=True) keys gradients "<name>_grad"; the per-head
    # copies each get their own head's gradient, summed into resid_pre's.
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    tokens = torch.tensor([[1, 17, 250, 3, 99, 42, 7]])
    names = ["blocks.1.hook_resid_pre", "blocks.1.hook_q_input", "blocks.1.hook_k_input",
             "blocks.1.hook_v_input", "blocks.2.hook_mlp_in", "unembed.hook_in"]
    _, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True, names_filter=names)
    anchor = torch.zeros(1, tokens.shape[1], model.cfg.d_model, requires_grad=True)
    logits, ref_cache = reference.forward(tokens, ops=[{"hook": "hook_embed", "op": "add", "tensor": "a"}],
                                          hook_tensors={"a": anchor},
                                          flags=["use_split_qkv_input", "use_hook_mlp_in"])
    loss = -torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None]).mean()
    grads = torch.autograd.grad(loss, [ref_cache[n] for n in names])
    for name, want in zip(names, grads):
        got = cache[f"{name}_grad"]
        assert got.shape == want.shape, name
        assert float(want.abs().max()) > 0, name
        assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max()), name


def test_client_reads_dims_from_the_listing(model):
    # A HookPoint knows its position and head dims from the server: an op applied locally
    # (TransformerLens-style hook function) and a client-side pos_slice use them.
    hp = model.hook_dict["blocks.0.hook_k_input"]
    assert (hp.pos_dim, hp.head_dim) == (1, 2)
    assert (model.hook_dict["blocks.0.attn.hook_pattern"].pos_dim,
            model.hook_dict["blocks.0.attn.hook_pattern"].head_dim) == (2, 1)
    act = torch.ones(1, 5, model.cfg.n_key_value_heads, model.cfg.d_model)
    out = ops.zero(pos=[-1], head=1)(act, hp)
    assert float(out[0, -1, 1].abs().max()) == 0 and float(out[0, :-1].min()) == 1 and float(out[0, -1, 0].min()) == 1
    model.set_use_split_qkv_input(True)
    tokens = model.to_tokens(PROMPT)
    _, full = model.run_with_cache(tokens, names_filter=["blocks.1.hook_v_input", "blocks.1.attn.hook_pattern"])
    _, sliced = model.run_with_cache(tokens, names_filter=["blocks.1.hook_v_input", "blocks.1.attn.hook_pattern"],
                                     pos_slice=[0, 2])
    assert torch.equal(sliced["blocks.1.hook_v_input"], full["blocks.1.hook_v_input"][:, [0, 2]])
    assert torch.equal(sliced["blocks.1.attn.hook_pattern"], full["blocks.1.attn.hook_pattern"][:, :, [0, 2]])
