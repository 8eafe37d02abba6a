"""Gradients on the server (issue 9), through the Python client and the wire, against the
independent reference under torch autograd.

The reference runs with a zero tensor that requires grad added at hook_embed, so its whole
forward is a torch graph; torch.autograd.grad then gives d(metric)/d(activation) at every hook,
which the server's "<hook>_grad" tensors must equal (TransformerLens's run_with_cache(incl_bwd=True)
names). TransformerLens semantics cited: HookedTransformer.run_with_cache(incl_bwd=True) calls
out.backward() (so the output must be a scalar) and stores each hook's gradient as
"<name>_grad" (transformer_lens/hook_points.py, get_caching_hooks with incl_bwd).
"""
import grpc
import pytest
import torch

from remotelens import ops
from remotelens.v1 import remotelens_pb2 as pb
from tests.reference.llama_reference import all_hook_names

TOKENS = torch.tensor([[1, 17, 250, 3, 99, 42, 7], [5, 300, 12, 8, 400, 2, 61]])


def _reference_grads(reference, tokens, metric, mask=None, ops_=(), hook_tensors=None):
    batch, pos = tokens.shape
    anchor = torch.zeros(batch, pos, reference.config.d_model, requires_grad=True)
    all_ops = [{"hook": "hook_embed", "op": "add", "tensor": "anchor"}, *ops_]
    tensors = {"anchor": anchor, **(hook_tensors or {})}
    logits, cache = reference.forward(tokens, attention_mask=mask, ops=all_ops, hook_tensors=tensors)
    value = metric(logits)
    names = [n for n in cache if cache[n].requires_grad]
    grads = torch.autograd.grad(value, [cache[n] for n in names], allow_unused=True)
    return value.detach(), {n: (g if g is not None else torch.zeros_like(cache[n]))
                            for n, g in zip(names, grads)}


def _loss(tokens, mask=None):
    """TransformerLens's mean next-token loss over real targets."""
    def metric(logits):
        log_probs = torch.log_softmax(logits[:, :-1].float(), -1)
        per_token = -log_probs.gather(-1, tokens[:, 1:, None])[..., 0]
        if mask is None:
            return per_token.mean()
        valid = (mask[:, 1:] * mask[:, :-1]).float()
        return (per_token * valid).sum() / valid.sum()
    return metric


def _assert_grads_close(actual, expected, names):
    for name in names:
        a, e = actual[f"{name}_grad"], expected[name]
        assert a.shape == e.shape, (name, a.shape, e.shape)
        scale = float(e.abs().max())
        assert float((a - e).abs().max()) <= 1e-4 * max(scale, 1e-6), (name, float((a - e).abs().max()), scale)


def test_incl_bwd_gives_every_hook_gradient_of_the_loss(model, reference):
    loss, cache = model.run_with_cache(TOKENS, return_type="loss", incl_bwd=True)
    ref_loss, ref_grads = _reference_grads(reference, TOKENS, _loss(TOKENS))
    assert abs(float(loss) - float(ref_loss)) < 1e-5
    names = [n for n in all_hook_names(reference.config.n_layers) if n in ref_grads and n in cache]
    assert len(names) >= 20 * reference.config.n_layers  # every per-block hook, q/k/v to resid_post
    for name in names:
        assert f"{name}_grad" in cache, name
    _assert_grads_close(cache, ref_grads, names)
    # Forward activations are still there, unchanged by the backward pass.
    assert cache["blocks.0.hook_resid_pre"].shape == (2, 7, reference.config.d_model)


def test_left_padded_batch_gradients_match_the_reference(model, reference):
    tokens = TOKENS.clone()
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # row 1 left-padded by three
    names = ["hook_embed", "blocks.0.attn.hook_pattern", "blocks.1.attn.hook_v",
             "blocks.1.hook_resid_post", "ln_final.hook_scale"]
    _, cache = model.run_with_cache(tokens, attention_mask=mask, return_type="loss",
                                    incl_bwd=True, names_filter=names)
    _, ref_grads = _reference_grads(reference, tokens, _loss(tokens, mask), mask=mask)
    real = mask.bool()
    for name in names:
        a, e = cache[f"{name}_grad"], ref_grads[name]
        if name.endswith("hook_pattern"):  # [batch, head, query, key]: real queries only
            a, e = a.transpose(1, 2)[real], e.transpose(1, 2)[real]
        else:
            a, e = a[real], e[real]
        scale = float(e.abs().max())
        assert float((a - e).abs().max()) <= 1e-4 * max(scale, 1e-6), name


