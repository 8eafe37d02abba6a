"""Server-side readouts (lens, norm, mean) and ops.add(scale_by=...) against the float32 reference."""
import pytest
import torch

import remotelens
from remotelens import ops, readouts
from remotelens.v1 import remotelens_pb2 as pb
from client_helpers import assert_close, reference_greedy

PROMPT = "The Eiffel Tower is in the city of"


def resid_post_names(model):
    return [f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)]


def unit_unembed_direction(model, token_id):
    direction = model.W_U[:, token_id].float()
    return direction / direction.norm()


def test_all_layer_top10_lens_at_the_last_token_matches_the_reference(model, reference):
    tokens = model.to_tokens(PROMPT)
    names = resid_post_names(model)
    out, (top,) = model.run_with_readouts(tokens, readouts=[readouts.lens(names, pos=-1, top_k=10)],
                                          return_type=None)
    assert out is None
    _, cache = reference.forward(tokens)
    expected = torch.stack([reference.lens(cache[n][:, -1:]) for n in names])  # [L, 1, 1, d_vocab]
    ref_top = expected.topk(10, dim=-1)
    assert top.indices.dtype == torch.int64 and top.values.dtype == torch.float32
    assert top.indices.shape == (model.cfg.n_layers, 1, 1, 10)
    assert_close(top.values, ref_top.values, what="top-10 logits")
    # Ids: the reference's logits at the returned ids are the returned values (robust to ties),
    # and the top-1 of every layer agrees.
    assert_close(expected.gather(-1, top.indices), top.values, what="logits at the returned ids")
    assert torch.equal(top.indices[..., 0], ref_top.indices[..., 0])
    # The last layer's lens is the model's own next-token prediction.
    logits = model(tokens)
    assert int(top.indices[-1, 0, 0, 0]) == int(logits[0, -1].argmax())


def test_all_layer_top10_lens_answer_is_under_10_kib_on_the_wire(model):
    # The whole response stream of one call, as serialized on the wire.
    names = resid_post_names(model)
    request = pb.RunRequest(texts=[PROMPT], prepend_bos=True, return_type=pb.RETURN_TYPE_NONE,
                            readouts=[readouts.lens(names, pos=-1, top_k=10).to_proto()])
    responses = list(model._stub.Run(request))
    total = sum(r.ByteSize() for r in responses)
    payload = sum(len(r.tensor.data) for r in responses if r.WhichOneof("item") == "tensor")
    assert payload == model.cfg.n_layers * 10 * (4 + 8)  # float32 logits + int64 ids
    assert total < 10 * 1024, total
    # An 8B model has 32 layers; the top-k answer's size does not depend on d_vocab or d_model, so
    # the per-layer cost measured here must keep 32 layers under 10 KiB too.
    per_layer = total / model.cfg.n_layers
    assert per_layer * 32 < 10 * 1024, per_layer
    # What it replaces: every layer's full-vocabulary logits at the last token.
    full = pb.RunRequest(texts=[PROMPT], prepend_bos=True, return_type=pb.RETURN_TYPE_NONE,
                         readouts=[readouts.lens(names, pos=-1).to_proto()])
    full_bytes = sum(r.ByteSize() for r in model._stub.Run(full))
    assert full_bytes > model.cfg.n_layers * model.cfg.d_vocab * 4 > total


def test_full_logits_lens_at_mid_and_pre_hooks_and_chosen_positions(model, reference):
    tokens = model.to_tokens(PROMPT)
    names = ["hook_embed", "blocks.0.hook_resid_mid", "blocks.1.hook_resid_pre"]
    _, (logits,) = model.run_with_readouts(tokens, readouts=[readouts.lens(names, pos=[0, -2])])
    _, cache = reference.forward(tokens)
    expected = torch.stack([reference.lens(cache[n][:, [0, -2]]) for n in names])
    assert logits.shape == (3, 1, 2, model.cfg.d_vocab)
    assert_close(logits, expected, what="lens logits")


def test_norm_and_mean_reductions_match_the_reference(model, reference):
    tokens = model.to_tokens(["The cat sat on the mat.", "A dog ran in the park!"])
    names = resid_post_names(model)
    _, (norms, means, z_norm) = model.run_with_readouts(tokens, readouts=[
        readouts.norm(names), readouts.mean(names, pos=[1, 2, -1]),
        readouts.norm("blocks.1.attn.hook_z", pos=-1)])
    _, cache = reference.forward(tokens)
    assert norms.shape == (len(names), 2, tokens.shape[1])
    assert_close(norms, torch.stack([cache[n].norm(dim=-1) for n in names]), atol=1e-3, what="norms")
    assert means.shape == (len(names), 2, model.cfg.d_model)
    assert_close(means, torch.stack([cache[n][:, [1, 2, -1]].mean(dim=1) for n in names]), what="means")
    z = cache["blocks.1.attn.hook_z"][:, -1:]  # [batch, 1, n_heads, d_head]
    assert_close(z_norm, z.norm(dim=-1)[None], what="hook_z norms")


