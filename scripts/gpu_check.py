#!/usr/bin/python3
"""Python steps of scripts/gpu_check.sh; each subcommand prints one line "RESULT <json>".

  parity      remotelens_run against tests/reference/llama_reference.py (float32 or bfloat16)
  checkpoint  a random Hugging Face checkpoint (config.json, bf16 shards, index), streamed to disk
  bounds      the GPU's (or CPU's) memory bandwidth and matmul peak, and where they come from
  roundtrip   a Run through the Python client against a remotelens_server on loopback
  hf          the same forward in transformers' LlamaForCausalLM with forward hooks (eager, sdpa)

Run by scripts/gpu_check.sh; not a test suite of its own. Exit 1 means the step failed and the
message on stderr says what.
"""

import argparse
import contextlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tests.reference import safetensors_io  # noqa: E402
from tests.reference.llama_reference import LlamaConfig, LlamaReference  # noqa: E402

# Llama 3.1 8B's config.json as Hugging Face ships it (meta-llama/Llama-3.1-8B).
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}

# Published peaks (vendor datasheets, dense, no sparsity): HBM bytes/s and bf16 tensor FLOP/s.
GPU_PEAKS = {
    "H200": (4.8e12, 989e12, "NVIDIA H200 SXM datasheet: 4.8 TB/s HBM3e, 989 TFLOP/s bf16 dense"),
    "H100 80GB HBM3": (3.35e12, 989e12, "NVIDIA H100 SXM datasheet: 3.35 TB/s, 989 TFLOP/s bf16 dense"),
    "H100 PCIe": (2.0e12, 756e12, "NVIDIA H100 PCIe datasheet: 2.0 TB/s, 756 TFLOP/s bf16 dense"),
    "A100-SXM4-80GB": (2.039e12, 312e12, "NVIDIA A100 80GB SXM datasheet: 2.0 TB/s, 312 TFLOP/s bf16"),
    "A100-SXM4-40GB": (1.555e12, 312e12, "NVIDIA A100 40GB datasheet: 1.6 TB/s, 312 TFLOP/s bf16"),
    "L4": (0.3e12, 121e12, "NVIDIA L4 datasheet: 300 GB/s, 121 TFLOP/s bf16 dense"),
}


def result(obj: dict) -> None:
    print("RESULT " + json.dumps(obj), flush=True)


