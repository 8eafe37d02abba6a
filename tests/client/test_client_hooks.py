"""Hooks: TransformerLens idioms with Python callables and remotelens.ops, against the reference."""
import functools

import pytest
import torch

import remotelens
from remotelens import ops
from client_helpers import assert_close

CLEAN = "The cat sat on the mat."
CORRUPT = "The dog sat on the rug."


def test_lambda_setitem_ablation_of_a_head(model, reference):
    # TL idiom: a lambda that edits the activation in place and returns None.
    tokens = model.to_tokens(CLEAN)
    logits = model.run_with_hooks(tokens, fwd_hooks=[
        ("blocks.1.attn.hook_z", lambda z, hook: z.__setitem__((slice(None), slice(None), 2), 0))])
    expected, _ = reference.forward(tokens, ops=[{"hook": "blocks.1.attn.hook_z", "op": "zero", "heads": [2]}])
    assert_close(logits, expected)
    assert not model.hook_dict["blocks.1.attn.hook_z"].fwd_hooks  # removed after the run


def test_hook_returning_a_new_tensor(model, reference):
    tokens = model.to_tokens(CLEAN)

    def scale_mlp(post, hook):
        assert hook.name == "blocks.2.mlp.hook_post" and post.shape[-1] == model.cfg.d_mlp
        return post * 0.5

    logits = model.run_with_hooks(tokens, fwd_hooks=[("blocks.2.mlp.hook_post", scale_mlp)])
    expected, _ = reference.forward(tokens, ops=[{"hook": "blocks.2.mlp.hook_post", "op": "scale", "factor": 0.5}])
    assert_close(logits, expected)


def test_observing_hook_sees_the_activation_and_changes_nothing(model, reference):
    tokens = model.to_tokens(CLEAN)
    seen = {}
    logits = model.run_with_hooks(tokens, fwd_hooks=[
        (lambda name: name.endswith("hook_resid_mid"), lambda x, hook: seen.__setitem__(hook.name, x.clone()))])
    expected, ref_cache = reference.forward(tokens)
    assert_close(logits, expected)
    assert sorted(seen) == [f"blocks.{l}.hook_resid_mid" for l in range(model.cfg.n_layers)]
    for name, value in seen.items():
        assert_close(value, ref_cache[name], what=name)


def test_activation_patching_with_partial_over_a_clean_cache(model, reference):
    # TL idiom: patch one position of the residual stream from a clean run with functools.partial.
    clean, corrupt = model.to_tokens(CLEAN), model.to_tokens(CORRUPT)
    _, clean_cache = model.run_with_cache(clean)

    def patch_position(resid, hook, position, clean_cache):
        resid[:, position, :] = clean_cache[hook.name][:, position, :]
        return resid

    layer, position = 1, 2
    patched = model.run_with_hooks(corrupt, fwd_hooks=[(
        f"blocks.{layer}.hook_resid_pre",
        functools.partial(patch_position, position=position, clean_cache=clean_cache))])
    _, ref_clean = reference.forward(clean)
    expected, _ = reference.forward(corrupt, ops=[{"hook": f"blocks.{layer}.hook_resid_pre", "op": "set",
                                                   "tensor": "clean", "positions": [position]}],
                                    hook_tensors={"clean": ref_clean[f"blocks.{layer}.hook_resid_pre"][:, [position]]})
    assert_close(patched, expected)
    # The same patch declared as an op, from the local cache (sent as a set) ...
    by_value = model.run_with_hooks(corrupt, fwd_hooks=[
        (f"blocks.{layer}.hook_resid_pre", ops.patch_from(clean_cache, pos=position))])
    assert_close(by_value, expected)
    # ... and from a cache stored on the server (sent by handle).
    _, stored = model.run_with_cache(clean, names_filter=f"blocks.{layer}.hook_resid_pre", store=True)
    proto = ops.patch_from(stored, pos=position).to_proto(f"blocks.{layer}.hook_resid_pre", model.session_id)
    assert proto.WhichOneof("op") == "patch_from_cache"
    by_handle = model.run_with_hooks(corrupt, fwd_hooks=[
        (f"blocks.{layer}.hook_resid_pre", ops.patch_from(stored, pos=position))])
    assert_close(by_handle, expected)


def test_hooks_context_manager(model, reference):
    tokens = model.to_tokens(CLEAN)
    expected, _ = reference.forward(tokens, ops=[{"hook": "blocks.0.hook_mlp_out", "op": "zero"}])
    with model.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", lambda x, hook: torch.zeros_like(x))]):
        assert len(model.hook_dict["blocks.0.hook_mlp_out"].fwd_hooks) == 1
        assert_close(model(tokens), expected)
        logits, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_mlp_out")
        assert not cache["mlp_out", 0].any()  # the cache sees the hooked value
    assert not model.hook_dict["blocks.0.hook_mlp_out"].fwd_hooks
    clean, _ = reference.forward(tokens)
    assert_close(model(tokens), clean)


def test_add_hook_persists_until_reset_hooks(model, reference):
    tokens = model.to_tokens(CLEAN)
    clean, _ = reference.forward(tokens)
    ablated, _ = reference.forward(tokens, ops=[{"hook": "blocks.2.attn.hook_pattern", "op": "mean"}])
    model.add_hook("blocks.2.attn.hook_pattern", ops.mean())
    assert_close(model(tokens), ablated)
    assert_close(model(tokens), ablated)
    model.reset_hooks()
    assert_close(model(tokens), clean)


