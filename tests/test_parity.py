"""Golden parity: the C++ engine (remotelens_run) against the float32 Python reference.

Every value is compared with max |engine - reference| <= 1e-4 (absolute, rtol 0). Masked
attention scores must be -inf in both at the same places.

Run:  bazel build //tools:all && /usr/bin/python3 -m pytest -q tests/test_parity.py
Binaries come from $REMOTELENS_BIN_DIR (default <repo>/bazel-bin/tools); tests that need the
engine are skipped when remotelens_run is absent.
"""

import json
import os
import re
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.reference import safetensors_io  # noqa: E402
from tests.reference.llama_reference import ALL_FLAGS, LlamaReference, left_pad  # noqa: E402
from tests.reference.random_model import VARIANTS, write_random_model  # noqa: E402

ATOL = 1e-4
BIN_DIR = os.environ.get("REMOTELENS_BIN_DIR", os.path.join(REPO, "bazel-bin", "tools"))
RUN_BIN = os.path.join(BIN_DIR, "remotelens_run")
DEMO_BIN = os.path.join(BIN_DIR, "make_demo_model")
ENGINE_TIMEOUT_S = 300

_ATTN_SQUARE = ("attn.hook_attn_scores", "attn.hook_pattern")


# ------------------------------------------------------------------ helpers


def _require(binary: str) -> None:
    if not os.access(binary, os.X_OK):
        if os.environ.get("REMOTELENS_REQUIRE_BINARIES"):
            pytest.fail(f"{binary} not built (bazel build //tools:all)")
        pytest.skip(f"{binary} not built (bazel build //tools:all)")


def tokens_arg(rows: Sequence[Sequence[int]]) -> str:
    return ";".join(",".join(str(int(t)) for t in row) for row in rows)


class EngineRun:
    def __init__(self, proc: subprocess.CompletedProcess, outputs: Optional[Dict[str, torch.Tensor]]):
        self.proc = proc
        self.outputs = outputs

    @property
    def stderr(self) -> str:
        return self.proc.stderr


def run_engine(model_dir: str, rows, out_path: str, names: str = "all",
               ops: Optional[List[dict]] = None, hook_tensors: Optional[Dict[str, np.ndarray]] = None,
               stop_at_layer: Optional[int] = None, extra: Sequence[str] = (),
               expect_ok: bool = True) -> EngineRun:
    """Runs remotelens_run; with expect_ok, fails the test on a nonzero exit."""
    _require(RUN_BIN)
    tokens = rows if isinstance(rows, str) else tokens_arg(rows)
    cmd = [RUN_BIN, "--model_dir", model_dir, "--tokens", tokens, "--names", names,
           "--out", out_path, "--dtype", "float32", "--device", "cpu"]
    if ops is not None:
        spec_path = out_path + ".hooks.json"
        with open(spec_path, "w") as f:
            json.dump({"ops": ops}, f)
        cmd += ["--hooks", spec_path]
        if hook_tensors is not None:
            tensors_path = out_path + ".hook_tensors.safetensors"
            safetensors_io.write_safetensors(
                tensors_path, {k: np.asarray(v, dtype=np.float32) for k, v in hook_tensors.items()},
                dtype="F32")
            cmd += ["--hook_tensors", tensors_path]
    if stop_at_layer is not None:
        cmd += ["--stop_at_layer", str(stop_at_layer)]
    cmd += list(extra)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S)
    if not expect_ok:
        return EngineRun(proc, None)
    assert proc.returncode == 0, (f"remotelens_run failed (exit {proc.returncode}):\n"
                                  f"cmd: {' '.join(cmd)}\nstderr:\n{proc.stderr[-4000:]}")
    arrays = safetensors_io.read_safetensors(out_path)
    return EngineRun(proc, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})


