#!/usr/bin/env python3
"""Server benchmarks, each a ratio against a baseline measured in the same run.

Starts remotelens_server on the demo model with two users (alice, bob) and runs
bazel-bin/bench/server_bench in three modes:
  latency  small Run round trip (1 x 8 tokens) vs the forward time inside it, vs the engine
           alone in-process (bench/forward_bench, same model and size), and vs a raw gRPC
           stream of the same bytes
  stream   FetchCache of a ~64 MiB stored cache vs a raw gRPC bytes stream of the same size
  load     --clients concurrent clients for --seconds, alternating between the two users:
           p50/p99 latency, throughput, errors, and the two users' shares

    /usr/bin/python3 bench/server_bench.py [--seconds 60] [--clients 32] [--out FILE.md]
"""
import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

import server_harness  # noqa: E402
from forward_bench import emit_report, run_forward_bench  # noqa: E402  (bench/ is on sys.path)

BENCH = os.path.join(REPO, "bazel-bin", "bench", "server_bench")
FORWARD_BENCH = os.path.join(REPO, "bazel-bin", "bench", "forward_bench")
KEYS = {"alice": "bench-key-alice", "bob": "bench-key-bob"}


def users_file(directory, max_concurrent):
    path = os.path.join(directory, "users.textproto")
    with open(path, "w") as f:
        for name, key in KEYS.items():
            digest = hashlib.sha256(key.encode()).hexdigest()
            f.write(f'users {{ name: "{name}" api_key_sha256: "{digest}" '
                    f'quota {{ max_concurrent_requests: {max_concurrent} }} }}\n')
    return path


def run(args):
    out = subprocess.run(args, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--cache_mb", type=int, default=64)
    parser.add_argument("--out")
    a = parser.parse_args()
    work = tempfile.mkdtemp(prefix="remotelens_bench_")
    model = server_harness.make_demo_model(os.path.join(work, "demo"))
    users = users_file(work, a.clients)
    # Latency and stream without auth (local user), load with two users.
    with server_harness.ServerProcess(model) as server:
        latency = run([BENCH, "--mode=latency", f"--address={server.address}", "--iters=1000"])
        stream = run([BENCH, "--mode=stream", f"--address={server.address}", f"--cache_mb={a.cache_mb}"])
    engine = run_forward_bench(FORWARD_BENCH, model, batch=1, pos=8, iters=300, warmup=20)["none"]
    with server_harness.ServerProcess(model, config=f'users_file: "{users}"\nlimits {{ max_queue: 1024 }}') as server:
        load = run([BENCH, "--mode=load", f"--address={server.address}", f"--clients={a.clients}",
                    f"--seconds={a.seconds}", f"--keys={KEYS['alice']},{KEYS['bob']}"])
    lines = [
        "| measurement | value | baseline (same run) | ratio |",
        "|---|---|---|---|",
        f"| small Run round trip p50 (1x8 tokens, demo) | {latency['round_trip_p50_ms']:.3f} ms | "
        f"engine forward alone {engine['median_ms']:.3f} ms | {latency['round_trip_p50_ms'] / engine['median_ms']:.2f}x |",
        f"| small Run round trip p99 | {latency['round_trip_p99_ms']:.3f} ms | | |",
        f"| server overhead p50 (round trip - forward in server) | {latency['overhead_p50_ms']:.3f} ms | "
        f"forward in server {latency['forward_p50_ms']:.3f} ms | |",
        f"| raw gRPC stream of the same bytes p50 (in-process server) | {latency['raw_grpc_p50_ms']:.3f} ms | | "
        f"overhead / raw {latency['overhead_p50_ms'] / latency['raw_grpc_p50_ms']:.2f}x |",
        f"| FetchCache {stream['mib']:.0f} MiB | {stream['fetch_mib_per_s']:.0f} MiB/s | "
        f"raw gRPC bytes stream {stream['raw_mib_per_s']:.0f} MiB/s | {stream['throughput_ratio']:.2f}x |",
        f"| load: {load['clients']} clients x {load['seconds']:.0f} s | {load['throughput_rps']:.0f} req/s, "
        f"p50 {load['p50_ms']:.1f} ms, p99 {load['p99_ms']:.1f} ms, {load['errors']} errors | | |",
        f"| fairness: alice vs bob completed | {load.get('user0_requests', 0):.0f} vs "
        f"{load.get('user1_requests', 0):.0f} | | share ratio {load.get('share_ratio', 0):.3f} |",
    ]
    text = "\n".join(lines) + (f"\n\nMachine: {platform.processor() or platform.machine()}, "
                               f"{os.cpu_count()} cores\n")
    emit_report(text, a.out)


if __name__ == "__main__":
    main()
