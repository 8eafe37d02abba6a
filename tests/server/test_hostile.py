"""Found when tried as a hostile client would: each request below once got a wrong status, a
default that ran silently, an echo large enough to break the status, or server memory or bytes
no quota counted. Each now fails with the documented code and a message naming the problem.

Cases run on the shared demo server, the `auth_server` (dave: 4096 streamed bytes, 64 tokens,
8 KiB stored per request; erin: admin) or processes started here.
"""
import signal
import socket
import struct
import threading
import time

import grpc
import numpy as np
import pytest

import server_harness
import wire
from server_helpers import KEYS, Client, Interactive, rpc_error, run, wait_until
from remotelens.v1 import hooks_pb2
from remotelens.v1 import remotelens_pb2 as pb
from remotelens.v1 import tensor_pb2

C = grpc.StatusCode
H = hooks_pb2.HookOp
T3 = wire.tokens([[1, 2, 3]])


# ------------------------------------------------------------------ bytes that do not decode

_NESTED = b"\xa3\x06" * 200 + b"\xa4\x06" * 200  # unknown group field 100, 200 deep
_BAD_UTF8 = b"\xc3\x28"
# Per RPC: (method, its request type, invalid UTF-8 in one of its string fields).
RPCS = [
    ("Tokenize", "TokenizeRequest", b"\x0a\x02" + _BAD_UTF8),              # texts
    ("Run", "RunRequest", b"\x1a\x02" + _BAD_UTF8),                        # texts
    ("RunInteractive", "InteractiveRequest", b"\x0a\x04\x1a\x02" + _BAD_UTF8),  # run.texts
]
UNDECODABLE = ["garbage", "truncated", "invalid-utf8", "nested-groups"]


def _undecodable(kind, request_type, bad_utf8):
    if kind == "garbage":
        return b"\xff" * 11  # a varint that never ends
    if kind == "truncated":
        whole = getattr(pb, request_type)(**({"run": pb.RunRequest(texts=["hello there"])}
                                              if request_type == "InteractiveRequest"
                                              else {"texts": ["hello there"]})).SerializeToString()
        return whole[:-3]
    if kind == "invalid-utf8":
        return bad_utf8
    return _NESTED


@pytest.mark.parametrize("kind", UNDECODABLE)
@pytest.mark.parametrize("method, request_type, bad_utf8", RPCS, ids=[r[0] for r in RPCS])
def test_undecodable_requests_are_invalid_argument_naming_the_rpc(client, kind, method, request_type,
                                                                 bad_utf8):
    data = _undecodable(kind, request_type, bad_utf8)
    path = f"/remotelens.v1.RemoteLens/{method}"
    if method == "Tokenize":
        fn = lambda: client.channel.unary_unary(path)(data, timeout=10)  # noqa: E731
    elif method == "Run":
        fn = lambda: list(client.channel.unary_stream(path)(data, timeout=10))  # noqa: E731
    else:
        fn = lambda: list(client.channel.stream_stream(path)(iter([data]), timeout=10))  # noqa: E731
    code, details = rpc_error(fn)
    assert code == C.INVALID_ARGUMENT, (code, details)
    assert f"{method}: the request is not a valid remotelens.v1.{request_type}" in details, details


def test_undecodable_hook_reply_ends_the_interactive_call(client):
    request = pb.RunRequest(tokens=T3, hooks=[H(hook_name="hook_embed",
                                                client_callback=hooks_pb2.ClientCallbackOp(callback_id=1))])
    called = threading.Event()

    def requests():
        yield pb.InteractiveRequest(run=request).SerializeToString()
        called.wait(20)
        yield b"\xff" * 11

    bidi = client.channel.stream_stream("/remotelens.v1.RemoteLens/RunInteractive")
    kinds = []

    def consume():
        for raw in bidi(requests(), timeout=30):
            kinds.append(pb.InteractiveResponse.FromString(raw).WhichOneof("item"))
            if kinds[-1] == "hook_call":
                called.set()

    code, details = rpc_error(consume)
    assert code == C.INVALID_ARGUMENT, (code, details)
    assert "RunInteractive: the request is not a valid remotelens.v1.InteractiveRequest" in details, details
    assert kinds[0] == "hook_call"


# ------------------------------------------------------------------ values the enums do not define


@pytest.mark.parametrize("request_kw, field", [
    ({"tokens": T3, "return_type": 7}, "return_type: 7"),
    ({"texts": ["hi"], "padding_side": 5}, "padding_side: 5"),
    ({"tokens": T3, "logits_dtype": 77}, "logits_dtype: 77"),
    ({"tokens": T3, "cache": pb.CacheSelection(names=["hook_embed"], stream=True, dtype=31)}, "cache.dtype: 31"),
])
def test_run_unknown_enum_values_are_invalid(stub, request_kw, field):
    code, details = rpc_error(lambda: list(stub.Run(pb.RunRequest(**request_kw), timeout=30)))
    assert code == C.INVALID_ARGUMENT, (code, details)
    assert field in details and "valid:" in details, details


