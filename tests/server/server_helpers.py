"""Shared helpers of the server tests (importable from test modules; fixtures live in conftest)."""
import hashlib
import os
import sys

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import grpc  # noqa: E402

import wire  # noqa: E402

# API keys of the auth server's users (the server only ever sees their SHA-256).
KEYS = {
    "alice": "alice-key-0123456789",
    "bob": "bob-key-9876543210",
    "carol": "carol-key-one-request-at-a-time",
    "dave": "dave-key-small-quotas",
    "erin": "erin-key-admin-sees-all",
}
QUOTAS = {
    "carol": "quota { max_concurrent_requests: 1 }",
    "dave": ("quota { max_streamed_bytes_per_request: 4096 max_tokens_per_request: 64 "
             "max_stored_cache_bytes: 8192 }"),
    "erin": 'role: "admin"',
}

LIMITS_CONFIG = """limits {
  session_ttl_seconds: 1
  hook_timeout_ms: 3000
  max_queue: 1
  max_batch: 4
  max_tokens_per_request: 1000
  max_new_tokens: 64
}"""


def sha256_hex(text):
    return hashlib.sha256(text.encode()).hexdigest()


def write_users_file(directory, keys=KEYS, quotas=QUOTAS):
    path = os.path.join(directory, "users.textproto")
    with open(path, "w") as f:
        for name, key in keys.items():
            f.write(f'users {{ name: "{name}" api_key_sha256: "{sha256_hex(key)}" '
                    f'{quotas.get(name, "")} }}\n')
    return path


class Client:
    """A channel and stub that close with the fixture; `md` is the call metadata (API key)."""

    def __init__(self, server, key=None):
        self.server = server
        self.channel = server.channel()
        self.stub = server.stub(self.channel)
        self.md = wire.bearer(key) if key else None

    def close(self):
        self.channel.close()


def rpc_error(fn):
    """Runs fn, which must raise grpc.RpcError; returns (code, details)."""
    try:
        result = fn()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    raise AssertionError(f"expected an RPC error, got success: {str(result)[:300]}")


def random_rows(batch, n_pos, seed, vocab=500):
    rng = np.random.default_rng(seed)
    return rng.integers(1, vocab, size=(batch, n_pos)).tolist()


# ------------------------------------------------------------------ calls and the reference

import queue  # noqa: E402

import torch  # noqa: E402

from remotelens.v1 import remotelens_pb2 as pb  # noqa: E402
from tests.reference.llama_reference import ALL_FLAGS  # noqa: E402

ATOL = 1e-4


def run(stub, md=None, timeout=60, **request):
    """Run(RunRequest(**request)) -> ({name: array}, Summary, [wire.Assembled])."""
    return wire.run_result(stub.Run(pb.RunRequest(**request), metadata=md, timeout=timeout))


def ref_forward(ref, rows, ops=None, hook_tensors=None, mask=None, **kw):
    """Reference forward -> (logits numpy, {hook: numpy})."""
    tensors = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in (hook_tensors or {}).items()}
    m = None if mask is None else torch.as_tensor(np.asarray(mask), dtype=torch.int64)
    kw.setdefault("flags", ALL_FLAGS)  # "*" runs every hook point, the opt-in ones too
    logits, cache = ref.forward(torch.as_tensor(np.asarray(rows), dtype=torch.int64), attention_mask=m,
                                ops=ops, hook_tensors=tensors, **kw)
    return logits.numpy(), {k: v.numpy() for k, v in cache.items()}


def max_diff(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    finite = np.isfinite(a) & np.isfinite(b)
    assert np.array_equal(np.isfinite(a), np.isfinite(b)), "infinities differ"
    return float(np.abs(a[finite] - b[finite]).max()) if finite.any() else 0.0


def assert_close(got, want, what="", atol=ATOL):
    d = max_diff(got, want)
    assert d <= atol, f"{what}: max |diff| {d:.3g} > {atol}"


class Interactive:
    """Drives RunInteractive. `on_call(hook_call, activation)` returns None ("unchanged"), an array
    (the replacement), a pb.HookReply (sent as is), or the string "hang" (never reply) / "close"
    (half-close the request stream without replying)."""

    def __init__(self, stub, request, on_call, md=None, timeout=60, first=None):
        self.calls = []          # (HookCall, activation array)
        self.items = []          # every response item kind, in order
        self.tensors = {}
        self.summary = None
        self._q = queue.Queue()
        self._first = first if first is not None else pb.InteractiveRequest(run=request)
        self._on_call = on_call
        self.call = stub.RunInteractive(self._requests(), metadata=md, timeout=timeout)

    def _requests(self):
        yield self._first
        while True:
            try:
                m = self._q.get(timeout=60)
            except queue.Empty:
                return
            if m is None:
                return
            yield m

    def run(self):
        """Consumes the stream; returns self (raises grpc.RpcError on a non-OK status)."""
        asm = wire.ChunkAssembler()
        pending = None
        try:
            for r in self.call:
                kind = r.WhichOneof("item")
                self.items.append(kind)
                if kind == "hook_call":
                    assert pending is None, "a HookCall while another's activation was incomplete"
                    pending = r.hook_call
                elif kind == "tensor":
                    done = asm.add(r.tensor)
                    if done is None:
                        continue
                    if pending is not None and done.name == pending.hook_name:
                        act = done.array()
                        self.calls.append((pending, act))
                        self._reply(pending, self._on_call(pending, act))
                        pending = None
                    else:
                        self.tensors[done.name] = done.array()
                elif kind == "summary":
                    self.summary = r.summary
        finally:
            self._q.put(None)
        return self

    def _reply(self, hook_call, answer):
        if isinstance(answer, str):
            if answer == "close":
                self._q.put(None)
            return  # "hang": never answer
        if answer is None:
            reply = pb.HookReply(call_id=hook_call.call_id, unchanged=True)
        elif isinstance(answer, pb.HookReply):
            reply = answer
        else:
            reply = pb.HookReply(call_id=hook_call.call_id, replacement=wire.to_proto(
                np.ascontiguousarray(answer, dtype=np.float32)))
        self._q.put(pb.InteractiveRequest(reply=reply))


def wait_until(predicate, timeout=10.0, interval=0.05):
    import time
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def metric(server, name, labels=None):
    """The value of one sample on the server's /metrics page (None when absent)."""
    import urllib.request
    with urllib.request.urlopen(f"http://{server.metrics_address}/metrics", timeout=5) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        rest = head[len(name):]
        if rest and not rest.startswith("{"):
            continue
        if labels and not all(f'{k}="{v}"' in rest for k, v in labels.items()):
            continue
        return float(value)
    return None
