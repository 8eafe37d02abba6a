"""RunRequest.past_kv_cache on the wire: incremental forwards whose keys and values stay in the
session (TransformerLens's HookedTransformerKeyValueCache, transformer_lens/past_key_value_caching.py;
its behaviour is tested in TransformerLens's tests/unit/test_kv_cache.py: a split prompt's logits
equal the full prompt's, a frozen cache is read but not extended).

Run:  bazel build //server:remotelens_server //tools:all
      /usr/bin/python3 -m pytest -q tests/server/test_kv_cache_wire.py
"""
import threading

import grpc
import numpy as np
import pytest

import wire
from server_helpers import KEYS, Client, Interactive, assert_close, random_rows, ref_forward, rpc_error, run, wait_until

from remotelens.v1 import hooks_pb2
from remotelens.v1 import remotelens_pb2 as pb

C = grpc.StatusCode
# Demo model: 4 blocks, 2 key/value heads of 16, float32 -> 1024 bytes of keys and values per
# row and position, plus 8 bytes of mask.
KV_BYTES_PER_POSITION = 4 * 2 * 2 * 16 * 4 + 8


@pytest.fixture
def session(stub):
    sid = stub.CreateSession(pb.CreateSessionRequest()).session_id
    yield sid
    stub.CloseSession(pb.CloseSessionRequest(session_id=sid))


def kv_run(stub, sid, rows, handle="", frozen=False, md=None, **request):
    return run(stub, md=md, session_id=sid, tokens=wire.tokens(rows),
               past_kv_cache=pb.PastKvCache(handle=handle, frozen=frozen), **request)


