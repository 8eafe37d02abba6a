"""Malformed and hostile requests: each gets the documented gRPC status code and a message that
names what was wrong; the server keeps serving, and 1000 bad requests do not grow its memory.

Most cases run on the shared demo server; limits, quotas and auth cases on the `limits_server`
(1 s session TTL, 3 s hook timeout, max_queue 1, max_batch 4, max_tokens_per_request 1000,
max_new_tokens 64) and the `auth_server` (users with small quotas).
"""
import re
import threading
import time

import grpc
import numpy as np
import pytest

import server_harness
import wire
from server_helpers import (KEYS, Client, Interactive, assert_close, metric, random_rows, ref_forward, rpc_error,
                     run, wait_until, write_users_file)
from remotelens.v1 import hooks_pb2
from remotelens.v1 import remotelens_pb2 as pb
from remotelens.v1 import tensor_pb2

H = hooks_pb2.HookOp
C = grpc.StatusCode
T3 = wire.tokens([[1, 2, 3]])
ZERO = hooks_pb2.ZeroOp()


def f32(*shape):
    return wire.to_proto(np.zeros(shape, np.float32))


def callback(name, cid=1):
    return H(hook_name=name, client_callback=hooks_pb2.ClientCallbackOp(callback_id=cid))


@pytest.fixture(scope="module")
def ctx(stub):
    """A session with a stored cache of hook_embed, and a closed session."""
    sid = stub.CreateSession(pb.CreateSessionRequest()).session_id
    _, s, _ = run(stub, session_id=sid, tokens=T3, return_type=pb.RETURN_TYPE_NONE,
                  cache=pb.CacheSelection(names=["hook_embed"], store=True))
    closed = stub.CreateSession(pb.CreateSessionRequest()).session_id
    stub.CloseSession(pb.CloseSessionRequest(session_id=closed))
    yield {"sid": sid, "handle": s.cache_handle, "closed": closed}
    stub.CloseSession(pb.CloseSessionRequest(session_id=sid))


def R(s, **kw):
    return lambda c: list(s.Run(pb.RunRequest(**kw), timeout=30))


def G(s, **kw):
    kw.setdefault("tokens", T3)
    return lambda c: list(s.Generate(pb.GenerateRequest(**kw), timeout=30))