@pytest.mark.parametrize("op,ref_op", [
    (ops.zero(pos=[1, -1], head=3), {"op": "zero", "positions": [1, -1], "heads": [3]}),
    (ops.scale(2.0, head=[0, 5]), {"op": "scale", "factor": 2.0, "heads": [0, 5]}),
    (ops.mean(pos=2), {"op": "mean", "positions": [2]}),
    (ops.set(torch.full((16,), 0.25), head=1), {"op": "set", "tensor": "v", "heads": [1]}),
    (ops.add(torch.ones(16), pos=0), {"op": "add", "tensor": "v", "positions": [0]}),
])
def test_ops_on_the_server_and_locally_match_reference(model, reference, op, ref_op):
    tokens = model.to_tokens([CLEAN, CORRUPT])
    hook = "blocks.1.attn.hook_z"
    values = {"v": op.value} if op.value is not None else {}
    expected, _ = reference.forward(tokens, ops=[dict(ref_op, hook=hook)], hook_tensors=values)
    assert_close(model.run_with_hooks(tokens, fwd_hooks=[(hook, op)]), expected, what="server")
    assert_close(model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda z, hook: op(z, hook))]),
                 expected, what="op called as a python hook")


def test_steering_vector_on_every_position(model, reference):
    tokens = model.to_tokens(CLEAN)
    vector = torch.linspace(-1, 1, model.cfg.d_model)
    logits = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_post", ops.add(vector * 3))])
    expected, _ = reference.forward(tokens, ops=[{"hook": "blocks.1.hook_resid_post", "op": "add", "tensor": "v"}],
                                    hook_tensors={"v": vector * 3})
    assert_close(logits, expected)


def test_hooks_on_one_point_apply_in_order_with_prepend(model, reference):
    tokens = model.to_tokens(CLEAN)
    name = "blocks.0.hook_resid_post"
    model.add_hook(name, ops.add(torch.ones(model.cfg.d_model)))
    model.add_hook(name, lambda x, hook: x * 2)             # (x + 1) * 2
    model.add_hook(name, ops.scale(0.5), prepend=True)      # (x / 2 + 1) * 2
    expected, _ = reference.forward(tokens, ops=[
        {"hook": name, "op": "scale", "factor": 0.5}, {"hook": name, "op": "add", "tensor": "one"},
        {"hook": name, "op": "scale", "factor": 2.0}], hook_tensors={"one": torch.ones(model.cfg.d_model)})
    assert_close(model(tokens), expected)


def test_python_hooks_and_caching_across_many_points(model, reference):
    tokens = model.to_tokens([CLEAN, CORRUPT])
    calls = []

    def double_head_0(q, hook):
        calls.append(hook.name)
        q[:, :, 0] *= 2

    with model.hooks(fwd_hooks=[(lambda n: n.endswith("attn.hook_q"), double_head_0)]):
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(("hook_q", "resid_post")))
    ref_ops = [{"hook": f"blocks.{l}.attn.hook_q", "op": "scale", "factor": 2.0, "heads": [0]}
               for l in range(model.cfg.n_layers)]
    expected, ref_cache = reference.forward(tokens, ops=ref_ops)
    assert calls == [f"blocks.{l}.attn.hook_q" for l in range(model.cfg.n_layers)]
    assert_close(logits, expected)
    for name in cache:
        assert_close(cache[name], ref_cache[name], what=name)


def test_hook_exceptions_and_bad_returns_surface_in_python(model):
    tokens = model.to_tokens(CLEAN)

    def boom(x, hook):
        raise ZeroDivisionError("inside the hook")

    with pytest.raises(ZeroDivisionError, match="inside the hook"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", boom)])
    with pytest.raises(ValueError, match="returned shape"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: x[:, :1])])
    with pytest.raises(TypeError, match="return a tensor or None"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: 3)])
    assert model(tokens).shape[1] == tokens.shape[1]  # the model still works afterwards
    with pytest.raises(remotelens.InvalidArgumentError, match="does not broadcast"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", ops.add(torch.ones(3)))])
    with pytest.raises(ValueError, match="no head dimension"):
        ops.zero(head=1)(torch.zeros(1, 2, 3), model.hook_dict["blocks.0.hook_resid_pre"])
    with pytest.raises(ValueError, match="Invalid direction"):
        model.add_hook("hook_embed", lambda x, hook: None, dir="sideways")


def test_bfloat16_server_round_trips_python_hooks(demo_model_dir):
    import server_harness
    with server_harness.ServerProcess(demo_model_dir, config='dtype: "bfloat16"') as server:
        with remotelens.HookedTransformer.from_server(server.address) as bf16:
            assert bf16.cfg.dtype == torch.bfloat16
            tokens = bf16.to_tokens(CLEAN)
            logits, cache = bf16.run_with_cache(tokens, names_filter="blocks.1.attn.hook_z")
            assert cache["z", 1].dtype == torch.bfloat16 and logits.dtype == torch.float32
            by_server = bf16.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", ops.zero(head=2))])
            seen = []
            by_python = bf16.run_with_hooks(tokens, fwd_hooks=[
                ("blocks.1.attn.hook_z", lambda z, hook: seen.append(z.dtype) or z.__setitem__((slice(None), slice(None), 2), 0))])
            assert seen == [torch.bfloat16]
            assert torch.equal(by_server, by_python)
            assert bf16.W_Q.dtype == torch.bfloat16