def test_readouts_see_the_hooks_interventions(model, reference):
    tokens = model.to_tokens(PROMPT)
    direction = unit_unembed_direction(model, 5)
    steer = ops.add(4.0 * direction, scale_by="mean_norm")
    names = resid_post_names(model)
    _, (top,) = model.run_with_readouts(tokens, readouts=[readouts.lens(names, pos=-1, top_k=3)],
                                        fwd_hooks=[("blocks.0.hook_resid_post", steer)])
    op = {"hook": "blocks.0.hook_resid_post", "op": "add", "tensor": "d", "scale_by": "mean_norm"}
    _, cache = reference.forward(tokens, ops=[op], hook_tensors={"d": 4.0 * direction})
    expected = torch.stack([reference.lens(cache[n][:, -1:]) for n in names]).topk(3, dim=-1)
    assert_close(top.values, expected.values, what="steered lens")
    # Local computation of the same readout from a client cache agrees as well.
    with model.hooks([("blocks.0.hook_resid_post", steer)]):
        _, client_cache = model.run_with_cache(tokens, names_filter=names)
    local = readouts.lens(names, pos=-1, top_k=3).compute(client_cache.__getitem__, reference.lens)
    assert_close(local.values, top.values, what="local readout")


@pytest.mark.parametrize("scale_by", ["mean_norm", "token_norm"])
def test_add_scaled_by_the_stream_norm_matches_the_reference(model, reference, scale_by):
    tokens = model.to_tokens(PROMPT)
    direction = 6.0 * unit_unembed_direction(model, 7)
    logits = model.run_with_hooks(tokens, fwd_hooks=[
        ("blocks.1.hook_resid_post", ops.add(direction, scale_by=scale_by))])
    op = {"hook": "blocks.1.hook_resid_post", "op": "add", "tensor": "d", "scale_by": scale_by}
    expected, _ = reference.forward(tokens, ops=[op], hook_tensors={"d": direction})
    assert_close(logits, expected, atol=1e-3)
    plain, _ = reference.forward(tokens)
    # The write moves the output (otherwise this test could not tell a dropped op from a kept one).
    assert (expected - plain).abs().max() > 1.0
    # The op computed locally (as a TransformerLens hook) matches the server's.
    _, cache = reference.forward(tokens)
    act = cache["blocks.1.hook_resid_post"]
    hook = model.hook_dict["blocks.1.hook_resid_post"]
    local = ops.add(direction, scale_by=scale_by)(act, hook)
    ref_op_act = reference._apply_op("blocks.1.hook_resid_post", act, op, {"d": direction})
    assert_close(local, ref_op_act, atol=1e-4)


def test_token_norm_add_at_one_position_scales_by_that_position(model, reference):
    tokens = model.to_tokens(PROMPT)
    direction = 3.0 * unit_unembed_direction(model, 11)
    logits = model.run_with_hooks(tokens, fwd_hooks=[
        ("blocks.0.hook_resid_pre", ops.add(direction, pos=-1, scale_by="token_norm"))])
    op = {"hook": "blocks.0.hook_resid_pre", "op": "add", "tensor": "d", "positions": [-1],
          "scale_by": "token_norm"}
    expected, _ = reference.forward(tokens, ops=[op], hook_tensors={"d": direction})
    assert_close(logits, expected, atol=1e-3)


def test_steering_at_every_generation_step_with_token_norm(model, reference):
    tokens = model.to_tokens(PROMPT)
    direction = 6.0 * unit_unembed_direction(model, 9)
    with model.hooks([("blocks.1.hook_resid_post", ops.add(direction, scale_by="token_norm"))]):
        out = model.generate(tokens, max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False)
    op = {"hook": "blocks.1.hook_resid_post", "op": "add", "tensor": "d", "scale_by": "token_norm"}
    expected = reference_greedy(reference, tokens, 8, ops=[op], hook_tensors={"d": direction})
    assert torch.equal(out, expected)


def test_bad_readouts_and_scale_by_are_invalid_argument_naming_what_is_valid(model):
    tokens = model.to_tokens(PROMPT)
    n_pos, vocab = tokens.shape[1], model.cfg.d_vocab
    with pytest.raises(remotelens.InvalidArgumentError, match=r"hook_resid_postt.*did you mean"):
        model.run_with_readouts(tokens, readouts=[readouts.norm("blocks.0.hook_resid_postt")])
    with pytest.raises(ValueError, match=rf"top_k: {vocab + 1} is out of range; valid: 0 \(full logits\) or 1..{vocab}"):
        model.run_with_readouts(tokens, readouts=[readouts.lens("blocks.0.hook_resid_post", top_k=vocab + 1)])
    with pytest.raises(ValueError, match=rf"position {n_pos} is out of range .* \(valid: -{n_pos}..{n_pos - 1}\)"):
        model.run_with_readouts(tokens, readouts=[readouts.lens("blocks.0.hook_resid_post", pos=n_pos, top_k=1)])
    with pytest.raises(ValueError, match="not a residual-stream hook"):
        model.run_with_readouts(tokens, readouts=[readouts.lens("blocks.0.hook_mlp_out", top_k=1)])
    with pytest.raises(ValueError, match="does not run in this forward"):
        model.run_with_readouts(tokens, readouts=[readouts.norm("blocks.1.hook_resid_post")],
                                stop_at_layer=1)
    with pytest.raises(ValueError, match="share a shape"):
        model.run_with_readouts(tokens, readouts=[readouts.mean(["hook_embed", "blocks.0.attn.hook_z"])])
    with pytest.raises(ValueError, match=r"scale_by.*hook_resid_post"):
        model.run_with_hooks(tokens, fwd_hooks=[
            ("blocks.0.mlp.hook_post", ops.add(torch.ones(1), scale_by="token_norm"))])
    with pytest.raises(ValueError, match="valid: None, 'mean_norm', 'token_norm'"):
        ops.add(torch.ones(1), scale_by="norm")
    with pytest.raises(ValueError, match="top_k"):
        readouts.lens("hook_embed", top_k=-1)
    with pytest.raises(TypeError):
        model.run_with_readouts(tokens, readouts=[ops.zero()])
    # The model still serves after every refusal.
    assert model(tokens).shape == (1, n_pos, vocab)