# (id, builder(stub) -> fn(ctx), expected code, regexes the message must match)
CASES = [
    ("unknown-hook-suggests",
     lambda s: R(s, tokens=T3, hooks=[H(hook_name="blocks.0.hook_resid_pr", zero=ZERO)]),
     C.INVALID_ARGUMENT, [r'"blocks\.0\.hook_resid_pr"', r'did you mean "blocks\.0\.hook_resid_pre"']),
    ("unknown-hook-addhook",
     lambda s: lambda c: s.AddHook(pb.AddHookRequest(session_id=c["sid"], op=H(
         hook_name="blocks.1.attn.hook_zz", zero=ZERO))),
     C.INVALID_ARGUMENT, [r"hook_zz", r'did you mean "blocks\.1\.attn\.hook_z"']),
    ("unknown-cache-name",
     lambda s: R(s, tokens=T3, cache=pb.CacheSelection(names=["hook_embd"], stream=True)),
     C.INVALID_ARGUMENT, [r"cache\.names\[0\]", r'"hook_embd"', r'did you mean "hook_embed"']),
    ("hook-layer-out-of-range",
     lambda s: R(s, tokens=T3, hooks=[H(hook_name="blocks.9.hook_resid_pre", zero=ZERO)]),
     C.INVALID_ARGUMENT, [r"layer 9", r"0\.\.3"]),
    ("heads-selector-on-resid",
     lambda s: R(s, tokens=T3, hooks=[H(hook_name="blocks.0.hook_resid_post",
                                        selector=hooks_pb2.Selector(heads=[0]), zero=ZERO)]),
     C.INVALID_ARGUMENT, [r"selector\.heads", r"blocks\.0\.hook_resid_post", r"no head dimension"]),
    ("head-index-out-of-range",
     lambda s: R(s, tokens=T3, hooks=[H(hook_name="blocks.0.attn.hook_z",
                                        selector=hooks_pb2.Selector(heads=[8]), zero=ZERO)]),
     C.INVALID_ARGUMENT, [r"head 8", r"out of range", r"8 heads"]),
    ("kv-head-index-out-of-range",
     lambda s: R(s, tokens=T3, hooks=[H(hook_name="blocks.0.attn.hook_k",
                                        selector=hooks_pb2.Selector(heads=[2]), zero=ZERO)]),
     C.INVALID_ARGUMENT, [r"head 2", r"2 heads"]),
    ("position-out-of-range",
     lambda s: R(s, tokens=T3, hooks=[H(hook_name="hook_embed",
                                        selector=hooks_pb2.Selector(positions=[5]), zero=ZERO)]),
     C.INVALID_ARGUMENT, [r"position 5", r"3 positions"]),
    ("value-does-not-broadcast",
     lambda s: R(s, tokens=T3, hooks=[H(hook_name="blocks.0.hook_resid_pre",
                                        add=hooks_pb2.AddOp(value=f32(63)))]),
     # Caught before the run, against the hook's static shape (-1 = batch, positions).
     C.INVALID_ARGUMENT, [r"\[63\]", r"broadcast", r"\[-1, -1, 128\]"]),
    ("set-value-does-not-broadcast-to-selection",
     lambda s: R(s, tokens=T3, hooks=[H(hook_name="blocks.1.hook_resid_mid",
                                        selector=hooks_pb2.Selector(positions=[0]),
                                        set=hooks_pb2.SetOp(value=f32(2, 128)))]),
     C.INVALID_ARGUMENT, [r"\[2, 128\]", r"broadcast", r"\[1, 1, 128\]"]),
    ("int-value-for-add",
     lambda s: R(s, tokens=T3, hooks=[H(hook_name="hook_embed", add=hooks_pb2.AddOp(
         value=wire.to_proto(np.ones(128, np.int64))))]),
     C.INVALID_ARGUMENT, [r"add\.value", r"floating"]),
    ("tensor-data-size-mismatch",
     lambda s: R(s, tokens=tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT64, shape=[1, 3], data=b"\0" * 16)),
     C.INVALID_ARGUMENT, [r"tokens", r"16 bytes", r"expected 24"]),
    ("value-data-size-mismatch",
     lambda s: R(s, tokens=T3, hooks=[H(hook_name="hook_embed", add=hooks_pb2.AddOp(value=tensor_pb2.Tensor(
         dtype=tensor_pb2.DTYPE_FLOAT32, shape=[128], data=b"\0" * 100)))]),
     C.INVALID_ARGUMENT, [r"add\.value", r"100 bytes", r"expected 512"]),
    ("negative-dim",
     lambda s: R(s, tokens=tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT64, shape=[1, -3])),
     C.INVALID_ARGUMENT, [r"tokens", r"dimension 1", r"negative"]),
    ("huge-shape-overflow",
     lambda s: R(s, tokens=T3, hooks=[H(hook_name="hook_embed", add=hooks_pb2.AddOp(value=tensor_pb2.Tensor(
         dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1 << 40, 1 << 40], data=b"")))]),
     C.INVALID_ARGUMENT, [r"add\.value", r"int64|more than"]),
    ("unknown-dtype",
     lambda s: R(s, tokens=tensor_pb2.Tensor(dtype=99, shape=[1, 3], data=b"\0" * 24)),
     # Caught when the request is parsed: every enum field must hold a defined value.
     C.INVALID_ARGUMENT, [r"tokens\.dtype: 99 is not a valid DType", r"DTYPE_INT64 \(4\)"]),
    ("float-tokens",
     lambda s: R(s, tokens=f32(1, 3)),
     C.INVALID_ARGUMENT, [r"tokens", r"int64"]),
    ("1d-tokens",
     lambda s: R(s, tokens=wire.to_proto(np.ones(3, np.int64))),
     C.INVALID_ARGUMENT, [r"tokens", r"\[batch, pos\]"]),
    ("batch-over-max-batch",
     lambda s: R(s, tokens=wire.tokens(np.ones((65, 2), np.int64))),
     C.INVALID_ARGUMENT, [r"65 rows", r"max_batch = 64"]),
    ("token-id-past-vocab",
     lambda s: R(s, tokens=wire.tokens([[1, 600]])),
     C.INVALID_ARGUMENT, [r"token id 600", r"vocab"]),
    ("negative-token-id",
     lambda s: R(s, tokens=wire.tokens([[-1, 2]])),
     C.INVALID_ARGUMENT, [r"token id -1", r"vocab"]),
    ("sequence-over-n-ctx",
     lambda s: R(s, tokens=wire.tokens([[1] * 513])),
     C.OUT_OF_RANGE, [r"513", r"n_ctx"]),
    ("generate-over-n-ctx",
     lambda s: G(s, tokens=wire.tokens([[1] * 500]), max_new_tokens=20),
     C.OUT_OF_RANGE, [r"500", r"max_new_tokens 20", r"512"]),
    ("unknown-session",
     lambda s: R(s, tokens=T3, session_id="no-such-session"),
     C.NOT_FOUND, [r"no-such-session", r"not found"]),
    ("closed-session",
     lambda s: lambda c: s.AddHook(pb.AddHookRequest(session_id=c["closed"], op=H(
         hook_name="hook_embed", zero=ZERO))),
     C.NOT_FOUND, [r"not found or expired"]),
    ("close-closed-session",
     lambda s: lambda c: s.CloseSession(pb.CloseSessionRequest(session_id=c["closed"])),
     C.NOT_FOUND, [r"not found"]),
    ("unknown-hook-id",
     lambda s: lambda c: s.RemoveHook(pb.RemoveHookRequest(session_id=c["sid"], hook_id=999)),
     C.NOT_FOUND, [r"hook 999"]),
    ("unknown-cache-handle-fetch",
     lambda s: lambda c: list(s.FetchCache(pb.FetchCacheRequest(session_id=c["sid"], cache_handle="c999"))),
     C.NOT_FOUND, [r"c999"]),
    ("unknown-cache-handle-delete",
     lambda s: lambda c: s.DeleteCache(pb.DeleteCacheRequest(session_id=c["sid"], cache_handle="c999")),
     C.NOT_FOUND, [r"c999"]),
    ("unknown-cache-handle-patch",
     lambda s: lambda c: list(s.Run(pb.RunRequest(session_id=c["sid"], tokens=T3, hooks=[H(
         hook_name="hook_embed", patch_from_cache=hooks_pb2.PatchFromCacheOp(cache_handle="c999"))]))),
     C.NOT_FOUND, [r"c999"]),
    ("fetch-name-not-in-cache",
     lambda s: lambda c: list(s.FetchCache(pb.FetchCacheRequest(
         session_id=c["sid"], cache_handle=c["handle"], names=["blocks.0.hook_resid_pre"]))),
     C.NOT_FOUND, [r"holds no", r"blocks\.0\.hook_resid_pre"]),
    ("patch-unknown-source-hook",
     lambda s: lambda c: list(s.Run(pb.RunRequest(session_id=c["sid"], tokens=T3, hooks=[H(
         hook_name="hook_embed", patch_from_cache=hooks_pb2.PatchFromCacheOp(
             cache_handle=c["handle"], source_hook_name="hook_embedd"))]))),
     C.INVALID_ARGUMENT, [r"source_hook_name", r"hook_embedd", r'did you mean "hook_embed"']),
    ("patch-source-not-cached",
     lambda s: lambda c: list(s.Run(pb.RunRequest(session_id=c["sid"], tokens=T3, hooks=[H(
         hook_name="blocks.0.hook_resid_pre", patch_from_cache=hooks_pb2.PatchFromCacheOp(
             cache_handle=c["handle"]))]))),
     C.NOT_FOUND, [r"holds no", r"blocks\.0\.hook_resid_pre"]),
    ("patch-shape-mismatch",
     lambda s: lambda c: list(s.Run(pb.RunRequest(session_id=c["sid"], tokens=wire.tokens([[1, 2, 3, 4]]),
                                                  hooks=[H(hook_name="hook_embed",
                                                           patch_from_cache=hooks_pb2.PatchFromCacheOp(
                                                               cache_handle=c["handle"]))]))),
     C.INVALID_ARGUMENT, [r"hook_embed", r"broadcast"]),
    ("patch-empty-handle",
     lambda s: lambda c: list(s.Run(pb.RunRequest(session_id=c["sid"], tokens=T3, hooks=[H(
         hook_name="hook_embed", patch_from_cache=hooks_pb2.PatchFromCacheOp())]))),
     C.INVALID_ARGUMENT, [r"cache_handle", r"empty"]),
    ("store-without-session",
     lambda s: R(s, tokens=T3, cache=pb.CacheSelection(names=["hook_embed"], store=True)),
     C.INVALID_ARGUMENT, [r"cache\.store", r"session_id"]),
    ("cache-names-without-stream-or-store",
     lambda s: R(s, tokens=T3, cache=pb.CacheSelection(names=["hook_embed"])),
     C.INVALID_ARGUMENT, [r"stream", r"store"]),
    ("start-at-layer-without-residual",
     lambda s: R(s, tokens=T3, start_at_layer=2),
     C.INVALID_ARGUMENT, [r"start_at_layer", r"residual"]),
    ("residual-without-start-at-layer",
     lambda s: R(s, residual=f32(1, 3, 128)),
     C.INVALID_ARGUMENT, [r"residual", r"start_at_layer"]),
    ("residual-wrong-d-model",
     lambda s: R(s, residual=f32(1, 3, 127), start_at_layer=1),
     C.INVALID_ARGUMENT, [r"residual", r"128"]),
    ("stop-at-layer-out-of-range",
     lambda s: R(s, tokens=T3, stop_at_layer=9),
     C.INVALID_ARGUMENT, [r"stop_at_layer 9", r"4"]),
    ("start-after-stop",
     lambda s: R(s, residual=f32(1, 3, 128), start_at_layer=3, stop_at_layer=2),
     C.INVALID_ARGUMENT, [r"start_at_layer 3", r"stop_at_layer 2"]),
    ("loss-with-stop-at-layer",
     lambda s: R(s, tokens=T3, stop_at_layer=2, return_type=pb.RETURN_TYPE_LOSS),
     C.INVALID_ARGUMENT, [r"loss", r"stop_at_layer"]),
    ("loss-with-one-position",
     lambda s: R(s, tokens=wire.tokens([[1]]), return_type=pb.RETURN_TYPE_LOSS),
     C.INVALID_ARGUMENT, [r"loss", r"2 positions"]),
    ("max-new-tokens-zero",
     lambda s: G(s, max_new_tokens=0),
     C.INVALID_ARGUMENT, [r"max_new_tokens", r"1\.\.1024", r"got 0"]),
    ("max-new-tokens-too-large",
     lambda s: G(s, max_new_tokens=2000),
     C.INVALID_ARGUMENT, [r"max_new_tokens", r"1\.\.1024", r"got 2000"]),
    ("top-p-above-one",
     lambda s: G(s, max_new_tokens=3, sampling=pb.SamplingParams(do_sample=True, top_p=1.5)),
     C.INVALID_ARGUMENT, [r"top_p", r"1\.5"]),
    ("negative-temperature",
     lambda s: G(s, max_new_tokens=3, sampling=pb.SamplingParams(do_sample=True, temperature=-1)),
     C.INVALID_ARGUMENT, [r"temperature", r"-1"]),
    ("negative-top-k",
     lambda s: G(s, max_new_tokens=3, sampling=pb.SamplingParams(do_sample=True, top_k=-2)),
     C.INVALID_ARGUMENT, [r"top_k", r"-2"]),
    ("eos-id-past-vocab",
     lambda s: G(s, max_new_tokens=3, stop_at_eos=True, eos_token_ids=[9999]),
     C.INVALID_ARGUMENT, [r"eos", r"9999"]),
    ("step-cache-without-stream",
     lambda s: G(s, max_new_tokens=3, step_cache=pb.CacheSelection(names=["hook_embed"])),
     C.INVALID_ARGUMENT, [r"step_cache", r"stream"]),
    ("no-input",
     lambda s: R(s),
     C.INVALID_ARGUMENT, [r"input", r"exactly one of tokens"]),
    ("both-tokens-and-texts",
     lambda s: R(s, tokens=T3, texts=["hello"]),
     C.INVALID_ARGUMENT, [r"exactly one of tokens"]),
    ("both-tokens-and-residual",
     lambda s: R(s, tokens=T3, residual=f32(1, 3, 128), start_at_layer=1),
     C.INVALID_ARGUMENT, [r"exactly one of tokens", r"residual"]),
    ("patch-without-session",
     lambda s: R(s, tokens=T3, hooks=[H(hook_name="hook_embed", patch_from_cache=hooks_pb2.PatchFromCacheOp(
         cache_handle="c1"))]),
     C.INVALID_ARGUMENT, [r"patch_from_cache", r"session"]),
    ("generate-no-input",
     lambda s: lambda c: list(s.Generate(pb.GenerateRequest(max_new_tokens=2))),
     C.INVALID_ARGUMENT, [r"exactly one of tokens"]),
    ("empty-text",
     lambda s: R(s, texts=["hello", ""]),
     C.INVALID_ARGUMENT, [r"texts\[1\]", r"no tokens"]),
    ("tokenize-no-texts",
     lambda s: lambda c: s.Tokenize(pb.TokenizeRequest()),
     C.INVALID_ARGUMENT, [r"texts", r"empty"]),
    ("text-over-max-text-bytes",
     lambda s: lambda c: s.Tokenize(pb.TokenizeRequest(texts=["ok", "a" * ((1 << 20) + 1)])),
     C.INVALID_ARGUMENT, [r"texts\[1\]", r"1048577 bytes", r"max_text_bytes"]),
    ("detokenize-id-past-vocab",
     lambda s: lambda c: s.Detokenize(pb.DetokenizeRequest(rows=[pb.TokenRow(ids=[1]), pb.TokenRow(ids=[2, 512])])),
     C.INVALID_ARGUMENT, [r"rows\[1\]", r"512"]),
    ("client-callback-in-addhook",
     lambda s: lambda c: s.AddHook(pb.AddHookRequest(session_id=c["sid"], op=callback("hook_embed"))),
     C.INVALID_ARGUMENT, [r"client callback", r"RunInteractive"]),
    ("client-callback-in-run",
     lambda s: R(s, tokens=T3, hooks=[callback("hook_embed")]),
     C.INVALID_ARGUMENT, [r"hooks\[0\]", r"client callback", r"RunInteractive"]),
    ("client-callback-in-generate",
     lambda s: G(s, max_new_tokens=2, hooks=[callback("hook_embed")]),
     C.INVALID_ARGUMENT, [r"client callback", r"RunInteractive"]),
    ("hook-op-not-set",
     lambda s: lambda c: s.AddHook(pb.AddHookRequest(session_id=c["sid"], op=H(hook_name="hook_embed"))),
     C.INVALID_ARGUMENT, [r"no op set"]),
    ("add-hook-value-never-broadcasts",
     lambda s: lambda c: s.AddHook(pb.AddHookRequest(session_id=c["sid"], op=H(
         hook_name="blocks.0.hook_resid_post", add=hooks_pb2.AddOp(value=f32(5))))),
     C.INVALID_ARGUMENT, [r"op\.add\.value", r"\[5\]", r"does not broadcast"]),
    ("scale-not-finite",
     lambda s: R(s, tokens=T3, hooks=[H(hook_name="hook_embed", scale=hooks_pb2.ScaleOp(factor=float("inf")))]),
     C.INVALID_ARGUMENT, [r"scale\.factor", r"finite"]),
    ("attention-mask-shape",
     lambda s: R(s, tokens=T3, attention_mask=wire.tokens([[1, 1]])),
     C.INVALID_ARGUMENT, [r"attention_mask", r"\[1, 2\]", r"\[1, 3\]"]),
    ("attention-mask-values",
     lambda s: R(s, tokens=T3, attention_mask=wire.tokens([[1, 2, 1]])),
     C.INVALID_ARGUMENT, [r"attention_mask", r"0 or 1"]),
    ("logits-dtype-int",
     lambda s: R(s, tokens=T3, logits_dtype=tensor_pb2.DTYPE_INT64),
     C.INVALID_ARGUMENT, [r"logits_dtype", r"floating"]),
    ("cache-dtype-int",
     lambda s: R(s, tokens=T3, cache=pb.CacheSelection(names=["hook_embed"], stream=True,
                                                       dtype=tensor_pb2.DTYPE_INT32)),
     C.INVALID_ARGUMENT, [r"cache\.dtype", r"floating"]),
    ("weights-unknown-name",
     lambda s: lambda c: list(s.GetWeights(pb.GetWeightsRequest(name="W_X"))),
     C.INVALID_ARGUMENT, [r'"W_X"', r"W_Q"]),
    ("weights-layer-out-of-range",
     lambda s: lambda c: list(s.GetWeights(pb.GetWeightsRequest(name="W_Q", layer=4))),
     C.INVALID_ARGUMENT, [r"layer 4", r"0\.\.3"]),
    ("negative-session-ttl",
     lambda s: lambda c: s.CreateSession(pb.CreateSessionRequest(ttl_seconds=-5)),
     C.INVALID_ARGUMENT, [r"ttl_seconds"]),
    ("texts-over-max-batch",
     lambda s: lambda c: s.Tokenize(pb.TokenizeRequest(texts=["a"] * 65)),
     C.INVALID_ARGUMENT, [r"65 texts", r"max_batch = 64"]),
    ("detokenize-rows-over-max-batch",
     lambda s: lambda c: s.Detokenize(pb.DetokenizeRequest(rows=[pb.TokenRow(ids=[1])] * 65)),
     C.INVALID_ARGUMENT, [r"65 rows", r"max_batch"]),
    ("selector-too-many-positions",
     lambda s: R(s, tokens=T3, hooks=[H(hook_name="hook_embed", selector=hooks_pb2.Selector(
         positions=[0] * 65537), zero=ZERO)]),
     C.INVALID_ARGUMENT, [r"selector\.positions", r"65537 entries", r"65536"]),
    ("too-many-one-shot-hooks",
     lambda s: R(s, tokens=T3, hooks=[H(hook_name="hook_embed", zero=ZERO)] * 1025),
     C.INVALID_ARGUMENT, [r"1025 one-shot hooks", r"1024"]),
    ("request-over-max-request-bytes",
     lambda s: R(s, tokens=T3, hooks=[H(hook_name="hook_embed", add=hooks_pb2.AddOp(value=tensor_pb2.Tensor(
         dtype=tensor_pb2.DTYPE_FLOAT32, shape=[17 << 20], data=bytes(68 << 20))))]),
     C.RESOURCE_EXHAUSTED, [r"larger than max"]),
    ("weights-negative-layer",
     lambda s: lambda c: list(s.GetWeights(pb.GetWeightsRequest(name="W_K", layer=-1))),
     C.INVALID_ARGUMENT, [r"layer -1", r"0\.\.3"]),
    ("hook-name-too-long",
     lambda s: R(s, tokens=T3, hooks=[H(hook_name="blocks." + "9" * 300, zero=ZERO)]),
     C.INVALID_ARGUMENT, [r"too long"]),
]