def test_tokenize_generate_getweights_unknown_enums(stub):
    code, details = rpc_error(lambda: stub.Tokenize(pb.TokenizeRequest(texts=["a"], padding_side=9)))
    assert code == C.INVALID_ARGUMENT and "padding_side: 9" in details and "PADDING_SIDE_RIGHT (2)" in details
    code, details = rpc_error(lambda: list(stub.Generate(pb.GenerateRequest(
        tokens=T3, max_new_tokens=1, step_cache=pb.CacheSelection(names=["hook_embed"], stream=True,
                                                                  dtype=12)), timeout=30)))
    assert code == C.INVALID_ARGUMENT and "step_cache.dtype: 12" in details, (code, details)
    code, details = rpc_error(lambda: list(stub.GetWeights(pb.GetWeightsRequest(name="W_E", dtype=50))))
    assert code == C.INVALID_ARGUMENT and "dtype: 50" in details, (code, details)


# ------------------------------------------------------------------ shapes, dtypes, sampling


@pytest.mark.parametrize("shape", [(0, 3, 128), (1, 0, 128)])
def test_empty_residual_is_invalid(stub, shape):
    code, details = rpc_error(lambda: list(stub.Run(pb.RunRequest(
        start_at_layer=1, residual=wire.to_proto(np.zeros(shape, np.float32))), timeout=30)))
    assert code == C.INVALID_ARGUMENT, (code, details)
    assert "residual" in details and "at least one row and one position" in details


def test_float_tokens_name_the_dtype(stub):
    code, details = rpc_error(lambda: list(stub.Run(pb.RunRequest(
        tokens=wire.to_proto(np.ones((1, 3), np.float32))), timeout=30)))
    assert code == C.INVALID_ARGUMENT and "DTYPE_FLOAT32" in details and "dtype" in details, details


@pytest.mark.parametrize("sampling, field", [
    (pb.SamplingParams(do_sample=True, temperature=1e-300), "temperature"),
    (pb.SamplingParams(do_sample=True, top_p=5e-324), "top_p"),
    (pb.SamplingParams(do_sample=True, temperature=1e300), "temperature"),
])
def test_sampling_values_zero_in_float32_are_invalid(stub, sampling, field):
    code, details = rpc_error(lambda: list(stub.Generate(pb.GenerateRequest(
        tokens=T3, max_new_tokens=2, sampling=sampling), timeout=30)))
    assert code == C.INVALID_ARGUMENT, (code, details)
    assert field in details, details


# ------------------------------------------------------------------ echoes


def test_huge_caller_strings_are_echoed_truncated(stub):
    huge = "s" * 8192
    for fn in (lambda: stub.CloseSession(pb.CloseSessionRequest(session_id=huge)),
               lambda: list(stub.Run(pb.RunRequest(session_id=huge, tokens=T3), timeout=30)),
               lambda: stub.DeleteCache(pb.DeleteCacheRequest(session_id=huge, cache_handle=huge)),
               lambda: list(stub.GetWeights(pb.GetWeightsRequest(name=huge)))):
        code, details = rpc_error(fn)
        assert code in (C.NOT_FOUND, C.INVALID_ARGUMENT), (code, details[:200])
        assert "(8192 bytes)" in details and len(details) < 1024, details[:200]
    sid = stub.CreateSession(pb.CreateSessionRequest()).session_id
    try:
        code, details = rpc_error(lambda: stub.DeleteCache(pb.DeleteCacheRequest(session_id=sid,
                                                                                  cache_handle=huge)))
        assert code == C.NOT_FOUND and "(8192 bytes)" in details, (code, details[:200])
    finally:
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid))


# ------------------------------------------------------------------ quotas


@pytest.fixture(scope="module")
def auth(auth_server):
    c = Client(auth_server)
    yield c
    c.close()


def test_session_hook_values_count_against_the_stored_quota(auth):
    md = wire.bearer(KEYS["dave"])  # 8192 stored bytes
    sid = auth.stub.CreateSession(pb.CreateSessionRequest(), metadata=md).session_id
    try:
        value = wire.to_proto(np.zeros((16, 128), np.float32))  # 8 KiB: with the op, past 8192
        code, details = rpc_error(lambda: auth.stub.AddHook(pb.AddHookRequest(
            session_id=sid, op=H(hook_name="hook_embed", add=hooks_pb2.AddOp(value=value))), metadata=md))
        assert code == C.RESOURCE_EXHAUSTED, (code, details)
        assert "dave" in details and "hook values" in details, details
        small = wire.to_proto(np.zeros(128, np.float32))  # 512 bytes
        auth.stub.AddHook(pb.AddHookRequest(session_id=sid, op=H(
            hook_name="hook_embed", add=hooks_pb2.AddOp(value=small))), metadata=md)
        sessions = auth.stub.ListSessions(pb.ListSessionsRequest(), metadata=md).sessions
        [mine] = [x for x in sessions if x.session_id == sid]
        assert 512 < mine.stored_cache_bytes < 700, mine
    finally:
        auth.stub.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=md)