def fail(message: str) -> None:
    print(f"gpu_check.py: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


# ------------------------------------------------------------------ parity

def _bf16_round(a: np.ndarray) -> np.ndarray:
    return safetensors_io.bf16_bits_to_float32(safetensors_io.float32_to_bf16_bits(a.astype(np.float32)))


def _compare(got: torch.Tensor, want: torch.Tensor, rel: bool) -> float:
    """max |got - want| (divided by max |want| when rel); infinities must coincide."""
    got = got.to(torch.float32)
    want = want.to(torch.float32)
    if tuple(got.shape) != tuple(want.shape):
        return float("inf")
    if not torch.equal(torch.isinf(got), torch.isinf(want)):
        return float("inf")
    finite = torch.isfinite(want)
    if not bool(finite.any()):
        return 0.0
    diff = float((got[finite] - want[finite]).abs().max())
    if rel:
        diff /= max(float(want[finite].abs().max()), 1e-3)
    return diff


def cmd_parity(args) -> None:
    work = tempfile.mkdtemp(prefix=f"gpu_check_parity_{args.dtype}_", dir=args.work)
    model_dir = os.path.join(work, "model")
    subprocess.run([args.make_demo_model, model_dir], check=True, capture_output=True)
    ref_device = args.ref_device
    if args.dtype == "bfloat16":
        # The same bf16-rounded weights for both: the engine computes in bfloat16, the reference
        # in float32, so the difference is the engine's bf16 arithmetic alone.
        arrays = safetensors_io.read_checkpoint(model_dir)
        rounded = {k: _bf16_round(v) for k, v in arrays.items()}
        for f in os.listdir(model_dir):
            if f.endswith(".safetensors") or f.endswith(".index.json"):
                os.remove(os.path.join(model_dir, f))
        safetensors_io.write_safetensors(os.path.join(model_dir, "model.safetensors"), rounded,
                                         dtype="BF16", metadata={"format": "pt"})
    with open(os.path.join(model_dir, "config.json")) as f:
        config = LlamaConfig.from_hf_dict(json.load(f))
    weights = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
               for k, v in safetensors_io.read_checkpoint(model_dir).items()}
    g = torch.Generator().manual_seed(7)
    rows = torch.randint(1, min(config.d_vocab, 500), (2, 12), generator=g)
    tokens_arg = ";".join(",".join(str(int(t)) for t in row) for row in rows.tolist())

    def reference(device: str):
        # The reference builds its tables with factory calls; `with torch.device` (PyTorch >= 2)
        # puts those on the GPU too.
        place = torch.device(device) if device != "cpu" else contextlib.nullcontext()
        with place:
            ref = LlamaReference(config, {k: v.to(device) for k, v in weights.items()})
            logits, cache = ref.forward(rows.to(device))
        out = {k: v.detach().cpu() for k, v in cache.items()}
        out["logits"] = logits.detach().cpu()
        return out

    try:
        want = reference(ref_device)
    except Exception as e:  # the reference builds some tables on the CPU; say so and fall back
        if ref_device == "cpu":
            raise
        print(f"gpu_check.py: reference on {ref_device} failed ({type(e).__name__}: {e}); "
              "using the CPU reference", file=sys.stderr)
        ref_device = "cpu"
        want = reference("cpu")

    worst: Dict[str, Tuple[str, float]] = {}
    problems: List[str] = []
    rel = args.dtype == "bfloat16"
    # Two engine runs: every hook (the differentiable attention path) and logits alone with one
    # cached hook (the fused path: scaled-dot-product attention, no pattern).
    for label, names in (("all hooks", "all"), ("fast path", "blocks.0.hook_resid_post")):
        out = os.path.join(work, f"engine_{label.replace(' ', '_')}.safetensors")
        cmd = [args.run, "--model_dir", model_dir, "--tokens", tokens_arg, "--names", names,
               "--out", out, "--dtype", args.dtype, "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            fail(f"remotelens_run ({label}) exited {proc.returncode}: {proc.stderr[-2000:]}")
        got = {k: torch.from_numpy(np.ascontiguousarray(v))
               for k, v in safetensors_io.read_safetensors(out).items()}
        for name, tensor in got.items():
            if name not in want:
                continue
            d = _compare(tensor, want[name], rel)
            if d > args.tol:
                problems.append(f"{label}: {name} differs by {d:.3g} (tolerance {args.tol:g})")
            if label not in worst or d > worst[label][1]:
                worst[label] = (name, d)
    summary = {"dtype": args.dtype, "device": args.device, "reference_device": ref_device,
               "tolerance": args.tol, "relative": rel,
               "worst": {k: {"tensor": v[0], "diff": v[1]} for k, v in worst.items()},
               "ok": not problems}
    result(summary)
    if problems:
        fail(f"{len(problems)} tensors out of tolerance:\n" + "\n".join(problems[:20]))


# ------------------------------------------------------------------ checkpoint

_ST_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def _shapes(cfg: dict) -> List[Tuple[str, Tuple[int, ...]]]:
    d, v, m = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    dh = d // h
    out = [("model.embed_tokens.weight", (v, d))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (h * dh, d)),
                (p + "self_attn.k_proj.weight", (kv * dh, d)), (p + "self_attn.v_proj.weight", (kv * dh, d)),
                (p + "self_attn.o_proj.weight", (d, h * dh)), (p + "post_attention_layernorm.weight", (d,)),
                (p + "mlp.gate_proj.weight", (m, d)), (p + "mlp.up_proj.weight", (m, d)),
                (p + "mlp.down_proj.weight", (d, m))]
    out += [("model.norm.weight", (d,))]
    if not cfg.get("tie_word_embeddings", False):
        out += [("lm_head.weight", (v, d))]
    return out


