"""Self-consistency tests of the float32 Llama reference and the safetensors reader/writer.

These need no engine: they check the reference against the math by other routes (a slow
per-token loop with complex-number rotary, causality, padding invariance, hook identities).
"""

import json
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.reference import safetensors_io  # noqa: E402
from tests.reference.llama_reference import (ALL_FLAGS, LlamaConfig, LlamaReference, ReferenceError,  # noqa: E402
                                             left_pad, rope_regions, rotary_inverse_frequencies)
from tests.reference.random_model import VARIANTS, write_random_model  # noqa: E402

ATOL = 1e-5


def max_abs(a, b):
    return float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max())


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def model(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    write_random_model(str(directory), request.param)
    return LlamaReference.from_pretrained(str(directory))


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    directory = tmp_path_factory.mktemp("untied")
    write_random_model(str(directory), "untied_f32")
    return LlamaReference.from_pretrained(str(directory))


def random_tokens(batch, n_pos, seed=0, vocab=300):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, n_pos), generator=g)


# ------------------------------------------------------------------ safetensors


def test_safetensors_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32),
               "b": rng.standard_normal((7,)).astype(np.float32),
               "scalar": np.float32(2.5).reshape(())}
    for dtype in ("F32", "F16", "BF16", "F64"):
        path = str(tmp_path / f"x_{dtype}.safetensors")
        safetensors_io.write_safetensors(path, tensors, dtype=dtype)
        header = safetensors_io.read_safetensors_header(path)
        assert header["a"]["dtype"] == dtype and header["a"]["shape"] == [3, 5]
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
        assert (8 + n) % 8 == 0
        back = safetensors_io.read_safetensors(path)
        for k, v in tensors.items():
            if dtype == "F32" or dtype == "F64":
                np.testing.assert_array_equal(back[k], v)
            elif dtype == "F16":
                np.testing.assert_array_equal(back[k], v.astype(np.float16).astype(np.float32))
            else:
                expect = torch.from_numpy(np.array(v)).to(torch.bfloat16).to(torch.float32).numpy()
                np.testing.assert_array_equal(back[k], expect)


def test_bf16_widening_is_bit_shift():
    bits = np.array([0x3F80, 0xC000, 0x0001, 0x7F80, 0x4049], dtype=np.uint16)
    values = safetensors_io.bf16_bits_to_float32(bits)
    assert values[0] == 1.0 and values[1] == -2.0 and values[3] == np.inf
    assert values[4] == np.float32(3.140625)
    torch_bits = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(torch_bits, bits)


def test_bf16_rounding_matches_torch():
    x = np.random.default_rng(1).standard_normal(10000).astype(np.float32)
    ours = safetensors_io.float32_to_bf16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)


def test_sharded_checkpoint_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    tensors = {f"t{i}": rng.standard_normal((i + 1, 4)).astype(np.float32) for i in range(5)}
    weight_map = safetensors_io.write_sharded_checkpoint(str(tmp_path), tensors, 2, dtype="F32")
    assert sorted(set(weight_map.values())) == ["model-00001-of-00002.safetensors",
                                                 "model-00002-of-00002.safetensors"]
    with open(tmp_path / "model.safetensors.index.json") as f:
        assert json.load(f)["weight_map"] == weight_map
    back = safetensors_io.read_checkpoint(str(tmp_path))
    assert sorted(back) == sorted(tensors)
    for k in tensors:
        np.testing.assert_array_equal(back[k], tensors[k])


def test_truncated_file_is_rejected(tmp_path):
    path = str(tmp_path / "x.safetensors")
    safetensors_io.write_safetensors(path, {"a": np.ones((64,), np.float32)})
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4)
    with pytest.raises(safetensors_io.SafetensorsError, match="truncated"):
        safetensors_io.read_safetensors(path)


# ------------------------------------------------------------------ rotary