def test_generate_counts_new_tokens_against_the_token_quota(auth):
    md = wire.bearer(KEYS["dave"])  # max_tokens_per_request 64
    code, details = rpc_error(lambda: list(auth.stub.Generate(pb.GenerateRequest(
        tokens=T3, max_new_tokens=500), metadata=md, timeout=30)))
    assert code == C.RESOURCE_EXHAUSTED, (code, details)
    assert "max_new_tokens 500" in details and "max_tokens_per_request = 64" in details, details
    # Within the limit it runs.
    steps = [r for r in auth.stub.Generate(pb.GenerateRequest(tokens=T3, max_new_tokens=2),
                                           metadata=md, timeout=30) if r.WhichOneof("item") == "step"]
    assert len(steps) == 2


def test_get_weights_counts_against_the_streamed_quota(auth):
    md = wire.bearer(KEYS["dave"])  # 4096 streamed bytes; W_E is 512 x 128 x 4
    code, details = rpc_error(lambda: list(auth.stub.GetWeights(pb.GetWeightsRequest(name="W_E"),
                                                                metadata=md)))
    assert code == C.RESOURCE_EXHAUSTED, (code, details)
    assert "quota" in details and "4096" in details, details
    chunks = list(auth.stub.GetWeights(pb.GetWeightsRequest(name="ln_final_w"), metadata=md))
    assert sum(len(c.data) for c in chunks) == 512


def test_interactive_hook_calls_count_against_the_streamed_quota(auth):
    md = wire.bearer(KEYS["dave"])
    # resid_post [1, 3, 128] float32 = 1536 bytes per call; three callbacks = 4608 > 4096.
    hooks = [H(hook_name=f"blocks.{layer}.hook_resid_post",
               client_callback=hooks_pb2.ClientCallbackOp(callback_id=layer)) for layer in range(3)]
    request = pb.RunRequest(tokens=T3, hooks=hooks, return_type=pb.RETURN_TYPE_NONE)
    session = Interactive(auth.stub, request, lambda c, a: None, md=md, timeout=30)
    code, details = rpc_error(session.run)
    assert code == C.RESOURCE_EXHAUSTED, (code, details)
    assert "quota of 4096" in details, details
    assert len(session.calls) == 2


# ------------------------------------------------------------------ admin


def test_admin_lists_every_users_sessions(auth):
    alice, erin = wire.bearer(KEYS["alice"]), wire.bearer(KEYS["erin"])
    sid = auth.stub.CreateSession(pb.CreateSessionRequest(), metadata=alice).session_id
    try:
        listed = auth.stub.ListSessions(pb.ListSessionsRequest(), metadata=erin).sessions
        assert [(x.session_id, x.owner) for x in listed if x.session_id == sid] == [(sid, "alice")]
        # A non-admin still sees only their own.
        bob = auth.stub.ListSessions(pb.ListSessionsRequest(), metadata=wire.bearer(KEYS["bob"])).sessions
        assert sid not in [x.session_id for x in bob]
    finally:
        auth.stub.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=alice)


# ------------------------------------------------------------------ interactive replies


def test_reply_before_any_hook_call_is_refused(stub):
    """A flood of HookReplies with no hook call pending used to be buffered whole."""
    # The only hook call comes at the end of a long forward: the replies arrive long before it.
    request = pb.RunRequest(tokens=wire.tokens(np.ones((16, 512), np.int64)),
                            return_type=pb.RETURN_TYPE_NONE,
                            hooks=[H(hook_name="ln_final.hook_normalized",
                                     client_callback=hooks_pb2.ClientCallbackOp(callback_id=1))])

    def requests():
        yield pb.InteractiveRequest(run=request)
        for i in range(2000):
            yield pb.InteractiveRequest(reply=pb.HookReply(call_id=i + 1, unchanged=True))

    code, details = rpc_error(lambda: list(stub.RunInteractive(requests(), timeout=30)))
    assert code == C.FAILED_PRECONDITION, (code, details)
    assert "no hook call was waiting" in details, details


# ------------------------------------------------------------------ process level


