"""Precision report: how far each load dtype and processing option moves the logits and every hook
point from a float32 run without processing (TransformerLens's hook-error benchmark: max, mean,
median and standard deviation of |activation - reference|).

    scripts/precision_report.sh MODEL_DIR                # float32, bfloat16, float16; every hook point
    scripts/precision_report.sh MODEL_DIR --by_site      # one row per site, layers pooled
    scripts/precision_report.sh MODEL_DIR --short        # CI form: 1 x 16 tokens, by site
    scripts/precision_report.sh MODEL_DIR --device cuda:0

One server process per dtype (`remotelens_server --dtype`, the same load path as production), each
driven through the Python client as a notebook would. The reference is the float32 server with
every processing option off. float16 runs where the device can multiply it: a server that refuses
the dtype at load (LibTorch builds without CPU half products) is reported as skipped, with its
reason. Processing options are those HookedTransformer.from_server takes as keyword flags
(fold_ln, center_unembed, ... : whichever this client has), plus "all" when there are several;
with none, only "none". Needs bazel build //server:remotelens_server.

Output: a markdown table, `| dtype | processing | hook | max | mean | median | std | n |`, the logits
first, then hook points in forward order, the opt-in ones included (use_attn_result,
use_split_qkv_input, use_hook_mlp_in; use_attn_in where HookedTransformer allows it, i.e. not with
grouped-query attention). Masked attention scores (-inf in both runs) are left out
of the statistics; a -inf in one run only is reported as an infinite max.
"""

import argparse
import inspect
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "clients", "python"))

import torch  # noqa: E402

import server_harness  # noqa: E402
from remotelens import HookedTransformer  # noqa: E402

# Keyword flags of HookedTransformer.from_server that are processing options with an effect on an
# RMSNorm model without biases (issue 12: fold_ln, and center_unembed's per-position logit shift),
# in the order TransformerLens's from_pretrained applies them. TransformerLens's other flags
# (center_writing_weights, fold_value_biases) change nothing here, so they add no rows.
KNOWN_PROCESSING_FLAGS = ("fold_ln", "center_unembed")
COLUMNS = ("dtype", "processing", "hook", "max", "mean", "median", "std", "n")


def processing_options() -> List[Tuple[str, Dict[str, bool]]]:
    """(label, from_server kwargs) for each processing option this client offers."""
    params = inspect.signature(HookedTransformer.from_server).parameters
    flags = [f for f in KNOWN_PROCESSING_FLAGS if f in params]
    options = [("none", {f: False for f in flags})]
    for flag in flags:
        options.append((flag, {f: f == flag for f in flags}))
    if len(flags) > 1:
        options.append(("all", {f: True for f in flags}))
    return options


def abs_diff_stats(got: torch.Tensor, want: torch.Tensor) -> Tuple[float, float, float, float, int]:
    """(max, mean, median, std, count) of |got - want| over entries finite in both."""
    got, want = got.float(), want.float()
    if got.shape != want.shape:
        raise ValueError(f"shape {tuple(got.shape)} != reference {tuple(want.shape)}")
    both = torch.isfinite(got) & torch.isfinite(want)
    if bool((torch.isfinite(got) != torch.isfinite(want)).any()):
        return float("inf"), float("inf"), float("inf"), float("inf"), int(got.numel())
    diff = (got[both] - want[both]).abs()
    if diff.numel() == 0:
        return 0.0, 0.0, 0.0, 0.0, 0
    return (float(diff.max()), float(diff.mean()), float(diff.median()),
            float(diff.std(unbiased=False)), int(diff.numel()))


def site_of(name: str) -> str:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
        return ".".join(["blocks", "*"] + parts[2:])
    return name


# The opt-in hook points, turned on so the table covers every hook point the client can run.
OPT_IN_SETTERS = ("set_use_attn_result", "set_use_split_qkv_input", "set_use_hook_mlp_in",
                  "set_use_attn_in")


def enable_opt_in_hooks(model: HookedTransformer) -> List[str]:
    """Turns on every opt-in hook point the model accepts; returns the setters it refused
    (HookedTransformer.set_use_attn_in refuses grouped-query attention, as TransformerLens 3)."""
    refused = []
    for setter in OPT_IN_SETTERS:
        if not hasattr(model, setter):
            continue
        try:
            getattr(model, setter)(True)
        except (AssertionError, ValueError):
            refused.append(setter)
    return refused


