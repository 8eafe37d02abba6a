"""Gradient requests at the wire's edges: quotas, bad output gradients, and hooks that fail in
the backward pass. Parity of the gradients themselves is tests/client/test_gradients.py."""
import grpc
import numpy as np

import wire
from server_helpers import KEYS, Client, rpc_error

from remotelens.v1 import hooks_pb2, remotelens_pb2 as pb


def _run(client, request):
    return wire.run_result(client.stub.Run(request, metadata=client.md, timeout=60))


def test_gradients_beyond_the_streamed_byte_quota_are_resource_exhausted(auth_server):
    dave = Client(auth_server, KEYS["dave"])  # 4096 streamed bytes per request
    try:
        # One [1, 8, 128] float32 gradient is 4096 bytes, and the metric comes first.
        request = pb.RunRequest(tokens=wire.tokens([list(range(1, 9))]), return_type=pb.RETURN_TYPE_NONE,
                                backward=pb.BackwardRequest(loss=pb.LossMetric(), cache=pb.CacheSelection(
                                    names=["blocks.0.hook_resid_pre"])))
        code, details = rpc_error(lambda: _run(dave, request))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "blocks.0.hook_resid_pre" in details and "4096" in details, details
        # Within the quota the same user gets the metric and a narrower gradient.
        request.backward.cache.pos_start = -1
        tensors, summary, _ = _run(dave, request)
        assert tensors["blocks.0.hook_resid_pre_grad"].shape == (1, 1, 128)
        assert summary.backward_ms > 0
    finally:
        dave.close()


def test_output_gradient_of_the_wrong_dtype_or_shape_is_invalid_argument(client):
    tokens = wire.tokens([[1, 2, 3, 4]])
    ints = pb.RunRequest(tokens=tokens, backward=pb.BackwardRequest(
        output_grad=wire.to_proto(np.ones((1, 4, 512), dtype=np.int64))))
    code, details = rpc_error(lambda: _run(client, ints))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "backward.output_grad" in details, details
    shape = pb.RunRequest(tokens=tokens, backward=pb.BackwardRequest(
        output_grad=wire.to_proto(np.ones((1, 4, 7), dtype=np.float32))))
    code, details = rpc_error(lambda: _run(client, shape))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "[1, 4, 512]" in details, details
    # A loss needs the full model; patching is no backward op.
    stop = pb.RunRequest(tokens=tokens, stop_at_layer=1, backward=pb.BackwardRequest(loss=pb.LossMetric()))
    code, details = rpc_error(lambda: _run(client, stop))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "backward.loss" in details, details
    patch = pb.RunRequest(tokens=tokens, backward=pb.BackwardRequest(loss=pb.LossMetric()), hooks=[
        hooks_pb2.HookOp(hook_name="hook_embed", backward=True,
                         patch_from_cache=hooks_pb2.PatchFromCacheOp(cache_handle="x"))])
    code, details = rpc_error(lambda: _run(client, patch))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "hooks[0].backward" in details, details


def test_a_backward_op_that_fails_fails_its_request_and_the_server_serves_on(client):
    # An add op whose value does not broadcast is found only when the gradient arrives.
    tokens = wire.tokens([[1, 2, 3, 4]])
    bad = pb.RunRequest(tokens=tokens, backward=pb.BackwardRequest(loss=pb.LossMetric()), hooks=[
        hooks_pb2.HookOp(hook_name="blocks.0.hook_resid_pre", backward=True, selector=hooks_pb2.Selector(positions=[9]),
                         zero=hooks_pb2.ZeroOp())])
    code, details = rpc_error(lambda: _run(client, bad))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "position 9 is out of range" in details, details
    tensors, _, _ = _run(client, pb.RunRequest(tokens=tokens))
    assert tensors["logits"].shape == (1, 4, 512)
