"""Multi-user isolation on a server with a users file (API keys as "authorization: Bearer KEY").

Two users run concurrently with different persistent hooks and each sees only their own; neither
can touch the other's sessions, hooks or caches; keys are required; a server without a users file
refuses to listen on 0.0.0.0.
"""
import os
import subprocess
import tempfile
import threading

import grpc
import numpy as np
import pytest

import server_harness
import wire
from server_helpers import KEYS, Client, assert_close, max_diff, random_rows, ref_forward, rpc_error, run
from remotelens.v1 import hooks_pb2
from remotelens.v1 import remotelens_pb2 as pb

H = hooks_pb2.HookOp
C = grpc.StatusCode


@pytest.fixture(scope="module")
def alice(auth_server):
    c = Client(auth_server, KEYS["alice"])
    yield c
    c.close()


@pytest.fixture(scope="module")
def bob(auth_server):
    c = Client(auth_server, KEYS["bob"])
    yield c
    c.close()


@pytest.fixture(scope="module")
def setup(alice, bob, ref):
    """alice: a session zero-ablating MLP 1 out; bob: a session steering block 2; a cache each."""
    a_sid = alice.stub.CreateSession(pb.CreateSessionRequest(), metadata=alice.md).session_id
    b_sid = bob.stub.CreateSession(pb.CreateSessionRequest(), metadata=bob.md).session_id
    steer = (np.random.default_rng(5).normal(size=ref.config.d_model) * 3).astype(np.float32)
    a_hook = alice.stub.AddHook(pb.AddHookRequest(session_id=a_sid, op=H(
        hook_name="blocks.1.hook_mlp_out", zero=hooks_pb2.ZeroOp())), metadata=alice.md).hook_id
    b_hook = bob.stub.AddHook(pb.AddHookRequest(session_id=b_sid, op=H(
        hook_name="blocks.2.hook_resid_post", add=hooks_pb2.AddOp(value=wire.to_proto(steer)))),
        metadata=bob.md).hook_id
    rows = random_rows(2, 12, seed=40)
    _, sa, _ = run(alice.stub, alice.md, session_id=a_sid, tokens=wire.tokens(rows),
                   return_type=pb.RETURN_TYPE_NONE,
                   cache=pb.CacheSelection(names=["blocks.0.hook_resid_post"], store=True))
    _, sb, _ = run(bob.stub, bob.md, session_id=b_sid, tokens=wire.tokens(rows),
                   return_type=pb.RETURN_TYPE_NONE,
                   cache=pb.CacheSelection(names=["blocks.0.hook_resid_post"], store=True))
    yield dict(a_sid=a_sid, b_sid=b_sid, a_hook=a_hook, b_hook=b_hook, steer=steer,
               a_handle=sa.cache_handle, b_handle=sb.cache_handle)
    for c, sid in ((alice, a_sid), (bob, b_sid)):
        try:
            c.stub.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=c.md)
        except grpc.RpcError:
            pass


