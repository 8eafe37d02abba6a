"""End to end: a real remotelens_server process and a real gRPC client, every RPC.

Values are checked against the independent float32 reference (tests/reference, |diff| <= 1e-4),
against the checkpoint itself (GetWeights), and against the engine run directly through
bazel-bin/tools/remotelens_run.
"""
import json
import os
import subprocess
import time

import grpc
import numpy as np
import pytest
import torch

import wire
from server_helpers import ATOL, Interactive, assert_close, max_diff, random_rows, ref_forward, run
from remotelens.v1 import hooks_pb2
from remotelens.v1 import remotelens_pb2 as pb
from remotelens.v1 import tensor_pb2
from tests.reference import safetensors_io
from tests.reference.llama_reference import BLOCK_SITES, all_hook_names

import server_harness

H = hooks_pb2.HookOp
ROWS = [[5, 17, 300, 42, 7, 99, 250, 13], [1, 2, 3, 4, 5, 6, 7, 8]]


def tok(rows):
    return wire.tokens(rows)


def vec(array):
    return wire.to_proto(np.asarray(array, np.float32))


# ------------------------------------------------------------------ GetModelInfo


def expected_hook_shape(name, c):
    site = name.split(".", 2)[2] if name.startswith("blocks.") else name
    d, H_, K, dh, m = c.d_model, c.n_heads, c.n_kv_heads, c.d_head, c.d_mlp
    return {
        "hook_embed": [-1, -1, d], "hook_resid_pre": [-1, -1, d], "ln1.hook_scale": [-1, -1, 1],
        "ln1.hook_normalized": [-1, -1, d], "attn.hook_q": [-1, -1, H_, dh],
        "attn.hook_k": [-1, -1, K, dh], "attn.hook_v": [-1, -1, K, dh],
        "attn.hook_rot_q": [-1, -1, H_, dh], "attn.hook_rot_k": [-1, -1, K, dh],
        "attn.hook_attn_scores": [-1, H_, -1, -1], "attn.hook_pattern": [-1, H_, -1, -1],
        "attn.hook_z": [-1, -1, H_, dh], "attn.hook_result": [-1, -1, H_, d],
        "hook_attn_out": [-1, -1, d], "hook_resid_mid": [-1, -1, d], "ln2.hook_scale": [-1, -1, 1],
        "ln2.hook_normalized": [-1, -1, d], "mlp.hook_pre": [-1, -1, m],
        "mlp.hook_pre_linear": [-1, -1, m], "mlp.hook_post": [-1, -1, m],
        "hook_mlp_out": [-1, -1, d], "hook_resid_post": [-1, -1, d],
        "ln_final.hook_scale": [-1, -1, 1], "ln_final.hook_normalized": [-1, -1, d],
        "hook_attn_in": [-1, -1, H_, d], "hook_q_input": [-1, -1, H_, d],
        "hook_k_input": [-1, -1, K, d], "hook_v_input": [-1, -1, K, d], "hook_mlp_in": [-1, -1, d],
        "unembed.hook_in": [-1, -1, d], "unembed.hook_out": [-1, -1, c.d_vocab],
    }[site]


def test_model_info_matches_checkpoint_and_lists_every_hook(info, ref, demo_model_dir):
    c = ref.config
    with open(os.path.join(demo_model_dir, "config.json")) as f:
        hf = json.load(f)
    assert info.model_name == "remotelens-demo"
    assert (info.n_layers, info.d_model, info.n_heads, info.n_key_value_heads, info.d_head,
            info.d_mlp, info.d_vocab, info.n_ctx) == (
        c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_head, c.d_mlp, c.d_vocab,
        c.max_position_embeddings)
    assert info.n_key_value_heads < info.n_heads  # the demo model uses grouped-query attention
    assert info.rms_norm_eps == pytest.approx(c.eps)
    assert info.rope_theta == pytest.approx(c.rope_theta)
    assert info.rope_scaling == "llama3"
    assert info.tie_word_embeddings == bool(hf.get("tie_word_embeddings", False))
    assert info.dtype == tensor_pb2.DTYPE_FLOAT32
    assert list(info.devices) == ["cpu"]
    assert 0 <= info.bos_token_id < info.d_vocab
    assert len(info.eos_token_ids) >= 1
    # Every hook point, in forward order, with TransformerLens shapes.
    assert [h.name for h in info.hooks] == all_hook_names(c.n_layers)
    assert len(info.hooks) == 5 + len(BLOCK_SITES) * c.n_layers
    for h in info.hooks:
        assert list(h.shape) == expected_hook_shape(h.name, c), h.name


def test_model_info_lists_dims_aliases_and_flags(info, ref):
    # Capability introspection (TransformerLens 4 supported hook points): the client needs no
    # hook tables of its own. Names from TL4 model_bridge/generalized_components/block.py,
    # attention.py and gated_mlp.py hook_aliases; flags from TL3 HookedTransformer.check_hooks_to_add.
    c = ref.config
    by_name = {h.name: h for h in info.hooks}
    words = {"batch": -1, "pos": -1, "query_pos": -1, "key_pos": -1, "head_index": c.n_heads,
             "kv_head_index": c.n_kv_heads, "d_head": c.d_head, "d_model": c.d_model,
             "d_mlp": c.d_mlp, "d_vocab": c.d_vocab, "1": 1}
    aliases = [a for h in info.hooks for a in h.aliases]
    assert len(aliases) == len(set(aliases))
    # An alias spelled like a wire name (blocks.L.hook_mlp_in, unembed.hook_in) is that same hook.
    assert all(a == h.name for h in info.hooks for a in h.aliases if a in by_name)
    for h in info.hooks:
        assert [words[d] for d in h.dims] == list(h.shape), h.name
        assert h.dims[h.pos_dim] in ("pos", "query_pos"), h.name
        assert (h.head_dim == -1) == all(d not in ("head_index", "kv_head_index") for d in h.dims), h.name
        assert h.supports_backward, h.name
    last = c.n_layers - 1
    assert list(by_name["blocks.0.hook_resid_pre"].aliases) == ["blocks.0.hook_in"]
    assert list(by_name["blocks.1.attn.hook_z"].aliases) == ["blocks.1.attn.o.hook_in"]
    assert list(by_name["blocks.0.hook_attn_out"].aliases) == ["blocks.0.attn.o.hook_out", "blocks.0.attn.hook_out"]
    assert list(by_name[f"blocks.{last}.hook_resid_post"].aliases) == [f"blocks.{last}.hook_out", "ln_final.hook_in"]
    assert list(by_name["hook_embed"].aliases) == ["embed.hook_out"]
    assert list(by_name["unembed.hook_out"].aliases) == ["unembed.hook_out"]
    assert list(by_name["blocks.0.hook_k_input"].dims) == ["batch", "pos", "kv_head_index", "d_model"]
    assert list(by_name["blocks.0.attn.hook_pattern"].dims) == ["batch", "head_index", "query_pos", "key_pos"]
    flags = {h.name.split(".", 2)[-1]: h.enabled_by for h in info.hooks if h.enabled_by}
    assert flags == {"attn.hook_result": "use_attn_result", "hook_attn_in": "use_attn_in",
                     "hook_q_input": "use_split_qkv_input", "hook_k_input": "use_split_qkv_input",
                     "hook_v_input": "use_split_qkv_input", "hook_mlp_in": "use_hook_mlp_in"}


