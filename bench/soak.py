#!/usr/bin/python3
"""Soak test: N concurrent clients against one remotelens_server over loopback for a while.

Every client loops over a fixed mix of every RPC (raw gRPC) plus the Python client
(HookedTransformer run_with_cache / run_with_hooks with a Python hook), streaming runs, interactive
hooks and cancelled calls. Reports throughput, p50/p99 latency per operation, outcomes by gRPC code,
and the server's RSS at start (after warm-up), middle and end.

Fails (exit 1) when any call ends INTERNAL or UNKNOWN, a reply is wrong, or RSS after warm-up grows
by more than --max_rss_growth (5%). Every loop is bounded by count and by time.

    bazel build //server:remotelens_server //tools:make_demo_model
    /usr/bin/python3 bench/soak.py                          # 64 clients, 5 minutes
    /usr/bin/python3 bench/soak.py --clients 16 --seconds 20   # the CI smoke
"""
import argparse
import collections
import json
import os
import queue
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "tests"), os.path.join(REPO, "tests", "server"),
                os.path.join(REPO, "clients", "python")]

import grpc  # noqa: E402

import server_harness  # noqa: E402
import wire  # noqa: E402
from remotelens.v1 import hooks_pb2, remotelens_pb2 as pb  # noqa: E402

KEY = "soak-key-0123456789abcdef"
# Codes a healthy server may answer under this load: our own cancellations, quota/queue pressure.
EXPECTED_CODES = {"OK", "CANCELLED", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
FATAL_CODES = {"INTERNAL", "UNKNOWN"}
MAX_OPS_PER_CLIENT = 1_000_000  # a count bound beside the time bound


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.latency = collections.defaultdict(list)  # op -> [seconds] of OK calls
        self.codes = collections.Counter()            # (op, code) -> count
        self.wrong = []                               # wrong replies (assertion messages)

    def record(self, op, code, seconds):
        with self.lock:
            self.codes[(op, code)] += 1
            if code == "OK":
                self.latency[op].append(seconds)


class Worker:
    """One client: its own channel, a session, and a fixed rotation of operations."""

    def __init__(self, index, address, info, stats, deadline):
        self.index = index
        self.channel = grpc.insecure_channel(address)
        self.stub = server_harness.remotelens_pb2_grpc.RemoteLensStub(self.channel)
        self.md = (("authorization", f"Bearer {KEY}"),)
        self.info = info
        self.stats = stats
        self.deadline = deadline
        self.rng = np.random.default_rng(index)
        self.d_vocab = info.d_vocab
        self.n_layers = info.n_layers
        self.model = None  # HookedTransformer, made lazily by the Python-client op

    def tokens(self, batch=2, pos=8):
        return wire.tokens(self.rng.integers(0, self.d_vocab, size=(batch, pos)).tolist())

    def timeout(self):
        return max(1.0, min(60.0, self.deadline - time.time() + 30))

    # --- operations: each returns normally on OK and raises grpc.RpcError otherwise
    def op_info(self):
        got = self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.md, timeout=self.timeout())
        assert got.n_layers == self.n_layers

    def op_tokenize(self):
        t = self.stub.Tokenize(pb.TokenizeRequest(texts=["soak test", "hello"], prepend_bos=True),
                               metadata=self.md, timeout=self.timeout())
        rows = wire.from_proto(t.tokens)
        d = self.stub.Detokenize(pb.DetokenizeRequest(rows=[pb.TokenRow(ids=rows[0].tolist())]),
                                 metadata=self.md, timeout=self.timeout())
        assert len(d.texts) == 1

    def op_session_hooks(self):
        s = self.stub.CreateSession(pb.CreateSessionRequest(ttl_seconds=120), metadata=self.md,
                                    timeout=self.timeout())
        try:
            steer = wire.to_proto(np.full((self.info.d_model,), 0.01, np.float32))
            h = self.stub.AddHook(pb.AddHookRequest(session_id=s.session_id, op=hooks_pb2.HookOp(
                hook_name="blocks.0.hook_resid_post", add=hooks_pb2.AddOp(value=steer))),
                metadata=self.md, timeout=self.timeout())
            listed = self.stub.ListHooks(pb.ListHooksRequest(session_id=s.session_id),
                                         metadata=self.md, timeout=self.timeout())
            assert len(listed.hooks) == 1
            t, summary, _ = _run(self.stub, self.md, self.timeout(), session_id=s.session_id,
                                 tokens=self.tokens(), return_type=pb.RETURN_TYPE_LOGITS)
            assert t["logits"].shape[:2] == (2, 8)
            self.stub.RemoveHook(pb.RemoveHookRequest(session_id=s.session_id, hook_id=h.hook_id),
                                 metadata=self.md, timeout=self.timeout())
            self.stub.ResetHooks(pb.ResetHooksRequest(session_id=s.session_id), metadata=self.md,
                                 timeout=self.timeout())
            self.stub.ListSessions(pb.ListSessionsRequest(), metadata=self.md, timeout=self.timeout())
        finally:
            self.stub.CloseSession(pb.CloseSessionRequest(session_id=s.session_id), metadata=self.md,
                                   timeout=self.timeout())

    def op_run_stream(self):
        t, summary, _ = _run(self.stub, self.md, self.timeout(), tokens=self.tokens(),
                             return_type=pb.RETURN_TYPE_BOTH,
                             cache=pb.CacheSelection(names=["blocks.1.attn.hook_pattern",
                                                            "blocks.0.hook_resid_post"], stream=True))
        assert "blocks.1.attn.hook_pattern" in t and "logits" in t

    def op_store_fetch(self):
        s = self.stub.CreateSession(pb.CreateSessionRequest(ttl_seconds=120), metadata=self.md,
                                    timeout=self.timeout())
        try:
            _, summary, _ = _run(self.stub, self.md, self.timeout(), session_id=s.session_id,
                                 tokens=self.tokens(), return_type=pb.RETURN_TYPE_NONE,
                                 cache=pb.CacheSelection(names=["blocks.0.mlp.hook_post"], store=True))
            got = wire.assemble(self.stub.FetchCache(pb.FetchCacheRequest(
                session_id=s.session_id, cache_handle=summary.cache_handle), metadata=self.md,
                timeout=self.timeout()))
            assert list(got) == ["blocks.0.mlp.hook_post"]
            self.stub.DeleteCache(pb.DeleteCacheRequest(session_id=s.session_id,
                                                        cache_handle=summary.cache_handle),
                                  metadata=self.md, timeout=self.timeout())
        finally:
            self.stub.CloseSession(pb.CloseSessionRequest(session_id=s.session_id), metadata=self.md,
                                   timeout=self.timeout())

    def op_weights(self):
        got = wire.assemble(self.stub.GetWeights(pb.GetWeightsRequest(name="W_Q", layer=1),
                                                 metadata=self.md, timeout=self.timeout()))
        assert len(got) == 1

    def op_generate(self):
        n = 0
        for r in self.stub.Generate(pb.GenerateRequest(tokens=self.tokens(1, 4), max_new_tokens=6),
                                    metadata=self.md, timeout=self.timeout()):
            n += r.WhichOneof("item") == "step"
        assert n == 6, f"{n} generate steps, expected 6"

    def op_interactive(self):
        hook = "blocks.1.hook_resid_pre"
        req = pb.RunRequest(tokens=self.tokens(), hooks=[hooks_pb2.HookOp(
            hook_name=hook, client_callback=hooks_pb2.ClientCallbackOp(callback_id=7))])
        replies = queue.Queue()

        def requests():
            yield pb.InteractiveRequest(run=req)
            for _ in range(4):  # bounded: one callback expected
                m = replies.get(timeout=60)
                if m is None:
                    return
                yield m

        call = self.stub.RunInteractive(requests(), metadata=self.md, timeout=self.timeout())
        asm, pending, calls = wire.ChunkAssembler(), None, 0
        try:
            for r in call:
                kind = r.WhichOneof("item")
                if kind == "hook_call":
                    pending = r.hook_call
                elif kind == "tensor":
                    done = asm.add(r.tensor)
                    if done is not None and pending is not None and done.name == pending.hook_name:
                        act = done.array()
                        calls += 1
                        replies.put(pb.InteractiveRequest(reply=pb.HookReply(
                            call_id=pending.call_id, replacement=wire.to_proto(act * 0.5))))
                        pending = None
        finally:
            replies.put(None)
        assert calls == 1, f"{calls} hook calls, expected 1"

    def op_cancel(self):
        """Starts a streamed Run or Generate and cancels it after the first message."""
        if self.rng.integers(2):
            call = self.stub.Generate(pb.GenerateRequest(tokens=self.tokens(1, 4), max_new_tokens=32),
                                      metadata=self.md, timeout=self.timeout())
        else:
            call = self.stub.Run(pb.RunRequest(tokens=self.tokens(4, 32), return_type=pb.RETURN_TYPE_BOTH,
                                               cache=pb.CacheSelection(names=["*"], stream=True)),
                                 metadata=self.md, timeout=self.timeout())
        for _ in call:
            call.cancel()
            break
        try:
            for _ in call:
                pass
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise

    def op_python_client(self):
        import torch
        from remotelens import HookedTransformer
        if self.model is None:
            self.model = HookedTransformer.from_server(
                server_harness_address(self.channel), api_key=KEY, timeout=60)
        toks = torch.as_tensor(self.rng.integers(0, self.d_vocab, size=(1, 6)))
        logits, cache = self.model.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_z"))
        assert logits.shape[:2] == (1, 6) and len(cache.keys()) == self.n_layers

        def halve(act, hook):
            return act * 0.5

        out = self.model.run_with_hooks(toks, fwd_hooks=[("blocks.0.hook_mlp_out", halve)])
        assert out.shape == logits.shape

    OPS = ["op_info", "op_tokenize", "op_run_stream", "op_session_hooks", "op_generate",
           "op_interactive", "op_cancel", "op_store_fetch", "op_weights", "op_run_stream",
           "op_python_client"]

    def loop(self):
        for i in range(MAX_OPS_PER_CLIENT):
            if time.time() >= self.deadline:
                break
            op = self.OPS[(self.index + i) % len(self.OPS)]
            start = time.time()
            try:
                getattr(self, op)()
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
                if code in FATAL_CODES:
                    with self.stats.lock:
                        self.stats.wrong.append(f"{op}: {code}: {e.details()}")
            except AssertionError as e:
                code = "WRONG_REPLY"
                with self.stats.lock:
                    self.stats.wrong.append(f"{op}: {e}")
            self.stats.record(op, code, time.time() - start)
        if self.model is not None:
            self.model.close() if hasattr(self.model, "close") else None
        self.channel.close()