def test_llama3_scaling_regions_and_values():
    for variant in VARIANTS:
        from tests.reference.random_model import hf_config
        config = LlamaConfig.from_hf_dict(hf_config(variant))
        unchanged, interpolated, divided = rope_regions(config)
        assert unchanged >= 1 and interpolated >= 1 and divided >= 1, variant
    config = LlamaConfig.from_hf_dict(hf_config("untied_f32"))
    inv = rotary_inverse_frequencies(config).numpy()
    base = 1.0 / 500000.0 ** (np.arange(0, 16, 2) / 16.0)
    assert inv[0] == base[0]  # wavelength 6.28 < 16: unchanged
    np.testing.assert_allclose(inv[2:], base[2:] / 8.0, rtol=1e-15)  # wavelengths > 64: divided
    wavelen = 2 * math.pi / base[1]
    smooth = (64.0 / wavelen - 1.0) / (4.0 - 1.0)
    assert 0 < smooth < 1
    np.testing.assert_allclose(inv[1], (1 - smooth) * base[1] / 8 + smooth * base[1], rtol=1e-15)


def test_no_scaling_when_rope_scaling_absent():
    from tests.reference.random_model import hf_config
    hf = hf_config("untied_f32")
    hf["rope_scaling"] = None
    inv = rotary_inverse_frequencies(LlamaConfig.from_hf_dict(hf)).numpy()
    np.testing.assert_allclose(inv, 1.0 / 500000.0 ** (np.arange(0, 16, 2) / 16.0), rtol=1e-15)


# ------------------------------------------------------------------ an independent slow forward


def slow_forward(model: LlamaReference, tokens: torch.Tensor) -> torch.Tensor:
    """Logits for one unpadded row, token by token, with complex-number rotary (float64)."""
    c = model.config
    w = {k: v.double() for k, v in model.w.items()}
    W_U = model.W_U.double()
    inv_freq = rotary_inverse_frequencies(c)
    half = c.d_head // 2

    def norm(x, weight):
        return x / torch.sqrt((x ** 2).mean() + c.eps) * weight

    def rotate(vec, pos):
        # Rotate-half layout pairs element i with element i + d_head/2.
        z = torch.complex(vec[:half], vec[half:]) * torch.exp(1j * pos * inv_freq)
        return torch.cat([z.real, z.imag])

    residuals = [w["model.embed_tokens.weight"][int(t)] for t in tokens]
    for layer in range(c.n_layers):
        p = f"model.layers.{layer}."
        keys, values, new_residuals = [], [], []
        for pos, x in enumerate(residuals):
            h = norm(x, w[p + "input_layernorm.weight"])
            q = (w[p + "self_attn.q_proj.weight"] @ h).reshape(c.n_heads, c.d_head)
            k = (w[p + "self_attn.k_proj.weight"] @ h).reshape(c.n_kv_heads, c.d_head)
            v = (w[p + "self_attn.v_proj.weight"] @ h).reshape(c.n_kv_heads, c.d_head)
            keys.append(torch.stack([rotate(k[j], pos) for j in range(c.n_kv_heads)]))
            values.append(v)
            heads_out = []
            for head in range(c.n_heads):
                kv = head * c.n_kv_heads // c.n_heads
                qr = rotate(q[head], pos)
                scores = torch.stack([qr @ keys[t][kv] for t in range(pos + 1)]) / math.sqrt(c.d_head)
                weights = torch.softmax(scores, dim=0)
                heads_out.append(sum(weights[t] * values[t][kv] for t in range(pos + 1)))
            x = x + w[p + "self_attn.o_proj.weight"] @ torch.cat(heads_out)
            h = norm(x, w[p + "post_attention_layernorm.weight"])
            gate = w[p + "mlp.gate_proj.weight"] @ h
            up = w[p + "mlp.up_proj.weight"] @ h
            x = x + w[p + "mlp.down_proj.weight"] @ (gate / (1 + torch.exp(-gate)) * up)
            new_residuals.append(x)
        residuals = new_residuals
    return torch.stack([W_U @ norm(x, w["model.norm.weight"]) for x in residuals])