def test_second_server_on_a_busy_port_refuses_to_start(demo_server, demo_model_dir):
    port = demo_server.address.rsplit(":", 1)[1]
    second = server_harness.ServerProcess(demo_model_dir, args=["--port", port], startup_timeout=60)
    with pytest.raises(RuntimeError) as error:
        second.start()
    second.proc.wait(30)
    assert second.proc.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in str(error.value), str(error.value)[-500:]


def test_second_sigterm_during_drain_is_absorbed(demo_model_dir):
    server = server_harness.ServerProcess(demo_model_dir).start()
    c = Client(server)
    try:
        # An interactive run whose hook call is never answered keeps the drain going for the
        # whole grace period (5 s).
        called = threading.Event()
        request = pb.RunRequest(tokens=T3, hooks=[H(hook_name="hook_embed", client_callback=hooks_pb2.ClientCallbackOp(
            callback_id=1))])
        session = Interactive(c.stub, request, lambda call, a: (called.set(), "hang")[1], timeout=60)
        th = threading.Thread(target=lambda: rpc_error(session.run), daemon=True)
        th.start()
        assert called.wait(20)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert server.proc.poll() is None, "the drain should still be waiting for the run"
        server.proc.send_signal(signal.SIGTERM)
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(30) == 0, "".join(server.stderr_lines)
    finally:
        c.close()
        server.stop()


# ------------------------------------------------------------------ slow readers


def test_a_client_that_stops_reading_fails_at_the_queue_cap(demo_model_dir):
    """Before the cap, a Run whose client stopped reading grew server memory up to the 4 GiB
    streamed-bytes quota; now the call ends at max_queued_bytes_per_call."""
    cap = 4 << 20
    config = f"limits {{ max_queued_bytes_per_call: {cap} }}"
    with server_harness.ServerProcess(demo_model_dir, config=config) as server:
        c = Client(server)
        try:
            # Every hook of 4 x 256 positions: ~100 MiB streamed, patterns 8 MiB a layer.
            rows = np.ones((4, 256), np.int64)
            rss_before = server.rss_bytes()
            call = c.stub.Run(pb.RunRequest(tokens=wire.tokens(rows), cache=pb.CacheSelection(
                names=["*"], stream=True)), timeout=60)
            next(call)
            time.sleep(3)  # not reading: the forward finishes meanwhile
            grown = server.rss_bytes() - rss_before
            code, details = rpc_error(lambda: list(call))
            assert code == C.RESOURCE_EXHAUSTED, (code, details)
            assert "max_queued_bytes_per_call" in details and str(cap) in details, details
            assert grown < 64 << 20, f"server grew {grown >> 20} MiB for one stalled call"
            # A call whose messages never pile up past the cap still runs.
            t, _, _ = run(c.stub, tokens=wire.tokens(rows))
            assert t["logits"].shape == (4, 256, 512)
        finally:
            c.close()
        assert server.stop() == 0, "".join(server.stderr_lines)


def test_memory_of_a_large_request_goes_back_to_the_system(demo_model_dir):
    """One legal 64 x 512 Run used to leave the server at 1.8 GiB with nothing live."""
    with server_harness.ServerProcess(demo_model_dir) as server:
        c = Client(server)
        try:
            run(c.stub, tokens=T3)  # warm up: threads, arenas, first-use allocations
            baseline = server.rss_bytes()
            t, _, _ = run(c.stub, tokens=wire.tokens(np.ones((64, 512), np.int64)), timeout=120)
            assert t["logits"].shape == (64, 512, 512)
            del t
            bound = baseline + (256 << 20)
            assert wait_until(lambda: server.rss_bytes() < bound, timeout=15), (
                f"RSS {server.rss_bytes() >> 20} MiB stays above {bound >> 20} MiB "
                f"(baseline {baseline >> 20} MiB)")
        finally:
            c.close()
        assert server.stop() == 0, "".join(server.stderr_lines)


def test_idle_metrics_connections_do_not_delay_a_scrape(demo_server):
    """/metrics used to serve one connection at a time, each allowed 2 s of silence."""
    import urllib.request
    host, port = demo_server.metrics_address.rsplit(":", 1)
    idle = []
    try:
        for i in range(6):
            s = socket.create_connection((host, int(port)), timeout=5)
            if i % 2:
                s.sendall(b"GET /metr")  # trickling: a request that never completes
            idle.append(s)
        time.sleep(0.2)
        start = time.time()
        with urllib.request.urlopen(f"http://{demo_server.metrics_address}/metrics", timeout=30) as r:
            body = r.read().decode()
        elapsed = time.time() - start
        assert "remotelens" in body
        # Six connections at 2 s each took 12 s before; concurrently it is one round trip.
        assert elapsed < 3, f"scrape took {elapsed:.1f} s behind idle connections"
    finally:
        for s in idle:
            s.close()
