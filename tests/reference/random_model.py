"""Writes small random Llama checkpoints in Hugging Face layout for parity tests.

Two variants:
  "untied_f32": untied embeddings, one model.safetensors in F32, rope_theta 500000.
  "tied_bf16_sharded": tied embeddings (no lm_head.weight), two shards with an index, BF16 on
      disk, rope_theta 10000.
Both are chosen so every llama3 rope-scaling region (unchanged, interpolated, divided by factor)
holds at least one frequency, and each variant's test length exceeds
original_max_position_embeddings.

Example:
    config = write_random_model(str(tmp_path / "m"), "untied_f32")
"""

import json
import os
from typing import Dict

import numpy as np

from . import safetensors_io

VARIANTS = {
    # With d_head 16 and theta 500000 the wavelengths are 6.3, 32.4, 167, ...; an original
    # context of 64 puts 32.4 between high_freq_wavelen 16 and low_freq_wavelen 64.
    "untied_f32": dict(rope_theta=500000.0, original_max_position_embeddings=64,
                       tie_word_embeddings=False, n_shards=1, dtype="F32", seq_len=72, seed=0),
    # With theta 10000 the wavelengths are 6.3, 19.9, 62.8, ...; an original context of 32 puts
    # 19.9 between 8 and 32.
    "tied_bf16_sharded": dict(rope_theta=10000.0, original_max_position_embeddings=32,
                              tie_word_embeddings=True, n_shards=2, dtype="BF16", seq_len=48, seed=1),
}


def hf_config(variant: str) -> dict:
    v = VARIANTS[variant]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_hidden_layers": 3,
        "vocab_size": 300,
        "rms_norm_eps": 1e-5,
        "rope_theta": v["rope_theta"],
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0,
                         "original_max_position_embeddings": v["original_max_position_embeddings"]},
        "max_position_embeddings": 128,
        "tie_word_embeddings": v["tie_word_embeddings"],
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32" if v["dtype"] == "F32" else "bfloat16",
    }


def random_weights(config: dict, seed: int) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d_model = config["hidden_size"]
    d_mlp = config["intermediate_size"]
    n_heads = config["num_attention_heads"]
    n_kv = config["num_key_value_heads"]
    d_head = config["head_dim"]
    vocab = config["vocab_size"]

    def randn(*shape, std=0.1):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm_weight():
        return (1.0 + rng.standard_normal(d_model) * 0.1).astype(np.float32)

    weights = {"model.embed_tokens.weight": randn(vocab, d_model, std=0.3)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        weights[p + "input_layernorm.weight"] = norm_weight()
        weights[p + "self_attn.q_proj.weight"] = randn(n_heads * d_head, d_model, std=0.15)
        weights[p + "self_attn.k_proj.weight"] = randn(n_kv * d_head, d_model, std=0.15)
        weights[p + "self_attn.v_proj.weight"] = randn(n_kv * d_head, d_model)
        weights[p + "self_attn.o_proj.weight"] = randn(d_model, n_heads * d_head)
        weights[p + "post_attention_layernorm.weight"] = norm_weight()
        weights[p + "mlp.gate_proj.weight"] = randn(d_mlp, d_model)
        weights[p + "mlp.up_proj.weight"] = randn(d_mlp, d_model)
        weights[p + "mlp.down_proj.weight"] = randn(d_model, d_mlp)
    weights["model.norm.weight"] = norm_weight()
    if not config["tie_word_embeddings"]:
        weights["lm_head.weight"] = randn(vocab, d_model)
    return weights


def write_random_model(directory: str, variant: str) -> dict:
    """Writes config.json and weights for one variant; returns the HF config dict."""
    v = VARIANTS[variant]
    config = hf_config(variant)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    weights = random_weights(config, v["seed"])
    if v["n_shards"] == 1:
        safetensors_io.write_safetensors(os.path.join(directory, safetensors_io.SINGLE_NAME),
                                         weights, dtype=v["dtype"], metadata={"format": "pt"})
    else:
        safetensors_io.write_sharded_checkpoint(directory, weights, v["n_shards"], dtype=v["dtype"])
    return config
