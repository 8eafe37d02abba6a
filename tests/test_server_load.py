"""Short load run in CI: 32 concurrent clients of two users; no errors, equal shares.

The 60 s version with latency figures is bench/server_bench.py (BENCHMARKS.md).
"""
import hashlib
import json
import os
import subprocess

import server_harness

BENCH = os.path.join(server_harness.REPO, "bazel-bin", "bench", "server_bench")


def test_two_users_under_load_get_equal_shares(demo_model_dir, tmp_path):
    keys = {"alice": "load-key-a", "bob": "load-key-b"}
    users = tmp_path / "users.textproto"
    users.write_text("".join(
        f'users {{ name: "{n}" api_key_sha256: "{hashlib.sha256(k.encode()).hexdigest()}" '
        f'quota {{ max_concurrent_requests: 32 }} }}\n' for n, k in keys.items()))
    with server_harness.ServerProcess(demo_model_dir, config=f'users_file: "{users}"') as server:
        out = subprocess.run([BENCH, "--mode=load", f"--address={server.address}", "--clients=32",
                              "--seconds=5", f"--keys={keys['alice']},{keys['bob']}"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (out.stderr + f"\nserver exit code: {server.proc.poll()}\n"
                                     + "".join(server.stderr_lines[-20:]))
        result = json.loads(out.stdout.strip().splitlines()[-1])
        # The server keeps serving afterwards.
        assert server.proc.poll() is None
    assert result["errors"] == 0
    assert result["requests"] > 100
    # Round robin between users: each gets the same share of the model thread, within 20%.
    assert result["share_ratio"] >= 0.8, result