def test_matches_slow_token_by_token_forward(model):
    n_pos = 48 if model.config.tie_word_embeddings else 72  # both longer than the original context
    tokens = random_tokens(1, n_pos, seed=3)
    logits, _ = model.forward(tokens)
    expected = slow_forward(model, tokens[0])
    assert max_abs(logits[0].double(), expected) < 2e-5


# ------------------------------------------------------------------ self-consistency


def test_causal(model):
    tokens = random_tokens(2, 20, seed=4)
    _, cache = model.forward(tokens)
    changed = tokens.clone()
    changed[:, 12:] = (changed[:, 12:] + 7) % 300
    _, cache2 = model.forward(changed)
    for name, act in cache.items():
        if "attn_scores" in name or "pattern" in name:
            a, b = act[:, :, :12, :12], cache2[name][:, :, :12, :12]
            finite = torch.isfinite(a)
            assert torch.equal(finite, torch.isfinite(b))
            assert max_abs(a[finite], b[finite]) == 0.0, name
        elif name.startswith("ln_final") or name.startswith("blocks") or name == "hook_embed":
            assert max_abs(act[:, :12], cache2[name][:, :12]) == 0.0, name
    assert max_abs(cache["blocks.2.hook_resid_post"][:, 12:], cache2["blocks.2.hook_resid_post"][:, 12:]) > 1e-2


def test_prefix_runs_agree_with_full_run(untied):
    tokens = random_tokens(1, 30, seed=5)
    full, _ = untied.forward(tokens)
    for t in (1, 7, 29):
        prefix, _ = untied.forward(tokens[:, :t])
        assert max_abs(prefix, full[:, :t]) < 1e-5


def test_left_padding_matches_unpadded_rows(model):
    rows = [random_tokens(1, n, seed=10 + n)[0].tolist() for n in (17, 9, 4)]
    tokens, mask = left_pad(rows)
    logits, cache = model.forward(tokens, attention_mask=mask)
    n_pos = tokens.shape[1]
    for i, row in enumerate(rows):
        start = n_pos - len(row)
        alone_logits, alone = model.forward(torch.tensor([row]))
        assert max_abs(logits[i, start:], alone_logits[0]) < ATOL
        for name, act in alone.items():
            if "attn_scores" in name or "pattern" in name:
                padded = cache[name][i, :, start:, start:]
                # Real queries never see pad keys.
                if start == 0:
                    pass
                elif "pattern" in name:
                    assert float(cache[name][i, :, start:, :start].abs().max()) == 0.0
                else:
                    assert bool(torch.isneginf(cache[name][i, :, start:, :start]).all())
                finite = torch.isfinite(act[0])
                assert torch.equal(finite, torch.isfinite(padded)), name
                assert max_abs(padded[finite], act[0][finite]) < ATOL, name
            else:
                assert max_abs(cache[name][i, start:], act[0]) < ATOL, name
    assert not any(bool(torch.isnan(a).any()) for a in cache.values())


