#!/usr/bin/python3
"""Gradients on the server (issue 9): forward + backward against the plain forward, one run.

Times, interleaved round-robin over the same tokens through the Python client:
  - the plain forward returning the loss (the baseline);
  - run_with_cache(return_type="loss", incl_bwd=True) caching every blocks.L.hook_resid_pre and
    its gradient (attribution patching's per-layer cell): a differentiable forward, the backward
    and both sets of tensors over the wire;
and reports each median and its ratio to the baseline, plus the server's peak resident memory
(VmHWM) before and after the gradient calls. nnbench measured ~3.4x for attribution patching on
Hugging Face eager; the target here is <= 3.5x.

Usage:
  bazel build //server:remotelens_server //tools:all
  /usr/bin/python3 bench/grad_bench.py [--model demo|100m] [--batch 1] [--pos 128] [--iters 10]
"""

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "clients", "python"))
sys.path.insert(0, os.path.join(REPO, "bench"))

import torch  # noqa: E402

import server_harness  # noqa: E402
from client_bench import MODEL_FLAGS, interleaved_medians  # noqa: E402
from remotelens import HookedTransformer  # noqa: E402


def peak_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", choices=sorted(MODEL_FLAGS))
    ap.add_argument("--model_root", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "remotelens_bench_models"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--pos", type=int, default=128)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()

    model_dir = os.path.join(args.model_root, args.model)
    os.makedirs(args.model_root, exist_ok=True)
    server_harness.make_demo_model(model_dir, *MODEL_FLAGS[args.model])
    server = server_harness.ServerProcess(model_dir).start()
    try:
        model = HookedTransformer.from_server(server.address)
        torch.manual_seed(0)
        tokens = torch.randint(0, model.cfg.d_vocab, (args.batch, args.pos))
        resid_pre = [f"blocks.{l}.hook_resid_pre" for l in range(model.cfg.n_layers)]

        def plain():
            model(tokens, return_type="loss")

        def with_gradients():
            _, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True,
                                            names_filter=resid_pre)
            assert len(cache) == 2 * len(resid_pre)

        plain()
        peak_before = peak_rss_bytes(server.proc.pid)
        rows = interleaved_medians([("forward, loss (baseline)", plain),
                                    (f"forward + backward, resid_pre and its gradient x {len(resid_pre)}",
                                     with_gradients)], args.iters, args.warmup)
        peak_after = peak_rss_bytes(server.proc.pid)
        model.close()
    finally:
        server.stop()

    baseline = rows[0][1]
    lines = [f"# Gradients ({args.model} model: {model.cfg.n_layers} layers, d_model {model.cfg.d_model}; "
             f"batch {args.batch}, pos {args.pos}; median of {args.iters}, interleaved)", "",
             "| measurement | median ms | ratio |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.1f} | {ms / baseline:.2f} |" for name, ms in rows]
    lines += ["", f"server peak RSS (VmHWM): {peak_before / 2**20:.0f} MiB after plain forwards, "
                  f"{peak_after / 2**20:.0f} MiB after the gradient calls"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
