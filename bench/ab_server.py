#!/usr/bin/python3
"""A/B: two remotelens_server binaries (e.g. before and after an engine change) under
batch_bench.py's concurrent workloads, each binary as a batching server and a
--max_batch_requests 1 server, all four taking turns round by round so that whatever else the
machine does lands on each alike. Prints each server's median and B/A.

Usage (what docs/decisions.md's "column chunks" entry ran):
  git worktree add /tmp/old <commit> && (cd /tmp/old && bazel build //server:remotelens_server)
  bazel build //server:remotelens_server //tools:all
  /usr/bin/python3 bench/ab_server.py --a /tmp/old/bazel-bin/server/remotelens_server \\
      --b bazel-bin/server/remotelens_server --workload runs
"""
import argparse
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, HERE)

import batch_bench  # noqa: E402
import server_harness  # noqa: E402
from client_bench import MODEL_FLAGS  # noqa: E402
from remotelens.v1 import remotelens_pb2 as pb  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="baseline server binary")
    ap.add_argument("--b", required=True, help="candidate server binary")
    ap.add_argument("--model", default="100m", choices=sorted(MODEL_FLAGS))
    ap.add_argument("--model_root", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "remotelens_bench_models"))
    ap.add_argument("--workload", default="runs", choices=("runs", "generate"))
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10, help="per Runs measurement")
    ap.add_argument("--new_tokens", type=int, default=32, help="per generation")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()

    model_dir = os.path.join(args.model_root, args.model)
    os.makedirs(args.model_root, exist_ok=True)
    server_harness.make_demo_model(model_dir, *MODEL_FLAGS[args.model])
    users = batch_bench.write_users(tempfile.mkdtemp(prefix="ab_server_"), args.clients)
    config = f'limits {{ max_queue: 1024 }}\nusers_file: "{users}"\n'
    servers = {}
    try:
        for side, binary in (("A", args.a), ("B", args.b)):
            server_harness.SERVER_BIN = os.path.abspath(binary)  # read when a server starts
            servers[f"{side} batching"] = server_harness.ServerProcess(model_dir, config=config).start()
            servers[f"{side} one per forward"] = server_harness.ServerProcess(
                model_dir, config=config, args=["--max_batch_requests=1"]).start()
        first = next(iter(servers.values()))
        channel = first.channel()
        info = first.stub(channel).GetModelInfo(pb.GetModelInfoRequest(), metadata=batch_bench.key(0))
        channel.close()
        results = {name: [] for name in servers}
        for _ in range(args.rounds):
            for name, server in servers.items():
                if args.workload == "runs":
                    value = batch_bench.concurrent_runs(server, info, args.clients, args.seconds)
                else:
                    value = batch_bench.concurrent_generations(server, info, args.clients, args.new_tokens)
                results[name].append(value)
    finally:
        for server in servers.values():
            server.stop()
    unit = "requests/s" if args.workload == "runs" else "generated tokens/s"
    med = {name: statistics.median(v) for name, v in results.items()}
    print(f"| server ({args.model}, {args.clients} clients, {args.workload}) | A {unit} | B {unit} | B/A |")
    print("|---|---|---|---|")
    for kind in ("batching", "one per forward"):
        a, b = med[f"A {kind}"], med[f"B {kind}"]
        print(f"| {kind} | {a:.1f} | {b:.1f} | {b / a:.3f} |")
    for side in "AB":
        print(f"{side}: batching / one per forward = "
              f"{med[f'{side} batching'] / med[f'{side} one per forward']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
