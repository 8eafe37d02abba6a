"""Batching benchmark: concurrent users sharing forwards, against one request per forward.

Two servers on the same model, started in this run: batching on (the default settings) and
--max_batch_requests 1 (one request per forward, the baseline). Each workload runs on both,
alternating for --rounds rounds, and the report gives the median of each and their ratio:
  - runs:     N clients, each sending 1 x 16-token Runs with its own steering vector (an add op
              at the middle block's resid_post), returning logits: requests per second;
  - generate: N clients, each generating --new_tokens greedy tokens with its own steering
              vector: generated tokens per second over all clients;
  - lone:     one client's 1 x 16-token steered Run, one at a time: p50 latency (the two servers
              take turns request by request).

  /usr/bin/python3 bench/batch_bench.py [--model 100m] [--clients 16] [--seconds 20] [--rounds 2]
  /usr/bin/python3 bench/batch_bench.py --model demo --clients 4 --seconds 2 --rounds 1   # smoke
  # on a GPU (what scripts/gpu_check.sh runs on its 8B-shaped model):
  python3 bench/batch_bench.py --model_dir MODEL --server_config 'dtype: "bfloat16" devices: "cuda:0"' \
      --forward_bench_args '--device cuda:0 --dtype bfloat16' --forward_bench BUILD/forward_bench

The report also gives each ratio's ceiling on this machine, measured in the same run from the
engine alone (bench/forward_bench, one thread per physical core as the server uses; no server, no
clients): for Runs, a 1 x 16-token forward's time over the per-request time of the shared forwards
the batching server ran (clients / 2 and clients requests of 16 tokens; the better of the two);
for generation, `clients` single-row decode steps over one decode step of `clients` rows (short
runs taking turns, three rounds after each of the servers' rounds). Below
those, the rest is the server's and the clients' own work on the same cores.

--batched_args / --alone_args add server flags to one side, for ablations: e.g.
--alone_args="--intra_op_threads 2" (the baseline on every core) or
--batched_args="--large_forward_threads 1" (shared forwards on one thread).
"""
import argparse
import json
import os
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "tests", "server"))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

import server_harness  # noqa: E402
import wire  # noqa: E402
from client_bench import MODEL_FLAGS  # noqa: E402
from forward_bench import run_forward_bench  # noqa: E402
from remotelens.v1 import remotelens_pb2 as pb  # noqa: E402
from remotelens.v1 import hooks_pb2  # noqa: E402


def steering_op(layer, d_model, seed):
    vector = np.random.default_rng(seed).standard_normal(d_model).astype(np.float32) * 0.1
    op = hooks_pb2.HookOp(hook_name=f"blocks.{layer}.hook_resid_post")
    op.add.value.CopyFrom(wire.to_proto(vector))
    return op