@pytest.mark.parametrize("builder,code,patterns", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request(stub, ctx, builder, code, patterns):
    got, details = rpc_error(lambda: builder(stub)(ctx))
    assert got == code, f"expected {code}, got {got}: {details}"
    for p in patterns:
        assert re.search(p, details), f"message {details!r} does not match /{p}/"


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30


# ------------------------------------------------------------------ formerly open bugs, now fixed


def test_get_weights_integer_dtype_is_invalid(stub):
    for dtype in (tensor_pb2.DTYPE_INT64, tensor_pb2.DTYPE_INT32):
        code, details = rpc_error(lambda: list(stub.GetWeights(pb.GetWeightsRequest(name="W_E", dtype=dtype))))
        assert code == C.INVALID_ARGUMENT, (code, details)
        assert "dtype" in details and "floating" in details, details


def test_float_attention_mask_is_invalid(stub):
    for mask in (np.array([[0.5, 1, 1]], np.float32), np.array([[1, 1, 1]], np.float32)):
        code, details = rpc_error(lambda: list(stub.Run(pb.RunRequest(tokens=T3, attention_mask=wire.to_proto(mask)))))
        assert code == C.INVALID_ARGUMENT, (code, details)
        assert "attention_mask" in details, details
    code, details = rpc_error(lambda: list(stub.Generate(pb.GenerateRequest(
        tokens=T3, max_new_tokens=1, attention_mask=wire.to_proto(np.array([[0.5, 1, 1]], np.float32))))))
    assert code == C.INVALID_ARGUMENT, (code, details)


def test_run_texts_right_padding_not_silently_ignored(stub):
    texts = ["Hello world", "hi"]
    try:
        t, _, _ = run(stub, texts=texts, padding_side=pb.PADDING_SIDE_RIGHT)
    except grpc.RpcError as e:
        assert e.code() == C.INVALID_ARGUMENT and "padding_side" in e.details(), (e.code(), e.details())
        return
    right = stub.Tokenize(pb.TokenizeRequest(texts=texts, padding_side=pb.PADDING_SIDE_RIGHT))
    t2, _, _ = run(stub, tokens=right.tokens, attention_mask=right.attention_mask)
    n1 = right.lengths[1]
    assert np.abs(t["logits"][1, :n1] - t2["logits"][1, :n1]).max() < 1e-4, "RIGHT was not honoured"


# ------------------------------------------------------------------ limits server


@pytest.fixture(scope="module")
def lim(limits_server):
    c = Client(limits_server)
    yield c
    c.close()


def test_tokens_over_max_tokens_is_resource_exhausted(lim):
    code, details = rpc_error(lambda: list(lim.stub.Run(pb.RunRequest(
        tokens=wire.tokens(np.ones((4, 300), np.int64))))))
    assert code == C.RESOURCE_EXHAUSTED, (code, details)
    assert "max_tokens_per_request" in details


def test_texts_over_max_tokens_is_resource_exhausted(lim):
    code, details = rpc_error(lambda: list(lim.stub.Run(pb.RunRequest(texts=["hello world " * 100] * 4))))
    assert code == C.RESOURCE_EXHAUSTED, (code, details)
    assert re.search(r"max_tokens_per_request = 1000", details), details


def test_residual_over_max_tokens_is_resource_exhausted(lim):
    code, details = rpc_error(lambda: list(lim.stub.Run(pb.RunRequest(
        residual=f32(4, 300, 128), start_at_layer=1))))
    assert code == C.RESOURCE_EXHAUSTED, (code, details)
    assert "max_tokens_per_request" in details


def test_limits_server_batch_and_new_tokens(lim):
    code, details = rpc_error(lambda: list(lim.stub.Run(pb.RunRequest(
        tokens=wire.tokens(np.ones((5, 3), np.int64))))))
    assert code == C.INVALID_ARGUMENT and "max_batch = 4" in details, details
    code, details = rpc_error(lambda: list(lim.stub.Generate(pb.GenerateRequest(tokens=T3, max_new_tokens=65))))
    assert code == C.INVALID_ARGUMENT and "1..64" in details, details


def test_expired_session_is_not_found(lim):
    s = lim.stub
    created = s.CreateSession(pb.CreateSessionRequest())
    sid = created.session_id
    assert created.ttl_seconds == 1  # the server's session_ttl_seconds
    s.AddHook(pb.AddHookRequest(session_id=sid, op=H(hook_name="hook_embed", zero=ZERO)))
    time.sleep(1.5)
    for fn in (lambda: s.ListHooks(pb.ListHooksRequest(session_id=sid)),
               lambda: list(s.Run(pb.RunRequest(session_id=sid, tokens=T3))),
               lambda: s.CloseSession(pb.CloseSessionRequest(session_id=sid))):
        code, details = rpc_error(fn)
        assert code == C.NOT_FOUND and "expired" in details and sid in details, (code, details)
    assert sid not in {x.session_id for x in s.ListSessions(pb.ListSessionsRequest()).sessions}


def test_janitor_frees_expired_sessions_and_caches(lim):
    """The janitor (every 5 s) frees expired sessions and their stored caches."""
    s = lim.stub
    sid = s.CreateSession(pb.CreateSessionRequest()).session_id
    run(s, session_id=sid, tokens=T3, return_type=pb.RETURN_TYPE_NONE,
        cache=pb.CacheSelection(names=["*"], store=True))
    assert metric(lim.server, "remotelens_stored_cache_bytes") > 0
    assert metric(lim.server, "remotelens_active_sessions") >= 1
    assert wait_until(lambda: metric(lim.server, "remotelens_active_sessions") == 0
                      and metric(lim.server, "remotelens_stored_cache_bytes") == 0, timeout=12), (
        metric(lim.server, "remotelens_active_sessions"), metric(lim.server, "remotelens_stored_cache_bytes"))
    code, _ = rpc_error(lambda: list(s.FetchCache(pb.FetchCacheRequest(session_id=sid, cache_handle="c1"))))
    assert code == C.NOT_FOUND


def test_idle_ttl_is_renewed_by_use(lim):
    s = lim.stub
    sid = s.CreateSession(pb.CreateSessionRequest(ttl_seconds=2)).session_id
    for _ in range(4):
        time.sleep(0.6)
        s.ListHooks(pb.ListHooksRequest(session_id=sid))  # each access restarts the idle clock
    s.CloseSession(pb.CloseSessionRequest(session_id=sid))


def _interactive_request(name="blocks.0.attn.hook_z"):
    return pb.RunRequest(tokens=T3, hooks=[callback(name, 9)])


def test_interactive_hook_timeout_is_deadline_exceeded(lim):
    t0 = time.time()
    code, details = rpc_error(lambda: Interactive(lim.stub, _interactive_request(),
                                                  lambda c, a: "hang").run())
    assert code == C.DEADLINE_EXCEEDED, (code, details)
    assert "hook_timeout_ms" in details and "blocks.0.attn.hook_z" in details and "3s" in details
    assert 2.5 < time.time() - t0 < 20
    t, _, _ = run(lim.stub, tokens=T3, timeout=10)
    assert t["logits"].shape == (1, 3, 512)


def test_queue_full_is_resource_exhausted(lim):
    """A pending interactive hook holds the one scheduler thread; one request may queue; the next
    is refused."""
    holding = threading.Event()
    release = threading.Event()

    def hold(call, act):
        holding.set()
        release.wait(5)
        return None

    holder = Interactive(lim.stub, _interactive_request(), hold)
    holder_result = {}

    def hold_run():
        try:
            holder_result["summary"] = holder.run().summary
        except grpc.RpcError as e:
            holder_result["error"] = (e.code(), e.details())
    th = threading.Thread(target=hold_run)
    th.start()
    queued = {}
    try:
        assert holding.wait(10), "no hook call arrived"
        q_thread = threading.Thread(target=lambda: queued.setdefault("r", run(lim.stub, tokens=T3, timeout=20)))
        q_thread.start()
        assert wait_until(lambda: metric(lim.server, "remotelens_queue_depth") == 1, timeout=15), \
            "the second request never reached the queue"
        code, details = rpc_error(lambda: list(lim.stub.Run(pb.RunRequest(tokens=T3), timeout=10)))
        assert code == C.RESOURCE_EXHAUSTED, (code, details)
        assert "queue is full" in details and "max_queue 1" in details
    finally:
        release.set()
        th.join(30)
    q_thread.join(30)
    assert "summary" in holder_result, holder_result
    assert holder_result["summary"].tokens_processed == 3
    assert queued["r"][0]["logits"].shape == (1, 3, 512)


def test_deadline_while_queued(lim):
    holding = threading.Event()
    release = threading.Event()
    holder = Interactive(lim.stub, _interactive_request(),
                         lambda c, a: (holding.set(), release.wait(5), None)[2])
    th = threading.Thread(target=holder.run)
    th.start()
    try:
        assert holding.wait(10)
        t0 = time.time()
        code, _ = rpc_error(lambda: list(lim.stub.Run(pb.RunRequest(tokens=T3), timeout=0.3)))
        assert code == C.DEADLINE_EXCEEDED and time.time() - t0 < 3
    finally:
        release.set()
        th.join(30)
    t, _, _ = run(lim.stub, tokens=T3, timeout=10)
    assert t["logits"].shape == (1, 3, 512)


# ------------------------------------------------------------------ auth server: keys and quotas


@pytest.fixture(scope="module")
def auth(auth_server):
    c = Client(auth_server)
    yield c
    c.close()


def test_missing_and_wrong_key(auth):
    code, details = rpc_error(lambda: list(auth.stub.Run(pb.RunRequest(tokens=T3))))
    assert code == C.UNAUTHENTICATED and "missing API key" in details
    code, details = rpc_error(lambda: list(auth.stub.Run(pb.RunRequest(tokens=T3),
                                                        metadata=wire.bearer("nope"))))
    assert code == C.UNAUTHENTICATED and "invalid API key" in details


def test_concurrency_quota_exceeded(auth):
    """carol may have one request in flight; a held interactive run is that one."""
    md = wire.bearer(KEYS["carol"])
    holding = threading.Event()
    release = threading.Event()
    holder = Interactive(auth.stub, _interactive_request(),
                         lambda c, a: (holding.set(), release.wait(10), None)[2], md=md)
    th = threading.Thread(target=holder.run)
    th.start()
    try:
        assert holding.wait(10)
        for fn in (lambda: list(auth.stub.Run(pb.RunRequest(tokens=T3), metadata=md, timeout=10)),
                   lambda: list(auth.stub.Generate(pb.GenerateRequest(tokens=T3, max_new_tokens=1),
                                                   metadata=md, timeout=10))):
            code, details = rpc_error(fn)
            assert code == C.RESOURCE_EXHAUSTED, (code, details)
            assert "max_concurrent_requests = 1" in details and "carol" in details
        # Another user is not limited by carol's quota (queued behind the held run).
        release.set()
        t, _, _ = run(auth.stub, wire.bearer(KEYS["alice"]), tokens=T3, timeout=20)
        assert t["logits"].shape == (1, 3, 512)
    finally:
        release.set()
        th.join(30)
    # The lease is returned once the held run ends.
    t, _, _ = run(auth.stub, md, tokens=T3, timeout=10)
    assert t["logits"].shape == (1, 3, 512)


def test_streamed_bytes_quota_exceeded(auth):
    md = wire.bearer(KEYS["dave"])
    # [1, 2, 512] float32 logits = 4096 bytes: exactly the quota.
    t, s, _ = run(auth.stub, md, tokens=wire.tokens([[1, 2]]))
    assert s.bytes_streamed == 4096
    code, details = rpc_error(lambda: list(auth.stub.Run(pb.RunRequest(tokens=T3), metadata=md)))
    assert code == C.RESOURCE_EXHAUSTED, (code, details)
    assert "6144 bytes" in details and "4096" in details and "quota" in details
    code, details = rpc_error(lambda: list(auth.stub.Run(pb.RunRequest(
        tokens=wire.tokens([[1, 2]]), cache=pb.CacheSelection(names=["*"], stream=True)), metadata=md)))
    assert code == C.RESOURCE_EXHAUSTED and "quota" in details, (code, details)


def test_server_wide_stored_cache_capacity(demo_model_dir, users_dir):
    # Two users each within their own quota; together past the server's capacity.
    users = write_users_file(users_dir)
    config = f'users_file: "{users}"\nlimits {{ max_stored_cache_bytes: 20000 }}'
    with server_harness.ServerProcess(demo_model_dir, config=config) as server:
        c = Client(server)
        try:
            def store(user):
                md = wire.bearer(KEYS[user])
                sid = c.stub.CreateSession(pb.CreateSessionRequest(), metadata=md).session_id
                # 2 * 4 * 384 * 4 = 12288 bytes
                responses = list(c.stub.Run(pb.RunRequest(
                    session_id=sid, tokens=wire.tokens([[1, 2, 3, 4]] * 2),
                    return_type=pb.RETURN_TYPE_NONE,
                    cache=pb.CacheSelection(names=["blocks.0.mlp.hook_post"], store=True)), metadata=md))
                return md, sid, responses[-1].summary.cache_handle

            md_a, sid_a, handle = store("alice")
            assert handle
            code, details = rpc_error(lambda: store("bob"))
            assert code == C.RESOURCE_EXHAUSTED, (code, details)
            assert "server's stored cache capacity" in details and "alice" not in details, details
            # Alice frees hers; bob's store now fits.
            c.stub.DeleteCache(pb.DeleteCacheRequest(session_id=sid_a, cache_handle=handle), metadata=md_a)
            assert store("bob")[2]
        finally:
            c.close()
        assert server.stop() == 0, "".join(server.stderr_lines)


def test_stored_cache_quota_exceeded(auth):
    md = wire.bearer(KEYS["dave"])
    sid = auth.stub.CreateSession(pb.CreateSessionRequest(), metadata=md).session_id
    try:
        code, details = rpc_error(lambda: list(auth.stub.Run(pb.RunRequest(
            session_id=sid, tokens=wire.tokens([[1, 2, 3, 4]] * 2), return_type=pb.RETURN_TYPE_NONE,
            cache=pb.CacheSelection(names=["blocks.0.mlp.hook_post"], store=True)), metadata=md)))
        # 2 * 4 * 384 * 4 = 12288 bytes > 8192
        assert code == C.RESOURCE_EXHAUSTED, (code, details)
        assert "stored cache quota" in details and "dave" in details
        sessions = auth.stub.ListSessions(pb.ListSessionsRequest(), metadata=md).sessions
        assert [x.num_caches for x in sessions if x.session_id == sid] == [0]
    finally:
        auth.stub.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=md)