def describe_diff(name: str, got: torch.Tensor, want: torch.Tensor, atol: float = ATOL) -> Optional[str]:
    """None when got matches want within atol (infinities must coincide); else a report line."""
    got = torch.as_tensor(got, dtype=torch.float32)
    want = torch.as_tensor(want, dtype=torch.float32)
    if tuple(got.shape) != tuple(want.shape):
        return f"{name}: shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    if got.numel() == 0:
        return None
    want_inf = torch.isinf(want)
    got_inf = torch.isinf(got)
    bad_inf = (want_inf != got_inf) | (want_inf & got_inf & (torch.sign(got) != torch.sign(want)))
    both_finite = ~want_inf & ~got_inf
    diff = torch.where(both_finite, (got - want).abs(), torch.zeros_like(got))
    diff = torch.where(torch.isnan(got) | torch.isnan(want), torch.full_like(diff, float("inf")), diff)
    bad = bad_inf | (diff > atol)
    if not bool(bad.any()):
        return None
    first = np.unravel_index(int(torch.nonzero(bad.flatten())[0]), tuple(got.shape))
    worst = np.unravel_index(int(torch.argmax(diff.flatten())), tuple(got.shape))
    first = tuple(int(i) for i in first)
    worst = tuple(int(i) for i in worst)
    return (f"{name}: max|diff| {float(diff.max()):.3g} at {worst} "
            f"(engine {float(got[worst]):.6g}, reference {float(want[worst]):.6g}); "
            f"{int(bad.sum())}/{bad.numel()} bad; first at {first} "
            f"(engine {float(got[first]):.6g}, reference {float(want[first]):.6g})"
            + ("; infinities differ" if bool(bad_inf.any()) else ""))


def assert_all_close(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor],
                     names: Sequence[str], what: str = "") -> None:
    problems = []
    for name in names:
        if name not in got:
            problems.append(f"{name}: missing from engine output")
            continue
        line = describe_diff(name, got[name], want[name])
        if line:
            problems.append(line)
    assert not problems, f"{what}: {len(problems)} tensors differ\n" + "\n".join(problems)


def reference_outputs(model: LlamaReference, rows=None, tokens=None, mask=None, **kw):
    if tokens is None:
        tokens = torch.tensor(rows, dtype=torch.int64)
    kw.setdefault("flags", ALL_FLAGS)  # names="all" runs every hook point, every flag's too
    if kw["flags"] is None:
        kw["flags"] = ALL_FLAGS
    logits, cache = model.forward(tokens, attention_mask=mask, **kw)
    cache = dict(cache)
    cache["logits"] = logits
    return cache


def random_rows(batch: int, n_pos: int, seed: int, vocab: int = 300) -> List[List[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, n_pos), generator=g).tolist()


def real_region(name: str, act: torch.Tensor, row: int, start: int) -> torch.Tensor:
    """Row `row` of act restricted to its real (non-pad) positions."""
    if name.endswith(_ATTN_SQUARE):
        return act[row, :, start:, start:]
    return act[row, start:]


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant_model(request, tmp_path_factory):
    """(variant name, model dir, reference) for each random checkpoint variant."""
    directory = str(tmp_path_factory.mktemp(request.param))
    write_random_model(directory, request.param)
    return request.param, directory, LlamaReference.from_pretrained(directory)


@pytest.fixture(scope="module")
def untied_model(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("untied_f32"))
    write_random_model(directory, "untied_f32")
    return directory, LlamaReference.from_pretrained(directory)


@pytest.fixture
def engine():
    _require(RUN_BIN)


# ------------------------------------------------------------------ 1, 8: every hook, long rows


def test_every_hook_and_logits_match(engine, variant_model, tmp_path):
    variant, model_dir, ref = variant_model
    n_pos = VARIANTS[variant]["seq_len"]  # longer than original_max_position_embeddings
    assert n_pos > ref.config.rope_scaling["original_max_position_embeddings"]
    rows = random_rows(2, n_pos, seed=1)
    run = run_engine(model_dir, rows, str(tmp_path / "out.safetensors"), names="all")
    want = reference_outputs(ref, rows)
    assert set(run.outputs) == set(want), (
        f"extra: {sorted(set(run.outputs) - set(want))}, missing: {sorted(set(want) - set(run.outputs))}")
    assert_all_close(run.outputs, want, ["logits"] + ref.hook_names, what=variant)


# ------------------------------------------------------------------ 2: left padding


