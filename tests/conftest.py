"""Shared fixtures: the demo model and a demo server process for the whole test session."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import server_harness  # noqa: E402


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory):
    return server_harness.make_demo_model(str(tmp_path_factory.mktemp("demo_model")))


@pytest.fixture(scope="session")
def demo_server(demo_model_dir):
    server = server_harness.ServerProcess(demo_model_dir).start()
    yield server
    assert server.stop() == 0, "".join(server.stderr_lines)