def test_generate_with_cache_streams_each_steps_activations(model, reference):
    tokens = model.to_tokens(PROMPT)
    name = "blocks.1.hook_resid_post"
    out, steps = model.generate_with_cache(tokens, max_new_tokens=5, names_filter=name)
    expected = reference_greedy(reference, tokens, 5)
    assert torch.equal(out, expected)
    assert len(steps) == 5
    _, cache = reference.forward(out[:, :-1])
    n = tokens.shape[1]
    assert_close(steps[0][name], cache[name][:, :n], atol=1e-3, what="prefill")
    for k in range(1, 5):
        assert_close(steps[k][name], cache[name][:, n + k - 1:n + k], atol=1e-3, what=f"step {k}")
    with pytest.raises(KeyError, match="not a hook point"):
        model.generate_with_cache(tokens, max_new_tokens=1, names_filter="blocks.1.hook_resid")


def test_copy_row_patches_the_clean_row_into_the_corrupt_one_in_one_forward(model, reference):
    clean = model.to_tokens("The cat sat on the mat.")
    corrupt = clean.clone()
    corrupt[0, 2] = (int(corrupt[0, 2]) + 1) % model.cfg.d_vocab
    hook = "blocks.1.hook_resid_post"
    logits = model.run_with_hooks(torch.cat([clean, corrupt]), fwd_hooks=[(hook, ops.copy_row(0, pos=[2, -1]))])
    _, cache = reference.forward(clean)
    op = {"hook": hook, "op": "set", "tensor": "v", "positions": [2, -1]}
    patched, _ = reference.forward(corrupt, ops=[op], hook_tensors={"v": cache[hook][:, [2, -1]]})
    plain_clean, _ = reference.forward(clean)
    plain_corrupt, _ = reference.forward(corrupt)
    assert_close(logits[1:], patched, atol=1e-3, what="patched corrupt row")
    assert_close(logits[:1], plain_clean, atol=1e-3, what="clean row")
    assert (patched - plain_corrupt).abs().max() > 1e-2  # the patch moved the corrupt row
    # Locally, as a TransformerLens hook, the op does the same.
    both = torch.cat([cache[hook], cache[hook] + 1.0])
    local = ops.copy_row(0, pos=-1)(both, model.hook_dict[hook])
    assert torch.equal(local[1, -1], both[0, -1]) and torch.equal(local[1, :-1], both[1, :-1])
    with pytest.raises(remotelens.InvalidArgumentError, match=r"source_row 2 is out of range .*valid: -2..1"):
        model.run_with_hooks(torch.cat([clean, corrupt]), fwd_hooks=[(hook, ops.copy_row(2))])


def test_scale_by_on_a_session_hook_and_an_undefined_scale_by_number(model, reference):
    import grpc
    from remotelens.v1 import hooks_pb2
    from remotelens._wire import tensor_to_proto
    tokens = model.to_tokens(PROMPT)
    direction = 6.0 * unit_unembed_direction(model, 7)
    model.add_hook("blocks.1.hook_resid_post", ops.add(direction, scale_by="token_norm"), is_permanent=True)
    try:
        logits = model(tokens)
    finally:
        model.reset_hooks(including_permanent=True)
    op = {"hook": "blocks.1.hook_resid_post", "op": "add", "tensor": "d", "scale_by": "token_norm"}
    expected, _ = reference.forward(tokens, ops=[op], hook_tensors={"d": direction})
    assert_close(logits, expected, atol=1e-3)
    bad = hooks_pb2.HookOp(hook_name="blocks.1.hook_resid_post",
                           add=hooks_pb2.AddOp(value=tensor_to_proto(direction), scale_by=7))
    with pytest.raises(grpc.RpcError) as info:
        list(model._stub.Run(pb.RunRequest(tokens=tensor_to_proto(tokens), hooks=[bad])))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "scale_by: 7 is not a valid ScaleBy" in info.value.details()
    assert "SCALE_BY_TOKEN_NORM (2)" in info.value.details()