def test_model_info_shapes_match_real_activations(stub, info):
    rows = random_rows(2, 5, seed=1)
    tensors, _, _ = run(stub, tokens=tok(rows), return_type=pb.RETURN_TYPE_NONE,
                        cache=pb.CacheSelection(names=["*"], stream=True))
    assert set(tensors) == {h.name for h in info.hooks}
    for h in info.hooks:
        got = tensors[h.name].shape
        want = list(h.shape)
        assert len(got) == len(want), h.name
        for g, w in zip(got, want):
            assert w == -1 or g == w, (h.name, got, want)
        assert got[0] == 2


# ------------------------------------------------------------------ Tokenize / Detokenize


def test_tokenize_detokenize_round_trip(stub, info):
    texts = ["The cat sat on the mat.", "naïve café ☕"]
    r = stub.Tokenize(pb.TokenizeRequest(texts=texts, prepend_bos=False, return_str_tokens=True))
    tokens = wire.from_proto(r.tokens)
    mask = wire.from_proto(r.attention_mask)
    assert r.tokens.dtype == tensor_pb2.DTYPE_INT64 and r.attention_mask.dtype == tensor_pb2.DTYPE_INT64
    assert tokens.shape == mask.shape == (2, max(r.lengths))
    assert list(mask.sum(1)) == list(r.lengths)
    for i, text in enumerate(texts):
        n = r.lengths[i]
        ids = tokens[i, tokens.shape[1] - n:].tolist()  # left padding by default
        assert mask[i, :tokens.shape[1] - n].sum() == 0
        assert (tokens[i, :tokens.shape[1] - n] == r.pad_token_id).all()
        # str tokens are bytes; they concatenate to the text's UTF-8 bytes, even when one token
        # is half a character.
        pieces = list(r.str_tokens[i].tokens)
        assert len(pieces) == n
        assert b"".join(pieces) == text.encode("utf-8")
        d = stub.Detokenize(pb.DetokenizeRequest(rows=[pb.TokenRow(ids=ids)], return_str_tokens=True))
        assert d.texts[0] == text.encode("utf-8")
        assert list(d.str_tokens[0].tokens) == pieces
    partial = [p for p in r.str_tokens[1].tokens if p]
    assert any(_not_utf8(p) for p in partial), "expected a token holding part of a character"
    # A row cut mid-character comes back as raw bytes, not an error.
    cut = stub.Detokenize(pb.DetokenizeRequest(rows=[pb.TokenRow(ids=[195])]))
    assert cut.texts[0] == b"\xc3"


def _not_utf8(b):
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_tokenize_padding_side_and_prepend_bos(stub, info):
    texts = ["Hello world", "hi"]
    left = stub.Tokenize(pb.TokenizeRequest(texts=texts, prepend_bos=True))
    right = stub.Tokenize(pb.TokenizeRequest(texts=texts, prepend_bos=True,
                                             padding_side=pb.PADDING_SIDE_RIGHT))
    explicit_left = stub.Tokenize(pb.TokenizeRequest(texts=texts, prepend_bos=True,
                                                     padding_side=pb.PADDING_SIDE_LEFT))
    no_bos = stub.Tokenize(pb.TokenizeRequest(texts=texts, prepend_bos=False))
    lt, lm = wire.from_proto(left.tokens), wire.from_proto(left.attention_mask)
    rt, rm = wire.from_proto(right.tokens), wire.from_proto(right.attention_mask)
    assert np.array_equal(lt, wire.from_proto(explicit_left.tokens))
    assert list(left.lengths) == list(right.lengths) == [n + 1 for n in no_bos.lengths]
    n0, n1 = left.lengths
    assert n0 > n1
    p = lt.shape[1]
    assert lm.tolist()[1] == [0] * (p - n1) + [1] * n1
    assert rm.tolist()[1] == [1] * n1 + [0] * (p - n1)
    assert lt[1, p - n1:].tolist() == rt[1, :n1].tolist()
    assert lt[1, p - n1] == info.bos_token_id and rt[1, 0] == info.bos_token_id
    assert lt[0, 0] == info.bos_token_id
    nb = wire.from_proto(no_bos.tokens)
    assert info.bos_token_id not in nb[np.asarray(wire.from_proto(no_bos.attention_mask)) == 1]
    assert lt[0, 1:].tolist() == nb[0].tolist()


# ------------------------------------------------------------------ sessions and hooks


def test_session_lifecycle(stub):
    before = {s.session_id for s in stub.ListSessions(pb.ListSessionsRequest()).sessions}
    t0 = time.time() * 1000
    s = stub.CreateSession(pb.CreateSessionRequest())
    assert len(s.session_id) >= 16
    assert s.ttl_seconds == 3600
    assert abs(s.expires_unix_ms - (t0 + 3600 * 1000)) < 60 * 1000
    assert (s.num_hooks, s.num_caches, s.stored_cache_bytes) == (0, 0, 0)
    short = stub.CreateSession(pb.CreateSessionRequest(ttl_seconds=120))
    assert short.ttl_seconds == 120
    capped = stub.CreateSession(pb.CreateSessionRequest(ttl_seconds=10 ** 7))
    assert capped.ttl_seconds == 86400  # max_session_ttl_seconds default
    listed = {x.session_id: x for x in stub.ListSessions(pb.ListSessionsRequest()).sessions}
    assert {s.session_id, short.session_id, capped.session_id} <= set(listed)
    assert listed[short.session_id].ttl_seconds == 120
    for x in (s, short, capped):
        stub.CloseSession(pb.CloseSessionRequest(session_id=x.session_id))
    after = {x.session_id for x in stub.ListSessions(pb.ListSessionsRequest()).sessions}
    assert after == before


