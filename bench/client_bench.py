#!/usr/bin/python3
"""Python client overhead: end-to-end client calls against the engine alone, measured in one run.

  (a) run_with_cache of every blocks.L.hook_resid_post, from the client call to torch tensors
      in Python, against bench/forward_bench's "resid_post" mode (the engine caching the same
      hooks in process, no gRPC) on the same model and token shape;
  (b) a Python-callable hook (a round trip to this process per hook call) against the same edit
      declared with remotelens.ops (applied on the server), with a no-hook run as the baseline.

It starts a remotelens_server on the model unless --address names a running one, and prints a
markdown table of medians and ratios (and writes it to --out).

Usage:
  bazel build //server:remotelens_server //tools:all //bench:forward_bench
  /usr/bin/python3 bench/client_bench.py [--model demo|100m] [--batch 1] [--pos 128] [--iters 20]
"""

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "clients", "python"))

import torch  # noqa: E402

import server_harness  # noqa: E402
from forward_bench import run_forward_bench  # noqa: E402  (bench/ is on sys.path)
from remotelens import HookedTransformer, ops  # noqa: E402

MODEL_FLAGS = {
    "demo": [],
    "100m": ["--vocab_size", "32000", "--d_model", "768", "--n_layers", "12", "--n_heads", "12",
             "--n_kv_heads", "4", "--d_mlp", "2048", "--seed", "1"],
}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", choices=sorted(MODEL_FLAGS))
    ap.add_argument("--model_root", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "remotelens_bench_models"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--pos", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--address", default=None, help="use this running server (same model) instead of starting one")
    ap.add_argument("--forward_bench", default=os.path.join(REPO, "bazel-bin", "bench", "forward_bench"))
    ap.add_argument("--out", default=None, help="also write the markdown report here")
    return ap.parse_args()


def interleaved_medians(cases: List[tuple], iters: int, warmup: int) -> List[tuple]:
    """Median ms of each (name, fn), timing the cases round-robin so that load from anything
    else on the machine lands on all of them alike."""
    for _ in range(warmup):
        for _, fn in cases:
            fn()
    times: Dict[str, List[float]] = {name: [] for name, _ in cases}
    for _ in range(iters):
        for name, fn in cases:
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return [(name, statistics.median(times[name])) for name, _ in cases]


def engine_ms(args, model_dir: str) -> Dict[str, float]:
    records = run_forward_bench(args.forward_bench, model_dir, args.batch, args.pos, args.iters,
                                args.warmup)
    return {mode: float(record["median_ms"]) for mode, record in records.items()}


def client_rows(model: HookedTransformer, args) -> List[tuple]:
    torch.manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (args.batch, args.pos))
    resid_post = [f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)]

    def cache_resid_post():
        _, cache = model.run_with_cache(tokens, names_filter=resid_post, return_type=None)
        assert len(cache) == len(resid_post)

    def zero_head(z, hook):
        z[:, :, 2] = 0.0

    one = "blocks.1.attn.hook_z"
    every = lambda name: name.endswith("hook_resid_post")  # noqa: E731
    vector = torch.full((model.cfg.d_model,), 0.01)
    n = model.cfg.n_layers
    cases = [
        ("run_with_cache(resid_post x all layers)", cache_resid_post),
        ("forward, no hooks", lambda: model(tokens)),
        ("1 hook: ops.zero(head=2)", lambda: model.run_with_hooks(tokens, fwd_hooks=[(one, ops.zero(head=2))])),
        ("1 hook: Python callable", lambda: model.run_with_hooks(tokens, fwd_hooks=[(one, zero_head)])),
        (f"{n} hooks: ops.add(vector)", lambda: model.run_with_hooks(tokens, fwd_hooks=[(every, ops.add(vector))])),
        (f"{n} hooks: Python callable", lambda: model.run_with_hooks(
            tokens, fwd_hooks=[(every, lambda x, hook: x + vector)])),
    ]
    return interleaved_medians(cases, args.iters, args.warmup)


def main() -> int:
    args = parse_args()
    model_dir = os.path.join(args.model_root, args.model)
    os.makedirs(args.model_root, exist_ok=True)
    server_harness.make_demo_model(model_dir, *MODEL_FLAGS[args.model])
    engine = engine_ms(args, model_dir)
    server = None
    address = args.address
    if address is None:
        server = server_harness.ServerProcess(model_dir).start()
        address = server.address
    try:
        model = HookedTransformer.from_server(address)
        rows = client_rows(model, args)
        model.close()
    finally:
        if server is not None:
            server.stop()

    by_name = dict(rows)
    baseline = by_name["forward, no hooks"]
    lines = [f"# Python client overhead ({args.model} model: {model.cfg.n_layers} layers, d_model "
             f"{model.cfg.d_model}; batch {args.batch}, pos {args.pos}; median of {args.iters})", "",
             "(a) caching every hook_resid_post: client call to torch tensors vs the engine alone", "",
             "| measurement | median ms | ratio |", "|---|---|---|",
             f"| engine: forward_bench resid_post (in process) | {engine['resid_post']:.2f} | 1.00 |",
             f"| client: run_with_cache(resid_post x {model.cfg.n_layers}) | {rows[0][1]:.2f} | "
             f"{rows[0][1] / engine['resid_post']:.2f} |"]
    if "none" in engine:
        lines.append(f"| engine: forward_bench, no hooks | {engine['none']:.2f} | "
                     f"{engine['none'] / engine['resid_post']:.2f} |")
    lines += ["", "(b) hooks: Python callables (a round trip per call) vs the same edit as remotelens.ops", "",
              "| measurement | median ms | ratio to no-hook forward |", "|---|---|---|"]
    for name, ms in rows[1:]:
        lines.append(f"| {name} | {ms:.2f} | {ms / baseline:.2f} |")
    lines += ["", f"Python callable / ops, 1 hook: {by_name['1 hook: Python callable'] / by_name['1 hook: ops.zero(head=2)']:.2f}x; "
              f"{model.cfg.n_layers} hooks: "
              f"{rows[-1][1] / rows[-2][1]:.2f}x", "",
              f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
              f"torch {torch.__version__}; client and server on the same host (loopback)."]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
