"""Minimal numpy reader and writer for the safetensors format, plus sharded checkpoints.

The format: an 8-byte little-endian u64 N, then N bytes of JSON header
{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}},
then the data buffer; offsets are relative to the start of the data buffer and tensors are
row-major little-endian. This module exists so the tests depend on nothing but numpy.

bfloat16 has no numpy dtype: it is stored as uint16 bit patterns and widened to float32 by
shifting the 16 bits into the top half of a uint32 (exact), and narrowed with round-to-nearest-even.

Example:
    write_safetensors("x.safetensors", {"w": np.ones((2, 3), np.float32)})
    tensors = read_safetensors("x.safetensors")          # {"w": float32 array}
    write_sharded_checkpoint("model_dir", tensors, n_shards=2, dtype="BF16")
    tensors = read_checkpoint("model_dir")               # float32 arrays, whatever the disk dtype
"""

import json
import os
import struct
from typing import Dict, Optional

import numpy as np

# Disk dtype name -> (numpy dtype of the stored bits, bytes per element).
_STORAGE = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "U8": np.dtype("u1"),
}

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsError(ValueError):
    """Raised for malformed or unsupported safetensors files."""


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widens bfloat16 bit patterns (uint16) to float32 exactly."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Narrows float32 to bfloat16 bit patterns (uint16), rounding to nearest even.

    NaN stays NaN (quiet), infinities stay infinite.
    """
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding_bias = ((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    rounded = ((u + rounding_bias) >> np.uint32(16)).astype(np.uint16)
    is_nan = np.isnan(x)
    if np.any(is_nan):
        rounded = np.where(is_nan, ((u >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16), rounded)
    return rounded


def _encode(array: np.ndarray, dtype: str) -> bytes:
    if dtype not in _STORAGE:
        raise SafetensorsError(f"unsupported dtype for writing: {dtype}")
    if dtype == "BF16":
        stored = float32_to_bf16_bits(np.asarray(array, dtype=np.float32))
    else:
        stored = np.asarray(array).astype(_STORAGE[dtype])
    return np.ascontiguousarray(stored).tobytes()


def _decode(raw: bytes, dtype: str, shape) -> np.ndarray:
    if dtype not in _STORAGE:
        raise SafetensorsError(f"unsupported dtype in file: {dtype}")
    stored = np.frombuffer(raw, dtype=_STORAGE[dtype]).reshape(shape)
    if dtype == "BF16":
        return bf16_bits_to_float32(stored)
    return stored.copy()


def write_safetensors(path: str, tensors: Dict[str, np.ndarray], dtype: Optional[str] = None,
                      dtypes: Optional[Dict[str, str]] = None,
                      metadata: Optional[Dict[str, str]] = None) -> None:
    """Writes tensors to one safetensors file.

    Args:
      path: output file.
      tensors: name -> array (any float/int array; converted to the disk dtype).
      dtype: disk dtype for every tensor ("F32", "F16", "BF16", "F64", ...); default: F32 for
        floating arrays, otherwise derived from the array's dtype.
      dtypes: per-tensor override of dtype.
      metadata: optional string -> string "__metadata__".
    """
    header = {}
    chunks = []
    offset = 0
    for name in tensors:
        array = np.asarray(tensors[name])
        disk_dtype = (dtypes or {}).get(name, dtype)
        if disk_dtype is None:
            if np.issubdtype(array.dtype, np.floating):
                disk_dtype = "F32"
            else:
                disk_dtype = {np.dtype("int64"): "I64", np.dtype("int32"): "I32",
                              np.dtype("uint8"): "U8"}[array.dtype]
        data = _encode(array, disk_dtype)
        header[name] = {"dtype": disk_dtype, "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = dict(metadata)
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * ((8 - len(header_bytes) % 8) % 8)  # align the data buffer to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for data in chunks:
            f.write(data)


def read_safetensors_header(path: str) -> Dict[str, dict]:
    """Returns the parsed JSON header (including "__metadata__" when present)."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise SafetensorsError(f"{path}: truncated (no header length)")
        (n,) = struct.unpack("<Q", prefix)
        raw = f.read(n)
        if len(raw) != n:
            raise SafetensorsError(f"{path}: truncated header")
    return json.loads(raw.decode("utf-8"))


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """Reads every tensor of one file; floating dtypes other than F64 come back as float32."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise SafetensorsError(f"{path}: truncated (no header length)")
    (n,) = struct.unpack("<Q", blob[:8])
    if 8 + n > len(blob):
        raise SafetensorsError(f"{path}: truncated header")
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    data = blob[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if end > len(data):
            raise SafetensorsError(f"{path}: truncated data for {name}")
        array = _decode(data[begin:end], info["dtype"], info["shape"])
        if info["dtype"] in ("F16", "BF16"):
            array = array.astype(np.float32)
        out[name] = array
    return out


def write_sharded_checkpoint(directory: str, tensors: Dict[str, np.ndarray], n_shards: int,
                             dtype: str = "F32") -> Dict[str, str]:
    """Writes model-0000i-of-0000n.safetensors shards and model.safetensors.index.json.

    Tensors are split in order into n_shards groups of roughly equal byte size.

    Returns:
      The weight_map (tensor name -> shard file name).
    """
    os.makedirs(directory, exist_ok=True)
    names = list(tensors)
    sizes = [np.asarray(tensors[k]).size for k in names]
    total = sum(sizes)
    groups = [[] for _ in range(n_shards)]
    running = 0
    for name, size in zip(names, sizes):
        shard = min(n_shards - 1, (running * n_shards) // max(total, 1))
        groups[shard].append(name)
        running += size
    # Never leave a shard empty: move a tensor from the largest earlier group if needed.
    for i in range(n_shards):
        if not groups[i]:
            donor = max(range(n_shards), key=lambda j: len(groups[j]))
            groups[i].append(groups[donor].pop())
    weight_map = {}
    bytes_per = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}.get(dtype, 4)
    for i, group in enumerate(groups):
        file_name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        write_safetensors(os.path.join(directory, file_name), {k: tensors[k] for k in group},
                          dtype=dtype, metadata={"format": "pt"})
        for k in group:
            weight_map[k] = file_name
    index = {"metadata": {"total_size": total * bytes_per},
             "weight_map": {k: weight_map[k] for k in names}}
    with open(os.path.join(directory, INDEX_NAME), "w") as f:
        json.dump(index, f, indent=2)
    return weight_map


def read_checkpoint(directory: str) -> Dict[str, np.ndarray]:
    """Reads model.safetensors, or the shards listed in model.safetensors.index.json."""
    index_path = os.path.join(directory, INDEX_NAME)
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        out = {}
        for file_name in sorted(set(weight_map.values())):
            shard = read_safetensors(os.path.join(directory, file_name))
            for name, array in shard.items():
                if weight_map.get(name) == file_name:
                    out[name] = array
        missing = [k for k in weight_map if k not in out]
        if missing:
            raise SafetensorsError(f"{directory}: index lists tensors absent from shards: {missing}")
        return out
    return read_safetensors(os.path.join(directory, SINGLE_NAME))
