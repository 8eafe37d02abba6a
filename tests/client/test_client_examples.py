"""examples/quickstart.py and examples/quickstart.ipynb run against the demo server."""
import contextlib
import io
import json
import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(REPO, "examples")


def test_quickstart_script(demo_server):
    env = dict(os.environ)
    env.pop("REMOTELENS_ADDRESS", None)
    result = subprocess.run([sys.executable, os.path.join(EXAMPLES, "quickstart.py"),
                             "--address", demo_server.address],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert "connected to remotelens-demo" in result.stdout
    assert "cache['resid_post', 1]: (1, 11, 128)" in result.stdout
    assert "logit lens rank of the final prediction" in result.stdout and "'final_post': 0" in result.stdout
    no_server = subprocess.run([sys.executable, os.path.join(EXAMPLES, "quickstart.py")],
                               capture_output=True, text=True, timeout=60, env=env)
    assert no_server.returncode == 2 and "REMOTELENS_ADDRESS" in no_server.stderr


def test_quickstart_notebook_cells_run_in_order(demo_server, monkeypatch):
    with open(os.path.join(EXAMPLES, "quickstart.ipynb")) as f:
        notebook = json.load(f)
    assert notebook["nbformat"] == 4
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert len(cells) >= 6 and all(c["outputs"] == [] for c in cells)
    monkeypatch.setenv("REMOTELENS_ADDRESS", demo_server.address)
    monkeypatch.chdir(EXAMPLES)
    namespace = {"__name__": "__main__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for i, cell in enumerate(cells):
            source = "".join(cell["source"])
            exec(compile(source, f"quickstart.ipynb[code cell {i}]", "exec"), namespace)
    assert namespace["cache"]["resid_post", 1].shape == (1, 11, 128)
    assert torch.allclose(namespace["python_loss"], namespace["server_loss"], atol=1e-4)
    assert len(namespace["effects"]) == namespace["model"].cfg.n_layers
    assert namespace["ranks"][-1] == 0 and namespace["plain"] != namespace["steered"]
    assert "The cat sat on the mat." in out.getvalue()


def test_transformer_bridge_example(demo_server):
    """examples/quickstart_bridge.py: the TransformerLens 4 entry point, as a notebook uses it."""
    result = subprocess.run([sys.executable, os.path.join(EXAMPLES, "quickstart_bridge.py"),
                             "--address", demo_server.address],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "with TransformerLens 4 names" in result.stdout
    assert "hook_resid_post equals hook_out: True" in result.stdout
    changed = float(result.stdout.split("changes the logits by ")[1].split()[0])
    assert changed > 0
