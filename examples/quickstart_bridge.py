#!/usr/bin/python3
"""remotelens with TransformerLens 4 names: a TransformerBridge notebook against a remotelens server.

    python3 examples/quickstart_bridge.py --address 127.0.0.1:50051 [--api_key KEY]

TransformerLens 4 replaced HookedTransformer with TransformerBridge, whose hook points are named
after the model's modules (blocks.{i}.hook_out, blocks.{i}.attn.o.hook_in, ...). The same server
hook points answer to both schemes; enable_compatibility_mode() adds the 3.x names.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "clients", "python"))

import torch  # noqa: E402

from remotelens import TransformerBridge, ops  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=os.environ.get("REMOTELENS_ADDRESS"))
    parser.add_argument("--api_key", default=None)
    args = parser.parse_args(argv)
    if not args.address:
        parser.error("no server: pass --address or set REMOTELENS_ADDRESS")

    # 1. Connect: TransformerBridge.boot_transformers(...) becomes from_server(...).
    model = TransformerBridge.from_server(args.address, api_key=args.api_key)
    print(f"connected to {model.cfg.model_name} with TransformerLens 4 names")

    # 2. Cache by architecture-native names.
    tokens = model.to_tokens("The cat sat on the mat.")
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_out"))
    last = model.cfg.n_layers - 1
    print(f"cache['blocks.{last}.hook_out']: {tuple(cache[f'blocks.{last}.hook_out'].shape)}")

    # 3. Ablate one head where the output projection reads it (TL3: attn.hook_z).
    ablated = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.o.hook_in", ops.zero(head=0))])
    print(f"ablating head 0.0 changes the logits by {float((ablated - logits).abs().max()):.4f}")

    # 4. The 3.x names as aliases of the same hook points.
    model.enable_compatibility_mode()
    _, cache3 = model.run_with_cache(tokens, names_filter=f"blocks.{last}.hook_resid_post")
    same = torch.allclose(cache3[f"blocks.{last}.hook_resid_post"], cache[f"blocks.{last}.hook_out"], atol=1e-5)
    print(f"hook_resid_post equals hook_out: {same}")
    model.close()
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
