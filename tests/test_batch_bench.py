"""Smoke run of bench/batch_bench.py on the demo model: both servers and the engine-alone
ceilings once, checked for shape and sense (timing is the benchmark's business, never asserted)."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import server_harness  # noqa: E402

FORWARD_BENCH = os.path.join(REPO, "bazel-bin", "bench", "forward_bench")


def test_batch_bench_reports_every_ratio_and_its_engine_ceiling(tmp_path):
    needed = (server_harness.SERVER_BIN, server_harness.MAKE_DEMO_MODEL, FORWARD_BENCH)
    missing = [b for b in needed if not os.access(b, os.X_OK)]
    if missing:
        message = f"{missing} not built (bazel build //server:all //tools:all //bench:forward_bench)"
        if os.environ.get("REMOTELENS_REQUIRE_BINARIES"):
            pytest.fail(message)
        pytest.skip(message)
    out = subprocess.run(
        ["/usr/bin/python3", os.path.join(REPO, "bench", "batch_bench.py"), "--model", "demo",
         "--model_root", str(tmp_path), "--clients", "4", "--seconds", "1", "--rounds", "1",
         "--new_tokens", "8", "--lone_iters", "5", "--json"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("runs_per_s", "generated_tokens_per_s", "lone_p50_ms"):
        assert set(summary[key]) == {"batched", "alone"}
        assert all(v > 0 for v in summary[key].values()), summary
    assert summary["runs_ratio"] == pytest.approx(
        summary["runs_per_s"]["batched"] / summary["runs_per_s"]["alone"])
    ceilings = summary["ceilings"]
    assert set(ceilings["engine_ms"]) == {"run1", "run_half", "run_all", "step1", "step_all"}
    assert all(ms > 0 for ms in ceilings["engine_ms"].values())
    t = ceilings["engine_ms"]
    # The Runs ceiling is a 1x16 forward over the better per-request time of the shared forwards
    # (2 and 4 requests here); the generation one is 4 single-row steps over one 4-row step.
    assert ceilings["runs"] == pytest.approx(t["run1"] / min(t["run_half"] / 2, t["run_all"] / 4))
    assert ceilings["generate"] == pytest.approx(4 * t["step1"] / t["step_all"])