def test_ragged_batch_left_padding(engine, variant_model, tmp_path):
    variant, model_dir, ref = variant_model
    lengths = (VARIANTS[variant]["seq_len"], 20, 5)
    rows = [random_rows(1, n, seed=20 + n)[0] for n in lengths]
    run = run_engine(model_dir, rows, str(tmp_path / "ragged.safetensors"), names="all")
    tokens, mask = left_pad(rows)
    assert "attention_mask" in run.outputs
    assert describe_diff("attention_mask", run.outputs["attention_mask"], mask.float()) is None
    want = reference_outputs(ref, tokens=tokens, mask=mask)
    n_pos = tokens.shape[1]
    names = ["logits"] + ref.hook_names
    problems = []
    for i, row in enumerate(rows):
        start = n_pos - len(row)
        alone_ref = reference_outputs(ref, [row])
        alone_run = run_engine(model_dir, [row], str(tmp_path / f"alone{i}.safetensors"), names="all")
        for name in names:
            got = real_region(name, run.outputs[name], i, start)
            for label, expected in (("reference batch", real_region(name, want[name], i, start)),
                                    ("reference alone", alone_ref[name][0]),
                                    ("engine alone", alone_run.outputs[name][0])):
                line = describe_diff(f"row {i} (start {start}) {name} vs {label}", got, expected)
                if line:
                    problems.append(line)
            if name.endswith(_ATTN_SQUARE) and start > 0:
                # Real queries must not see pad keys.
                pad_cols = run.outputs[name][i, :, start:, :start]
                expected = torch.full_like(pad_cols, float("-inf") if "scores" in name else 0.0)
                line = describe_diff(f"row {i} {name} pad keys", pad_cols, expected)
                if line:
                    problems.append(line)
    assert not problems, f"{len(problems)} differences\n" + "\n".join(problems)


def test_fast_path_logits_match(engine, variant_model, tmp_path):
    """Without attention hooks requested the engine may take its fused path; logits must not move."""
    variant, model_dir, ref = variant_model
    rows = [random_rows(1, VARIANTS[variant]["seq_len"], seed=30)[0], random_rows(1, 11, seed=31)[0]]
    run = run_engine(model_dir, rows, str(tmp_path / "fast.safetensors"), names="blocks.0.hook_resid_post")
    assert set(run.outputs) == {"logits", "blocks.0.hook_resid_post", "attention_mask"}
    tokens, mask = left_pad(rows)
    want = reference_outputs(ref, tokens=tokens, mask=mask)
    n_pos = tokens.shape[1]
    problems = []
    for i, row in enumerate(rows):
        start = n_pos - len(row)
        for name in ("logits", "blocks.0.hook_resid_post"):
            line = describe_diff(f"row {i} {name}", run.outputs[name][i, start:], want[name][i, start:])
            if line:
                problems.append(line)
    assert not problems, "\n".join(problems)


def test_ragged_batch_has_no_nan(engine, untied_model, tmp_path):
    model_dir, ref = untied_model
    rows = [random_rows(1, 12, seed=3)[0], random_rows(1, 4, seed=4)[0]]
    run = run_engine(model_dir, rows, str(tmp_path / "nan.safetensors"), names="all")
    with_nan = [k for k, v in run.outputs.items() if bool(torch.isnan(v).any())]
    assert not with_nan, f"NaN (at pad positions) in {with_nan}"


# ------------------------------------------------------------------ 3-6: interventions


def test_zero_ablate_head_of_z(engine, untied_model, tmp_path):
    model_dir, ref = untied_model
    rows = random_rows(2, 24, seed=5)
    ops = [{"hook": "blocks.1.attn.hook_z", "op": "zero", "heads": [1]}]
    clean = run_engine(model_dir, rows, str(tmp_path / "clean.safetensors"), names="blocks.1.attn.hook_z")
    run = run_engine(model_dir, rows, str(tmp_path / "ablated.safetensors"), names="all", ops=ops)
    want = reference_outputs(ref, rows, ops=ops)
    assert float(run.outputs["blocks.1.attn.hook_z"][:, :, 1].abs().max()) == 0.0
    assert float((run.outputs["logits"] - clean.outputs["logits"]).abs().max()) > 1e-3
    assert_all_close(run.outputs, want, ["logits"] + ref.hook_names, what="zero z head 1")


def test_patch_resid_pre_from_other_prompt(engine, untied_model, tmp_path):
    model_dir, ref = untied_model
    rows_a = random_rows(2, 16, seed=6)
    rows_b = random_rows(2, 16, seed=7)
    p = 9
    corrupted = run_engine(model_dir, rows_b, str(tmp_path / "b.safetensors"),
                           names="blocks.1.hook_resid_pre")
    patch = corrupted.outputs["blocks.1.hook_resid_pre"][:, p:p + 1].clone()  # [batch, 1, d_model]
    assert describe_diff("B resid_pre", corrupted.outputs["blocks.1.hook_resid_pre"],
                         reference_outputs(ref, rows_b)["blocks.1.hook_resid_pre"]) is None
    ops = [{"hook": "blocks.1.hook_resid_pre", "op": "set", "tensor": "patch", "positions": [p]}]
    run = run_engine(model_dir, rows_a, str(tmp_path / "patched.safetensors"), names="all",
                     ops=ops, hook_tensors={"patch": patch.numpy()})
    want = reference_outputs(ref, rows_a, ops=ops, hook_tensors={"patch": patch})
    assert torch.equal(run.outputs["blocks.1.hook_resid_pre"][:, p:p + 1], patch)
    clean_logits = reference_outputs(ref, rows_a)["logits"]
    assert float((want["logits"][:, p:] - clean_logits[:, p:]).abs().max()) > 1e-3
    assert float((want["logits"][:, :p] - clean_logits[:, :p]).abs().max()) == 0.0
    assert_all_close(run.outputs, want, ["logits"] + ref.hook_names, what="patch resid_pre")