def test_hooks_add_list_remove_reset_with_prepend_order(stub, ref):
    rows = random_rows(2, 7, seed=2)
    hook = "blocks.1.hook_resid_post"
    steer = np.random.default_rng(0).normal(size=ref.config.d_model).astype(np.float32)
    sid = stub.CreateSession(pb.CreateSessionRequest()).session_id
    try:
        scale_op = H(hook_name=hook, scale=hooks_pb2.ScaleOp(factor=2.0))
        add_op = H(hook_name=hook, add=hooks_pb2.AddOp(value=vec(steer)))
        zero_op = H(hook_name="blocks.0.attn.hook_z", selector=hooks_pb2.Selector(heads=[3]),
                    zero=hooks_pb2.ZeroOp())
        id_scale = stub.AddHook(pb.AddHookRequest(session_id=sid, op=scale_op)).hook_id
        id_add = stub.AddHook(pb.AddHookRequest(session_id=sid, op=add_op, prepend=True)).hook_id
        id_zero = stub.AddHook(pb.AddHookRequest(session_id=sid, op=zero_op)).hook_id
        assert len({id_scale, id_add, id_zero}) == 3
        listed = stub.ListHooks(pb.ListHooksRequest(session_id=sid)).hooks
        # Application order: the prepended add first.
        assert [h.hook_id for h in listed] == [id_add, id_scale, id_zero]
        assert listed[0].op == add_op and listed[1].op == scale_op and listed[2].op == zero_op
        sessions = {x.session_id: x for x in stub.ListSessions(pb.ListSessionsRequest()).sessions}
        assert sessions[sid].num_hooks == 3

        tensors, _, _ = run(stub, session_id=sid, tokens=tok(rows))
        ops_add_first = [{"hook": "blocks.0.attn.hook_z", "op": "zero", "heads": [3]},
                         {"hook": hook, "op": "add", "tensor": "s"},
                         {"hook": hook, "op": "scale", "factor": 2.0}]
        want, _ = ref_forward(ref, rows, ops=ops_add_first, hook_tensors={"s": steer})
        wrong, _ = ref_forward(ref, rows, ops=[ops_add_first[0], ops_add_first[2], ops_add_first[1]],
                               hook_tensors={"s": steer})
        assert max_diff(want, wrong) > 1e-2  # the order is observable
        assert_close(tensors["logits"], want, "session hooks, prepended add first")

        # Session hooks run before the call's one-shot hooks.
        tensors, _, _ = run(stub, session_id=sid, tokens=tok(rows),
                            hooks=[H(hook_name=hook, scale=hooks_pb2.ScaleOp(factor=-0.5))])
        want2, _ = ref_forward(ref, rows, ops=ops_add_first + [{"hook": hook, "op": "scale",
                                                                 "factor": -0.5}],
                               hook_tensors={"s": steer})
        assert_close(tensors["logits"], want2, "session hooks then one-shot hook")

        stub.RemoveHook(pb.RemoveHookRequest(session_id=sid, hook_id=id_add))
        assert [h.hook_id for h in stub.ListHooks(pb.ListHooksRequest(session_id=sid)).hooks] == [
            id_scale, id_zero]
        tensors, _, _ = run(stub, session_id=sid, tokens=tok(rows))
        want3, _ = ref_forward(ref, rows, ops=[ops_add_first[0], ops_add_first[2]])
        assert_close(tensors["logits"], want3, "after RemoveHook")

        assert stub.ResetHooks(pb.ResetHooksRequest(session_id=sid)).removed == 2
        assert len(stub.ListHooks(pb.ListHooksRequest(session_id=sid)).hooks) == 0
        assert stub.ResetHooks(pb.ResetHooksRequest(session_id=sid)).removed == 0
        tensors, _, _ = run(stub, session_id=sid, tokens=tok(rows))
        plain, _ = ref_forward(ref, rows)
        assert_close(tensors["logits"], plain, "after ResetHooks")
        # Ids are not reused after a reset.
        new_id = stub.AddHook(pb.AddHookRequest(session_id=sid, op=scale_op)).hook_id
        assert new_id not in (id_scale, id_add, id_zero)
    finally:
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid))


# ------------------------------------------------------------------ Run


def test_run_return_types_and_loss(stub, ref):
    rows = ROWS
    want_logits, _ = ref_forward(ref, rows)
    lp = torch.log_softmax(torch.from_numpy(want_logits[:, :-1]).double(), -1)
    targets = torch.tensor(rows)[:, 1:]
    want_per_token = (-lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)).numpy()

    t, s, asm = run(stub, tokens=tok(rows))
    assert list(t) == ["logits"]
    assert asm[0].dtype == tensor_pb2.DTYPE_FLOAT32
    assert t["logits"].shape == (2, 8, ref.config.d_vocab)
    assert_close(t["logits"], want_logits, "logits")
    assert s.tokens_processed == 16
    assert s.bytes_streamed == t["logits"].nbytes
    assert s.forward_ms > 0 and s.queue_ms >= 0
    assert s.cache_handle == ""

    t, s, _ = run(stub, tokens=tok(rows), return_type=pb.RETURN_TYPE_LOSS)
    assert list(t) == ["loss"]
    assert t["loss"].shape == ()
    assert float(t["loss"]) == pytest.approx(float(want_per_token.mean()), abs=ATOL)
    assert s.bytes_streamed == 4

    t, s, _ = run(stub, tokens=tok(rows), return_type=pb.RETURN_TYPE_BOTH)
    assert set(t) == {"loss", "logits"}
    assert_close(t["logits"], want_logits, "logits (both)")
    assert float(t["loss"]) == pytest.approx(float(want_per_token.mean()), abs=ATOL)

    t, s, _ = run(stub, tokens=tok(rows), return_type=pb.RETURN_TYPE_BOTH, loss_per_token=True)
    assert t["loss"].shape == (2, 7)
    assert_close(t["loss"], want_per_token, "loss_per_token")

    t, s, _ = run(stub, tokens=tok(rows), return_type=pb.RETURN_TYPE_NONE)
    assert t == {}
    assert s.bytes_streamed == 0 and s.tokens_processed == 16

    # logits_dtype bfloat16: the float32 logits rounded to bfloat16.
    t, _, asm = run(stub, tokens=tok(rows), logits_dtype=tensor_pb2.DTYPE_BFLOAT16)
    assert asm[0].dtype == tensor_pb2.DTYPE_BFLOAT16 and asm[0].total_bytes == 2 * 2 * 8 * 512
    assert_close(t["logits"], want_logits, "bf16 logits", atol=0.05 * np.abs(want_logits).max())


def test_run_texts_equal_tokens(stub, ref):
    texts = ["Hello world", "hi"]
    tk = stub.Tokenize(pb.TokenizeRequest(texts=texts, prepend_bos=True))
    tokens, mask = wire.from_proto(tk.tokens), wire.from_proto(tk.attention_mask)
    t, s, _ = run(stub, texts=texts, prepend_bos=True, return_type=pb.RETURN_TYPE_BOTH)
    t2, _, _ = run(stub, tokens=tk.tokens, attention_mask=tk.attention_mask,
                   return_type=pb.RETURN_TYPE_BOTH)
    assert s.tokens_processed == tokens.size
    want, _ = ref_forward(ref, tokens, mask=mask)
    real = mask == 1
    assert_close(t["logits"][real], want[real], "text run vs reference (real positions)")
    assert_close(t["logits"][real], t2["logits"][real], "text run vs token run")
    assert float(t["loss"]) == pytest.approx(float(t2["loss"]), abs=1e-5)