def test_concurrent_users_each_see_only_their_own_hooks(alice, bob, setup, ref):
    rows = random_rows(2, 16, seed=41)
    want_alice, _ = ref_forward(ref, rows, ops=[{"hook": "blocks.1.hook_mlp_out", "op": "zero"}])
    want_bob, _ = ref_forward(ref, rows, ops=[{"hook": "blocks.2.hook_resid_post", "op": "add",
                                               "tensor": "s"}], hook_tensors={"s": setup["steer"]})
    plain, _ = ref_forward(ref, rows)
    assert max_diff(want_alice, plain) > 1e-2 and max_diff(want_bob, plain) > 1e-2
    assert max_diff(want_alice, want_bob) > 1e-2

    results = {"alice": [], "bob": [], "alice-plain": []}
    errors = []
    barrier = threading.Barrier(3)

    def worker(label, c, sid):
        try:
            barrier.wait(timeout=30)
            for _ in range(8):
                t, _, _ = run(c.stub, c.md, session_id=sid, tokens=wire.tokens(rows))
                results[label].append(t["logits"])
        except Exception as e:  # reported below with the label
            errors.append(f"{label}: {e!r}")

    threads = [threading.Thread(target=worker, args=("alice", alice, setup["a_sid"])),
               threading.Thread(target=worker, args=("bob", bob, setup["b_sid"])),
               threading.Thread(target=worker, args=("alice-plain", alice, ""))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert all(len(v) == 8 for v in results.values()), {k: len(v) for k, v in results.items()}
    for logits in results["alice"]:
        assert_close(logits, want_alice, "alice's run (zero-ablated)")
    for logits in results["bob"]:
        assert_close(logits, want_bob, "bob's run (steered)")
    for logits in results["alice-plain"]:
        assert_close(logits, plain, "alice without a session (no hooks)")


def test_cross_user_session_access_is_denied(alice, bob, setup):
    a_sid, a_handle = setup["a_sid"], setup["a_handle"]
    md = bob.md
    s = bob.stub
    zero = H(hook_name="hook_embed", zero=hooks_pb2.ZeroOp())
    attempts = {
        "AddHook": lambda: s.AddHook(pb.AddHookRequest(session_id=a_sid, op=zero), metadata=md),
        "ListHooks": lambda: s.ListHooks(pb.ListHooksRequest(session_id=a_sid), metadata=md),
        "RemoveHook": lambda: s.RemoveHook(pb.RemoveHookRequest(session_id=a_sid,
                                                                hook_id=setup["a_hook"]), metadata=md),
        "ResetHooks": lambda: s.ResetHooks(pb.ResetHooksRequest(session_id=a_sid), metadata=md),
        "Run": lambda: list(s.Run(pb.RunRequest(session_id=a_sid, tokens=wire.tokens([[1, 2, 3]])),
                                  metadata=md)),
        "Run store": lambda: list(s.Run(pb.RunRequest(
            session_id=a_sid, tokens=wire.tokens([[1, 2, 3]]),
            cache=pb.CacheSelection(names=["hook_embed"], store=True)), metadata=md)),
        "Generate": lambda: list(s.Generate(pb.GenerateRequest(
            session_id=a_sid, tokens=wire.tokens([[1, 2, 3]]), max_new_tokens=2), metadata=md)),
        "FetchCache": lambda: list(s.FetchCache(pb.FetchCacheRequest(session_id=a_sid,
                                                                     cache_handle=a_handle), metadata=md)),
        "DeleteCache": lambda: s.DeleteCache(pb.DeleteCacheRequest(session_id=a_sid,
                                                                   cache_handle=a_handle), metadata=md),
        "CloseSession": lambda: s.CloseSession(pb.CloseSessionRequest(session_id=a_sid), metadata=md),
    }
    problems = []
    for label, fn in attempts.items():
        code, details = rpc_error(fn)
        if code != C.PERMISSION_DENIED or "another user" not in details:
            problems.append(f"{label}: {code} {details!r}")
    assert not problems, "\n".join(problems)
    # Nothing changed in alice's session.
    hooks = alice.stub.ListHooks(pb.ListHooksRequest(session_id=a_sid), metadata=alice.md).hooks
    assert [h.hook_id for h in hooks] == [setup["a_hook"]]
    mine = {x.session_id: x for x in alice.stub.ListSessions(pb.ListSessionsRequest(),
                                                             metadata=alice.md).sessions}
    assert mine[a_sid].num_caches == 1 and mine[a_sid].num_hooks == 1
    fetched = wire.assemble(alice.stub.FetchCache(pb.FetchCacheRequest(
        session_id=a_sid, cache_handle=a_handle), metadata=alice.md))
    assert list(fetched) == ["blocks.0.hook_resid_post"]


def test_patch_from_cache_cannot_read_another_users_cache(alice, bob, setup):
    # bob names alice's session in his run: denied before anything runs.
    op = H(hook_name="blocks.0.hook_resid_post",
           patch_from_cache=hooks_pb2.PatchFromCacheOp(cache_handle=setup["a_handle"]))
    code, details = rpc_error(lambda: list(bob.stub.Run(pb.RunRequest(
        session_id=setup["a_sid"], tokens=wire.tokens([[1, 2, 3]]), hooks=[op]), metadata=bob.md)))
    assert code == C.PERMISSION_DENIED, (code, details)


def test_list_sessions_shows_only_own(alice, bob, setup):
    a = {x.session_id for x in alice.stub.ListSessions(pb.ListSessionsRequest(), metadata=alice.md).sessions}
    b = {x.session_id for x in bob.stub.ListSessions(pb.ListSessionsRequest(), metadata=bob.md).sessions}
    assert setup["a_sid"] in a and setup["b_sid"] not in a
    assert setup["b_sid"] in b and setup["a_sid"] not in b
    assert not (a & b)


@pytest.mark.parametrize("metadata,pattern", [
    (None, "missing API key"),
    ((("authorization", "Bearer wrong-key"),), "invalid API key"),
    ((("authorization", "Bearer " + KEYS["alice"] + "x"),), "invalid API key"),
    ((("authorization", "Bearer "),), "missing API key"),
    ((("authorization", "Basic " + KEYS["alice"]),), "malformed"),
    ((("authorization", KEYS["alice"]),), "malformed"),
], ids=["missing", "wrong", "key-plus-one", "empty-bearer", "basic-scheme", "bare-key"])
def test_missing_or_wrong_key_is_unauthenticated(auth_server, alice, metadata, pattern):
    s = alice.stub
    calls = {
        "GetModelInfo": lambda: s.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata),
        "Tokenize": lambda: s.Tokenize(pb.TokenizeRequest(texts=["hi"]), metadata=metadata),
        "CreateSession": lambda: s.CreateSession(pb.CreateSessionRequest(), metadata=metadata),
        "ListSessions": lambda: s.ListSessions(pb.ListSessionsRequest(), metadata=metadata),
        "Run": lambda: list(s.Run(pb.RunRequest(tokens=wire.tokens([[1, 2]])), metadata=metadata)),
        "Generate": lambda: list(s.Generate(pb.GenerateRequest(tokens=wire.tokens([[1, 2]]),
                                                               max_new_tokens=1), metadata=metadata)),
        "RunInteractive": lambda: list(s.RunInteractive(iter([pb.InteractiveRequest(
            run=pb.RunRequest(tokens=wire.tokens([[1, 2]])))]), metadata=metadata)),
        "GetWeights": lambda: list(s.GetWeights(pb.GetWeightsRequest(name="W_E"), metadata=metadata)),
        "FetchCache": lambda: list(s.FetchCache(pb.FetchCacheRequest(session_id="x", cache_handle="c1"),
                                                metadata=metadata)),
    }
    problems = []
    for label, fn in calls.items():
        code, details = rpc_error(fn)
        if code != C.UNAUTHENTICATED or pattern not in details:
            problems.append(f"{label}: {code} {details!r}")
        assert KEYS["alice"] not in details, "the key must never be echoed"
    assert not problems, "\n".join(problems)
    # The right key still works.
    assert s.GetModelInfo(pb.GetModelInfoRequest(), metadata=alice.md).n_layers == 4


def test_refuses_wildcard_listen_without_users_file(demo_model_dir):
    d = tempfile.mkdtemp(prefix="remotelens_wild_")
    cfg = os.path.join(d, "server.textproto")
    with open(cfg, "w") as f:
        f.write(f'model_dir: "{demo_model_dir}"\nlisten_address: "0.0.0.0:0"\nmetrics_address: "none"\n')
    proc = subprocess.run([server_harness.SERVER_BIN, "--config", cfg], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    assert "listening on" not in proc.stdout
    assert "0.0.0.0" in proc.stderr and "users_file" in proc.stderr, proc.stderr
    assert "127.0.0.1" in proc.stderr  # the other fix: listen on loopback
    # The --host flag is checked the same way.
    cfg2 = os.path.join(d, "server2.textproto")
    with open(cfg2, "w") as f:
        f.write(f'model_dir: "{demo_model_dir}"\nmetrics_address: "none"\n')
    proc = subprocess.run([server_harness.SERVER_BIN, "--config", cfg2, "--host", "0.0.0.0",
                           "--port", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "users_file" in proc.stderr, proc.stderr
