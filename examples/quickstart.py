#!/usr/bin/python3
"""remotelens quickstart: a TransformerLens workflow against a running remotelens server.

    bazel-bin/server/remotelens_server --config configs/demo.textproto &     # or any server
    python3 examples/quickstart.py --address 127.0.0.1:50051 [--api_key KEY]

The address defaults to $REMOTELENS_ADDRESS and the key to $REMOTELENS_API_KEY. Nothing is
started here. Without an installed package, the client is imported from clients/python.
"""

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "clients", "python"))

from remotelens import HookedTransformer, ops  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=os.environ.get("REMOTELENS_ADDRESS"),
                        help="host:port of the server (default $REMOTELENS_ADDRESS)")
    parser.add_argument("--api_key", default=None, help="default $REMOTELENS_API_KEY")
    parser.add_argument("--root_certificates", default=None, help="CA PEM file, for TLS")
    args = parser.parse_args(argv)
    if not args.address:
        parser.error("no server: pass --address or set REMOTELENS_ADDRESS")

    # 1. Connect: the only line that differs from a TransformerLens notebook.
    model = HookedTransformer.from_server(args.address, api_key=args.api_key,
                                          root_certificates=args.root_certificates)
    print(f"connected to {model.cfg.model_name}: {model.cfg.n_layers} layers, d_model "
          f"{model.cfg.d_model}, {model.cfg.n_heads} heads ({model.cfg.n_key_value_heads} kv)")

    # 2. Run with cache and index it the TransformerLens way.
    prompt = "The cat sat on the mat."
    tokens = model.to_tokens(prompt)
    logits, cache = model.run_with_cache(tokens)
    print("tokens:", model.to_str_tokens(prompt))
    print("cache['resid_post', 1]:", tuple(cache["resid_post", 1].shape),
          "pattern of layer 0:", tuple(cache["pattern", 0].shape))
    next_token = logits[0, -1].argmax().item()
    print("most likely next token:", repr(model.to_string([next_token])))

    # 3. Ablate head 2 of layer 1: a Python hook (called back over the network) and the same
    #    operation declared with remotelens.ops (run on the server) agree.
    def ablate_head(z, hook, head):
        z[:, :, head] = 0.0

    loss = model(tokens, return_type="loss").item()
    by_python = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[
        ("blocks.1.attn.hook_z", functools.partial(ablate_head, head=2))]).item()
    by_server = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[
        ("blocks.1.attn.hook_z", ops.zero(head=2))]).item()
    print(f"loss {loss:.4f}; ablating L1H2: python hook {by_python:.4f}, server op {by_server:.4f}")
    assert abs(by_python - by_server) < 1e-4

    # 4. Activation patching: keep the clean cache on the server and patch it into a corrupted run.
    corrupt = model.to_tokens("The dog sat on the mat.")
    _, clean_cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("resid_pre"),
                                          store=True)
    answer = tokens[0, -1]
    clean_logit = logits[0, -2, answer].item()
    effects = []
    for layer in range(model.cfg.n_layers):
        patched = model.run_with_hooks(corrupt, fwd_hooks=[
            (f"blocks.{layer}.hook_resid_pre", ops.patch_from(clean_cache, pos=2))])
        effects.append(round(patched[0, -2, answer].item() - clean_logit, 3))
    print("patching position 2 of resid_pre, logit change per layer:", effects)

    # 5. Logit lens: the accumulated residual stream, normalised and unembedded.
    resid, labels = cache.accumulated_resid(apply_ln=True, pos_slice=-1, return_labels=True)
    lens = resid[:, 0] @ model.W_U  # [layers + 1, d_vocab]
    ranks = (lens > lens[:, [next_token]]).sum(-1).tolist()
    print("logit lens rank of the final prediction:", dict(zip(labels, ranks)))

    # 6. Steered generation: add a vector to the residual stream at every step.
    steering = 4.0 * model.W_E[model.to_single_token(" the")]
    plain = model.generate(prompt, max_new_tokens=8, do_sample=False, verbose=False)
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", ops.add(steering))]):
        steered = model.generate(prompt, max_new_tokens=8, do_sample=False, verbose=False)
    print("generated:", repr(plain))
    print("steered:  ", repr(steered))
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