def test_user_token_quota_is_resource_exhausted(auth):
    md = wire.bearer(KEYS["dave"])
    code, details = rpc_error(lambda: list(auth.stub.Run(pb.RunRequest(
        tokens=wire.tokens(np.ones((2, 40), np.int64)), return_type=pb.RETURN_TYPE_NONE), metadata=md)))
    assert code == C.RESOURCE_EXHAUSTED, (code, details)
    assert "max_tokens_per_request" in details


# ------------------------------------------------------------------ deadlines and vanished clients


def test_tiny_deadline(stub):
    rows = np.ones((16, 400), np.int64)
    code, _ = rpc_error(lambda: list(stub.Run(pb.RunRequest(tokens=wire.tokens(rows)), timeout=0.001)))
    assert code == C.DEADLINE_EXCEEDED
    code, _ = rpc_error(lambda: list(stub.Generate(pb.GenerateRequest(tokens=T3, max_new_tokens=50),
                                                   timeout=0.001)))
    assert code == C.DEADLINE_EXCEEDED
    t, _, _ = run(stub, tokens=T3, timeout=10)
    assert t["logits"].shape == (1, 3, 512)


def test_client_gone_mid_stream(stub, ref, auth):
    rows = random_rows(32, 300, seed=51)
    call = stub.Run(pb.RunRequest(tokens=wire.tokens(rows)), timeout=60)
    first = next(call)
    assert first.tensor.name == "logits" and first.tensor.offset == 0
    call.cancel()
    code, _ = rpc_error(lambda: list(call))
    assert code == C.CANCELLED
    # A generation abandoned after its first step.
    gen = stub.Generate(pb.GenerateRequest(tokens=T3, max_new_tokens=500), timeout=60)
    assert next(gen).WhichOneof("item") == "step"
    gen.cancel()
    # carol (one request at a time) abandons a large run, a generation and an interactive run:
    # her lease must come back each time.
    md = wire.bearer(KEYS["carol"])

    def carol_can_run_again():
        deadline = time.time() + 20
        while True:
            try:
                return run(auth.stub, md, tokens=T3, timeout=10)
            except grpc.RpcError as e:
                assert e.code() == C.RESOURCE_EXHAUSTED and time.time() < deadline, e
                time.sleep(0.1)

    call = auth.stub.Run(pb.RunRequest(tokens=wire.tokens(rows)), metadata=md, timeout=60)
    next(call)
    call.cancel()
    carol_can_run_again()
    gen = auth.stub.Generate(pb.GenerateRequest(tokens=T3, max_new_tokens=500), metadata=md, timeout=60)
    next(gen)
    gen.cancel()
    carol_can_run_again()
    code, _ = rpc_error(lambda: Interactive(auth.stub, _interactive_request(), lambda c, a: "close", md=md).run())
    assert code == C.CANCELLED
    carol_can_run_again()
    want, _ = ref_forward(ref, rows[:2], collect=False)
    t, _, _ = run(stub, tokens=wire.tokens(rows[:2]), timeout=20)
    assert_close(t["logits"], want, "a run after abandoned streams")


