#!/usr/bin/python3
"""Interpretability workloads as users run them: nnbench's comparison cells and interp-engine's
capture cells, driven through the Python client over loopback against a server process.

Cells (layer numbers scale with the model: nnbench's 28-layer rows use 7, 14 and 21, i.e. L/4,
L/2 and 3L/4):
  logit_lens          every layer's resid_post at the last token, full logits (server-side lens)
  logit_lens_top10    the same as top-10 ids and logits (the small answer)
  steering            alpha 6 toward " Rome" (a unit W_U column) at L/4 and L/2, and alpha 0.1
                      and 0.5 at L/2, scaled by the mean residual norm and by each token's norm;
                      read the next-token logits
  gen_steering        alpha 6 and 0.5 at L/2 at every step of an 8-token greedy generation
  activation_patching clean resid_post into the corrupt run at L/4 and 3L/4, all positions and
                      the last position (IOI-style pairs of equal length), as two calls (store
                      the clean activation on the server, then patch from it: nnbench's
                      two-trace recipe) and as one call (the pair as one batch, ops.copy_row)
  ablation            zero hook_mlp_out / hook_attn_out at layer 1
  attention_pattern   the last query row of every head and layer
  attribution patching: per-layer resid_pre attributions from a clean forward and a corrupt
      forward + backward of the logit difference (gradients on the server, issue 9)
  capture_mid / capture_all / capture_gen32 / lens_top10_all_rows: interp-engine's capture cells
                      (the middle layer's resid_post, every layer's, the middle layer's at every
                      step of a 32-token generation, top-10 lens over every position and layer)

Timing (as nnbench): warm-ups, then the median of repeated single-prompt calls, each cell
interleaved with its baseline so that load on the machine lands on both alike. The baseline is a
plain forward of the same tokens in the same run (`model(tokens, return_type=None)`: one round
trip, nothing returned), or a plain greedy generation of the same length for the generation
cells. Correctness: each cell against the independent float32 reference (tests/reference) on the
same weights, over every prompt: top-1 agreement and total variation of the next-token (or
lens, or attention) distributions; for writes, nnbench's effect-size guard on the reference
(the write must flip the top-1 or move TV past 0.2, else the match is vacuous: "weak").

Usage:
  bazel build //server:remotelens_server //tools:make_demo_model //tools:make_checkpoint
  /usr/bin/python3 bench/interp_bench.py                     # the demo model
  bazel-bin/tools/make_checkpoint --preset 100m --dtype float32 --shards 1 --out /tmp/m100
  /usr/bin/python3 bench/interp_bench.py --model_dir /tmp/m100 --iters 15
  # on a GPU host, an 8B-shaped checkpoint (timing only: the float32 reference is too slow there)
  bazel-bin/tools/make_checkpoint --preset llama3.1-8b --out /tmp/llama8b
  /usr/bin/python3 bench/interp_bench.py --model_dir /tmp/llama8b --no_check \\
      --server_config 'devices: "cuda:0" dtype: "bfloat16"'
"""

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "clients", "python"))

import torch  # noqa: E402

import server_harness  # noqa: E402
from remotelens import HookedTransformer, metrics, ops, readouts  # noqa: E402
from tests.reference.llama_reference import LlamaReference  # noqa: E402

# nnbench-style prompts: counterfact-like facts, each cut (a prefix, BOS included) to about its
# length under the Llama 3 tokenizer (4-13 tokens), since the demo tokenizers split words finer;
# and IOI-style clean/corrupt pairs that differ at one token (the corrupt prompt is the clean
# one with the first token where the two texts' tokenizations differ swapped in).
PROMPTS = [
    ("The Eiffel Tower is in the city of", 11),
    ("The capital of Japan is the city of", 9),
    ("Water is composed of hydrogen and", 7),
    ("The opposite of hot is", 6),
    ("Barack Obama was born in the state of", 9),
    ("The Colosseum is located in", 8),
    ("Paris is in", 4),
    ("When Mary and John went to the store, John gave a drink to", 13),
]
PAIRS = [
    ("France has its capital in the city of", "Russia has its capital in the city of", 9),
    ("When Mary and John went to the store, John gave a drink to",
     "When Alice and John went to the store, John gave a drink to", 13),
    ("Tom and Lisa met at the park, and Lisa handed a ball to",
     "Sam and Lisa met at the park, and Lisa handed a ball to", 12),
]
STEER_TARGET, STEER_ALPHA = " Rome", 6.0
GEN_STEPS, CAPTURE_GEN_STEPS = 8, 32


