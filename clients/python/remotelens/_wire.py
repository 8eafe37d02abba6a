"""Tensors on the wire <-> torch tensors: the only module that touches proto tensor bytes.

Incoming tensors are reassembled from TensorChunks into one preallocated buffer: each chunk's
bytes are copied exactly once, straight into place, and the finished buffer is wrapped as a torch
tensor with np.frombuffer-style views and torch.from_numpy (no further copies). bfloat16, which
numpy lacks, travels as int16 and is reinterpreted with Tensor.view(torch.bfloat16). The
resulting tensors are writable (hook functions may edit them in place) and live on the CPU.

    assembler = ChunkAssembler()
    for message in stream:
        done = assembler.add(message.tensor)
        if done is not None:
            name, tensor = done

The wire format is little-endian; so are the machines this client supports (x86-64, arm64).
"""

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import RemoteLensError
from .v1 import tensor_pb2

# proto DType -> (torch dtype, numpy dtype used to hold the bytes, bytes per element)
_DTYPES: Dict[int, Tuple[torch.dtype, np.dtype, int]] = {
    tensor_pb2.DTYPE_FLOAT32: (torch.float32, np.dtype("<f4"), 4),
    tensor_pb2.DTYPE_BFLOAT16: (torch.bfloat16, np.dtype("<i2"), 2),
    tensor_pb2.DTYPE_FLOAT16: (torch.float16, np.dtype("<f2"), 2),
    tensor_pb2.DTYPE_INT64: (torch.int64, np.dtype("<i8"), 8),
    tensor_pb2.DTYPE_INT32: (torch.int32, np.dtype("<i4"), 4),
}
_TORCH_TO_PROTO: Dict[torch.dtype, int] = {v[0]: k for k, v in _DTYPES.items()}


def dtype_from_proto(dtype: int) -> torch.dtype:
    """The torch dtype of a proto DType; RemoteLensError for DTYPE_UNSPECIFIED or unknown."""
    try:
        return _DTYPES[dtype][0]
    except KeyError:
        raise RemoteLensError(f"the server sent a tensor with unknown dtype {dtype}") from None


def dtype_to_proto(dtype: torch.dtype) -> int:
    """The proto DType of a torch dtype; ValueError when the wire has none."""
    try:
        return _TORCH_TO_PROTO[dtype]
    except KeyError:
        raise ValueError(f"{dtype} cannot be sent to the server; use one of "
                         f"{sorted(str(d) for d in _TORCH_TO_PROTO)}") from None


def _wire_ready(tensor: torch.Tensor, float_only: bool) -> torch.Tensor:
    """A contiguous CPU tensor in a dtype the wire has (float64 -> float32, ints -> int64)."""
    t = tensor.detach()
    if t.dtype not in _TORCH_TO_PROTO:
        if t.is_floating_point():
            t = t.to(torch.float32)
        elif t.dtype in (torch.bool, torch.uint8, torch.int8, torch.int16) and not float_only:
            t = t.to(torch.int64)
        else:
            raise ValueError(f"tensors of dtype {t.dtype} cannot be sent to the server")
    if float_only and not t.is_floating_point():
        t = t.to(torch.float32)
    return t.to("cpu").contiguous()


def tensor_to_proto(tensor, float_only: bool = False) -> tensor_pb2.Tensor:
    """Encodes a tensor (any device, strides, or a nested list / numpy array) as a Tensor message.

    Args:
        tensor: the values. Non-tensors go through torch.as_tensor.
        float_only: cast integer values to float32 (op values must be floating).

    Returns:
        A Tensor message with row-major little-endian bytes.
    """
    if not isinstance(tensor, torch.Tensor):
        tensor = torch.as_tensor(tensor)
    t = _wire_ready(tensor, float_only)
    as_numpy = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
    return tensor_pb2.Tensor(dtype=_TORCH_TO_PROTO[t.dtype], shape=list(t.shape),
                             data=as_numpy.tobytes())