def run_all(model: HookedTransformer, tokens: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Logits and every hook point run_with_cache returns, as float32."""
    logits, cache = model.run_with_cache(tokens)
    out = {"logits": logits.float()}
    out.update({name: cache[name].float() for name in cache.keys()})
    return out


def compare(dtype: str, option: str, got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor],
            by_site: bool) -> List[tuple]:
    rows = []
    if not by_site:
        for name, tensor in want.items():
            rows.append((dtype, option, name) + abs_diff_stats(got[name], tensor))
        return rows
    groups: Dict[str, List[str]] = {}
    for name in want:
        groups.setdefault(site_of(name), []).append(name)
    for site, names in groups.items():
        g = torch.cat([got[n].flatten() for n in names])
        w = torch.cat([want[n].flatten() for n in names])
        rows.append((dtype, option, site) + abs_diff_stats(g, w))
    return rows


def start_server(model_dir: str, dtype: str, device: str) -> Tuple[Optional[object], str]:
    """(server, "") or (None, why it did not start)."""
    server = server_harness.ServerProcess(model_dir, args=["--dtype", dtype, "--device", device],
                                          startup_timeout=600)
    try:
        return server.start(), ""
    except Exception as e:  # noqa: BLE001 (a refused dtype is a result, not an error)
        lines = [l.strip() for l in server.stderr_lines if l.strip()]
        reason = lines[-1] if lines else str(e)
        try:
            server.stop()
        except Exception:  # noqa: BLE001
            pass
        return None, reason


def report(model_dir: str, dtypes: Sequence[str], device: str, batch: int, n_pos: int, seed: int,
           by_site: bool) -> Tuple[List[tuple], List[str]]:
    """Rows of the table and notes (skipped dtypes, the options found)."""
    options = processing_options()
    notes = [f"processing options from HookedTransformer.from_server: "
             f"{', '.join(label for label, _ in options)}"]
    rows: List[tuple] = []
    reference: Optional[Dict[str, torch.Tensor]] = None
    tokens: Optional[torch.Tensor] = None
    for dtype in ["float32"] + [d for d in dtypes if d != "float32"]:
        server, why = start_server(model_dir, dtype, device)
        if server is None:
            if dtype == "float32":
                raise RuntimeError(f"the float32 reference server did not start: {why}")
            notes.append(f"{dtype}: skipped ({why})")
            continue
        try:
            for label, kwargs in options:
                model = HookedTransformer.from_server(server.address, **kwargs)
                try:
                    refused = enable_opt_in_hooks(model)
                    if tokens is None:
                        if refused:
                            notes.append(f"opt-in hook points left out: {', '.join(refused)} "
                                         f"refused by HookedTransformer on this model")
                        g = torch.Generator().manual_seed(seed)
                        tokens = torch.randint(0, model.cfg.d_vocab, (batch, n_pos), generator=g)
                    got = run_all(model, tokens)
                finally:
                    model.close()
                if reference is None:  # float32, no processing: the first run
                    reference = got
                if dtype in dtypes:
                    rows += compare(dtype, label, got, reference, by_site)
        finally:
            server.stop()
    return rows, notes


def format_table(rows: Sequence[tuple]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for dtype, option, hook, mx, mean, median, std, n in rows:
        lines.append(f"| {dtype} | {option} | {hook} | {mx:.3g} | {mean:.3g} | {median:.3g} | "
                     f"{std:.3g} | {n} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16",
                        help="comma-separated load dtypes to compare with the float32 reference")
    parser.add_argument("--device", default="cpu", help="server device(s), e.g. cpu or cuda:0")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--pos", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--by_site", action="store_true", help="pool the layers of each site")
    parser.add_argument("--short", action="store_true", help="CI form: 1 x 16 tokens, --by_site")
    args = parser.parse_args(argv)
    if args.short:
        args.batch, args.pos, args.by_site = 1, 16, True
    if not os.access(server_harness.SERVER_BIN, os.X_OK):
        print(f"{server_harness.SERVER_BIN} not built: bazel build //server:remotelens_server",
              file=sys.stderr)
        return 2
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    rows, notes = report(args.model_dir, dtypes, args.device, args.batch, args.pos, args.seed,
                         args.by_site)
    print(f"# |activation - float32 reference without processing|, {args.batch} x {args.pos} "
          f"random tokens, device {args.device}")
    for note in notes:
        print(f"# {note}")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