def softmax_tv(ref_logits: torch.Tensor, got_logits: torch.Tensor) -> float:
    """Mean total variation between the softmax distributions of matching rows (last dim)."""
    p, q = ref_logits.float().softmax(-1), got_logits.float().softmax(-1)
    return float(0.5 * (p - q).abs().sum(-1).mean())


def top1(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float((ref.float().argmax(-1) == got.float().argmax(-1)).float().mean())


@dataclass
class Cell:
    name: str
    params: str
    call: Optional[Callable[[int], object]]   # one timed client call for prompt i
    check: Optional[Callable[[], dict]]       # correctness over every prompt
    baseline: str = "forward"                 # "forward" or "gen{N}"
    note: str = ""
    result: dict = field(default_factory=dict)


class Bench:
    def __init__(self, model: HookedTransformer, reference: LlamaReference, n_prompts: int):
        self.model, self.ref = model, reference
        self.n_layers = model.cfg.n_layers
        n = self.n_layers
        self.q1, self.half, self.q3 = max(n // 4, 1), n // 2, min(3 * n // 4, n - 2)
        self.resid = [f"blocks.{l}.hook_resid_post" for l in range(n)]
        self.final = self.resid[-1]
        self.tokens = [model.to_tokens(text)[:, :length] for text, length in PROMPTS[:n_prompts]]
        self.pairs = []
        for clean_text, corrupt_text, length in PAIRS[:max(1, min(len(PAIRS), n_prompts))]:
            clean, other = model.to_tokens(clean_text), model.to_tokens(corrupt_text)
            differ = (clean[0, :other.shape[1]] != other[0, :clean.shape[1]]).nonzero()
            if len(differ) == 0 or int(differ[0]) >= length:
                raise RuntimeError(f"{clean_text!r} and {corrupt_text!r} do not differ in their "
                                   f"first {length} tokens under this tokenizer")
            corrupt = clean.clone()
            corrupt[0, int(differ[0])] = other[0, int(differ[0])]
            self.pairs.append((clean[:, :length], corrupt[:, :length]))
        target = model.to_tokens(STEER_TARGET, prepend_bos=False)[0, -1].item()
        # The unembedding row of the target (nnbench: the head's weight row), unit length.
        if reference is not None:
            direction = reference.W_U[target].float()
        else:
            direction = model.get_weight("W_U")[:, target].float()  # unfolded, as the checkpoint's
        self.direction = direction / direction.norm()

    # ------------------------------------------------------------------ reference helpers

    def ref_next(self, tokens, ops_=None, tensors=None) -> torch.Tensor:
        logits, _ = self.ref.forward(tokens, ops=ops_, hook_tensors=tensors, collect=False)
        return logits[:, -1]  # [batch, d_vocab]

    def next_logits(self, tokens, fwd_hooks=()) -> torch.Tensor:
        """One call: the next-token logits, read on the server at the final residual."""
        _, (out,) = self.model.run_with_readouts(
            tokens, readouts=[readouts.lens(self.final, pos=-1)], fwd_hooks=fwd_hooks, return_type=None)
        return out[0, :, 0]  # [batch, d_vocab]

    def write_check(self, cases: Sequence[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict:
        """cases: (server result, reference result, reference without the write), per prompt."""
        got = torch.cat([c[0] for c in cases])
        want = torch.cat([c[1] for c in cases])
        base = torch.cat([c[2] for c in cases])
        effect_top1, effect_tv = top1(base, want), softmax_tv(base, want)
        return {"top1": top1(want, got), "tv": softmax_tv(want, got),
                "effect": f"{effect_tv:.3f} ({'strong' if effect_top1 < 0.5 or effect_tv > 0.2 else 'weak'})",
                "effect_tv": effect_tv, "effect_strong": effect_top1 < 0.5 or effect_tv > 0.2}

    def patch_check(self, call, hook: str, pos) -> dict:
        """Activation patching's correctness: `call(i)` against the reference's corrupt run with
        the clean activation at `hook` (every position, or `pos`) set in, for every pair."""
        cases = []
        for i, (clean, corrupt) in enumerate(self.pairs):
            _, cache = self.ref.forward(clean)
            value = cache[hook] if pos is None else cache[hook][:, [pos]]
            op = [{"hook": hook, "op": "set", "tensor": "v"}]
            if pos is not None:
                op[0]["positions"] = [pos]
            cases.append((call(i), self.ref_next(corrupt, op, {"v": value}), self.ref_next(corrupt)))
        return self.write_check(cases)

    # ------------------------------------------------------------------ cells

    def cells(self) -> List[Cell]:
        m, n = self.model, self.n_layers
        P = len(self.tokens)
        tok = lambda i: self.tokens[i % P]  # noqa: E731
        out: List[Cell] = []

        # logit lens, every layer, last token
        def lens_call(i, k=0):
            return m.run_with_readouts(tok(i), readouts=[readouts.lens(self.resid, pos=-1, top_k=k)],
                                       return_type=None)[1][0]

        def lens_check(k=0):
            tops, tvs, diffs = [], [], []
            for i, t in enumerate(self.tokens):
                got = lens_call(i, k)
                _, cache = self.ref.forward(t)
                want = torch.stack([self.ref.lens(cache[name][:, -1]) for name in self.resid])
                if k:
                    tops.append(float((got.indices[:, :, 0, 0] == want.argmax(-1)).float().mean()))
                    diffs.append(float((want.topk(k, -1).values - got.values[:, :, 0]).abs().max()))
                else:
                    tops.append(top1(want, got[:, :, 0]))
                    tvs.append(softmax_tv(want, got[:, :, 0]))
            r = {"top1": statistics.mean(tops)}
            if tvs:
                r["tv"] = statistics.mean(tvs)
            if diffs:
                r["max_abs"] = max(diffs)
            return r

        out.append(Cell("logit_lens", f"all {n} layers, last token, full logits",
                        lambda i: lens_call(i), lambda: lens_check()))
        out.append(Cell("logit_lens_top10", f"all {n} layers, last token, top-10",
                        lambda i: lens_call(i, 10), lambda: lens_check(10)))

        # steering
        # alpha 6 saturates a trained model's output; nnbench adds weaker rows that stay graded.
        for layer, alpha in ((self.q1, STEER_ALPHA), (self.half, STEER_ALPHA), (self.half, 0.1),
                             (self.half, 0.5)):
            for scale_by in ("mean_norm", "token_norm"):
                hook = f"blocks.{layer}.hook_resid_post"
                vec = alpha * self.direction

                def steer_call(i, hook=hook, vec=vec, scale_by=scale_by):
                    return self.next_logits(tok(i), [(hook, ops.add(vec, scale_by=scale_by))])

                def steer_check(hook=hook, vec=vec, scale_by=scale_by):
                    op = [{"hook": hook, "op": "add", "tensor": "v", "scale_by": scale_by}]
                    return self.write_check([
                        (self.next_logits(t, [(hook, ops.add(vec, scale_by=scale_by))]),
                         self.ref_next(t, op, {"v": vec}), self.ref_next(t)) for t in self.tokens])

                out.append(Cell("steering", f"layer {layer}, alpha {alpha:g} x {scale_by}",
                                steer_call, steer_check))

        # steering at every step of an 8-token greedy generation
        for alpha, scale_by in ((STEER_ALPHA, "mean_norm"), (STEER_ALPHA, "token_norm"),
                                (0.5, "mean_norm"), (0.5, "token_norm")):
            hook = f"blocks.{self.half}.hook_resid_post"
            vec = alpha * self.direction

            def gen_call(i, hook=hook, vec=vec, scale_by=scale_by):
                with m.hooks([(hook, ops.add(vec, scale_by=scale_by))]):
                    return m.generate(tok(i), max_new_tokens=GEN_STEPS, do_sample=False,
                                      stop_at_eos=False, verbose=False)

            def gen_check(hook=hook, vec=vec, scale_by=scale_by, gen_call=gen_call):
                agree, moved = [], []
                for i, t in enumerate(self.tokens):
                    got = gen_call(i)
                    want = self.ref_generate(t, GEN_STEPS, hook, vec, scale_by)
                    plain = self.ref_generate(t, GEN_STEPS, None, None, None)
                    agree.append(float((got[0, t.shape[1]:] == want[0, t.shape[1]:]).float().mean()))
                    moved.append(float((plain[0, t.shape[1]:] != want[0, t.shape[1]:]).float().mean()))
                effect = statistics.mean(moved)
                return {"top1": statistics.mean(agree),
                        "effect": f"{effect:.2f} of tokens changed ({'strong' if effect >= 0.5 else 'weak'})",
                        "effect_strong": effect >= 0.5, "effect_tv": effect}

            out.append(Cell("gen_steering", f"layer {self.half}, alpha {alpha:g} x {scale_by}, "
                            f"every step of {GEN_STEPS} greedy tokens", gen_call, gen_check,
                            baseline=f"gen{GEN_STEPS}",
                            note="top-1 column: generated tokens identical to the reference's"))

        # activation patching (two calls: store the clean activation, patch from it)
        for layer in (self.q1, self.q3):
            for where in ("all", "last"):
                hook = f"blocks.{layer}.hook_resid_post"
                pos = None if where == "all" else -1

                def patch_call(i, hook=hook, pos=pos):
                    clean, corrupt = self.pairs[i % len(self.pairs)]
                    _, cache = m.run_with_cache(clean, names_filter=hook, store=True, download=False,
                                                return_type=None)
                    return self.next_logits(corrupt, [(hook, ops.patch_from(cache, pos=pos))])

                def patch_check(hook=hook, pos=pos, patch_call=patch_call):
                    return self.patch_check(patch_call, hook, pos)

                out.append(Cell("activation_patching", f"layer {layer}, {where} positions",
                                patch_call, patch_check,
                                note="2 calls: store clean, patch corrupt"))

                def batch_call(i, hook=hook, pos=pos):
                    clean, corrupt = self.pairs[i % len(self.pairs)]
                    both = torch.cat([clean, corrupt])
                    return self.next_logits(both, [(hook, ops.copy_row(0, pos=pos))])[1:]

                def batch_check(hook=hook, pos=pos, batch_call=batch_call):
                    return self.patch_check(batch_call, hook, pos)

                out.append(Cell("activation_patching", f"layer {layer}, {where} positions, one call",
                                batch_call, batch_check,
                                note="1 call: batch [clean; corrupt], ops.copy_row(0)"))

        # zero ablation at layer 1
        for target, hook in (("mlp", "blocks.1.hook_mlp_out"), ("attn", "blocks.1.hook_attn_out")):
            def ablate_call(i, hook=hook):
                return self.next_logits(tok(i), [(hook, ops.zero())])

            def ablate_check(hook=hook):
                op = [{"hook": hook, "op": "zero"}]
                return self.write_check([(self.next_logits(t, [(hook, ops.zero())]),
                                          self.ref_next(t, op), self.ref_next(t)) for t in self.tokens])

            out.append(Cell("ablation", f"zero {target} output at layer 1", ablate_call, ablate_check))

        # attention pattern: last query row, every head and layer
        patterns = [f"blocks.{l}.attn.hook_pattern" for l in range(n)]

        def pattern_call(i):
            _, cache = m.run_with_cache(tok(i), names_filter=patterns, pos_slice=-1, return_type=None,
                                        return_cache_object=False)
            return cache

        def pattern_check():
            tops, tvs = [], []
            for i, t in enumerate(self.tokens):
                got = pattern_call(i)
                _, cache = self.ref.forward(t)
                for name in patterns:
                    want = cache[name][:, :, -1]  # [batch, heads, key_pos]
                    g = got[name].reshape(want.shape)
                    tops.append(float((want.argmax(-1) == g.argmax(-1)).float().mean()))
                    tvs.append(float(0.5 * (want - g).abs().sum(-1).mean()))
            return {"top1": statistics.mean(tops), "tv": statistics.mean(tvs)}

        out.append(Cell("attention_pattern", f"last query row, every head of {n} layers",
                        pattern_call, pattern_check,
                        note="TV between attention distributions"))

        # attribution patching: per-layer resid_pre (clean - corrupt) . d(logit diff)/d(resid_pre)
        # at the corrupt run, from one clean forward and one corrupt forward + backward.
        resid_pre = [f"blocks.{l}.hook_resid_pre" for l in range(n)]

        def answer_ids(i):
            """The clean and corrupt top-1 next tokens (distinct), the metric's two ids."""
            clean, corrupt = self.pairs[i % len(self.pairs)]
            both = self.next_logits(torch.cat([clean, corrupt]))
            correct = int(both[0].argmax())
            ranked = both[1].argsort(descending=True)
            incorrect = int(ranked[0]) if int(ranked[0]) != correct else int(ranked[1])
            return correct, incorrect

        answers = {}

        def attribution_call(i):
            clean, corrupt = self.pairs[i % len(self.pairs)]
            if i % len(self.pairs) not in answers:
                answers[i % len(self.pairs)] = answer_ids(i)
            correct, incorrect = answers[i % len(self.pairs)]
            _, clean_cache = m.run_with_cache(clean, names_filter=resid_pre, return_type=None,
                                              return_cache_object=False)
            _, corrupt_cache = m.run_with_cache(corrupt, names_filter=resid_pre, return_type=None,
                                                incl_bwd=True, return_cache_object=False,
                                                metric=metrics.logit_diff(correct, incorrect))
            return torch.stack([((clean_cache[h] - corrupt_cache[h]) * corrupt_cache[f"{h}_grad"]).sum()
                                for h in resid_pre])  # [n_layers]

        def attribution_check():
            tops, errors = [], []
            for i, (clean, corrupt) in enumerate(self.pairs):
                got = attribution_call(i)
                correct, incorrect = answers[i]
                want = self.ref_attribution(clean, corrupt, correct, incorrect, resid_pre)
                tops.append(float(int(got.abs().argmax()) == int(want.abs().argmax())))
                errors.append(float((got - want).abs().max() / want.abs().max().clamp_min(1e-12)))
            return {"top1": statistics.mean(tops), "tv": max(errors)}

        out.append(Cell("attribution_patching", f"per-layer resid_pre (clean - corrupt) x grad, {n} layers",
                        attribution_call, attribution_check,
                        note="2 calls: clean cache; corrupt forward + backward of the logit difference "
                             "on the server. top-1: same layer attributed most; TV column: max "
                             "relative error vs the reference's autograd"))

        # interp-engine's capture cells
        def capture_call(i, names):
            _, cache = m.run_with_cache(tok(i), names_filter=names, return_type=None,
                                        return_cache_object=False)
            return cache

        def capture_check(names):
            worst = 0.0
            for i, t in enumerate(self.tokens):
                got = capture_call(i, names)
                _, cache = self.ref.forward(t)
                worst = max(worst, max(float((got[k] - cache[k]).abs().max()) for k in names))
            return {"max_abs": worst}

        mid = [self.resid[self.half]]
        out.append(Cell("capture_mid", f"{mid[0]}", lambda i: capture_call(i, mid),
                        lambda: capture_check(mid)))
        out.append(Cell("capture_all", f"resid_post of all {n} layers",
                        lambda i: capture_call(i, self.resid), lambda: capture_check(self.resid)))

        def gen_capture_call(i):
            return m.generate_with_cache(tok(i), max_new_tokens=CAPTURE_GEN_STEPS, names_filter=mid[0])

        def gen_capture_check():
            agree, worst = [], 0.0
            for i, t in enumerate(self.tokens):
                seq, steps = gen_capture_call(i)
                want = self.ref_generate(t, CAPTURE_GEN_STEPS, None, None, None)
                agree.append(float((seq == want).float().mean()))
                _, cache = self.ref.forward(seq[:, :-1])
                got = torch.cat([s[mid[0]] for s in steps], dim=1)
                worst = max(worst, float((got - cache[mid[0]]).abs().max()))
            return {"top1": statistics.mean(agree), "max_abs": worst}

        out.append(Cell("capture_gen32", f"{mid[0]} at every step of {CAPTURE_GEN_STEPS} greedy tokens",
                        gen_capture_call, gen_capture_check, baseline=f"gen{CAPTURE_GEN_STEPS}",
                        note="top-1 column: generated tokens identical to the reference's"))

        def lens_rows_call(i):
            return m.run_with_readouts(tok(i), readouts=[readouts.lens(self.resid, top_k=10)],
                                       return_type=None)[1][0]

        def lens_rows_check():
            tops, diffs = [], []
            for i, t in enumerate(self.tokens):
                got = lens_rows_call(i)
                _, cache = self.ref.forward(t)
                want = torch.stack([self.ref.lens(cache[name]) for name in self.resid])
                tops.append(float((got.indices[..., 0] == want.argmax(-1)).float().mean()))
                diffs.append(float((want.topk(10, -1).values - got.values).abs().max()))
            return {"top1": statistics.mean(tops), "max_abs": max(diffs)}

        out.append(Cell("lens_top10_all_rows", f"top-10 lens, every position of {n} layers",
                        lens_rows_call, lens_rows_check))
        return out

    def ref_attribution(self, clean, corrupt, correct, incorrect, names) -> torch.Tensor:
        """Attribution patching on the reference: (clean - corrupt) . grad per hook, with torch's
        autograd through the reference (a zero tensor requiring grad added at hook_embed)."""
        _, clean_cache = self.ref.forward(clean)
        anchor = torch.zeros(*corrupt.shape, self.ref.config.d_model, requires_grad=True)
        logits, cache = self.ref.forward(corrupt, ops=[{"hook": "hook_embed", "op": "add", "tensor": "a"}],
                                         hook_tensors={"a": anchor})
        metric = (logits[:, -1, correct] - logits[:, -1, incorrect]).mean()
        grads = torch.autograd.grad(metric, [cache[h] for h in names])
        return torch.stack([((clean_cache[h] - cache[h].detach()) * g).sum() for h, g in zip(names, grads)])

    def ref_generate(self, tokens, steps, hook, vec, scale_by) -> torch.Tensor:
        """Greedy reference generation with the server's steering semantics: with the KV cache
        the prompt's forward averages norms over the prompt, each later step's over its one
        position (so mean_norm is each new token's own norm there)."""
        seq = tokens.clone()
        n_prompt = tokens.shape[1]
        for _ in range(steps):
            ops_, tensors = None, None
            if hook is not None:
                _, cache = self.ref.forward(seq)
                norms = cache[hook].norm(dim=-1, keepdim=True)  # [1, pos, 1], before the write
                if scale_by == "mean_norm":
                    norms = torch.cat([norms[:, :n_prompt].mean(dim=1, keepdim=True).expand(-1, n_prompt, -1),
                                       norms[:, n_prompt:]], dim=1)
                ops_, tensors = [{"hook": hook, "op": "add", "tensor": "v"}], {"v": vec * norms}
            logits, _ = self.ref.forward(seq, ops=ops_, hook_tensors=tensors, collect=False)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return seq


def time_cells(bench: Bench, cells: List[Cell], iters: int, warmup: int) -> None:
    m = bench.model
    P = len(bench.tokens)
    baselines = {
        "forward": lambda i: m(bench.tokens[i % P], return_type=None),
        f"gen{GEN_STEPS}": lambda i: m.generate(bench.tokens[i % P], max_new_tokens=GEN_STEPS,
                                                do_sample=False, stop_at_eos=False, verbose=False),
        f"gen{CAPTURE_GEN_STEPS}": lambda i: m.generate(bench.tokens[i % P], max_new_tokens=CAPTURE_GEN_STEPS,
                                                        do_sample=False, stop_at_eos=False, verbose=False),
    }
    for cell in cells:
        if cell.call is None:
            continue
        base = baselines[cell.baseline]
        for i in range(warmup):
            base(i)
            cell.call(i)
        t_cell, t_base = [], []
        for i in range(iters):
            start = time.perf_counter()
            base(i)
            t_base.append((time.perf_counter() - start) * 1e3)
            start = time.perf_counter()
            cell.call(i)
            t_cell.append((time.perf_counter() - start) * 1e3)
        cell.result["ms"] = statistics.median(t_cell)
        cell.result["base_ms"] = statistics.median(t_base)
        cell.result["overhead"] = cell.result["ms"] / cell.result["base_ms"]


def run(model: HookedTransformer, reference: LlamaReference, iters: int = 15, warmup: int = 3,
        n_prompts: int = len(PROMPTS), timing: bool = True, only: Sequence[str] = (),
        check: bool = True) -> List[Cell]:
    """Runs every cell (or those named in `only`): correctness (unless not `check`), then timing
    when `timing`."""
    bench = Bench(model, reference, n_prompts)
    cells = [c for c in bench.cells() if not only or c.name in only]
    for cell in cells:
        if check and cell.check is not None:
            cell.result.update(cell.check())
    if timing:
        time_cells(bench, cells, iters, warmup)
    return cells


def fmt(value, spec=".3f") -> str:
    return "-" if value is None else format(value, spec)


def table(cells: List[Cell]) -> str:
    lines = ["| cell | parameters | median ms | baseline ms | overhead | top-1 | TV | write effect (ref TV) | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        r = c.result
        note = c.note
        if "max_abs" in r:
            note = (note + "; " if note else "") + f"max abs diff {r['max_abs']:.1e}"
        if c.call is None:
            lines.append(f"| {c.name} | {c.params} | - | - | - | - | - | - | {note} |")
            continue
        base = "plain forward" if c.baseline == "forward" else f"plain {c.baseline[3:]}-token generation"
        lines.append(f"| {c.name} | {c.params} | {fmt(r.get('ms'), '.2f')} | {fmt(r.get('base_ms'), '.2f')} ({base}) "
                     f"| {fmt(r.get('overhead'), '.2f')}x | {fmt(r.get('top1'), '.2f')} | {fmt(r.get('tv'), '.1e')} "
                     f"| {r.get('effect', '-')} | {note} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_dir", default=None,
                    help="a checkpoint directory (e.g. make_checkpoint's); default: the demo model, made here")
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--cells", default="", help="comma-separated cell names (default: all)")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    ap.add_argument("--no_check", action="store_true",
                    help="timing only: skip the float32 reference (for models too big to check on "
                         "the CPU, e.g. an 8B-shaped checkpoint on a GPU server)")
    ap.add_argument("--server_config", default="",
                    help='extra ServerConfig textproto lines, e.g. \'devices: "cuda:0" dtype: "bfloat16"\'')
    args = ap.parse_args()
    model_dir = args.model_dir
    if model_dir is None:
        model_dir = os.path.join(os.environ.get("TMPDIR", "/tmp"), "remotelens_bench_models", "demo")
        os.makedirs(model_dir, exist_ok=True)
        server_harness.make_demo_model(model_dir)
    reference = None if args.no_check else LlamaReference.from_pretrained(model_dir)
    server = server_harness.ServerProcess(model_dir, config=args.server_config, startup_timeout=600).start()
    try:
        model = HookedTransformer.from_server(server.address)
        cells = run(model, reference, args.iters, args.warmup, args.prompts,
                    only=[c for c in args.cells.split(",") if c], check=not args.no_check)
        cfg = model.cfg
        model.close()
    finally:
        server.stop()
    report = (f"{cfg.model_name}: {cfg.n_layers} layers, d_model {cfg.d_model}, d_vocab {cfg.d_vocab}; "
              f"{args.prompts} prompts of {min(n for _, n in PROMPTS[:args.prompts])}-{max(n for _, n in PROMPTS[:args.prompts])} tokens; median of {args.iters} "
              f"after {args.warmup} warm-ups\n\n" + table(cells))
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