def test_stop_at_layer(stub, ref):
    rows = ROWS
    _, cache = ref_forward(ref, rows)
    t, _, _ = run(stub, tokens=tok(rows), stop_at_layer=2,
                  cache=pb.CacheSelection(names=["blocks.1.hook_resid_post", "blocks.0.hook_resid_pre"],
                                          stream=True))
    assert t["logits"].shape == (2, 8, ref.config.d_model)
    assert_close(t["logits"], cache["blocks.1.hook_resid_post"], "stop_at_layer=2 output")
    assert_close(t["blocks.0.hook_resid_pre"], cache["blocks.0.hook_resid_pre"], "cached before stop")
    t, _, _ = run(stub, tokens=tok(rows), stop_at_layer=0)
    assert_close(t["logits"], cache["hook_embed"], "stop_at_layer=0 returns the embeddings")
    # TransformerLens: stop_at_layer == n_layers still returns the residual, not logits.
    L = ref.config.n_layers
    t, _, _ = run(stub, tokens=tok(rows), stop_at_layer=L)
    assert_close(t["logits"], cache[f"blocks.{L - 1}.hook_resid_post"], "stop_at_layer=n_layers")
    t, _, _ = run(stub, tokens=tok(rows), stop_at_layer=-1)  # negatives count from n_layers
    assert_close(t["logits"], cache[f"blocks.{ref.config.n_layers - 2}.hook_resid_post"], "stop -1")
    # Hooks after the stop point are not computed, so "*" only holds earlier ones.
    t, _, _ = run(stub, tokens=tok(rows), stop_at_layer=1, return_type=pb.RETURN_TYPE_NONE,
                  cache=pb.CacheSelection(names=["*"], stream=True))
    assert set(t) == {"hook_embed"} | {f"blocks.0.{s}" for s in BLOCK_SITES}


def test_start_at_layer_with_residual(stub, ref):
    rows = ROWS
    want, cache = ref_forward(ref, rows)
    resid = cache["blocks.2.hook_resid_pre"]
    t, s, _ = run(stub, residual=vec(resid), start_at_layer=2,
                  cache=pb.CacheSelection(names=["*"], stream=True))
    assert_close(t["logits"], want, "start_at_layer=2 from the reference's resid_pre")
    assert "blocks.1.hook_resid_post" not in t and "hook_embed" not in t
    assert_close(t["blocks.2.hook_resid_pre"], resid, "resid_pre at the start layer is the input")
    assert_close(t["blocks.3.attn.hook_pattern"], cache["blocks.3.attn.hook_pattern"], "pattern")
    assert s.tokens_processed == 16
    # start_at_layer == n_layers runs no block: the residual goes to the final norm and unembed.
    L = ref.config.n_layers
    t, _, _ = run(stub, residual=vec(cache[f"blocks.{L - 1}.hook_resid_post"]), start_at_layer=L)
    assert_close(t["logits"], want, "start_at_layer=n_layers")
    # start and stop together: blocks 1..2 only.
    t, _, _ = run(stub, residual=vec(cache["blocks.1.hook_resid_pre"]), start_at_layer=1,
                  stop_at_layer=3)
    assert_close(t["logits"], cache["blocks.2.hook_resid_post"], "start 1, stop 3")


def test_cache_selection_names_star_slices_dtype(stub, ref):
    rows = ROWS
    want_logits, cache = ref_forward(ref, rows)
    names = ["blocks.0.attn.hook_pattern", "blocks.3.mlp.hook_post", "hook_embed",
             "ln_final.hook_scale"]
    t, s, asm = run(stub, tokens=tok(rows), cache=pb.CacheSelection(names=names, stream=True))
    # Exactly the selected activations, in forward order, then the logits.
    assert [a.name for a in asm] == ["hook_embed", "blocks.0.attn.hook_pattern",
                                     "blocks.3.mlp.hook_post", "ln_final.hook_scale", "logits"]
    for n in names:
        assert_close(t[n], cache[n], n)
    assert s.bytes_streamed == sum(a.total_bytes for a in asm)

    t, s, asm = run(stub, tokens=tok(rows), cache=pb.CacheSelection(names=["*"], stream=True))
    assert [a.name for a in asm] == all_hook_names(ref.config.n_layers) + ["logits"]
    for n in cache:
        assert_close(t[n], cache[n], n)
    assert_close(t["logits"], want_logits, "logits with '*'")

    for start, stop in ((2, 5), (None, 3), (-3, None), (-4, -1), (6, 2)):
        sel = pb.CacheSelection(names=["blocks.1.hook_resid_mid", "blocks.1.attn.hook_pattern",
                                       "blocks.1.attn.hook_z"], stream=True)
        if start is not None:
            sel.pos_start = start
        if stop is not None:
            sel.pos_stop = stop
        t, _, _ = run(stub, tokens=tok(rows), return_type=pb.RETURN_TYPE_NONE, cache=sel)
        sl = slice(start, stop)
        assert_close(t["blocks.1.hook_resid_mid"], cache["blocks.1.hook_resid_mid"][:, sl],
                     f"resid_mid [{start}:{stop}]")
        assert_close(t["blocks.1.attn.hook_z"], cache["blocks.1.attn.hook_z"][:, sl],
                     f"z [{start}:{stop}]")
        # Attention patterns are sliced along query positions.
        assert_close(t["blocks.1.attn.hook_pattern"], cache["blocks.1.attn.hook_pattern"][:, :, sl],
                     f"pattern [{start}:{stop}]")

    # bfloat16: exactly the float32 values rounded to nearest even.
    sel = pb.CacheSelection(names=["blocks.2.hook_resid_post", "blocks.2.attn.hook_pattern"],
                            stream=True)
    t32, _, _ = run(stub, tokens=tok(rows), return_type=pb.RETURN_TYPE_NONE, cache=sel)
    sel.dtype = tensor_pb2.DTYPE_BFLOAT16
    tb, s, asm = run(stub, tokens=tok(rows), return_type=pb.RETURN_TYPE_NONE, cache=sel)
    for a in asm:
        assert a.dtype == tensor_pb2.DTYPE_BFLOAT16
        assert a.total_bytes == 2 * int(np.prod(a.shape))
        bits = a.array(widen_bf16=False)
        assert np.array_equal(bits, wire.float32_to_bf16(t32[a.name])), a.name
    assert s.bytes_streamed == sum(a.total_bytes for a in asm)


