"""Fixtures for the Python client suite: a client model on the shared demo server, and the
independent float32 reference on the same weights.

Run:  bazel build //server:remotelens_server //tools:all
      REMOTELENS_BIN_DIR=$PWD/bazel-bin/tools /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/client
"""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "clients", "python"))

from tests.reference.llama_reference import LlamaReference  # noqa: E402

import remotelens  # noqa: E402
from client_helpers import reset_bridge  # noqa: E402


def pytest_runtest_setup(item):
    """Tests that need the server binaries skip when they are not built (fail in CI, as parity does)."""
    if not {"demo_server", "demo_model_dir"} & set(item.fixturenames):
        return
    import server_harness
    missing = [b for b in (server_harness.SERVER_BIN, server_harness.MAKE_DEMO_MODEL) if not os.access(b, os.X_OK)]
    if missing:
        message = f"{missing} not built (bazel build //server:remotelens_server //tools:all)"
        if os.environ.get("REMOTELENS_REQUIRE_BINARIES"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def reference(demo_model_dir):
    return LlamaReference.from_pretrained(demo_model_dir)


@pytest.fixture(scope="session")
def session_model(demo_server):
    # The reference computes raw logits; center_unembed (from_server's TransformerLens default)
    # is tested on its own in test_tl_surface.py.
    model = remotelens.HookedTransformer.from_server(demo_server.address, center_unembed=False)
    yield model
    model.close()


@pytest.fixture
def model(session_model):
    """The shared client model, with every hook and setting reset after each test."""
    yield session_model
    session_model.reset_hooks(including_permanent=True)
    session_model.set_use_attn_result(False)
    session_model.set_use_split_qkv_input(False)
    session_model.set_use_hook_mlp_in(False)
    session_model.cfg.use_attn_in = False
    session_model.tokenizer.padding_side = "right"
    session_model.cfg.device = "cpu"


@pytest.fixture(scope="module")
def bridge_session(demo_server):
    bridge = remotelens.TransformerBridge.from_server(demo_server.address)
    yield bridge
    bridge.close()


@pytest.fixture
def bridge(bridge_session):
    """A TransformerLens 4 bridge without compatibility mode, reset after each test."""
    yield bridge_session
    reset_bridge(bridge_session)