def test_backward_op_zeroing_resid_pre_zeroes_every_gradient_upstream(model, reference):
    model.add_hook("blocks.1.hook_resid_pre", ops.zero(), dir="bwd")
    names = ["hook_embed", "blocks.0.attn.hook_z", "blocks.0.hook_resid_post",
             "blocks.1.hook_resid_mid"]
    _, cache = model.run_with_cache(TOKENS, return_type="loss", incl_bwd=True, names_filter=names)
    for name in names[:3]:
        assert float(cache[f"{name}_grad"].abs().max()) == 0, name
    assert float(cache["blocks.1.hook_resid_mid_grad"].abs().max()) > 0
    # Scaling instead: everything upstream scales with it, as in the reference.
    model.reset_hooks()
    model.add_hook("blocks.1.hook_resid_pre", ops.scale(3.0), dir="bwd")
    _, scaled = model.run_with_cache(TOKENS, return_type="loss", incl_bwd=True, names_filter=names)
    _, ref_grads = _reference_grads(reference, TOKENS, _loss(TOKENS))
    expected = ref_grads["hook_embed"] * 3
    assert float((scaled["hook_embed_grad"] - expected).abs().max()) <= 1e-4 * float(expected.abs().max())
    # A plain forward ignores backward ops (TransformerLens's bwd hooks fire only in backward).
    plain = model(TOKENS)
    assert plain.shape == (2, 7, reference.config.d_vocab)


def test_incl_bwd_needs_a_scalar_and_patching_is_no_backward_op(model):
    with pytest.raises(RuntimeError, match="scalar outputs"):
        model.run_with_cache(TOKENS, incl_bwd=True)
    with pytest.raises(ValueError, match="cannot be a backward hook"):
        model.add_hook("blocks.0.hook_resid_pre", ops.patch_from({"blocks.0.hook_resid_pre": TOKENS}), dir="bwd")


def _stub_run(model, request):
    responses = list(model._stub.Run(request, **model._call_kwargs()))
    from remotelens._wire import ChunkAssembler  # noqa: WPS433 (test-only use of the assembler)
    assembler, out, summary = ChunkAssembler(), {}, None
    for r in responses:
        if r.WhichOneof("item") == "tensor":
            done = assembler.add(r.tensor)
            if done is not None:
                out[done[0]] = done[1]
        else:
            summary = r.summary
    return out, summary


def _tokens_proto(tokens):
    from remotelens._wire import tensor_to_proto
    return tensor_to_proto(tokens)


def test_logit_difference_and_client_metric_gradients_match_the_reference(model, reference):
    correct, incorrect = [250, 12], [3, 8]

    def logit_diff(logits):
        last = logits[:, -1].float()
        rows = torch.arange(logits.shape[0])
        return (last[rows, torch.tensor(correct)] - last[rows, torch.tensor(incorrect)]).mean()

    names = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z", "blocks.1.hook_resid_pre"]
    request = pb.RunRequest(tokens=_tokens_proto(TOKENS), backward=pb.BackwardRequest(
        logit_diff=pb.LogitDiffMetric(correct=correct, incorrect=incorrect),
        cache=pb.CacheSelection(names=names)))
    out, summary = _stub_run(model, request)
    value, ref_grads = _reference_grads(reference, TOKENS, logit_diff)
    assert abs(float(out["metric"]) - float(value)) < 1e-4
    assert summary.backward_ms > 0
    _assert_grads_close(out, ref_grads, names)

    # Any metric the client computes: send d(metric)/d(logits).
    weights = torch.linspace(-1, 1, 2 * 7 * reference.config.d_vocab).view(2, 7, -1)
    request = pb.RunRequest(tokens=_tokens_proto(TOKENS), backward=pb.BackwardRequest(
        output_grad=_tokens_proto(weights), cache=pb.CacheSelection(names=names)))
    out, _ = _stub_run(model, request)
    _, ref_grads = _reference_grads(reference, TOKENS, lambda logits: (logits * weights).sum())
    _assert_grads_close(out, ref_grads, names)
    assert "metric" not in out