def cmd_checkpoint(args) -> None:
    """Streams random bf16 weights shard by shard (never the whole model in memory)."""
    cfg = dict(LLAMA31_8B)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    dtype = torch.bfloat16
    shapes = _shapes(cfg)
    sizes = [int(np.prod(s)) * 2 for _, s in shapes]
    total = sum(sizes)
    groups: List[List[int]] = [[] for _ in range(args.shards)]
    running = 0
    for i, size in enumerate(sizes):
        groups[min(args.shards - 1, running * args.shards // total)].append(i)
        running += size
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    weight_map = {}
    start = time.time()
    for s, group in enumerate(groups):
        name = f"model-{s + 1:05d}-of-{args.shards:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for i in group:
            key, shape = shapes[i]
            header[key] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape),
                           "data_offsets": [offset, offset + sizes[i]]}
            offset += sizes[i]
            weight_map[key] = name
        blob = json.dumps(header).encode()
        blob += b" " * ((8 - len(blob) % 8) % 8)
        with open(os.path.join(args.out, name), "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for i in group:
                key, shape = shapes[i]
                if len(shape) == 1:
                    t = torch.ones(shape, dtype=dtype, device=device)
                else:
                    t = (torch.randn(shape, generator=gen, device=device) * 0.02).to(dtype)
                f.write(t.view(torch.int16).cpu().numpy().tobytes())
    with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    result({"dir": args.out, "weight_bytes": total, "shards": args.shards,
            "seconds": time.time() - start, "generator": "scripts/gpu_check.py checkpoint"})


# ------------------------------------------------------------------ bounds

def cmd_bounds(args) -> None:
    if args.device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(args.device))
        for key, (bw, flops, source) in GPU_PEAKS.items():
            if key in name:
                result({"device": name, "bandwidth_Bps": bw, "flops": flops, "source": source})
                return
    # Unknown device or CPU: measure what this machine does (a large copy; a large matmul).
    dev = torch.device(args.device)
    n = (256 << 20) // 4
    a = torch.empty(n, dtype=torch.float32, device=dev).fill_(1)
    b = torch.empty_like(a)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    b.copy_(a)
    sync()
    t = time.perf_counter()
    reps = 5
    for _ in range(reps):
        b.copy_(a)
    sync()
    bw = 2 * a.numel() * 4 * reps / (time.perf_counter() - t)
    k = 4096 if dev.type == "cuda" else 1024
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    x = torch.randn(k, k, device=dev, dtype=dt)
    x @ x
    sync()
    t = time.perf_counter()
    reps = 10 if dev.type == "cuda" else 3
    for _ in range(reps):
        x @ x
    sync()
    flops = 2 * k ** 3 * reps / (time.perf_counter() - t)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    result({"device": name, "bandwidth_Bps": bw, "flops": flops,
            "source": f"measured here: 256 MiB copy, {k}x{k} {str(dt).replace('torch.', '')} matmul "
                      f"(no datasheet entry for this device)"})


# ------------------------------------------------------------------ round trip