def test_steering_vector_add(engine, untied_model, tmp_path):
    model_dir, ref = untied_model
    rows = random_rows(2, 20, seed=8)
    steer = torch.randn(ref.config.d_model, generator=torch.Generator().manual_seed(0))
    ops = [{"hook": "blocks.2.hook_resid_post", "op": "add", "tensor": "steer"}]
    run = run_engine(model_dir, rows, str(tmp_path / "steer.safetensors"),
                     names="blocks.2.hook_resid_post,ln_final.hook_normalized",
                     ops=ops, hook_tensors={"steer": steer.numpy()})
    want = reference_outputs(ref, rows, ops=ops, hook_tensors={"steer": steer})
    assert_all_close(run.outputs, want, ["logits", "blocks.2.hook_resid_post", "ln_final.hook_normalized"],
                     what="steering")


@pytest.mark.parametrize("case", ["scale", "mean", "pattern_head", "combined"])
def test_scale_mean_and_pattern_ops(engine, untied_model, tmp_path, case):
    model_dir, ref = untied_model
    rows = random_rows(3, 14, seed=9)
    ops = {
        "scale": [{"hook": "blocks.0.hook_mlp_out", "op": "scale", "factor": 0.5, "positions": [-1]}],
        "mean": [{"hook": "blocks.1.hook_resid_mid", "op": "mean"}],
        "pattern_head": [{"hook": "blocks.0.attn.hook_pattern", "op": "zero", "heads": [2]}],
        "combined": [
            {"hook": "blocks.0.attn.hook_v", "op": "scale", "factor": -2.0, "heads": [1], "positions": [0, 3]},
            {"hook": "blocks.1.attn.hook_attn_scores", "op": "scale", "factor": 0.25, "heads": [0, 3]},
            {"hook": "blocks.1.mlp.hook_post", "op": "mean", "positions": [2, -2]},
            {"hook": "blocks.2.attn.hook_pattern", "op": "zero", "heads": [1], "positions": [-1]},
            {"hook": "blocks.2.attn.hook_result", "op": "zero", "heads": [3]},
        ],
    }[case]
    run = run_engine(model_dir, rows, str(tmp_path / f"{case}.safetensors"), names="all", ops=ops)
    want = reference_outputs(ref, rows, ops=ops)
    clean = reference_outputs(ref, rows)
    assert float((want["logits"] - clean["logits"]).abs().max()) > 1e-3
    assert_all_close(run.outputs, want, ["logits"] + ref.hook_names, what=case)


# ------------------------------------------------------------------ opt-in hook points


@pytest.mark.parametrize("case", ["split_qkv", "attn_in", "mlp_in_and_unembed"])
def test_opt_in_hook_point_edits(engine, untied_model, tmp_path, case):
    """TransformerLens's use_split_qkv_input / use_attn_in / use_hook_mlp_in hook points and
    unembed.hook_in/hook_out (components/transformer_block.py, components/unembed.py), edited:
    a replaced per-head copy goes through ln1 and its own head's projection."""
    model_dir, ref = untied_model
    rows = random_rows(2, 13, seed=12)
    d = torch.randn(ref.config.d_model, generator=torch.Generator().manual_seed(1))
    tensors = {"d": d}
    names, flags = "all", None  # every hook point: the engine then runs every flag's path
    if case == "split_qkv":
        ops = [{"hook": "blocks.0.hook_k_input", "op": "zero", "heads": [1]},
               {"hook": "blocks.1.hook_q_input", "op": "add", "tensor": "d", "heads": [0, 3], "positions": [2, -1]},
               {"hook": "blocks.2.hook_v_input", "op": "scale", "factor": -1.5, "heads": [0]}]
    elif case == "attn_in":
        # use_attn_in alone: no split-input hook point requested.
        ops = [{"hook": "blocks.1.hook_attn_in", "op": "add", "tensor": "d", "heads": [0, 2]}]
        names = "blocks.1.hook_attn_in,blocks.1.attn.hook_q,blocks.1.attn.hook_k,blocks.1.attn.hook_v,blocks.1.hook_attn_out"
        flags = ["use_attn_in"]
    else:
        ops = [{"hook": "blocks.1.hook_mlp_in", "op": "add", "tensor": "d", "positions": [4]},
               {"hook": "unembed.hook_in", "op": "scale", "factor": 0.5, "positions": [-1]}]
    run = run_engine(model_dir, rows, str(tmp_path / f"{case}.safetensors"), names=names, ops=ops,
                     hook_tensors={k: v.numpy() for k, v in tensors.items()})
    want = reference_outputs(ref, rows, ops=ops, hook_tensors=tensors, flags=flags)
    clean = reference_outputs(ref, rows)
    assert float((want["logits"] - clean["logits"]).abs().max()) > 1e-3
    compared = ["logits"] + (ref.hook_names if names == "all" else names.split(","))
    assert_all_close(run.outputs, want, compared, what=case)


