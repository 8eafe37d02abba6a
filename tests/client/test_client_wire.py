"""Units without a server: the tensor codec, chunk reassembly, error mapping, get_act_name."""
import grpc
import numpy as np
import pytest
import torch

import remotelens
from remotelens import errors
from remotelens._wire import ChunkAssembler, tensor_from_proto, tensor_to_proto
from remotelens.v1 import tensor_pb2


def chunks_of(name, tensor, chunk_bytes):
    message = tensor_to_proto(tensor)
    data = message.data
    out = []
    for offset in range(0, max(len(data), 1), chunk_bytes):
        out.append(tensor_pb2.TensorChunk(name=name, dtype=message.dtype, shape=message.shape,
                                          total_bytes=len(data), offset=offset,
                                          data=data[offset:offset + chunk_bytes]))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64,
                                   torch.int32])
def test_round_trip_every_dtype_through_uneven_chunks(dtype):
    value = (torch.randn(3, 5, 7) * 100).to(dtype)
    assembler = ChunkAssembler()
    results = [assembler.add(c) for c in chunks_of("x", value, 33)]
    assert all(r is None for r in results[:-1])
    name, tensor = results[-1]
    assert name == "x" and tensor.dtype == dtype and torch.equal(tensor, value)
    tensor[0, 0, 0] = 1  # reassembled tensors are writable (hooks edit them in place)
    assert not assembler.in_progress


def test_bfloat16_bytes_are_the_upper_half_of_float32():
    value = torch.tensor([1.0, -2.5, 3.140625], dtype=torch.bfloat16)
    data = tensor_to_proto(value).data
    as_f32 = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
    assert np.array_equal(as_f32.view(np.float32), value.float().numpy())


def test_float64_is_sent_as_float32_and_non_contiguous_tensors_are_row_major():
    value = torch.arange(12, dtype=torch.float64).reshape(3, 4).t()
    message = tensor_to_proto(value)
    assert message.dtype == tensor_pb2.DTYPE_FLOAT32 and list(message.shape) == [4, 3]
    assert torch.equal(tensor_from_proto(message), value.float())


def test_scalar_and_empty_tensors():
    for value in (torch.tensor(2.5), torch.zeros(0, 4)):
        assembler = ChunkAssembler()
        name, out = [r for r in (assembler.add(c) for c in chunks_of("s", value, 8)) if r][0]
        assert out.shape == value.shape and torch.equal(out, value)


def test_out_of_order_chunk_is_a_protocol_error():
    parts = chunks_of("x", torch.randn(64), 64)
    assembler = ChunkAssembler()
    assembler.add(parts[0])
    with pytest.raises(remotelens.RemoteLensError, match="does not continue"):
        assembler.add(parts[2])


def test_wrong_total_bytes_is_a_protocol_error():
    bad = tensor_pb2.TensorChunk(name="x", dtype=tensor_pb2.DTYPE_FLOAT32, shape=[4],
                                 total_bytes=12, offset=0, data=b"\0" * 12)
    with pytest.raises(remotelens.RemoteLensError, match="expected 16"):
        ChunkAssembler().add(bad)


class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize("code,cls,builtin", [
    (grpc.StatusCode.INVALID_ARGUMENT, remotelens.InvalidArgumentError, ValueError),
    (grpc.StatusCode.OUT_OF_RANGE, remotelens.OutOfRangeError, ValueError),
    (grpc.StatusCode.NOT_FOUND, remotelens.NotFoundError, KeyError),
    (grpc.StatusCode.PERMISSION_DENIED, remotelens.PermissionDeniedError, PermissionError),
    (grpc.StatusCode.UNAUTHENTICATED, remotelens.UnauthenticatedError, PermissionError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, remotelens.DeadlineExceededError, TimeoutError),
    (grpc.StatusCode.UNAVAILABLE, remotelens.UnavailableError, ConnectionError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, remotelens.ResourceExhaustedError, RuntimeError),
    (grpc.StatusCode.CANCELLED, remotelens.CancelledError, RuntimeError),
    (grpc.StatusCode.INTERNAL, remotelens.RemoteLensError, RuntimeError),
])
def test_status_codes_map_to_exceptions(code, cls, builtin):
    err = errors.from_rpc_error(FakeRpcError(code, "what was wrong, and what is valid"))
    assert type(err) is cls
    assert isinstance(err, builtin) and isinstance(err, remotelens.RemoteLensError)
    assert str(err) == "what was wrong, and what is valid"
    assert err.code == code and err.details == "what was wrong, and what is valid"
    with pytest.raises(builtin):
        with errors.translate_rpc_errors():
            raise FakeRpcError(code, "x")
