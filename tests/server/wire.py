"""Wire helpers for the server tests: Tensor protos <-> numpy, TensorChunk reassembly, bfloat16.

    t = wire.to_proto(np.array([[1, 2, 3]], np.int64))     # tensor_pb2.Tensor
    a = wire.from_proto(t)                                  # numpy array
    tensors = wire.assemble(chunks)                         # {name: numpy array}, chunks checked

bfloat16 has no numpy dtype: values arrive as uint16 bits and widen to float32 by << 16.
"""
import os
import sys

import numpy as np

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REPO = os.path.dirname(_TESTS)
for _p in (_TESTS, _REPO, os.path.join(_REPO, "clients", "python")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from remotelens.v1 import tensor_pb2  # noqa: E402

MIB = 1 << 20

_NUMPY_OF = {
    tensor_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    tensor_pb2.DTYPE_INT64: np.dtype("<i8"),
    tensor_pb2.DTYPE_INT32: np.dtype("<i4"),
    tensor_pb2.DTYPE_BFLOAT16: np.dtype("<u2"),  # raw bits; see bf16_to_float32
}
ITEMSIZE = {k: v.itemsize for k, v in _NUMPY_OF.items()}
_PROTO_OF = {
    np.dtype("float32"): tensor_pb2.DTYPE_FLOAT32,
    np.dtype("float16"): tensor_pb2.DTYPE_FLOAT16,
    np.dtype("int64"): tensor_pb2.DTYPE_INT64,
    np.dtype("int32"): tensor_pb2.DTYPE_INT32,
}


def bf16_to_float32(bits):
    """uint16 bfloat16 bits -> float32 (exact: bfloat16 is the upper half of a float32)."""
    bits = np.asarray(bits, dtype=np.uint16)
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(x):
    """float32 -> uint16 bfloat16 bits, round to nearest even (as torch does)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))
    return (rounded >> 16).astype(np.uint16)


def to_proto(array, dtype=None):
    """numpy array -> tensor_pb2.Tensor (dtype: a tensor_pb2.DTYPE_*, default from the array)."""
    array = np.asarray(array)
    if dtype is None:
        dtype = _PROTO_OF[array.dtype]
    if dtype == tensor_pb2.DTYPE_BFLOAT16:
        data = float32_to_bf16(array).tobytes()
    else:
        data = np.ascontiguousarray(array, dtype=_NUMPY_OF[dtype]).tobytes()
    return tensor_pb2.Tensor(dtype=dtype, shape=list(array.shape), data=data)


def tokens(rows):
    """[[ids]] -> int64 Tensor proto."""
    return to_proto(np.asarray(rows, dtype=np.int64))


def from_bytes(data, dtype, shape, widen_bf16=True):
    arr = np.frombuffer(data, dtype=_NUMPY_OF[dtype]).reshape(tuple(shape))
    if dtype == tensor_pb2.DTYPE_BFLOAT16 and widen_bf16:
        return bf16_to_float32(arr)
    return arr.copy()


def from_proto(t, widen_bf16=True):
    return from_bytes(t.data, t.dtype, t.shape, widen_bf16)


class Assembled:
    """One reassembled tensor with the wire facts the tests check."""

    def __init__(self, name, dtype, shape, total_bytes, chunk_sizes, data):
        self.name = name
        self.dtype = dtype
        self.shape = tuple(shape)
        self.total_bytes = total_bytes
        self.chunk_sizes = chunk_sizes
        self.data = data

    def array(self, widen_bf16=True):
        return from_bytes(self.data, self.dtype, self.shape, widen_bf16)


class ChunkAssembler:
    """Feeds TensorChunks in stream order; checks every wire rule of tensor.proto."""

    def __init__(self, max_chunk_bytes=MIB):
        self.max_chunk_bytes = max_chunk_bytes
        self.done = []          # [Assembled] in arrival order
        self._cur = None        # (name, dtype, shape, total, [sizes], bytearray)

    def add(self, chunk):
        assert len(chunk.data) <= self.max_chunk_bytes, (
            f"chunk of {chunk.name} carries {len(chunk.data)} bytes > {self.max_chunk_bytes}")
        if self._cur is None:
            assert chunk.offset == 0, f"{chunk.name}: first chunk at offset {chunk.offset}"
            numel = int(np.prod(chunk.shape)) if len(chunk.shape) else 1
            expected = numel * ITEMSIZE[chunk.dtype]
            assert chunk.total_bytes == expected, (
                f"{chunk.name}: total_bytes {chunk.total_bytes} != numel*itemsize {expected}")
            self._cur = (chunk.name, chunk.dtype, tuple(chunk.shape), chunk.total_bytes, [],
                         bytearray())
        name, dtype, shape, total, sizes, buf = self._cur
        assert chunk.name == name, f"chunk of {chunk.name} interleaved with incomplete {name}"
        assert chunk.dtype == dtype and tuple(chunk.shape) == shape and chunk.total_bytes == total, (
            f"{name}: dtype/shape/total changed mid-tensor")
        assert chunk.offset == len(buf), f"{name}: offset {chunk.offset}, expected {len(buf)}"
        buf.extend(chunk.data)
        sizes.append(len(chunk.data))
        assert len(buf) <= total, f"{name}: {len(buf)} bytes > total_bytes {total}"
        if len(buf) == total:
            self.done.append(Assembled(name, dtype, shape, total, sizes, bytes(buf)))
            self._cur = None
            return self.done[-1]
        return None

    @property
    def incomplete(self):
        return self._cur is not None

    def tensors(self, widen_bf16=True):
        return {a.name: a.array(widen_bf16) for a in self.done}


def assemble(chunks, max_chunk_bytes=MIB):
    """Iterable of TensorChunk -> {name: numpy array}; every chunk and tensor is checked."""
    asm = ChunkAssembler(max_chunk_bytes)
    for c in chunks:
        asm.add(c)
    assert not asm.incomplete, "stream ended inside a tensor"
    return asm.tensors()


def run_result(responses, max_chunk_bytes=MIB):
    """RunResponse (or InteractiveResponse) iterable -> ({name: array}, summary, [Assembled])."""
    asm = ChunkAssembler(max_chunk_bytes)
    summary = None
    for r in responses:
        kind = r.WhichOneof("item")
        if kind == "tensor":
            assert summary is None, "tensor after the summary"
            asm.add(r.tensor)
        elif kind == "summary":
            assert summary is None, "two summaries"
            summary = r.summary
        else:
            raise AssertionError(f"unexpected item {kind}")
    assert not asm.incomplete, "stream ended inside a tensor"
    assert summary is not None, "no Summary at the end of the stream"
    return asm.tensors(), summary, asm.done


def bearer(key):
    return (("authorization", f"Bearer {key}"),)