@pytest.mark.parametrize("backward,field", [
    (pb.BackwardRequest(), "backward"),
    (pb.BackwardRequest(logit_diff=pb.LogitDiffMetric(correct=[1, 2, 3], incorrect=[4])),
     "backward.logit_diff.correct"),
    (pb.BackwardRequest(logit_diff=pb.LogitDiffMetric(correct=[1], incorrect=[10**6])),
     "backward.logit_diff.incorrect"),
    (pb.BackwardRequest(loss=pb.LossMetric(), cache=pb.CacheSelection(names=["*"], store=True)),
     "backward.cache.store"),
])
def test_bad_backward_requests_name_the_field(model, backward, field):
    request = pb.RunRequest(tokens=_tokens_proto(TOKENS), backward=backward)
    with pytest.raises(grpc.RpcError) as error:
        _stub_run(model, request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.details(), error.value.details()


def test_wrong_output_gradient_shape_is_invalid_argument(model):
    request = pb.RunRequest(tokens=_tokens_proto(TOKENS), backward=pb.BackwardRequest(
        output_grad=_tokens_proto(torch.ones(2, 7))))
    with pytest.raises(grpc.RpcError) as error:
        _stub_run(model, request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "output's shape" in error.value.details(), error.value.details()


def test_gradient_and_plain_requests_from_two_users_at_once_stay_correct(demo_server, reference):
    """Gradient requests and plain ones interleave on the model thread; each answer is its own."""
    import threading
    import remotelens

    _, ref_grads = _reference_grads(reference, TOKENS, _loss(TOKENS))
    ref_logits, _ = reference.forward(TOKENS)
    errors = []

    def gradients():
        with remotelens.HookedTransformer.from_server(demo_server.address) as m:
            for _ in range(6):
                _, cache = m.run_with_cache(TOKENS, return_type="loss", incl_bwd=True,
                                            names_filter=["blocks.0.hook_resid_pre"])
                got = cache["blocks.0.hook_resid_pre_grad"]
                expected = ref_grads["blocks.0.hook_resid_pre"]
                if float((got - expected).abs().max()) > 1e-4 * float(expected.abs().max()):
                    errors.append("gradient differs")

    def plain():
        with remotelens.HookedTransformer.from_server_no_processing(demo_server.address) as m:
            for _ in range(12):
                logits = m(TOKENS)
                if float((logits - ref_logits).abs().max()) > 1e-4:
                    errors.append("logits differ")

    threads = [threading.Thread(target=f) for f in (gradients, plain, plain)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors


def test_attribution_patching_example_matches_the_reference(model, reference, demo_server):
    """examples/attribution_patching.py: per-layer resid_pre and per-head z attributions from the
    server equal (clean - corrupt) . d(logit diff)/dA computed with the reference's autograd."""
    import importlib.util
    import os
    import subprocess
    import sys

    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "attribution_patching.py")
    spec = importlib.util.spec_from_file_location("attribution_patching", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    clean = torch.tensor([[1, 17, 250, 3, 99, 42, 7]])
    corrupt = torch.tensor([[1, 17, 250, 3, 12, 42, 7]])
    correct, incorrect = [99], [12]
    resid, heads = example.attribution_patching(model, clean, corrupt, correct, incorrect)

    def logit_diff(logits):
        return (logits[:, -1, correct[0]] - logits[:, -1, incorrect[0]]).mean()

    _, clean_cache = reference.forward(clean)
    _, grads = _reference_grads(reference, corrupt, logit_diff)
    _, corrupt_cache = reference.forward(corrupt)
    n = reference.config.n_layers
    for layer in range(n):
        name = f"blocks.{layer}.hook_resid_pre"
        expected = ((clean_cache[name] - corrupt_cache[name]) * grads[name]).sum(dim=(0, 2))
        assert torch.allclose(resid[layer], expected, rtol=1e-3, atol=1e-5), (layer, resid[layer], expected)
        name = f"blocks.{layer}.attn.hook_z"
        expected = ((clean_cache[name] - corrupt_cache[name]) * grads[name]).sum(dim=(0, 1, 3))
        assert torch.allclose(heads[layer], expected, rtol=1e-3, atol=1e-5), (layer, heads[layer], expected)
    # Only position 4 differs, so layer 0's resid_pre attribution lives there alone.
    assert float(resid[0].abs().sum() - resid[0, 4].abs()) == 0

    result = subprocess.run([sys.executable, path, "--address", demo_server.address],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "resid_pre attribution per layer" in result.stdout and "largest head attributions" in result.stdout


def test_transformer_lens_backward_hook_idiom_matches_the_reference(model, reference):
    """The idiom from TransformerLens's docs (Exploratory Analysis Demo, attribution patching):
    forward and backward Python hooks, any metric of the logits computed in the notebook, and
    value.backward()."""
    act_cache, grad_cache = {}, {}

    def fwd_cache_hook(act, hook):
        act_cache[hook.name] = act.detach().clone()

    def bwd_cache_hook(grad, hook):
        grad_cache[hook.name] = grad.detach().clone()

    def name_filter(name):
        return name.endswith("hook_resid_pre") or name.endswith("attn.hook_pattern")

    def metric(logits):
        return torch.log_softmax(logits[:, -1], -1)[:, 5].sum() + logits[:, 2, 7].mean()

    model.add_hook(name_filter, fwd_cache_hook, "fwd")
    model.add_hook(name_filter, bwd_cache_hook, "bwd")
    value = metric(model(TOKENS))
    value.backward()
    model.reset_hooks()

    ref_value, ref_grads = _reference_grads(reference, TOKENS, metric)
    assert abs(float(value) - float(ref_value)) < 1e-4
    names = [n for n in ref_grads if name_filter(n)]
    assert sorted(grad_cache) == sorted(names) and sorted(act_cache) == sorted(names)
    _assert_grads_close({f"{n}_grad": g for n, g in grad_cache.items()}, ref_grads, names)


def test_backward_through_the_loss_and_a_stop_at_layer_output(model, reference):
    grads = {}
    model.add_hook("blocks.0.hook_resid_pre", lambda g, hook: grads.__setitem__("loss", g.clone()), dir="bwd")
    loss = model(TOKENS, return_type="loss")
    (2.5 * loss).backward()
    _, ref_grads = _reference_grads(reference, TOKENS, lambda logits: 2.5 * _loss(TOKENS)(logits))
    _assert_grads_close({"x_grad": grads["loss"]}, {"x": ref_grads["blocks.0.hook_resid_pre"]}, ["x"])

    model.reset_hooks()
    model.add_hook("blocks.0.hook_resid_pre", lambda g, hook: grads.__setitem__("stop", g.clone()), dir="bwd")
    resid = model(TOKENS, stop_at_layer=2)
    (resid ** 2).sum().backward()
    batch, pos = TOKENS.shape
    anchor = torch.zeros(batch, pos, reference.config.d_model, requires_grad=True)
    _, cache = reference.forward(TOKENS, ops=[{"hook": "hook_embed", "op": "add", "tensor": "a"}],
                                 hook_tensors={"a": anchor}, stop_at_layer=2)
    ref_resid = cache["blocks.1.hook_resid_post"]
    (expected,) = torch.autograd.grad((ref_resid ** 2).sum(), [cache["blocks.0.hook_resid_pre"]])
    _assert_grads_close({"x_grad": grads["stop"]}, {"x": expected}, ["x"])


def test_python_backward_hook_returning_zeros_stops_the_gradient_upstream(model):
    seen = {}
    model.add_hook("blocks.1.hook_resid_pre", lambda g, hook: torch.zeros_like(g), dir="bwd")
    model.add_hook("blocks.0.attn.hook_z", lambda g, hook: seen.__setitem__("z", g.clone()), dir="bwd")
    model.add_hook("blocks.1.hook_resid_mid", lambda g, hook: seen.__setitem__("mid", g.clone()), dir="bwd")
    model(TOKENS).sum().backward()
    assert float(seen["z"].abs().max()) == 0
    assert float(seen["mid"].abs().max()) > 0
    # Without grad mode there is no graph, as with TransformerLens under torch.no_grad().
    with torch.no_grad():
        assert not model(TOKENS).requires_grad


def test_logit_difference_gradients_at_every_hook_through_the_client(model, reference):
    from remotelens import metrics
    correct, incorrect = [250, 12], [3, 8]

    def logit_diff(logits):
        rows = torch.arange(logits.shape[0])
        return (logits[rows, -1, torch.tensor(correct)] - logits[rows, -1, torch.tensor(incorrect)]).mean()

    logits, cache = model.run_with_cache(TOKENS, incl_bwd=True, metric=metrics.logit_diff(correct, incorrect))
    _, ref_grads = _reference_grads(reference, TOKENS, logit_diff)
    names = [n for n in all_hook_names(reference.config.n_layers) if n in ref_grads and n in cache]
    assert len(names) >= 20 * reference.config.n_layers
    _assert_grads_close(cache, ref_grads, names)
    assert logits.shape == (2, 7, reference.config.d_vocab)
    with pytest.raises(ValueError, match="incl_bwd=True"):
        model.run_with_cache(TOKENS, metric=metrics.logit_diff(1, 2))