def run_request(info, seed, pos=16):
    rows = np.random.default_rng(1000 + seed).integers(1, info.d_vocab, (1, pos))
    request = pb.RunRequest(tokens=wire.tokens(rows.tolist()))
    request.hooks.append(steering_op(info.n_layers // 2, info.d_model, seed))
    return request


def generate_request(info, seed, new_tokens):
    rows = np.random.default_rng(2000 + seed).integers(1, info.d_vocab, (1, 8))
    request = pb.GenerateRequest(tokens=wire.tokens(rows.tolist()), max_new_tokens=new_tokens,
                                 sampling=pb.SamplingParams(do_sample=False))
    request.hooks.append(steering_op(info.n_layers // 2, info.d_model, seed))
    return request


def write_users(directory, n):
    """A users file with n users (user0.. with keys key0..): one per client, as in a lab."""
    import hashlib
    path = os.path.join(directory, "users.textproto")
    with open(path, "w") as f:
        for i in range(n):
            digest = hashlib.sha256(f"key{i}".encode()).hexdigest()
            f.write(f'users {{ name: "user{i}" api_key_sha256: "{digest}" }}\n')
    return path


def key(i):
    return wire.bearer(f"key{i}")


def drain(stream):
    for _ in stream:
        pass


def concurrent_runs(server, info, clients, seconds):
    stop = time.time() + seconds
    counts = [0] * clients
    barrier = threading.Barrier(clients)

    def client(i):
        channel = server.channel()
        stub = server.stub(channel)
        request = run_request(info, i)
        drain(stub.Run(request, timeout=120, metadata=key(i)))  # connected and warm before the clock
        barrier.wait()
        start = time.time()
        while time.time() < stop:
            drain(stub.Run(request, timeout=120, metadata=key(i)))
            counts[i] += 1
        channel.close()
        return start

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    begin = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.time() - begin)


def concurrent_generations(server, info, clients, new_tokens):
    barrier = threading.Barrier(clients + 1)
    generated = [0] * clients

    def client(i):
        channel = server.channel()
        stub = server.stub(channel)
        stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=key(i))
        request = generate_request(info, i, new_tokens)
        barrier.wait()
        for response in stub.Generate(request, timeout=600, metadata=key(i)):
            if response.HasField("step"):
                generated[i] += len(response.step.tokens)
        channel.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.time()
    for t in threads:
        t.join()
    return sum(generated) / (time.time() - start)


def lone_latencies(servers, info, iters):
    """p50 of one client's Runs on each server, the servers taking turns request by request, so
    that whatever else the machine does in the meantime falls on both alike."""
    stubs = {}
    for name, server in servers.items():
        channel = server.channel()
        stubs[name] = (channel, server.stub(channel))
    request = run_request(info, 0)
    for _ in range(3):
        for _, stub in stubs.values():
            drain(stub.Run(request, timeout=120, metadata=key(0)))
    times = {name: [] for name in servers}
    for _ in range(iters):
        for name, (_, stub) in stubs.items():
            t = time.perf_counter()
            drain(stub.Run(request, timeout=120, metadata=key(0)))
            times[name].append(time.perf_counter() - t)
    for channel, _ in stubs.values():
        channel.close()
    return {name: statistics.median(t) for name, t in times.items()}


def physical_cores():
    """Physical cores this process may use (what the server's large forwards use by default)."""
    cores = set()
    for cpu in os.sched_getaffinity(0):
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{topology}/physical_package_id") as p, open(f"{topology}/core_id") as c:
                cores.add((p.read().strip(), c.read().strip()))
        except OSError:
            return len(os.sched_getaffinity(0))
    return max(1, len(cores))


class EngineCeilings:
    """The batching ratios the engine alone allows on this machine (see the module docstring).
    Each measure() is a few rounds of short forward_bench runs taking turns, called between the
    servers' rounds: this VM's speed drifts over minutes, so the sizes compared are measured
    seconds apart, many times, and beside the server figures they are compared with."""

    def __init__(self, binary, model_dir, clients, extra_flags=()):
        self.binary, self.model_dir, self.clients = binary, model_dir, clients
        self.extra_flags = list(extra_flags)
        self.half = max(1, clients // 2)
        self.cases = {"run1": (1, 16, "none"), "run_half": (self.half, 16, "none"),
                      "run_all": (clients, 16, "none"), "step1": (1, 40, "decode"),
                      "step_all": (clients, 40, "decode")}
        self.times = {name: [] for name in self.cases}

    def measure(self, rounds=3, iters=3):
        flags = [f"--threads={physical_cores()}"] + self.extra_flags
        for _ in range(rounds):
            for name, (batch, pos, mode) in self.cases.items():
                record = run_forward_bench(self.binary, self.model_dir, batch, pos, iters, 1, flags,
                                           modes=(mode,))
                self.times[name].append(record[mode]["median_ms"])

    def summary(self):
        t = {name: statistics.median(v) for name, v in self.times.items()}
        per_request = min(t["run_half"] / self.half, t["run_all"] / self.clients)
        return {"runs": t["run1"] / per_request, "generate": self.clients * t["step1"] / t["step_all"],
                "engine_ms": t}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="100m", choices=sorted(MODEL_FLAGS))
    ap.add_argument("--model_root", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "remotelens_bench_models"))
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--lone_iters", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batched_args", default="", help="extra flags for the batching server")
    ap.add_argument("--alone_args", default="", help="extra flags for the --max_batch_requests 1 server")
    ap.add_argument("--forward_bench", default=os.path.join(REPO, "bazel-bin", "bench", "forward_bench"),
                    help="the engine benchmark for the ceilings (bazel build //bench:forward_bench)")
    ap.add_argument("--no_ceilings", action="store_true", help="skip the engine-alone ceilings")
    ap.add_argument("--model_dir", default="", help="an existing model directory instead of --model")
    ap.add_argument("--server_config", default="",
                    help='config text for both servers, e.g. \'dtype: "bfloat16" devices: "cuda:0"\'')
    ap.add_argument("--forward_bench_args", default="",
                    help="extra forward_bench flags for the ceilings, e.g. '--device cuda:0 --dtype bfloat16'")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args()

    if args.model_dir:
        model_dir, args.model = args.model_dir, os.path.basename(os.path.normpath(args.model_dir))
    else:
        model_dir = os.path.join(args.model_root, args.model)
        os.makedirs(args.model_root, exist_ok=True)
        server_harness.make_demo_model(model_dir, *MODEL_FLAGS[args.model])
    import tempfile
    users = write_users(tempfile.mkdtemp(prefix="batch_bench_"), args.clients)
    queue = f'limits {{ max_queue: 1024 }}\nusers_file: "{users}"\n{args.server_config}\n'
    servers = {
        "batched": server_harness.ServerProcess(model_dir, config=queue, args=args.batched_args.split()).start(),
        "alone": server_harness.ServerProcess(
            model_dir, config=queue, args=["--max_batch_requests=1"] + args.alone_args.split()).start(),
    }
    try:
        channel = servers["batched"].channel()
        info = servers["batched"].stub(channel).GetModelInfo(pb.GetModelInfoRequest(), metadata=key(0))
        channel.close()
        results = {name: {"runs": [], "generate": [], "lone": []} for name in servers}
        ceilings = None if args.no_ceilings else EngineCeilings(
            args.forward_bench, model_dir, args.clients, args.forward_bench_args.split())
        for _ in range(args.rounds):
            for name, server in servers.items():
                results[name]["runs"].append(concurrent_runs(server, info, args.clients, args.seconds))
                results[name]["generate"].append(
                    concurrent_generations(server, info, args.clients, args.new_tokens))
            for name, p50 in lone_latencies(servers, info, args.lone_iters).items():
                results[name]["lone"].append(p50)
            if ceilings is not None:
                ceilings.measure()  # both servers idle
        med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
        summary = {
            "model": args.model, "clients": args.clients,
            "batched_args": args.batched_args, "alone_args": args.alone_args,
            "runs_per_s": {n: med[n]["runs"] for n in med},
            "runs_ratio": med["batched"]["runs"] / med["alone"]["runs"],
            "generated_tokens_per_s": {n: med[n]["generate"] for n in med},
            "generate_ratio": med["batched"]["generate"] / med["alone"]["generate"],
            "lone_p50_ms": {n: med[n]["lone"] * 1e3 for n in med},
            "lone_ratio": med["batched"]["lone"] / med["alone"]["lone"],
        }
        if ceilings is not None:
            summary["ceilings"] = ceilings.summary()
    finally:
        for server in servers.values():
            server.stop()
    if args.json:
        print(json.dumps(summary))
        return 0
    ceilings = summary.get("ceilings", {})

    def ceiling(kind):
        return f"{ceilings[kind]:.2f}x" if kind in ceilings else "-"

    print(f"| workload ({args.model}, {args.clients} clients) | batching on | --max_batch_requests 1 | ratio "
          "| engine-alone ceiling |")
    print("|---|---|---|---|---|")
    print(f"| 1x16-token steered Runs, requests/s | {summary['runs_per_s']['batched']:.1f} | "
          f"{summary['runs_per_s']['alone']:.1f} | {summary['runs_ratio']:.2f}x | {ceiling('runs')} |")
    print(f"| steered greedy generation of {args.new_tokens} tokens, tokens/s | "
          f"{summary['generated_tokens_per_s']['batched']:.1f} | {summary['generated_tokens_per_s']['alone']:.1f} | "
          f"{summary['generate_ratio']:.2f}x | {ceiling('generate')} |")
    print(f"| lone 1x16-token steered Run, p50 ms | {summary['lone_p50_ms']['batched']:.2f} | "
          f"{summary['lone_p50_ms']['alone']:.2f} | {summary['lone_ratio']:.3f}x | |")
    if ceilings:
        print("\nengine alone, median ms: " + ", ".join(
            f"{name} {ms:.1f}" for name, ms in ceilings["engine_ms"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