_ADDRESSES = {}


def server_harness_address(channel):
    return _ADDRESSES["address"]


def _run(stub, md, timeout, **request):
    return wire.run_result(stub.Run(pb.RunRequest(**request), metadata=md, timeout=timeout))


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q)) * 1000 if values else float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=300.0)
    p.add_argument("--warmup_fraction", type=float, default=0.25,
                   help="share of the run before the RSS baseline is taken")
    p.add_argument("--max_rss_growth", type=float, default=0.05)
    p.add_argument("--json", default="", help="also write the report here")
    args = p.parse_args(argv)
    if not 1 <= args.clients <= 1024 or not 1 <= args.seconds <= 24 * 3600:
        p.error("--clients in [1, 1024], --seconds in [1, 86400]")

    work = tempfile.mkdtemp(prefix="remotelens_soak_")
    model_dir = server_harness.make_demo_model(os.path.join(work, "model"))
    import hashlib
    users = os.path.join(work, "users.textproto")
    with open(users, "w") as f:
        f.write(f'users {{ name: "soak" api_key_sha256: "{hashlib.sha256(KEY.encode()).hexdigest()}" '
                f'quota {{ max_concurrent_requests: {2 * args.clients} }} }}\n')
    config = (f'users_file: "{users}"\nlimits {{ max_queue: {4 * args.clients} '
              f'max_sessions_per_user: {4 * args.clients} }}\n')
    server = server_harness.ServerProcess(model_dir, config=config).start()
    _ADDRESSES["address"] = server.address
    pid = server.proc.pid
    ok = True
    try:
        channel = grpc.insecure_channel(server.address)
        info = server_harness.remotelens_pb2_grpc.RemoteLensStub(channel).GetModelInfo(
            pb.GetModelInfoRequest(), metadata=(("authorization", f"Bearer {KEY}"),), timeout=30)
        channel.close()
        stats = Stats()
        t0 = time.time()
        deadline = t0 + args.seconds
        rss = {"before": rss_kib(pid)}
        workers = [Worker(i, server.address, info, stats, deadline) for i in range(args.clients)]
        threads = [threading.Thread(target=w.loop, daemon=True) for w in workers]
        for t in threads:
            t.start()
        warm_at = t0 + args.seconds * args.warmup_fraction
        mid_at = warm_at + (deadline - warm_at) / 2
        for label, at in (("start", warm_at), ("middle", mid_at)):
            time.sleep(max(0.0, at - time.time()))
            rss[label] = rss_kib(pid)
        for t in threads:
            t.join(timeout=max(1.0, deadline - time.time() + 120))
        rss["end"] = rss_kib(pid)
        elapsed = time.time() - t0
        stuck = sum(t.is_alive() for t in threads)
    finally:
        server.stop() if hasattr(server, "stop") else server.proc.terminate()

    by_code = collections.Counter()
    for (op, code), n in stats.codes.items():
        by_code[code] += n
    total_ok = by_code["OK"]
    report = {
        "clients": args.clients, "seconds": round(elapsed, 1),
        "ops_per_second": round(sum(by_code.values()) / elapsed, 1),
        "ok_per_second": round(total_ok / elapsed, 1),
        "codes": dict(by_code),
        "ops": {op: {"ok": len(v), "p50_ms": round(percentile(v, 50), 1), "p99_ms": round(percentile(v, 99), 1)}
                for op, v in sorted(stats.latency.items())},
        "rss_mib": {k: round(v / 1024, 1) for k, v in rss.items()},
        "rss_growth_after_warmup": round((rss["end"] - rss["start"]) / max(1, rss["start"]), 4),
    }
    all_lat = [x for v in stats.latency.values() for x in v]
    report["p50_ms"] = round(percentile(all_lat, 50), 1)
    report["p99_ms"] = round(percentile(all_lat, 99), 1)
    print(json.dumps(report, indent=1))
    failures = list(stats.wrong[:20])
    if any(c in FATAL_CODES for c in by_code):
        failures.append(f"fatal codes seen: { {c: by_code[c] for c in FATAL_CODES if by_code[c]} }")
    unexpected = set(by_code) - EXPECTED_CODES - FATAL_CODES - {"WRONG_REPLY"}
    if unexpected:
        failures.append(f"unexpected codes: { {c: by_code[c] for c in unexpected} }")
    if report["rss_growth_after_warmup"] > args.max_rss_growth:
        failures.append(f"server RSS grew {report['rss_growth_after_warmup']:.1%} after warm-up "
                        f"(limit {args.max_rss_growth:.0%})")
    if stuck:
        failures.append(f"{stuck} clients did not finish")
    if total_ok == 0:
        failures.append("no call succeeded")
    missing = set(Worker.OPS) - set(stats.latency)
    if missing:
        failures.append(f"operations that never succeeded: {sorted(missing)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(report, failures=failures), f, indent=1)
    for f in failures:
        print("soak FAIL:", f)
    print("soak:", "passed" if not failures else "failed")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