def test_client_gone_mid_interactive_hook(stub, ref):
    """The demo server waits 30 s for hook replies: a vanished client must not hold it that long."""
    rows = [[4, 5, 6, 7]]
    for how in ("close", "cancel"):
        arrived = threading.Event()
        holder = Interactive(stub, pb.RunRequest(tokens=wire.tokens(rows), hooks=[callback("blocks.2.hook_resid_pre")]),
                             lambda c, a: (arrived.set(), "close" if how == "close" else "hang")[1])
        result = {}

        def consume():
            try:
                holder.run()
                result["code"] = C.OK
            except grpc.RpcError as e:
                result["code"] = e.code()
        th = threading.Thread(target=consume)
        th.start()
        assert arrived.wait(10)
        if how == "cancel":
            time.sleep(0.1)
            holder.call.cancel()
        th.join(10)
        assert not th.is_alive()
        assert result["code"] == C.CANCELLED, (how, result)
        t0 = time.time()
        t, _, _ = run(stub, tokens=wire.tokens(rows), timeout=10)
        assert time.time() - t0 < 5, f"the server was still waiting for the vanished client ({how})"
        want, _ = ref_forward(ref, rows)
        assert_close(t["logits"], want, f"run after the client vanished ({how})")


def test_interactive_reply_errors(stub):
    req = _interactive_request()
    cases = [
        (lambda c, a: np.zeros((1, 3, 8, 15), np.float32), [r"returned shape \[1, 3, 8, 15\]", r"\[1, 3, 8, 16\]"]),
        (lambda c, a: a.reshape(-1), [r"returned shape \[384\]"]),
        (lambda c, a: pb.HookReply(call_id=c.call_id, replacement=wire.to_proto(np.zeros(a.shape, np.int64))),
         [r"floating"]),
        (lambda c, a: pb.HookReply(call_id=c.call_id + 5, unchanged=True), [r"call_id 6", r"pending hook call 1"]),
        (lambda c, a: pb.HookReply(call_id=c.call_id), [r"HookReply\.replacement", r"dtype"]),
    ]
    for on_call, patterns in cases:
        code, details = rpc_error(lambda: Interactive(stub, req, on_call).run())
        assert code == C.INVALID_ARGUMENT, (code, details)
        for p in patterns:
            assert re.search(p, details), (p, details)
    # float16 replacements are cast to the model's dtype.
    it = Interactive(stub, req, lambda c, a: pb.HookReply(
        call_id=c.call_id, replacement=wire.to_proto(a.astype(np.float16)))).run()
    assert it.summary.tokens_processed == 3


