#!/usr/bin/python3
"""Writes the small seed corpus in fuzz/corpus/<target>/ (run once; its output is committed).

Each seed is a valid or nearly valid input, so the fuzzers start from the formats' structure
instead of finding JSON or protobuf framing by chance. Usage: /usr/bin/python3 fuzz/make_seed_corpus.py
"""
import hashlib
import json
import os
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "reference"))

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def put(target, name, data):
    os.makedirs(os.path.join(ROOT, target), exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(ROOT, target, name), "wb") as f:
        f.write(data)


def safetensors(tensors, metadata=None):
    header, offset, body = {}, 0, b""
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        body += data
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def tensor_proto(dtype, shape, data):
    # remotelens.v1.Tensor: 1 dtype (varint), 2 shape (packed int64), 3 data (bytes)
    packed = b"".join(varint(d & (2**64 - 1)) for d in shape)
    out = b"\x08" + varint(dtype)
    if shape:
        out += b"\x12" + varint(len(packed)) + packed
    return out + b"\x1a" + varint(len(data)) + data


def main():
    for i, name in enumerate(["hook_embed", "blocks.0.hook_resid_pre", "blocks.1.attn.hook_z",
                              "blocks.3.mlp.hook_post", "ln_final.hook_normalized",
                              "blocks.2.attn.hook_pattern"]):
        put("hook_names_fuzz", f"seed{i}", bytes([4]) + name.encode())

    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
              "vocab_size": 300, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
              "rope_theta": 500000.0, "bos_token_id": 1, "eos_token_id": 2,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
    put("llama_config_fuzz", "full.json", json.dumps(config))
    del config["rope_scaling"]
    put("llama_config_fuzz", "no_scaling.json", json.dumps(config))
    put("llama_config_fuzz", "empty.json", "{}")

    vocab = {chr(c) if chr(c).isalnum() else f"<{c}>": i for i, c in enumerate(range(33, 127))}
    vocab.update({"Ġ": 94, "he": 95, "Ġthe": 96})
    tokenizer = {"version": "1.0", "added_tokens": [
        {"id": 97, "content": "<|begin_of_text|>", "special": True},
        {"id": 98, "content": "<|end_of_text|>", "special": True}],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+|\\s+"},
             "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False}]},
        "model": {"type": "BPE", "vocab": vocab, "merges": ["h e", "Ġ t", "Ġt he"],
                  "ignore_merges": True}}
    put("tokenizer_fuzz", "small.json", json.dumps(tokenizer))
    tokenizer["model"]["merges"] = [["h", "e"]]
    put("tokenizer_fuzz", "merges_as_pairs.json", json.dumps(tokenizer))
    put("tokenizer_fuzz", "empty_model.json", json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": []}}))

    f32 = struct.pack("<6f", *range(6))
    put("safetensors_fuzz", "one_f32.safetensors", safetensors({"w": ("F32", [2, 3], f32)}))
    put("safetensors_fuzz", "mixed.safetensors", safetensors(
        {"a": ("BF16", [2], b"\x80\x3f\x00\x40"), "b": ("F16", [], b"\x00\x3c"),
         "e": ("F32", [0, 4], b"")}, {"format": "pt"}))
    put("safetensors_fuzz", "truncated.safetensors", safetensors({"w": ("F32", [2, 3], f32)})[:-5])

    put("checkpoint_index_fuzz", "index.json", json.dumps(
        {"metadata": {"total_size": 54}, "weight_map": {
            "model.embed_tokens.weight": "shard.safetensors", "model.norm.weight": "shard.safetensors"}}))
    put("checkpoint_index_fuzz", "other_shard.json", json.dumps(
        {"weight_map": {"model.norm.weight": "../shard.safetensors"}}))
    put("checkpoint_index_fuzz", "empty_map.json", json.dumps({"weight_map": {}}))

    put("tensor_codec_fuzz", "int64_tokens", tensor_proto(4, [1, 3], struct.pack("<3q", 1, 2, 3)))
    put("tensor_codec_fuzz", "f32_matrix", tensor_proto(1, [2, 2], struct.pack("<4f", 1, 2, 3, 4)))
    put("tensor_codec_fuzz", "bf16_scalar", tensor_proto(2, [], b"\x80\x3f"))
    put("tensor_codec_fuzz", "negative_dim", tensor_proto(1, [-1, 2], b""))
    put("tensor_codec_fuzz", "int32_empty", tensor_proto(5, [0], b""))

    h = hashlib.sha256(b"key").hexdigest()
    put("textproto_fuzz", "users", b"\x00" + (
        f'users {{ name: "alice" api_key_sha256: "{h}" role: "admin" '
        f'quota {{ max_concurrent_requests: 2 }} }}\n'
        f'users {{ name: "bob" api_key_sha256: "{hashlib.sha256(b"k2").hexdigest()}" }}\n').encode())
    put("textproto_fuzz", "users_dup", b"\x00" + (
        f'users {{ name: "a" api_key_sha256: "{h}" }} users {{ name: "a" api_key_sha256: "{h}" }}').encode())
    with open(os.path.join(os.path.dirname(__file__), "..", "configs", "demo.textproto"), "rb") as f:
        put("textproto_fuzz", "server_config", b"\x01" + f.read())

    put("metrics_http_fuzz", "get_metrics", "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    put("metrics_http_fuzz", "get_other", "GET / HTTP/1.1\r\n\r\n")
    put("metrics_http_fuzz", "post", "POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
    put("metrics_http_fuzz", "partial", "GET /metr")


if __name__ == "__main__":
    main()
