#!/usr/bin/python3
"""Forward-pass benchmark driver: the C++ engine (bench/forward_bench) against the Python reference.

For each model it
  1. creates the model with make_demo_model unless its directory already holds a config.json
     ("demo": the default demo model; "100m": a ~100M-parameter Llama-shaped model),
  2. runs bazel-bin/bench/forward_bench, which prints one JSON object per line:
     {"mode": "none"|"resid_post"|"all", "median_ms": ..., "mean_ms": ..., "iters": ...},
  3. runs it again with --onednn_gemm=false (LibTorch's BLAS for every product) as the baseline
     for engine/cpu_gemm's oneDNN path,
  4. times the float32 reference forward (fast path: no hook cache) on the same weights and
     token shape, median of --iters after --warmup, under torch.inference_mode with the same
     thread count,
  5. prints a markdown table (and writes it to --out when given).

Usage:
  bazel build //tools:all //bench:forward_bench
  /usr/bin/python3 bench/forward_bench.py --batch 1 --pos 128 --iters 10 --models demo,100m --out bench.md
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Sequence

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.reference.llama_reference import LlamaReference  # noqa: E402

MODEL_FLAGS = {
    "demo": [],
    "100m": ["--vocab_size", "32000", "--d_model", "768", "--n_layers", "12", "--n_heads", "12",
             "--n_kv_heads", "4", "--d_mlp", "2048", "--seed", "1"],
}
MODES = ("none", "resid_post", "all")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--pos", type=int, default=128)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--models", default="demo,100m", help="comma-separated subset of: " + ",".join(MODEL_FLAGS))
    ap.add_argument("--model_root", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "remotelens_bench_models"),
                    help="models are created under MODEL_ROOT/<name> unless present")
    ap.add_argument("--tools_dir", default=os.path.join(REPO, "bazel-bin", "tools"))
    ap.add_argument("--bench_bin", default=os.path.join(REPO, "bazel-bin", "bench", "forward_bench"))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for the reference (default: the \"threads\" the C++ "
                         "benchmark reports, else torch.get_num_threads(), LibTorch's own default)")
    ap.add_argument("--out", default=None, help="also write the markdown report here")
    return ap.parse_args()


def ensure_model(name: str, args: argparse.Namespace) -> str:
    directory = os.path.join(args.model_root, name)
    if os.path.exists(os.path.join(directory, "config.json")):
        return directory
    os.makedirs(args.model_root, exist_ok=True)
    cmd = [os.path.join(args.tools_dir, "make_demo_model"), directory] + MODEL_FLAGS[name]
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    return directory


def run_forward_bench(binary: str, model_dir: str, batch: int, pos: int, iters: int,
                      warmup: int, extra_flags: List[str] = (),
                      modes: Sequence[str] = MODES) -> Dict[str, dict]:
    """Runs the C++ forward_bench and returns its records by mode (by default "none",
    "resid_post" and "all"; "decode" when asked).

    Shared by every benchmark driver that needs the engine-alone baseline.
    """
    cmd = [binary, "--model_dir", model_dir, "--batch", str(batch), "--pos", str(pos),
           "--iters", str(iters), "--warmup", str(warmup), "--modes", ",".join(modes)] + list(extra_flags)
    print("+", " ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"forward_bench failed (exit {proc.returncode}):\n{proc.stderr}")
    results = {}
    for line in proc.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            record = json.loads(line)
            results[record["mode"]] = record
    missing = [m for m in modes if m not in results]
    if missing:
        raise SystemExit(f"forward_bench printed no result for modes {missing}:\n{proc.stdout}")
    return results


def emit_report(text: str, out_path: str = None) -> None:
    """Prints a benchmark's markdown report and, with a path, writes it there too."""
    print(text)
    if out_path:
        with open(out_path, "w") as f:
            f.write(text)


def run_cpp_bench(model_dir: str, args: argparse.Namespace, extra_flags: List[str] = ()) -> Dict[str, dict]:
    return run_forward_bench(args.bench_bin, model_dir, args.batch, args.pos, args.iters, args.warmup,
                             extra_flags)


def time_reference(model: LlamaReference, args: argparse.Namespace) -> List[float]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.d_vocab, (args.batch, args.pos), generator=g)
    times_ms = []
    with torch.inference_mode():
        for i in range(args.warmup + args.iters):
            start = time.perf_counter()
            model.forward(tokens, collect=False)
            elapsed = (time.perf_counter() - start) * 1000.0
            if i >= args.warmup:
                times_ms.append(elapsed)
    return times_ms


def openblas_info() -> str:
    """Which OpenBLAS kernel the Python baseline (torch's BLAS) runs, and the variables that pick
    it: OPENBLAS_CORETYPE forces a core (an older one is slower); OPENBLAS_L2_SIZE sizes blocks."""
    env = ", ".join(f"{v}={os.environ[v]!r}" if v in os.environ else f"{v} unset"
                    for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"))
    try:
        import ctypes
        lib = ctypes.CDLL("libblas.so.3")
        lib.openblas_get_corename.restype = ctypes.c_char_p
        core = lib.openblas_get_corename().decode()
    except (OSError, AttributeError):
        core = "not OpenBLAS"
    return f"- BLAS for the reference and LibTorch products: OpenBLAS core {core} ({env})"


def machine_info(threads: int) -> List[str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return [f"- CPU: {cpu} ({os.cpu_count()} logical cores)",
            f"- OS: {platform.platform()}",
            f"- Python {platform.python_version()}, torch {torch.__version__}, torch threads {threads}",
            openblas_info()]


def main() -> None:
    args = parse_args()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in MODEL_FLAGS:
            raise SystemExit(f"unknown model {name!r}; valid: {sorted(MODEL_FLAGS)}")
        model_dir = ensure_model(name, args)
        cpp = run_cpp_bench(model_dir, args)
        libtorch_gemm = run_cpp_bench(model_dir, args, ["--onednn_gemm=false"])
        cpp_threads = cpp["none"].get("threads")
        if args.threads is None and cpp_threads:
            threads = int(cpp_threads)  # match what the engine used, when it says
        torch.set_num_threads(threads)
        model = LlamaReference.from_pretrained(model_dir)
        n_params = sum(t.numel() for t in model.w.values())
        ref_ms = statistics.median(time_reference(model, args))
        del model
        none_ms = cpp["none"]["median_ms"]
        rows.append(
            f"| {name} | {n_params / 1e6:.1f}M | {args.batch}x{args.pos} | {threads} | {ref_ms:.2f} | {none_ms:.2f} "
            f"| {cpp['resid_post']['median_ms']:.2f} | {cpp['all']['median_ms']:.2f} "
            f"| {none_ms / ref_ms:.2f} | {cpp['resid_post']['median_ms'] / none_ms:.2f} "
            f"| {cpp['all']['median_ms'] / none_ms:.2f} "
            f"| {libtorch_gemm['none']['median_ms']:.2f} | {none_ms / libtorch_gemm['none']['median_ms']:.2f} |")
    report = "\n".join(
        ["# Forward-pass benchmark (median ms, float32, CPU)", "",
         f"iters {args.iters} after {args.warmup} warmup; batch x pos as shown; reference = "
         "tests/reference/llama_reference.py fast path (no hook cache).", "",
         "| model | params | batch x pos | threads | reference | engine none | engine resid_post | engine all "
         "| none/ref | resid_post/none | all/none | engine none, LibTorch BLAS products | none/BLAS |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"] + rows + ["", "Machine:"] + machine_info(threads)) + "\n"
    emit_report(report, args.out)


if __name__ == "__main__":
    main()