def test_store_fetch_delete_cache(stub, ref):
    rows = ROWS
    _, cache = ref_forward(ref, rows)
    sid = stub.CreateSession(pb.CreateSessionRequest()).session_id
    try:
        names = ["blocks.1.hook_resid_pre", "blocks.2.attn.hook_pattern", "blocks.0.mlp.hook_post"]
        t, s, _ = run(stub, session_id=sid, tokens=tok(rows), return_type=pb.RETURN_TYPE_NONE,
                      cache=pb.CacheSelection(names=names, store=True))
        assert t == {} and s.bytes_streamed == 0
        handle = s.cache_handle
        assert handle
        expected_bytes = sum(cache[n].nbytes for n in names)
        sess = {x.session_id: x for x in stub.ListSessions(pb.ListSessionsRequest()).sessions}[sid]
        assert sess.num_caches == 1 and sess.stored_cache_bytes == expected_bytes

        fetched = wire.assemble(stub.FetchCache(pb.FetchCacheRequest(session_id=sid,
                                                                     cache_handle=handle)))
        assert set(fetched) == set(names)
        for n in names:
            assert_close(fetched[n], cache[n], f"fetched {n}")
        one = wire.assemble(stub.FetchCache(pb.FetchCacheRequest(
            session_id=sid, cache_handle=handle, names=["blocks.2.attn.hook_pattern"])))
        assert list(one) == ["blocks.2.attn.hook_pattern"]
        assert np.array_equal(one["blocks.2.attn.hook_pattern"], fetched["blocks.2.attn.hook_pattern"])

        # stream and store together, with a slice and bfloat16: both paths agree.
        t, s2, _ = run(stub, session_id=sid, tokens=tok(rows), return_type=pb.RETURN_TYPE_NONE,
                       cache=pb.CacheSelection(names=["blocks.3.hook_resid_post"], store=True,
                                               stream=True, pos_start=1, pos_stop=4,
                                               dtype=tensor_pb2.DTYPE_BFLOAT16))
        assert s2.cache_handle and s2.cache_handle != handle
        f2 = wire.assemble(stub.FetchCache(pb.FetchCacheRequest(session_id=sid,
                                                                cache_handle=s2.cache_handle)))
        assert f2["blocks.3.hook_resid_post"].shape == (2, 3, ref.config.d_model)
        assert np.array_equal(f2["blocks.3.hook_resid_post"], t["blocks.3.hook_resid_post"])

        freed = stub.DeleteCache(pb.DeleteCacheRequest(session_id=sid, cache_handle=handle))
        assert freed.freed_bytes == expected_bytes
        sess = {x.session_id: x for x in stub.ListSessions(pb.ListSessionsRequest()).sessions}[sid]
        assert sess.num_caches == 1 and sess.stored_cache_bytes == 2 * 3 * ref.config.d_model * 2
        with pytest.raises(grpc.RpcError) as e:
            list(stub.FetchCache(pb.FetchCacheRequest(session_id=sid, cache_handle=handle)))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid))


# ------------------------------------------------------------------ GetWeights


def test_get_weights_shapes_and_values(stub, ref, demo_model_dir):
    c = ref.config
    ckpt = safetensors_io.read_checkpoint(demo_model_dir)
    H_, K, dh, d, m = c.n_heads, c.n_kv_heads, c.d_head, c.d_model, c.d_mlp

    def fetch(name, layer=0, dtype=tensor_pb2.DTYPE_UNSPECIFIED):
        chunks = list(stub.GetWeights(pb.GetWeightsRequest(name=name, layer=layer, dtype=dtype)))
        asm = wire.ChunkAssembler()
        for ch in chunks:
            assert ch.name == name
            asm.add(ch)
        assert len(asm.done) == 1
        return asm.done[0]

    lm_head = ckpt["model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"]
    global_expect = {
        "W_E": ckpt["model.embed_tokens.weight"],
        "W_U": lm_head.T,
        "ln_final_w": ckpt["model.norm.weight"],
    }
    for name, want in global_expect.items():
        a = fetch(name)
        assert a.dtype == tensor_pb2.DTYPE_FLOAT32
        assert np.array_equal(a.array(), want), name
    assert fetch("W_E").shape == (c.d_vocab, d) and fetch("W_U").shape == (d, c.d_vocab)
    for layer in (0, c.n_layers - 1):
        p = f"model.layers.{layer}."
        q = ckpt[p + "self_attn.q_proj.weight"]
        k = ckpt[p + "self_attn.k_proj.weight"]
        v = ckpt[p + "self_attn.v_proj.weight"]
        o = ckpt[p + "self_attn.o_proj.weight"]
        expect = {
            "W_Q": ((H_, d, dh), q.reshape(H_, dh, d).transpose(0, 2, 1)),
            "W_K": ((K, d, dh), k.reshape(K, dh, d).transpose(0, 2, 1)),
            "W_V": ((K, d, dh), v.reshape(K, dh, d).transpose(0, 2, 1)),
            "W_O": ((H_, dh, d), o.reshape(d, H_, dh).transpose(1, 2, 0)),
            "W_in": ((d, m), ckpt[p + "mlp.up_proj.weight"].T),
            "W_gate": ((d, m), ckpt[p + "mlp.gate_proj.weight"].T),
            "W_out": ((m, d), ckpt[p + "mlp.down_proj.weight"].T),
            "ln1_w": ((d,), ckpt[p + "input_layernorm.weight"]),
            "ln2_w": ((d,), ckpt[p + "post_attention_layernorm.weight"]),
        }
        for name, (shape, want) in expect.items():
            a = fetch(name, layer)
            assert a.shape == shape, (name, layer, a.shape)
            assert np.array_equal(a.array(), want), f"{name} layer {layer} differs from the checkpoint"
    # Head h of W_Q is the q projection's rows h*d_head..(h+1)*d_head, transposed.
    wq = fetch("W_Q", 1).array()
    q1 = ckpt["model.layers.1.self_attn.q_proj.weight"]
    assert np.array_equal(wq[3], q1[3 * dh:4 * dh].T)
    # bfloat16 on request: the float32 weights rounded.
    a = fetch("W_out", 2, tensor_pb2.DTYPE_BFLOAT16)
    assert a.dtype == tensor_pb2.DTYPE_BFLOAT16
    assert np.array_equal(a.array(widen_bf16=False),
                          wire.float32_to_bf16(ckpt["model.layers.2.mlp.down_proj.weight"].T))


# ------------------------------------------------------------------ Generate


def ref_greedy(ref, prompt_rows, n, ops=None, hook_tensors=None):
    """Greedy continuation by full recompute each step (the reference has no KV cache)."""
    seq = [list(r) for r in prompt_rows]
    out = []
    for _ in range(n):
        logits, _ = ref_forward(ref, seq, ops=ops, hook_tensors=hook_tensors, collect=False)
        last = logits[:, -1]
        top2 = np.sort(last, axis=-1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0] > 1e-3).all(), "near-tie in the reference's argmax"
        nxt = last.argmax(-1)
        out.append(nxt.tolist())
        seq = [r + [int(t)] for r, t in zip(seq, nxt)]
    return np.array(out).T, np.array(seq)


def generate(stub, md=None, **request):
    steps, tensors, done = [], [], None
    kinds = []
    for r in stub.Generate(pb.GenerateRequest(**request), metadata=md, timeout=120):
        kind = r.WhichOneof("item")
        kinds.append(kind)
        if kind == "step":
            assert done is None
            steps.append(r.step)
        elif kind == "tensor":
            tensors.append((len(steps), r.tensor))
        else:
            assert done is None
            done = r.done
    assert done is not None and kinds[-1] == "done", "stream must end with Done"
    return steps, tensors, done


