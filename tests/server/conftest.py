"""Fixtures for the server tests: the float32 reference, gRPC clients, and extra server processes.

The demo server (tests/conftest.py) serves most tests. Two more processes start lazily, once per
test session: `auth_server` (a users file with four users and their quotas) and `limits_server`
(tiny limits: 1 s session TTL, 3 s hook timeout, a queue of 1, small batches).
"""
import os
import sys
import tempfile

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import wire  # noqa: E402,F401  (puts the repo and clients/python on sys.path)
from server_helpers import LIMITS_CONFIG, Client, write_users_file  # noqa: E402
import server_harness  # noqa: E402

from remotelens.v1 import remotelens_pb2 as pb  # noqa: E402
from tests.reference.llama_reference import LlamaReference  # noqa: E402


@pytest.fixture(scope="session")
def ref(demo_model_dir):
    return LlamaReference.from_pretrained(demo_model_dir)


@pytest.fixture(scope="module")
def client(demo_server):
    c = Client(demo_server)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(client):
    return client.stub


@pytest.fixture(scope="session")
def info(demo_server):
    c = Client(demo_server)
    try:
        return c.stub.GetModelInfo(pb.GetModelInfoRequest())
    finally:
        c.close()


@pytest.fixture(scope="session")
def users_dir():
    return tempfile.mkdtemp(prefix="remotelens_users_")


@pytest.fixture(scope="session")
def auth_server(demo_model_dir, users_dir):
    users = write_users_file(users_dir)
    server = server_harness.ServerProcess(demo_model_dir, config=f'users_file: "{users}"').start()
    yield server
    assert server.stop() == 0, "".join(server.stderr_lines)


@pytest.fixture(scope="session")
def limits_server(demo_model_dir):
    server = server_harness.ServerProcess(demo_model_dir, config=LIMITS_CONFIG).start()
    yield server
    assert server.stop() == 0, "".join(server.stderr_lines)