# ------------------------------------------------------------------ 7: stop_at_layer


def test_stop_at_layer_returns_residual(engine, untied_model, tmp_path):
    model_dir, ref = untied_model
    rows = random_rows(2, 10, seed=10)
    run = run_engine(model_dir, rows, str(tmp_path / "stop.safetensors"),
                     names="blocks.0.hook_resid_post", stop_at_layer=2)
    want = reference_outputs(ref, rows)
    assert describe_diff("logits (stop_at_layer=2)", run.outputs["logits"],
                         want["blocks.1.hook_resid_post"]) is None
    assert describe_diff("blocks.0.hook_resid_post", run.outputs["blocks.0.hook_resid_post"],
                         want["blocks.0.hook_resid_post"]) is None


# ------------------------------------------------------------------ 9: CLI behaviour


def test_output_keys_are_exactly_requested(engine, untied_model, tmp_path):
    model_dir, ref = untied_model
    rows = random_rows(2, 6, seed=11)
    run = run_engine(model_dir, rows, str(tmp_path / "two.safetensors"),
                     names="blocks.0.attn.hook_pattern,ln_final.hook_scale")
    assert set(run.outputs) == {"logits", "blocks.0.attn.hook_pattern", "ln_final.hook_scale"}
    assert_all_close(run.outputs, reference_outputs(ref, rows), sorted(run.outputs), what="two names")
    run = run_engine(model_dir, rows, str(tmp_path / "all.safetensors"), names="all")
    assert set(run.outputs) == {"logits"} | set(ref.hook_names)
    assert "blocks.2.attn.hook_result" in run.outputs


def _expect_error(run: EngineRun, *patterns: str) -> None:
    assert run.proc.returncode != 0, f"expected failure, got exit 0; stderr: {run.stderr}"
    assert run.stderr.strip(), "error without a message on stderr"
    for pattern in patterns:
        assert re.search(pattern, run.stderr, re.IGNORECASE), (
            f"stderr does not match /{pattern}/:\n{run.stderr[-2000:]}")


def test_error_unknown_hook_name_suggests(engine, untied_model, tmp_path):
    model_dir, _ = untied_model
    out = str(tmp_path / "x.safetensors")
    run = run_engine(model_dir, [[1, 2, 3]], out, names="blocks.0.hook_resid_pr", expect_ok=False)
    _expect_error(run, r"blocks\.0\.hook_resid_pr", r"hook_resid_pre")
    run = run_engine(model_dir, [[1, 2, 3]], out, names="hook_embed",
                     ops=[{"hook": "blocks.0.hook_resid_pr", "op": "zero"}], expect_ok=False)
    _expect_error(run, r"hook_resid_pre")


def test_error_token_out_of_vocab(engine, untied_model, tmp_path):
    model_dir, _ = untied_model
    run = run_engine(model_dir, [[1, 300, 2]], str(tmp_path / "x.safetensors"), names="hook_embed",
                     expect_ok=False)
    _expect_error(run, r"vocab")


def test_error_sequence_too_long(engine, untied_model, tmp_path):
    model_dir, ref = untied_model
    row = [5] * (ref.config.max_position_embeddings + 1)
    run = run_engine(model_dir, [row], str(tmp_path / "x.safetensors"), names="hook_embed", expect_ok=False)
    _expect_error(run, r"max_position_embeddings|too long|exceeds")


