#!/usr/bin/python3
"""A/B: two forward_bench binaries (e.g. before and after an engine change) on one model, run
alternately so that anything else on the machine lands on both alike; prints, per mode, each
side's median of the per-run medians and the ratio B/A.

Usage (what BENCHMARKS.md's "Gradients" section ran to show the inference forward unchanged):
  git worktree add /tmp/old <commit> && (cd /tmp/old && bazel build //bench:forward_bench)
  bazel build //bench:forward_bench
  /usr/bin/python3 bench/ab_forward.py --a /tmp/old/bazel-bin/bench/forward_bench \\
      --b bazel-bin/bench/forward_bench --model_dir /tmp/remotelens_bench_models/100m
"""

import argparse
import json
import statistics
import subprocess
import sys


def run(binary, args, extra):
    out = subprocess.run([binary, f"--model_dir={args.model_dir}", f"--batch={args.batch}",
                          f"--pos={args.pos}", f"--iters={args.iters}", "--warmup=2",
                          f"--modes={args.modes}", *extra.split()], capture_output=True, text=True,
                         check=True)
    return {r["mode"]: float(r["median_ms"]) for r in map(json.loads, out.stdout.splitlines())
            if r.get("mode")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="baseline forward_bench")
    ap.add_argument("--b", required=True, help="candidate forward_bench")
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--pos", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--modes", default="none,resid_post,decode")
    ap.add_argument("--a_flags", default="", help="extra flags for A, e.g. --copy_weights")
    ap.add_argument("--b_flags", default="", help="extra flags for B")
    args = ap.parse_args()
    results = {"a": [], "b": []}
    for _ in range(args.rounds):
        for side in ("a", "b"):
            results[side].append(run(getattr(args, side), args, getattr(args, f"{side}_flags")))
    print(f"| mode | A median ms | B median ms | B/A |  ({args.rounds} alternating runs of "
          f"{args.iters}; batch {args.batch}, pos {args.pos})")
    print("|---|---|---|---|")
    for mode in args.modes.split(","):
        a = statistics.median(r[mode] for r in results["a"])
        b = statistics.median(r[mode] for r in results["b"])
        print(f"| {mode} | {a:.2f} | {b:.2f} | {b / a:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