def cmd_roundtrip(args) -> None:
    os.environ["REMOTELENS_SERVER_BIN"] = args.server
    sys.path.insert(0, os.path.join(REPO, "tests"))
    sys.path.insert(0, os.path.join(REPO, "clients", "python"))
    import server_harness  # noqa: E402
    from remotelens import HookedTransformer  # noqa: E402

    config = f'dtype: "{args.dtype}"\n' + "".join(f'devices: "{d}"\n' for d in args.device.split(","))
    with server_harness.ServerProcess(args.model_dir, config=config, startup_timeout=600) as server:
        model = HookedTransformer.from_server(server.address)
        n_layers = model.cfg.n_layers
        tokens = torch.randint(1, 200, (args.batch, args.pos))
        names = [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]
        times, cache = [], None
        for _ in range(args.iters + 1):
            t = time.perf_counter()
            logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
            times.append(time.perf_counter() - t)
        times = sorted(times[1:])
        shape = tuple(cache[names[-1]].shape)
        if shape != (args.batch, args.pos, model.cfg.d_model) or tuple(logits.shape[:2]) != (args.batch, args.pos):
            fail(f"round trip returned resid_post {shape}, logits {tuple(logits.shape)}")
        if not bool(torch.isfinite(logits).all()):
            fail("round trip returned non-finite logits")
        result({"median_ms": 1000 * times[len(times) // 2], "batch": args.batch, "pos": args.pos,
                "cached": len(names), "device": args.device})


# ------------------------------------------------------------------ Hugging Face

def _load_hf(cls, model_dir: str, dtype: torch.dtype, impl: str, dev: torch.device):
    """from_pretrained straight onto the device where the installed transformers allows it
    (device_map needs accelerate; `dtype` replaced `torch_dtype` in newer releases)."""
    last = None
    for kwargs in ({"dtype": dtype, "device_map": {"": dev}}, {"torch_dtype": dtype, "device_map": {"": dev}},
                   {"dtype": dtype}, {"torch_dtype": dtype}):
        try:
            model = cls.from_pretrained(model_dir, attn_implementation=impl, **kwargs)
        except (TypeError, ValueError, ImportError) as e:
            last = e
            continue
        if next(model.parameters()).dtype != dtype:
            model = model.to(dtype)
        return model.to(dev).eval()
    raise RuntimeError(f"transformers could not load {model_dir}: {last}")


def cmd_hf(args) -> None:
    try:
        import transformers  # noqa: F401
        from transformers import LlamaForCausalLM
    except Exception as e:  # noqa: BLE001
        result({"skipped": f"transformers not importable ({type(e).__name__}: {e})"})
        return
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    rows = {}
    for impl in ("eager", "sdpa"):
        model = _load_hf(LlamaForCausalLM, args.model_dir, dtype, impl, dev)
        cache: Dict[str, torch.Tensor] = {}
        handles = []

        def add_hooks():
            for i, layer in enumerate(model.model.layers):
                def hook(_m, _inp, out, i=i):
                    cache[f"blocks.{i}.hook_resid_post"] = (out[0] if isinstance(out, tuple) else out).detach()
                handles.append(layer.register_forward_hook(hook))

        for shape_name, (b, p) in (("decode", (1, 1)), ("prefill", (args.batch, args.pos))):
            tokens = torch.randint(1, 200, (b, p), device=dev)
            for hooked in (False, True):
                if hooked:
                    add_hooks()
                with torch.inference_mode():
                    model(tokens, use_cache=False)
                    sync()
                    times = []
                    for _ in range(args.iters):
                        t = time.perf_counter()
                        model(tokens, use_cache=False)
                        sync()
                        times.append(time.perf_counter() - t)
                for h in handles:
                    h.remove()
                handles.clear()
                times.sort()
                rows[f"{impl} {shape_name} {'resid_post hooks' if hooked else 'no hooks'}"] = 1000 * times[len(times) // 2]
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    result({"median_ms": rows, "transformers": transformers.__version__})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("parity")
    p.add_argument("--run", required=True)
    p.add_argument("--make_demo_model", required=True)
    p.add_argument("--work", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--ref_device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--tol", type=float, required=True)
    p = sub.add_parser("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--shards", type=int, default=4)
    p = sub.add_parser("bounds")
    p.add_argument("--device", default="cpu")
    p = sub.add_parser("roundtrip")
    for flag, default in (("--server", None), ("--model_dir", None), ("--device", "cpu"),
                          ("--dtype", "float32")):
        p.add_argument(flag, default=default, required=default is None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--pos", type=int, default=16)
    p.add_argument("--iters", type=int, default=5)
    p = sub.add_parser("hf")
    p.add_argument("--model_dir", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--pos", type=int, default=512)
    p.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    {"parity": cmd_parity, "checkpoint": cmd_checkpoint, "bounds": cmd_bounds,
     "roundtrip": cmd_roundtrip, "hf": cmd_hf}[args.cmd](args)


if __name__ == "__main__":
    main()