def test_first_interactive_message_must_be_run(stub):
    code, details = rpc_error(lambda: Interactive(stub, None, lambda c, a: None, first=pb.InteractiveRequest(
        reply=pb.HookReply(call_id=1, unchanged=True))).run())
    assert code == C.INVALID_ARGUMENT and "first RunInteractive message must be a RunRequest" in details
    code, details = rpc_error(lambda: list(stub.RunInteractive(iter([]), timeout=10)))
    assert code == C.INVALID_ARGUMENT and "RunRequest" in details
    # A second RunRequest where a reply is expected ends the run.
    code, details = rpc_error(lambda: _second_run(stub))
    assert code == C.INVALID_ARGUMENT and "only HookReply" in details, (code, details)


def _second_run(stub):
    class Second(Interactive):
        def _reply(self, hook_call, answer):
            self._q.put(pb.InteractiveRequest(run=pb.RunRequest(tokens=T3)))
    return Second(stub, _interactive_request(), lambda c, a: None).run()


# ------------------------------------------------------------------ memory


def _bad_requests(stub, ctx):
    big = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[128], data=b"\0" * (256 << 10))
    return [
        lambda: list(stub.Run(pb.RunRequest(tokens=T3, hooks=[H(hook_name="blocks.0.hook_resid_pr", zero=ZERO)]))),
        lambda: list(stub.Run(pb.RunRequest(tokens=T3, hooks=[H(hook_name="hook_embed", add=hooks_pb2.AddOp(value=big))]))),
        lambda: list(stub.Run(pb.RunRequest(tokens=wire.tokens([[1, 600]])))),
        lambda: list(stub.Run(pb.RunRequest(tokens=T3, session_id="missing"))),
        lambda: list(stub.Run(pb.RunRequest(tokens=T3, hooks=[H(hook_name="blocks.0.hook_resid_pre",
                                                                 add=hooks_pb2.AddOp(value=f32(2, 5, 127)))]))),
        lambda: list(stub.Generate(pb.GenerateRequest(tokens=T3, max_new_tokens=0))),
        lambda: stub.AddHook(pb.AddHookRequest(session_id=ctx["sid"], op=callback("hook_embed"))),
        lambda: list(stub.FetchCache(pb.FetchCacheRequest(session_id=ctx["sid"], cache_handle="c404"))),
        lambda: stub.Tokenize(pb.TokenizeRequest(texts=[""])),
        lambda: list(stub.Run(pb.RunRequest(tokens=T3, cache=pb.CacheSelection(names=["nope"], stream=True)))),
    ]