def tensor_from_proto(message: tensor_pb2.Tensor) -> torch.Tensor:
    """Decodes a whole Tensor message into a writable CPU tensor (one copy of the bytes)."""
    _, np_dtype, size = _DTYPES.get(message.dtype, (None, None, 0))
    if np_dtype is None:
        raise RemoteLensError(f"the server sent a tensor with unknown dtype {message.dtype}")
    shape = tuple(int(d) for d in message.shape)
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if n * size != len(message.data):
        raise RemoteLensError(f"tensor of shape {list(shape)} has {len(message.data)} bytes of "
                              f"data, expected {n * size}")
    buffer = np.empty(n, dtype=np_dtype)
    buffer.view(np.uint8)[:] = np.frombuffer(message.data, dtype=np.uint8)
    return _wrap(buffer, shape, message.dtype)


def _wrap(buffer: np.ndarray, shape: Sequence[int], dtype: int) -> torch.Tensor:
    t = torch.from_numpy(buffer.reshape(shape))
    if dtype == tensor_pb2.DTYPE_BFLOAT16:
        t = t.view(torch.bfloat16)
    return t


class ChunkAssembler:
    """Reassembles TensorChunks, one tensor at a time, into preallocated buffers.

    Every chunk is checked against the tensor it continues (name, dtype, shape, offset); a
    protocol violation raises RemoteLensError rather than producing a corrupt tensor.
    """

    def __init__(self) -> None:
        self._name: Optional[str] = None
        self._dtype = 0
        self._shape: Tuple[int, ...] = ()
        self._bytes: Optional[np.ndarray] = None  # uint8 view of the element buffer
        self._buffer: Optional[np.ndarray] = None
        self._next = 0
        self._total = 0

    @property
    def in_progress(self) -> bool:
        """True between a tensor's first and last chunk."""
        return self._buffer is not None

    def add(self, chunk: tensor_pb2.TensorChunk) -> Optional[Tuple[str, torch.Tensor]]:
        """Adds one chunk.

        Args:
            chunk: the next TensorChunk of the stream.

        Returns:
            (name, tensor) when this chunk completes a tensor, else None.
        """
        data = chunk.data
        if self._buffer is None:
            self._start(chunk)
        elif (chunk.name != self._name or chunk.offset != self._next or chunk.dtype != self._dtype
              or tuple(chunk.shape) != self._shape):
            raise RemoteLensError(
                f"chunk for {chunk.name!r} at offset {chunk.offset} does not continue "
                f"{self._name!r} (expected offset {self._next})")
        end = self._next + len(data)
        if end > self._total:
            raise RemoteLensError(f"chunks of {self._name!r} overrun its {self._total} bytes")
        if data:
            self._bytes[self._next:end] = np.frombuffer(data, dtype=np.uint8)
        self._next = end
        if end < self._total:
            return None
        name, tensor = self._name, _wrap(self._buffer, self._shape, self._dtype)
        self._name, self._buffer, self._bytes = None, None, None
        return name, tensor

    def _start(self, chunk: tensor_pb2.TensorChunk) -> None:
        if chunk.offset != 0:
            raise RemoteLensError(f"first chunk of {chunk.name!r} starts at offset {chunk.offset}")
        if chunk.dtype not in _DTYPES:
            raise RemoteLensError(f"tensor {chunk.name!r} has unknown dtype {chunk.dtype}")
        _, np_dtype, size = _DTYPES[chunk.dtype]
        shape = tuple(int(d) for d in chunk.shape)
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if n * size != chunk.total_bytes:
            raise RemoteLensError(f"tensor {chunk.name!r} of shape {list(shape)} announces "
                                  f"{chunk.total_bytes} bytes, expected {n * size}")
        self._name, self._dtype, self._shape = chunk.name, chunk.dtype, shape
        self._buffer = np.empty(n, dtype=np_dtype)
        self._bytes = self._buffer.view(np.uint8)
        self._total = n * size
        self._next = 0


def element_size(dtype: int) -> int:
    """Bytes per element of a proto DType (0 when unknown)."""
    return _DTYPES.get(dtype, (None, None, 0))[2]