def test_error_patch_tensor_wrong_shape(engine, untied_model, tmp_path):
    model_dir, _ = untied_model
    ops = [{"hook": "blocks.1.hook_resid_pre", "op": "set", "tensor": "patch", "positions": [1]}]
    run = run_engine(model_dir, [[1, 2, 3], [4, 5, 6]], str(tmp_path / "x.safetensors"), names="hook_embed",
                     ops=ops, hook_tensors={"patch": np.zeros((2, 1, 63), np.float32)}, expect_ok=False)
    _expect_error(run, r"blocks\.1\.hook_resid_pre", r"broadcast|shape")


def test_error_heads_on_hook_without_head_dim(engine, untied_model, tmp_path):
    model_dir, _ = untied_model
    ops = [{"hook": "blocks.0.hook_resid_post", "op": "zero", "heads": [0]}]
    run = run_engine(model_dir, [[1, 2, 3]], str(tmp_path / "x.safetensors"), names="hook_embed",
                     ops=ops, expect_ok=False)
    _expect_error(run, r"head")


def test_error_missing_hook_tensor(engine, untied_model, tmp_path):
    model_dir, _ = untied_model
    ops = [{"hook": "blocks.0.hook_resid_post", "op": "add", "tensor": "nope"}]
    run = run_engine(model_dir, [[1, 2, 3]], str(tmp_path / "x.safetensors"), names="hook_embed",
                     ops=ops, hook_tensors={"steer": np.zeros(64, np.float32)}, expect_ok=False)
    _expect_error(run, r"nope")


def _broken_copy(tmp_path, mutate) -> str:
    """A single-file F32 model directory with its tensors passed through mutate(dict)."""
    directory = str(tmp_path / "broken")
    write_random_model(directory, "untied_f32")
    path = os.path.join(directory, "model.safetensors")
    tensors = safetensors_io.read_safetensors(path)
    dtypes = mutate(tensors) or {}
    safetensors_io.write_safetensors(path, tensors, dtype="F32", dtypes=dtypes)
    return directory


def test_error_missing_checkpoint_tensor(engine, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"

    def mutate(t):
        del t[name]
    directory = _broken_copy(tmp_path, mutate)
    run = run_engine(directory, [[1, 2]], str(tmp_path / "x.safetensors"), names="hook_embed", expect_ok=False)
    _expect_error(run, re.escape(name))


def test_error_misshaped_checkpoint_tensor(engine, tmp_path):
    name = "model.layers.2.self_attn.k_proj.weight"

    def mutate(t):
        t[name] = t[name][:-1]
    directory = _broken_copy(tmp_path, mutate)
    run = run_engine(directory, [[1, 2]], str(tmp_path / "x.safetensors"), names="hook_embed", expect_ok=False)
    _expect_error(run, re.escape(name), r"shape")


def test_error_truncated_safetensors(engine, tmp_path):
    directory = _broken_copy(tmp_path, lambda t: None)
    path = os.path.join(directory, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1000)
    run = run_engine(directory, [[1, 2]], str(tmp_path / "x.safetensors"), names="hook_embed", expect_ok=False)
    _expect_error(run, r"truncat|too short|past the end|exceeds|bytes")


def test_error_unsupported_dtype(engine, tmp_path):
    name = "model.layers.0.mlp.down_proj.weight"
    directory = _broken_copy(tmp_path, lambda t: {name: "F64"})
    assert safetensors_io.read_safetensors_header(os.path.join(directory, "model.safetensors"))[name]["dtype"] == "F64"
    run = run_engine(directory, [[1, 2]], str(tmp_path / "x.safetensors"), names="hook_embed", expect_ok=False)
    _expect_error(run, r"F64")


# ------------------------------------------------------------------ demo model


def test_demo_model_parity(engine, tmp_path):
    _require(DEMO_BIN)
    directory = str(tmp_path / "demo")
    proc = subprocess.run([DEMO_BIN, directory], capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    for f in ("config.json", "tokenizer.json"):
        assert os.path.exists(os.path.join(directory, f)), f
    ref = LlamaReference.from_pretrained(directory)
    n_pos = min(80, ref.config.max_position_embeddings)  # past original_max_position_embeddings
    rows = random_rows(2, n_pos, seed=12, vocab=ref.config.d_vocab)
    run = run_engine(directory, rows, str(tmp_path / "demo.safetensors"), names="all")
    assert_all_close(run.outputs, reference_outputs(ref, rows), ["logits"] + ref.hook_names, what="demo model")
