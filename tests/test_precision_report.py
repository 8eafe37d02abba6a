"""The precision report's short form on the demo model (issue 12 item 4): the table's structure,
float32 rows exactly at the reference, bfloat16 rows off it but bounded."""
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
sys.path.insert(0, os.path.join(REPO, "clients", "python"))

import server_harness  # noqa: E402


@pytest.fixture(scope="module")
def report(demo_model_dir):
    if not os.access(server_harness.SERVER_BIN, os.X_OK):
        message = f"{server_harness.SERVER_BIN} not built (bazel build //server:remotelens_server)"
        if os.environ.get("REMOTELENS_REQUIRE_BINARIES"):
            pytest.fail(message)
        pytest.skip(message)
    proc = subprocess.run([os.path.join(REPO, "scripts", "precision_report.sh"), demo_model_dir, "--short"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = [l for l in proc.stdout.splitlines() if l.startswith("#")]
    table = [l for l in proc.stdout.splitlines() if l.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in l.strip("|").split("|")))) for l in table[2:]]
    return notes, header, rows


def test_table_has_every_dtype_option_and_site(report):
    import precision_report
    notes, header, rows = report
    assert header == ["dtype", "processing", "hook", "max", "mean", "median", "std", "n"]
    options = [label for label, _ in precision_report.processing_options()]
    assert options[0] == "none" and "fold_ln" in options  # HookedTransformer.from_server(fold_ln=)
    dtypes = sorted({r["dtype"] for r in rows})
    # float16 appears where LibTorch multiplies it on this device, else a note says why not.
    assert dtypes in (["bfloat16", "float32"], ["bfloat16", "float16", "float32"])
    if "float16" not in dtypes:
        assert any(n.startswith("# float16: skipped (") for n in notes), notes
    sites = None
    for dtype in dtypes:
        for option in options:
            got = [r["hook"] for r in rows if r["dtype"] == dtype and r["processing"] == option]
            assert got[0] == "logits", (dtype, option)
            sites = sites or got
            assert got == sites, (dtype, option)  # the same hook points, in forward order
    assert {"hook_embed", "blocks.*.hook_resid_post", "blocks.*.attn.hook_pattern",
            "ln_final.hook_normalized", "unembed.hook_out"} <= set(sites)
    # Opt-in hook points too, except use_attn_in, which TransformerLens 3 refuses for GQA models.
    assert {"blocks.*.hook_q_input", "blocks.*.hook_v_input", "blocks.*.attn.hook_result",
            "blocks.*.hook_mlp_in"} <= set(sites)
    assert "blocks.*.hook_attn_in" not in sites
    assert any("set_use_attn_in refused" in n for n in notes), notes
    assert all(int(r["n"]) > 0 for r in rows)


def test_float32_rows_are_the_reference_and_bfloat16_rows_are_bounded(report):
    _, _, rows = report
    for r in rows:
        mx, mean, median, std = (float(r[k]) for k in ("max", "mean", "median", "std"))
        assert all(math.isfinite(v) and v >= 0 for v in (mx, mean, median, std)), r
        assert median <= mx and mean <= mx, r
        centred = r["processing"] in ("center_unembed", "all") and r["hook"] == "logits"
        if r["dtype"] == "float32" and centred:
            # center_unembed shifts each position's returned logits by their mean (TransformerLens's
            # from_pretrained default): a difference by design, not of precision.
            assert mx > 0.0, r
        elif r["dtype"] == "float32":
            assert mx == 0.0, r  # the same server dtype as the reference: the same numbers
        else:
            if not centred:
                assert mx < 1.0 and mean < 0.1, r  # 8 mantissa bits on a 4-layer random model
    bf16_logits = [r for r in rows if r["dtype"] == "bfloat16" and r["hook"] == "logits"]
    assert bf16_logits and all(float(r["max"]) > 1e-4 for r in bf16_logits)