def test_generate_greedy_matches_reference(stub, ref):
    prompt = [[5, 17, 300, 42], [9, 8, 7, 6]]
    n = 12
    steps, tensors, done = generate(stub, tokens=tok(prompt), max_new_tokens=n)
    assert [s.step for s in steps] == list(range(n))
    assert all(len(s.tokens) == 2 and len(s.texts) == 2 for s in steps)
    got = np.array([list(s.tokens) for s in steps]).T
    want, want_seq = ref_greedy(ref, prompt, n)
    assert np.array_equal(got, want), f"server {got.tolist()} != reference {want.tolist()}"
    seqs = wire.from_proto(done.sequences)
    assert seqs.shape == (2, 4 + n) and np.array_equal(seqs, want_seq)
    assert done.steps == n and done.generate_ms > 0
    # Step texts are each token's bytes.
    d = stub.Detokenize(pb.DetokenizeRequest(rows=[pb.TokenRow(ids=got[0].tolist())],
                                             return_str_tokens=True))
    assert [s.texts[0] for s in steps] == list(d.str_tokens[0].tokens)
    assert tensors == []
    # Without the KV cache: the same tokens.
    steps2, _, done2 = generate(stub, tokens=tok(prompt), max_new_tokens=n, disable_kv_cache=True)
    assert np.array_equal(wire.from_proto(done2.sequences), want_seq)


def test_generate_with_steering_hook_every_step(stub, ref, info):
    prompt = [[5, 17, 300, 42]]
    n = 10
    rng = np.random.default_rng(7)
    steer = (rng.normal(size=ref.config.d_model) * 8).astype(np.float32)
    hook = "blocks.1.hook_resid_post"
    ops = [{"hook": hook, "op": "add", "tensor": "steer"}]
    plain, _ = ref_greedy(ref, prompt, n)
    want, want_seq = ref_greedy(ref, prompt, n, ops=ops, hook_tensors={"steer": steer})
    assert not np.array_equal(plain, want), "steering vector too weak to change the text"
    one_shot = [H(hook_name=hook, add=hooks_pb2.AddOp(value=vec(steer)))]
    steps, _, done = generate(stub, tokens=tok(prompt), max_new_tokens=n, hooks=one_shot)
    got = np.array([list(s.tokens) for s in steps]).T
    assert np.array_equal(got, want), f"steered: server {got.tolist()} != reference {want.tolist()}"
    # The same hook as a persistent session hook applies at every step too.
    sid = stub.CreateSession(pb.CreateSessionRequest()).session_id
    try:
        stub.AddHook(pb.AddHookRequest(session_id=sid, op=one_shot[0]))
        _, _, done = generate(stub, session_id=sid, tokens=tok(prompt), max_new_tokens=n)
        assert np.array_equal(wire.from_proto(done.sequences), want_seq)
    finally:
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
    # Text prompt + step_cache: activations follow the Step they belong to.
    steps, tensors, done = generate(stub, tokens=tok(prompt), max_new_tokens=3,
                                    step_cache=pb.CacheSelection(names=["blocks.0.hook_resid_post"],
                                                                 stream=True))
    per_step = {}
    for after_steps, chunk in tensors:
        per_step.setdefault(after_steps, wire.ChunkAssembler()).add(chunk)
    assert sorted(per_step) == [1, 2, 3], "each step's activations come right after its Step"
    first = per_step[1].done[0].array()
    _, cache = ref_forward(ref, prompt)
    assert_close(first, cache["blocks.0.hook_resid_post"], "step 0 activation (the prompt)")
    assert per_step[2].done[0].shape == (1, 1, ref.config.d_model)


# ------------------------------------------------------------------ RunInteractive


def test_interactive_zero_head_equals_reference(stub, ref):
    rows = ROWS
    hook = "blocks.1.attn.hook_z"
    _, cache = ref_forward(ref, rows)

    def zero_head(call, act):
        assert call.hook_name == hook and call.callback_id == 42
        assert_close(act, cache[hook], "activation sent to the client")
        out = act.copy()
        out[:, :, 5] = 0
        return out

    req = pb.RunRequest(tokens=tok(rows), hooks=[H(hook_name=hook, client_callback=hooks_pb2.ClientCallbackOp(
        callback_id=42))], cache=pb.CacheSelection(names=[hook], stream=True))
    it = Interactive(stub, req, zero_head).run()
    assert len(it.calls) == 1 and it.calls[0][0].call_id >= 1
    want, _ = ref_forward(ref, rows, ops=[{"hook": hook, "op": "zero", "heads": [5]}])
    plain, _ = ref_forward(ref, rows)
    assert max_diff(want, plain) > 1e-3, "zeroing the head must change the logits"
    assert_close(it.tensors["logits"], want, "interactive zero head 5")
    assert float(np.abs(it.tensors[hook][:, :, 5]).max()) == 0.0
    assert it.items[0] == "hook_call" and it.items[-1] == "summary"

    it = Interactive(stub, req, lambda call, act: None).run()
    assert_close(it.tensors["logits"], plain, "unchanged reply")


def test_interactive_multiple_callbacks(stub, ref):
    rows = ROWS
    steer = np.random.default_rng(3).normal(size=ref.config.d_model).astype(np.float32)
    hooks = [
        H(hook_name="blocks.2.hook_mlp_out", client_callback=hooks_pb2.ClientCallbackOp(callback_id=2)),
        H(hook_name="blocks.0.hook_resid_post", client_callback=hooks_pb2.ClientCallbackOp(callback_id=1)),
        H(hook_name="blocks.0.hook_resid_post", scale=hooks_pb2.ScaleOp(factor=0.5)),
        H(hook_name="blocks.3.attn.hook_pattern", client_callback=hooks_pb2.ClientCallbackOp(callback_id=3)),
    ]
    ops_so_far = [{"hook": "blocks.0.hook_resid_post", "op": "add", "tensor": "s"},
                  {"hook": "blocks.0.hook_resid_post", "op": "scale", "factor": 0.5}]
    _, steered_cache = ref_forward(ref, rows, ops=ops_so_far, hook_tensors={"s": steer})

    def on_call(call, act):
        if call.callback_id == 1:
            return act + steer
        if call.callback_id == 2:
            # Sees block 0's modification (add then the one-shot scale).
            assert_close(act, steered_cache["blocks.2.hook_mlp_out"], "second callback's input")
            return None
        return act * 0.0 + (1.0 / act.shape[-1])  # uniform attention

    req = pb.RunRequest(tokens=tok(rows), hooks=hooks, return_type=pb.RETURN_TYPE_BOTH)
    it = Interactive(stub, req, on_call).run()
    calls = [c for c, _ in it.calls]
    assert [c.callback_id for c in calls] == [1, 2, 3]  # forward order, not request order
    assert [c.hook_name for c in calls] == ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out",
                                            "blocks.3.attn.hook_pattern"]
    assert len({c.call_id for c in calls}) == 3
    assert [c.call_id for c in calls] == sorted(c.call_id for c in calls)
    uniform = np.full((2, 8, 8, 8), 1.0 / 8, np.float32)
    want, _ = ref_forward(ref, rows, ops=ops_so_far + [
        {"hook": "blocks.3.attn.hook_pattern", "op": "set", "tensor": "u"}],
        hook_tensors={"s": steer, "u": uniform})
    plain, _ = ref_forward(ref, rows)
    assert max_diff(want, plain) > 1e-2
    assert_close(it.tensors["logits"], want, "three callbacks and a declarative op")
    assert "loss" in it.tensors