def test_chunks_equal_the_full_forward_and_the_reference(stub, session, ref):
    rows = random_rows(2, 11, seed=1)
    full, _ = ref_forward(ref, rows)
    first = [r[:5] for r in rows]
    t1, s1, _ = kv_run(stub, session, first)
    assert s1.kv_cache_handle and s1.kv_cache_length == 5
    assert_close(t1["logits"], full[:, :5], "first chunk")
    handle = s1.kv_cache_handle
    t2, s2, _ = kv_run(stub, session, [r[5:9] for r in rows], handle=handle)
    assert (s2.kv_cache_handle, s2.kv_cache_length) == (handle, 9)
    assert t2["logits"].shape == (2, 4, 512)
    assert_close(t2["logits"], full[:, 5:9], "second chunk")
    t3, s3, _ = kv_run(stub, session, [r[9:] for r in rows], handle=handle,
                       return_type=pb.RETURN_TYPE_BOTH, loss_per_token=True)
    assert s3.kv_cache_length == 11
    assert_close(t3["logits"], full[:, 9:], "third chunk")
    # The loss covers the new positions only: the prediction of token 10 from position 9.
    logp = full[:, 9] - np.log(np.exp(full[:, 9] - full[:, 9].max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - full[:, 9].max(-1, keepdims=True)
    want_loss = -np.take_along_axis(logp, np.asarray(rows)[:, 10:11], axis=-1)
    assert_close(t3["loss"], want_loss, "loss")
    # The session holds one cache of 11 positions; FetchCache streams its tensors.
    sessions = {s.session_id: s for s in stub.ListSessions(pb.ListSessionsRequest()).sessions}
    assert sessions[session].num_caches == 1
    assert sessions[session].stored_cache_bytes == 2 * 11 * KV_BYTES_PER_POSITION
    fetched = wire.assemble(stub.FetchCache(pb.FetchCacheRequest(
        session_id=session, cache_handle=handle, names=["kv.mask", "kv.3.values"])))
    assert np.array_equal(fetched["kv.mask"], np.ones((2, 11), np.int64))
    assert fetched["kv.3.values"].shape == (2, 2, 11, 16)
    _, cache = ref_forward(ref, rows)
    # hook_v is [batch, pos, n_kv_heads, d_head]; the cache keeps [batch, n_kv_heads, pos, d_head].
    assert_close(fetched["kv.3.values"], cache["blocks.3.attn.hook_v"].transpose(0, 2, 1, 3), "values")
    freed = stub.DeleteCache(pb.DeleteCacheRequest(session_id=session, cache_handle=handle)).freed_bytes
    assert freed == 2 * 11 * KV_BYTES_PER_POSITION
    code, details = rpc_error(lambda: kv_run(stub, session, [[1], [2]], handle=handle))
    assert code == C.NOT_FOUND and handle in details, (code, details)


def test_frozen_cache_is_read_not_extended(stub, session, ref):
    rows = random_rows(1, 8, seed=2)
    _, s1 = kv_run(stub, session, [rows[0][:6]])[:2]
    handle = s1.kv_cache_handle
    t_a, s_a, _ = kv_run(stub, session, [rows[0][6:]], handle=handle, frozen=True)
    t_b, s_b, _ = kv_run(stub, session, [rows[0][6:]], handle=handle, frozen=True)
    assert (s_a.kv_cache_handle, s_a.kv_cache_length) == (handle, 6)
    assert s_b.kv_cache_length == 6
    assert np.array_equal(t_a["logits"], t_b["logits"])
    full, _ = ref_forward(ref, rows)
    assert_close(t_a["logits"], full[:, 6:], "frozen")
    # A frozen new cache runs a plain forward and keeps nothing.
    t_c, s_c, _ = kv_run(stub, session, rows, frozen=True)
    assert (s_c.kv_cache_handle, s_c.kv_cache_length) == ("", 0)
    assert_close(t_c["logits"], full, "frozen new")


def test_refusals_name_the_problem(stub, session, demo_server):
    _, s, _ = kv_run(stub, session, [[1, 2, 3]])
    handle = s.kv_cache_handle
    kv = pb.PastKvCache(handle=handle)
    cases = [
        (dict(tokens=wire.tokens([[4]]), past_kv_cache=kv), C.INVALID_ARGUMENT, "needs session_id"),
        (dict(session_id=session, residual=wire.to_proto(np.zeros((1, 1, 128), np.float32)),
              start_at_layer=1, past_kv_cache=kv), C.INVALID_ARGUMENT, "residual input"),
        (dict(session_id=session, tokens=wire.tokens([[4]]), stop_at_layer=2, past_kv_cache=kv),
         C.INVALID_ARGUMENT, "stop_at_layer"),
        (dict(session_id=session, tokens=wire.tokens([[4, 5]]), past_kv_cache=kv,
              backward=pb.BackwardRequest(loss=pb.LossMetric())), C.INVALID_ARGUMENT, "backward"),
        (dict(session_id=session, tokens=wire.tokens([[4], [5]]), past_kv_cache=kv),
         C.INVALID_ARGUMENT, "holds 1 rows; this input has 2"),
        (dict(session_id=session, tokens=wire.tokens([[4] * 510]), past_kv_cache=kv),
         C.OUT_OF_RANGE, "3 cached positions plus 510 new ones exceed the model's maximum of 512"),
        (dict(session_id=session, tokens=wire.tokens([[4]]), past_kv_cache=pb.PastKvCache(handle="c999")),
         C.NOT_FOUND, "cache 'c999' not found"),
    ]
    for request, want_code, needle in cases:
        code, details = rpc_error(lambda: run(stub, **request))
        assert code == want_code and needle in details, (request.keys(), code, details)
    # An activation cache is not a key/value cache, and a key/value cache is no patch source.
    _, s_act, _ = run(stub, session_id=session, tokens=wire.tokens([[1, 2, 3]]),
                      cache=pb.CacheSelection(names=["blocks.0.hook_resid_post"], store=True))
    code, details = rpc_error(lambda: kv_run(stub, session, [[4]], handle=s_act.cache_handle))
    assert code == C.INVALID_ARGUMENT and "is an activation cache" in details, details
    patch = hooks_pb2.HookOp(hook_name="blocks.0.hook_resid_post",
                             patch_from_cache=hooks_pb2.PatchFromCacheOp(cache_handle=handle))
    code, details = rpc_error(lambda: run(stub, session_id=session, tokens=wire.tokens([[1, 2, 3]]),
                                          hooks=[patch]))
    assert code == C.INVALID_ARGUMENT and "is a key/value cache" in details, details
    # None of the refusals changed the cache.
    _, s_after, _ = kv_run(stub, session, [[4]], handle=handle, frozen=True)
    assert s_after.kv_cache_length == 3


def test_interactive_run_extends_the_cache_with_hooks_on_new_positions(stub, session, ref):
    rows = random_rows(1, 7, seed=3)
    _, s1, _ = kv_run(stub, session, [rows[0][:4]])
    handle = s1.kv_cache_handle
    hook = "blocks.1.hook_resid_post"
    request = pb.RunRequest(session_id=session, tokens=wire.tokens([rows[0][4:]]),
                            past_kv_cache=pb.PastKvCache(handle=handle),
                            hooks=[hooks_pb2.HookOp(hook_name=hook, client_callback=hooks_pb2.ClientCallbackOp(callback_id=1))])
    it = Interactive(stub, request, lambda call, act: act * 0.5).run()
    assert it.summary.kv_cache_length == 7
    (call, act), = it.calls
    assert act.shape == (1, 3, 128)  # the new positions only
    _, cache = ref_forward(ref, rows)
    assert_close(act, cache[hook][:, 4:], "hook activation")
    want, _ = ref_forward(ref, rows, ops=[{"hook": hook, "op": "scale", "factor": 0.5, "positions": [4, 5, 6]}])
    assert_close(it.tensors["logits"], want[:, 4:], "halved")


@pytest.fixture
def small_quota(demo_model_dir):
    """A client of a server whose stored-bytes quota holds five positions of key/value cache,
    a session, and that session's first 4-position key/value cache."""
    import server_harness
    config = "limits { max_stored_cache_bytes: %d }" % (5 * KV_BYTES_PER_POSITION)
    with server_harness.ServerProcess(demo_model_dir, config=config) as server:
        c = Client(server)
        try:
            sid = c.stub.CreateSession(pb.CreateSessionRequest()).session_id
            _, first, _ = kv_run(c.stub, sid, [[1, 2, 3, 4]])
            yield c, sid, first.kv_cache_handle
        finally:
            c.close()
        assert server.stop() == 0, "".join(server.stderr_lines)


def test_stored_bytes_quota_covers_growth(small_quota):
    c, sid, handle = small_quota
    code, details = rpc_error(lambda: kv_run(c.stub, sid, [[5, 6]], handle=handle))
    assert code == C.RESOURCE_EXHAUSTED and "would exceed" in details, (code, details)
    # Left as it was; one more position still fits.
    _, s2, _ = kv_run(c.stub, sid, [[5]], handle=handle)
    assert s2.kv_cache_length == 5


def test_failed_growth_leaves_no_activation_cache_behind(small_quota):
    # A run that stores an activation cache and then cannot grow its key/value cache fails as a
    # whole: the activation cache it stored first is deleted, not left in the session's quota.
    c, sid, handle = small_quota
    sessions = lambda: {s.session_id: s for s in c.stub.ListSessions(pb.ListSessionsRequest()).sessions}  # noqa: E731
    before = sessions()[sid]
    assert before.num_caches == 1
    # hook_embed for one position is 512 bytes: it fits; the cache's fifth position
    # (KV_BYTES_PER_POSITION more) then does not.
    store = pb.CacheSelection(names=["hook_embed"], store=True)
    code, details = rpc_error(lambda: kv_run(c.stub, sid, [[5]], handle=handle, cache=store))
    assert code == C.RESOURCE_EXHAUSTED and "would exceed" in details, (code, details)
    after = sessions()[sid]
    assert (after.num_caches, after.stored_cache_bytes) == (1, before.stored_cache_bytes)
    # The same store without the growth succeeds (the quota had room for it).
    _, s2, _ = kv_run(c.stub, sid, [[5]], handle=handle, frozen=True, cache=store)
    assert s2.cache_handle and sessions()[sid].num_caches == 2


def test_second_run_on_one_handle_is_aborted(auth_server):
    # Alice's interactive run holds the model at a Python hook; her plain run on the same handle
    # is validated (reads the cache) and queued behind it. The first to finish extends the cache;
    # the second fails with ABORTED and stores nothing.
    alice, erin = Client(auth_server, KEYS["alice"]), Client(auth_server, KEYS["erin"])
    try:
        sid = alice.stub.CreateSession(pb.CreateSessionRequest(), metadata=alice.md).session_id
        _, s1, _ = kv_run(alice.stub, sid, [[1, 2, 3]], md=alice.md)
        handle = s1.kv_cache_handle
        release = threading.Event()

        def hold(call, act):
            release.wait(30)
            return None

        request = pb.RunRequest(session_id=sid, tokens=wire.tokens([[4, 5]]),
                                past_kv_cache=pb.PastKvCache(handle=handle),
                                hooks=[hooks_pb2.HookOp(hook_name="blocks.0.hook_resid_post",
                                                        client_callback=hooks_pb2.ClientCallbackOp(callback_id=1))])
        first = Interactive(alice.stub, request, hold, md=alice.md)
        first_thread = threading.Thread(target=first.run)
        first_thread.start()
        assert wait_until(lambda: len(first.calls) == 1, timeout=30)
        outcome = {}

        def second():
            outcome["error"] = rpc_error(lambda: kv_run(alice.stub, sid, [[6]], handle=handle, md=alice.md))

        second_thread = threading.Thread(target=second)
        second_thread.start()
        jobs = lambda: erin.stub.ListJobs(pb.ListJobsRequest(), metadata=erin.md).jobs  # noqa: E731
        assert wait_until(lambda: [j.state for j in jobs() if j.user == "alice"] == ["running", "queued"],
                          timeout=30)
        release.set()
        first_thread.join(60)
        second_thread.join(60)
        assert first.summary.kv_cache_length == 5
        code, details = outcome["error"]
        assert code == C.ABORTED and "replaced by another run" in details, (code, details)
        _, s_now, _ = kv_run(alice.stub, sid, [[7]], handle=handle, frozen=True, md=alice.md)
        assert s_now.kv_cache_length == 5
        alice.stub.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=alice.md)
    finally:
        release.set()
        alice.close()
        erin.close()