def test_bad_requests_do_not_leak_memory(demo_server, stub, ctx):
    bad = _bad_requests(stub, ctx)

    def burst(n):
        for i in range(n):
            try:
                bad[i % len(bad)]()
            except grpc.RpcError as e:
                assert e.code() not in (C.OK, C.INTERNAL, C.UNKNOWN), (i % len(bad), e.code(), e.details())
            else:
                raise AssertionError(f"bad request #{i % len(bad)} succeeded")
    burst(100)
    time.sleep(0.3)
    before = demo_server.rss_bytes()
    t0 = time.time()
    burst(1000)
    time.sleep(0.3)
    after = demo_server.rss_bytes()
    assert time.time() - t0 < 90
    assert after - before < 30 * (1 << 20), f"RSS grew {(after - before) / (1 << 20):.1f} MiB"


# ------------------------------------------------------------------ still healthy


def test_server_still_serves_correctly(demo_server, stub, ref):
    assert demo_server.proc.poll() is None, "".join(demo_server.stderr_lines)
    rows = random_rows(2, 9, seed=99)
    t, s, _ = run(stub, tokens=wire.tokens(rows), return_type=pb.RETURN_TYPE_BOTH)
    want, _ = ref_forward(ref, rows)
    assert_close(t["logits"], want, "normal run after every bad request")
    assert s.tokens_processed == 18