def test_interactive_large_activation_and_bf16_reply(stub, ref):
    """A HookCall activation over 16 MiB arrives in <= 1 MiB chunks; the reply goes back whole."""
    rows = random_rows(8, 300, seed=13)
    hook = "blocks.1.attn.hook_attn_scores"
    sizes = []

    def on_call(call, act):
        out = act.copy()
        out[:, 3] = 0.0  # flat scores for head 3: uniform attention over allowed keys
        return out

    it = Interactive(stub, pb.RunRequest(tokens=tok(rows), hooks=[H(
        hook_name=hook, client_callback=hooks_pb2.ClientCallbackOp(callback_id=5))]), on_call, timeout=120)
    # Count the activation's chunks by wrapping the response iterator.
    inner = it.call

    class Counting:
        def __iter__(self):
            for r in inner:
                if r.WhichOneof("item") == "tensor" and r.tensor.name == hook:
                    sizes.append(len(r.tensor.data))
                yield r
    it.call = Counting()
    it.run()
    act = it.calls[0][1]
    assert act.shape == (8, ref.config.n_heads, 300, 300)
    assert act.nbytes > 16 * wire.MIB
    assert max(sizes) <= wire.MIB and sum(sizes) == act.nbytes
    want, _ = ref_forward(ref, rows[:2], ops=[{"hook": hook, "op": "set", "tensor": "z", "heads": [3]}],
                          hook_tensors={"z": np.zeros(1, np.float32)}, collect=False)
    assert_close(it.tensors["logits"][:2], want, "large interactive replacement")

    # A bfloat16 replacement is cast to the model's dtype.
    r2 = [[5, 6, 7, 8]]
    name = "blocks.0.hook_resid_post"
    it = Interactive(stub, pb.RunRequest(tokens=tok(r2), hooks=[H(
        hook_name=name, client_callback=hooks_pb2.ClientCallbackOp(callback_id=1))]),
        lambda call, a: pb.HookReply(call_id=call.call_id, replacement=wire.to_proto(
            a * 2, tensor_pb2.DTYPE_BFLOAT16))).run()
    _, cache = ref_forward(ref, r2)
    val = wire.bf16_to_float32(wire.float32_to_bf16(cache[name] * 2))
    want, _ = ref_forward(ref, r2, ops=[{"hook": name, "op": "set", "tensor": "v"}], hook_tensors={"v": val})
    assert_close(it.tensors["logits"], want, "bfloat16 replacement")


# ------------------------------------------------------------------ patching from a stored cache


def test_patch_from_stored_cache(stub, ref):
    rows_a = random_rows(2, 10, seed=11)
    rows_b = random_rows(2, 10, seed=12)
    p = 6
    hook = "blocks.1.hook_resid_pre"
    sid = stub.CreateSession(pb.CreateSessionRequest()).session_id
    try:
        _, s, _ = run(stub, session_id=sid, tokens=tok(rows_b), return_type=pb.RETURN_TYPE_NONE,
                      cache=pb.CacheSelection(names=[hook, "blocks.2.hook_resid_pre"], store=True))
        handle = s.cache_handle
        op = H(hook_name=hook, selector=hooks_pb2.Selector(positions=[p]),
               patch_from_cache=hooks_pb2.PatchFromCacheOp(cache_handle=handle))
        t, _, _ = run(stub, session_id=sid, tokens=tok(rows_a), hooks=[op],
                      cache=pb.CacheSelection(names=[hook], stream=True))
        _, cache_b = ref_forward(ref, rows_b)
        patch = cache_b[hook][:, p:p + 1]
        want, _ = ref_forward(ref, rows_a, ops=[{"hook": hook, "op": "set", "tensor": "patch",
                                                 "positions": [p]}], hook_tensors={"patch": patch})
        clean, _ = ref_forward(ref, rows_a)
        assert max_diff(want[:, p:], clean[:, p:]) > 1e-3, "the patch must matter"
        assert max_diff(want[:, :p], clean[:, :p]) == 0.0
        assert_close(t["logits"], want, "patched from cache")
        assert_close(t[hook][:, p:p + 1], patch, "patched region")
        # With a source hook name and a negative position, as a session hook.
        op2 = H(hook_name="blocks.2.hook_resid_pre", selector=hooks_pb2.Selector(positions=[-1]),
                patch_from_cache=hooks_pb2.PatchFromCacheOp(cache_handle=handle,
                                                            source_hook_name="blocks.2.hook_resid_pre"))
        stub.AddHook(pb.AddHookRequest(session_id=sid, op=op2))
        t, _, _ = run(stub, session_id=sid, tokens=tok(rows_a))
        want2, _ = ref_forward(ref, rows_a, ops=[{"hook": "blocks.2.hook_resid_pre", "op": "set",
                                                  "tensor": "x", "positions": [-1]}],
                               hook_tensors={"x": cache_b["blocks.2.hook_resid_pre"][:, -1:]})
        assert_close(t["logits"], want2, "session patch hook with source_hook_name")
    finally:
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid))


# ------------------------------------------------------------------ a stream over 16 MiB


def test_stream_larger_than_16_mib(stub, ref):
    batch, n_pos = 32, 300
    rows = random_rows(batch, n_pos, seed=21)
    chunks = []
    summary = None
    for r in stub.Run(pb.RunRequest(tokens=tok(rows)), timeout=120):
        if r.WhichOneof("item") == "tensor":
            chunks.append(r.tensor)
        else:
            summary = r.summary
    total = batch * n_pos * ref.config.d_vocab * 4
    assert total > 16 * wire.MIB
    assert all(len(c.data) <= wire.MIB for c in chunks)
    assert len(chunks) >= total // wire.MIB
    assert all(c.total_bytes == total and list(c.shape) == [batch, n_pos, 512] for c in chunks)
    assert sum(len(c.data) for c in chunks) == total
    assert [c.offset for c in chunks] == list(np.cumsum([0] + [len(c.data) for c in chunks[:-1]]))
    logits = wire.assemble(chunks)["logits"]
    assert summary.bytes_streamed == total
    # Second path: a few rows on their own, through the server and through the reference.
    pick = [0, 17, 31]
    alone, _, _ = run(stub, tokens=tok([rows[i] for i in pick]))
    assert_close(logits[pick], alone["logits"], "rows of the big batch vs the rows alone")
    want, _ = ref_forward(ref, [rows[i] for i in pick[:2]], collect=False)
    assert_close(logits[pick[:2]], want, "rows of the big batch vs the reference")


