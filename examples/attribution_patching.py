#!/usr/bin/python3
"""Attribution patching against a remotelens server: every layer's and every head's effect on a
logit difference, estimated from one clean forward and one corrupt forward + backward.

    bazel-bin/server/remotelens_server --config configs/demo.textproto &     # or any server
    python3 examples/attribution_patching.py --address 127.0.0.1:50051

The estimate of patching activation A from the clean run into the corrupt run is the first-order
term (A_clean - A_corrupt) . d(metric)/dA at the corrupt run (Nanda, "Attribution Patching",
2023). The metric is the logit difference between the clean answer and the corrupt answer at the
last position; the server computes it and back-propagates it, so only the selected activations
and gradients cross the wire.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "clients", "python"))

import torch  # noqa: E402

from remotelens import HookedTransformer, metrics  # noqa: E402


def attribution_patching(model, clean, corrupt, correct, incorrect):
    """Per-layer resid_pre attributions [n_layers, pos] and per-head z attributions
    [n_layers, n_heads], summed over the batch."""
    n = model.cfg.n_layers
    names = [f"blocks.{l}.hook_resid_pre" for l in range(n)] + [f"blocks.{l}.attn.hook_z" for l in range(n)]
    _, clean_cache = model.run_with_cache(clean, names_filter=names, return_type=None)
    _, corrupt_cache = model.run_with_cache(corrupt, names_filter=names, return_type=None, incl_bwd=True,
                                            metric=metrics.logit_diff(correct, incorrect))
    resid = torch.stack([((clean_cache[f"blocks.{l}.hook_resid_pre"] - corrupt_cache[f"blocks.{l}.hook_resid_pre"])
                          * corrupt_cache[f"blocks.{l}.hook_resid_pre_grad"]).sum(dim=(0, 2)) for l in range(n)])
    heads = torch.stack([((clean_cache[f"blocks.{l}.attn.hook_z"] - corrupt_cache[f"blocks.{l}.attn.hook_z"])
                          * corrupt_cache[f"blocks.{l}.attn.hook_z_grad"]).sum(dim=(0, 1, 3)) for l in range(n)])
    return resid, heads


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=os.environ.get("REMOTELENS_ADDRESS"))
    parser.add_argument("--api_key", default=None)
    args = parser.parse_args(argv)
    if not args.address:
        parser.error("no server: pass --address or set REMOTELENS_ADDRESS")
    model = HookedTransformer.from_server(args.address, api_key=args.api_key)
    # An IOI-style pair of equal length: only the repeated name differs. The first pair of names
    # that tokenizes to the same length is used (tokenizers split names differently).
    template = "When {a} and {b} went to the store, {c} gave a drink to"
    for a, b in [("Mary", "John"), ("Anna", "Bob"), ("A", "B")]:
        clean = model.to_tokens(template.format(a=a, b=b, c=b))
        corrupt = model.to_tokens(template.format(a=a, b=b, c=a))
        if clean.shape == corrupt.shape:
            break
    else:
        raise SystemExit("no pair of names tokenizes to prompts of the same length")
    differ = (clean != corrupt).nonzero()[0, 1]
    # The clean answer is the name not repeated (a); the corrupt prompt points at b.
    correct, incorrect = int(corrupt[0, differ]), int(clean[0, differ])
    print(f"clean: {template.format(a=a, b=b, c=b)!r}; metric: logit[{correct}] - logit[{incorrect}]")
    resid, heads = attribution_patching(model, clean, corrupt, [correct], [incorrect])
    print(f"resid_pre attribution per layer (summed over positions): "
          f"{[round(float(v), 4) for v in resid.sum(-1)]}")
    top = torch.topk(heads.flatten().abs(), k=min(3, heads.numel()))
    print("largest head attributions: " + ", ".join(
        f"L{int(i) // heads.shape[1]}H{int(i) % heads.shape[1]} {float(heads.flatten()[i]):+.4f}"
        for i in top.indices))
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