def test_hook_identities(model):
    c = model.config
    tokens = random_tokens(2, 12, seed=6)
    logits, cache = model.forward(tokens, flags=ALL_FLAGS)
    assert set(cache) == set(model.hook_names)
    shapes = {"hook_embed": (2, 12, c.d_model), "ln_final.hook_scale": (2, 12, 1)}
    for layer in range(c.n_layers):
        p = f"blocks.{layer}."
        shapes.update({p + "attn.hook_q": (2, 12, c.n_heads, c.d_head),
                       p + "attn.hook_k": (2, 12, c.n_kv_heads, c.d_head),
                       p + "attn.hook_rot_k": (2, 12, c.n_kv_heads, c.d_head),
                       p + "attn.hook_pattern": (2, c.n_heads, 12, 12),
                       p + "attn.hook_result": (2, 12, c.n_heads, c.d_model),
                       p + "mlp.hook_post": (2, 12, c.d_mlp),
                       p + "ln2.hook_scale": (2, 12, 1)})
        r = cache[p + "hook_resid_pre"]
        assert max_abs(cache[p + "ln1.hook_normalized"] * cache[p + "ln1.hook_scale"], r) < ATOL
        assert max_abs(cache[p + "attn.hook_result"].sum(2), cache[p + "hook_attn_out"]) == 0.0
        assert max_abs(cache[p + "hook_resid_mid"], r + cache[p + "hook_attn_out"]) == 0.0
        assert max_abs(cache[p + "hook_resid_post"],
                       cache[p + "hook_resid_mid"] + cache[p + "hook_mlp_out"]) == 0.0
        pattern = cache[p + "attn.hook_pattern"]
        assert max_abs(pattern.sum(-1), torch.ones(2, c.n_heads, 12)) < 1e-6
        assert float(pattern.triu(1).abs().max()) == 0.0
        assert bool(torch.isneginf(cache[p + "attn.hook_attn_scores"].triu(1)[..., 0, 1:]).all())
        # Grouped-query attention: head h reads kv head h // (n_heads / n_kv_heads).
        v = cache[p + "attn.hook_v"]
        for h in range(c.n_heads):
            z_h = torch.einsum("bqk,bkd->bqd", pattern[:, h], v[:, :, h // (c.n_heads // c.n_kv_heads)])
            assert max_abs(z_h, cache[p + "attn.hook_z"][:, :, h]) < ATOL
        # Rotary is a rotation: norms of each half-pair are preserved, position 0 is unrotated.
        q, rq = cache[p + "attn.hook_q"], cache[p + "attn.hook_rot_q"]
        assert max_abs(q[:, 0], rq[:, 0]) == 0.0
        assert max_abs(q.norm(dim=-1), rq.norm(dim=-1)) < ATOL
    for name, shape in shapes.items():
        assert tuple(cache[name].shape) == shape, name
    fast, empty = model.forward(tokens, collect=False)
    assert empty == {} and max_abs(fast, logits) < ATOL


def test_stop_at_layer(untied):
    tokens = random_tokens(2, 10, seed=7)
    _, cache = untied.forward(tokens)
    resid, _ = untied.forward(tokens, stop_at_layer=2)
    assert torch.equal(resid, cache["blocks.1.hook_resid_post"])


# ------------------------------------------------------------------ interventions


def test_zero_head_of_z_propagates(untied):
    tokens = random_tokens(2, 10, seed=8)
    clean, clean_cache = untied.forward(tokens)
    ops = [{"hook": "blocks.1.attn.hook_z", "op": "zero", "heads": [1]}]
    logits, cache = untied.forward(tokens, ops=ops)
    assert float(cache["blocks.1.attn.hook_z"][:, :, 1].abs().max()) == 0.0
    assert float(cache["blocks.1.attn.hook_result"][:, :, 1].abs().max()) == 0.0
    assert torch.equal(cache["blocks.1.attn.hook_z"][:, :, 0], clean_cache["blocks.1.attn.hook_z"][:, :, 0])
    assert torch.equal(cache["blocks.1.hook_resid_pre"], clean_cache["blocks.1.hook_resid_pre"])
    assert max_abs(logits, clean) > 1e-3
    # Same thing done by hand: remove head 1's contribution from attn_out.
    manual = {"d": clean_cache["blocks.1.attn.hook_result"][:, :, 1].neg()}
    by_hand, _ = untied.forward(tokens, ops=[{"hook": "blocks.1.hook_attn_out", "op": "add", "tensor": "d"}],
                                hook_tensors=manual)
    assert max_abs(by_hand, logits) < ATOL


def test_set_add_scale_mean_selectors(untied):
    tokens = random_tokens(3, 9, seed=9)
    _, clean = untied.forward(tokens)
    patch = torch.randn(3, 1, 64)
    steer = torch.randn(64)
    ops = [{"hook": "blocks.0.hook_resid_pre", "op": "set", "tensor": "patch", "positions": [-2]},
           {"hook": "blocks.1.hook_resid_post", "op": "add", "tensor": "steer"},
           {"hook": "blocks.1.hook_resid_post", "op": "scale", "factor": 0.5, "positions": [0, -1]},
           {"hook": "blocks.2.mlp.hook_post", "op": "mean", "positions": [3]},
           {"hook": "blocks.2.attn.hook_pattern", "op": "zero", "heads": [2], "positions": [5]}]
    _, cache = untied.forward(tokens, ops=ops, hook_tensors={"patch": patch, "steer": steer})
    r0 = cache["blocks.0.hook_resid_pre"]
    assert torch.equal(r0[:, 7:8], patch) and torch.equal(r0[:, :7], clean["hook_embed"][:, :7])
    r1 = cache["blocks.1.hook_resid_post"]
    assert max_abs(r1[:, 0], r1[:, 0].new_zeros(1)) > 0
    mean = cache["blocks.2.mlp.hook_post"][:, 3]
    assert max_abs(mean, mean[:1].expand_as(mean)) == 0.0
    pattern = cache["blocks.2.attn.hook_pattern"]
    assert float(pattern[:, 2, 5].abs().max()) == 0.0
    assert float(pattern[:, 2, 4].abs().max()) > 0 and float(pattern[:, 1, 5].abs().max()) > 0


def test_scale_op_values(untied):
    tokens = random_tokens(2, 6, seed=11)
    ops = [{"hook": "blocks.1.hook_resid_post", "op": "add", "tensor": "steer"},
           {"hook": "blocks.1.hook_resid_post", "op": "scale", "factor": 0.5, "positions": [0, -1]}]
    steer = torch.randn(64)
    clean, _ = untied.forward(tokens, stop_at_layer=2)
    out, _ = untied.forward(tokens, ops=ops, hook_tensors={"steer": steer}, stop_at_layer=2)
    expected = clean + steer
    expected[:, [0, 5]] *= 0.5
    assert max_abs(out, expected) < ATOL


def test_invalid_ops_are_rejected(untied):
    tokens = random_tokens(1, 5)
    with pytest.raises(ReferenceError, match="unknown hook"):
        untied.forward(tokens, ops=[{"hook": "blocks.0.hook_resid_pr", "op": "zero"}])
    with pytest.raises(ReferenceError, match="head"):
        untied.forward(tokens, ops=[{"hook": "blocks.0.hook_resid_pre", "op": "zero", "heads": [0]}])
    with pytest.raises(ReferenceError, match="broadcast"):
        untied.forward(tokens, ops=[{"hook": "blocks.0.hook_resid_pre", "op": "set", "tensor": "t"}],
                       hook_tensors={"t": torch.zeros(3)})
    with pytest.raises(ReferenceError, match="vocab"):
        untied.forward(torch.tensor([[300]]))
    with pytest.raises(ReferenceError, match="max_position_embeddings"):
        untied.forward(torch.ones(1, 129, dtype=torch.int64))


# ------------------------------------------------------------------ opt-in hook points


def test_opt_in_hook_points_hold_transformer_lens_values(model):
    # TransformerLens components/transformer_block.py (use_attn_in, use_split_qkv_input,
    # use_hook_mlp_in) and components/unembed.py (unembed.hook_in / hook_out).
    c = model.config
    tokens = random_tokens(2, 9, seed=21)
    logits, cache = model.forward(tokens, flags=ALL_FLAGS)
    plain, plain_cache = model.forward(tokens)
    assert max_abs(logits, plain) < ATOL
    assert not any(k.endswith(("hook_q_input", "hook_attn_in", "hook_mlp_in")) for k in plain_cache)
    for layer in range(c.n_layers):
        p = f"blocks.{layer}."
        resid_pre = cache[p + "hook_resid_pre"]
        assert cache[p + "hook_attn_in"].shape == (2, 9, c.n_heads, c.d_model)
        assert cache[p + "hook_q_input"].shape == (2, 9, c.n_heads, c.d_model)
        assert cache[p + "hook_k_input"].shape == (2, 9, c.n_kv_heads, c.d_model)
        for h in range(c.n_heads):
            assert torch.equal(cache[p + "hook_q_input"][:, :, h], resid_pre)
        assert torch.equal(cache[p + "hook_mlp_in"], cache[p + "hook_resid_mid"])
        assert max_abs(cache[p + "attn.hook_q"], plain_cache[p + "attn.hook_q"]) < ATOL
    assert torch.equal(cache["unembed.hook_out"], logits)
    assert max_abs(cache["unembed.hook_in"],
                   cache["ln_final.hook_normalized"] * model.w["model.norm.weight"]) < ATOL


def test_split_inputs_feed_their_own_heads(model):
    c = model.config
    tokens = random_tokens(1, 8, seed=22)
    _, clean = model.forward(tokens)
    ops = [{"hook": "blocks.1.hook_k_input", "op": "zero", "heads": [1]}]
    _, cache = model.forward(tokens, ops=ops, flags=["use_split_qkv_input"])
    assert float(cache["blocks.1.attn.hook_k"][:, :, 1].abs().max()) == 0.0
    assert max_abs(cache["blocks.1.attn.hook_k"][:, :, 0], clean["blocks.1.attn.hook_k"][:, :, 0]) < ATOL
    assert max_abs(cache["blocks.1.attn.hook_v"], clean["blocks.1.attn.hook_v"]) < ATOL
    # A copy scaled up goes through its own RMSNorm: the scale cancels (up to eps).
    _, scaled = model.forward(tokens, ops=[{"hook": "blocks.1.hook_q_input", "op": "scale", "factor": 4.0}],
                              flags=["use_split_qkv_input"])
    assert max_abs(scaled["blocks.1.attn.hook_q"], clean["blocks.1.attn.hook_q"]) < 1e-3
    with pytest.raises(ReferenceError, match="flag"):
        model.forward(tokens, ops=ops, flags=["use_attn_in"])


def test_attn_in_is_overridden_by_split_inputs(model):
    c = model.config
    tokens = random_tokens(1, 8, seed=23)
    _, clean = model.forward(tokens)
    ops = [{"hook": "blocks.0.hook_attn_in", "op": "zero", "heads": [0]}]
    _, alone = model.forward(tokens, ops=ops, flags=["use_attn_in"])
    # Query head 0 and, with grouped-query attention, key/value head 0 read copy 0.
    for site in ("attn.hook_q", "attn.hook_k", "attn.hook_v"):
        assert float(alone["blocks.0." + site][:, :, 0].abs().max()) == 0.0, site
        assert max_abs(alone["blocks.0." + site][:, :, 1], clean["blocks.0." + site][:, :, 1]) < ATOL
    _, both = model.forward(tokens, ops=ops, flags=["use_attn_in", "use_split_qkv_input"])
    assert max_abs(both["blocks.0.attn.hook_q"], clean["blocks.0.attn.hook_q"]) < ATOL


def test_mlp_in_edits_leave_the_residual_stream(model):
    tokens = random_tokens(1, 6, seed=24)
    _, clean = model.forward(tokens)
    d = torch.full((model.config.d_model,), 0.5)
    _, cache = model.forward(tokens, ops=[{"hook": "blocks.1.hook_mlp_in", "op": "add", "tensor": "d"}],
                             hook_tensors={"d": d}, flags=["use_hook_mlp_in"])
    assert torch.equal(cache["blocks.1.hook_resid_mid"], clean["blocks.1.hook_resid_mid"])
    assert max_abs(cache["blocks.1.hook_mlp_out"], clean["blocks.1.hook_mlp_out"]) > 1e-4
    assert max_abs(cache["blocks.1.hook_resid_post"],
                   cache["blocks.1.hook_resid_mid"] + cache["blocks.1.hook_mlp_out"]) < ATOL