# ------------------------------------------------------------------ against the engine directly


RUN_BIN = os.path.join(server_harness.BIN_DIR, "remotelens_run")


def test_results_equal_engine_cli(stub, demo_model_dir, tmp_path):
    if not os.access(RUN_BIN, os.X_OK):
        pytest.skip(f"{RUN_BIN} not built (bazel build //tools:all)")
    rows = random_rows(2, 9, seed=31)
    out = str(tmp_path / "engine.safetensors")
    spec = str(tmp_path / "hooks.json")
    with open(spec, "w") as f:
        json.dump({"ops": [{"hook": "blocks.1.attn.hook_z", "op": "zero", "heads": [2]},
                           {"hook": "blocks.2.hook_mlp_out", "op": "scale", "factor": 0.25,
                            "positions": [-1]}]}, f)
    tokens_arg = ";".join(",".join(str(t) for t in r) for r in rows)
    proc = subprocess.run([RUN_BIN, "--model_dir", demo_model_dir, "--tokens", tokens_arg,
                           "--names", "all", "--out", out, "--dtype", "float32", "--device", "cpu",
                           "--hooks", spec], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    engine = safetensors_io.read_safetensors(out)
    hooks = [H(hook_name="blocks.1.attn.hook_z", selector=hooks_pb2.Selector(heads=[2]),
               zero=hooks_pb2.ZeroOp()),
             H(hook_name="blocks.2.hook_mlp_out", selector=hooks_pb2.Selector(positions=[-1]),
               scale=hooks_pb2.ScaleOp(factor=0.25))]
    t, _, _ = run(stub, tokens=tok(rows), hooks=hooks,
                  cache=pb.CacheSelection(names=["*"], stream=True))
    names = [n for n in engine if n != "attention_mask"]
    assert set(names) == set(t), set(names) ^ set(t)
    for n in names:
        assert_close(t[n], engine[n], f"server vs remotelens_run: {n}", atol=1e-5)


# ------------------------------------------------------------------ padded batches, sampling, eos


def test_left_padded_text_batch_run_and_generate(stub, ref):
    texts = ["Hello world, the cat", "hi"]
    tk = stub.Tokenize(pb.TokenizeRequest(texts=texts, prepend_bos=True))
    toks, mask = wire.from_proto(tk.tokens), wire.from_proto(tk.attention_mask)
    assert mask[1, 0] == 0, "the short row must be left-padded"
    # Loss over a padded batch counts only targets whose predictor is real too.
    t, _, _ = run(stub, tokens=tk.tokens, attention_mask=tk.attention_mask,
                  return_type=pb.RETURN_TYPE_BOTH)
    logits, _ = ref_forward(ref, toks, mask=mask)
    lp = torch.log_softmax(torch.from_numpy(logits[:, :-1]).double(), -1)
    per = -lp.gather(-1, torch.from_numpy(toks[:, 1:]).unsqueeze(-1)).squeeze(-1).numpy()
    valid = mask[:, 1:] * mask[:, :-1]
    assert float(t["loss"]) == pytest.approx(float((per * valid).sum() / valid.sum()), abs=ATOL)
    real = mask == 1
    assert_close(t["logits"][real], logits[real], "padded batch logits at real positions")

    n = 8
    steps, _, done = generate(stub, texts=texts, prepend_bos=True, max_new_tokens=n)
    got = np.array([list(s.tokens) for s in steps]).T
    cur, m, want = toks.copy(), mask.copy(), []
    for _ in range(n):
        lg, _ = ref_forward(ref, cur, mask=m, collect=False)
        nxt = lg[:, -1].argmax(-1)
        want.append(nxt)
        cur = np.concatenate([cur, nxt[:, None]], 1)
        m = np.concatenate([m, np.ones((2, 1), np.int64)], 1)
    assert np.array_equal(got, np.array(want).T)
    assert np.array_equal(wire.from_proto(done.sequences), cur)
    for i, text in enumerate(texts):  # each row alone continues the same way
        alone, _, _ = generate(stub, texts=[text], prepend_bos=True, max_new_tokens=n)
        assert [s.tokens[0] for s in alone] == got[i].tolist()


def test_generate_sampling_seed_and_eos(stub):
    prompt = tok([[5, 6, 7]])

    def tokens_of(**kw):
        steps, _, done = generate(stub, tokens=prompt, **kw)
        return [s.tokens[0] for s in steps], done

    a, _ = tokens_of(max_new_tokens=10, sampling=pb.SamplingParams(do_sample=True, seed=3))
    b, _ = tokens_of(max_new_tokens=10, sampling=pb.SamplingParams(do_sample=True, seed=3))
    c, _ = tokens_of(max_new_tokens=10, sampling=pb.SamplingParams(do_sample=True, seed=4))
    greedy, _ = tokens_of(max_new_tokens=10)
    top1, _ = tokens_of(max_new_tokens=10, sampling=pb.SamplingParams(do_sample=True, top_k=1, seed=9))
    assert a == b, "same seed, same tokens"
    assert a != c, "different seeds should differ"
    assert top1 == greedy, "top_k=1 sampling is greedy"
    assert a != greedy
    # Stop at a chosen eos: the third greedy token.
    eos = greedy[2]
    assert eos not in greedy[:2]
    stopped, done = tokens_of(max_new_tokens=10, stop_at_eos=True, eos_token_ids=[eos])
    assert stopped == greedy[:3] and done.steps == 3
    assert wire.from_proto(done.sequences).shape == (1, 6)
    # A batch: the finished row repeats its eos while the other runs on.
    steps, _, done = generate(stub, tokens=tok([[5, 6, 7], [9, 8, 7]]), max_new_tokens=6,
                              stop_at_eos=True, eos_token_ids=[eos])
    row0 = [s.tokens[0] for s in steps]
    assert row0[:3] == greedy[:3] and set(row0[3:]) <= {eos}


def test_session_limit(stub):
    own = len(stub.ListSessions(pb.ListSessionsRequest()).sessions)
    created = []
    try:
        for _ in range(64 - own):
            created.append(stub.CreateSession(pb.CreateSessionRequest()).session_id)
        with pytest.raises(grpc.RpcError) as e:
            created.append(stub.CreateSession(pb.CreateSessionRequest()).session_id)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_sessions_per_user" in e.value.details()
    finally:
        for sid in created:
            stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
    stub.CloseSession(pb.CloseSessionRequest(session_id=stub.CreateSession(
        pb.CreateSessionRequest()).session_id))
