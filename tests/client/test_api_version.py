"""The client reports its version and refuses a server that speaks another wire API version.

The compatible case runs against the real demo server; the incompatible ones against a stand-in
gRPC server (in this process) whose GetModelInfo reports another ModelInfo.api_version, so no
server flag exists for tests. The refusal must come before any other RPC (no session opened) and
name both versions, the address and what to install.
"""
from concurrent import futures

import grpc
import pytest

import remotelens
from remotelens.v1 import remotelens_pb2 as pb, remotelens_pb2_grpc


def test_versions_come_from_one_place():
    assert remotelens.API_VERSION == pb.API_VERSION_CURRENT == 1
    assert isinstance(remotelens.__version__, str) and remotelens.__version__.count(".") >= 1


def test_real_server_reports_the_clients_api_version(demo_server, model):
    info = demo_server.stub().GetModelInfo(pb.GetModelInfoRequest())
    assert info.api_version == remotelens.API_VERSION
    # model (from_server) connected: the check passed.
    assert model.cfg.n_layers > 0


class _StandInServer(remotelens_pb2_grpc.RemoteLensServicer):
    """Answers GetModelInfo with `api_version`; records every RPC it is asked."""

    def __init__(self, api_version, info):
        self.api_version = api_version
        self.info = info
        self.calls = []

    def GetModelInfo(self, request, context):
        self.calls.append("GetModelInfo")
        reply = pb.ModelInfo()
        reply.CopyFrom(self.info)
        reply.api_version = self.api_version
        return reply

    def CreateSession(self, request, context):
        self.calls.append("CreateSession")
        return pb.Session(session_id="stand-in")


@pytest.fixture
def stand_in(demo_server):
    real_info = demo_server.stub().GetModelInfo(pb.GetModelInfoRequest())
    servers = []

    def start(api_version):
        servicer = _StandInServer(api_version, real_info)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        remotelens_pb2_grpc.add_RemoteLensServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return servicer, f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(grace=None)


@pytest.mark.parametrize("server_version", [2, 7])
def test_newer_server_is_refused(stand_in, server_version):
    servicer, address = stand_in(server_version)
    with pytest.raises(remotelens.IncompatibleServerError) as raised:
        remotelens.HookedTransformer.from_server(address)
    message = str(raised.value)
    assert f"speaks wire API version {remotelens.API_VERSION}" in message
    assert f"server at {address} speaks wire API version {server_version}" in message
    assert "install the client from the server's release" in message
    assert remotelens.__version__ in message
    assert raised.value.client_api_version == remotelens.API_VERSION
    assert raised.value.server_api_version == server_version
    assert servicer.calls == ["GetModelInfo"]  # refused before opening a session


def test_server_from_before_versioning_is_refused(stand_in):
    servicer, address = stand_in(0)
    with pytest.raises(remotelens.IncompatibleServerError) as raised:
        remotelens.TransformerBridge.from_server(address)
    message = str(raised.value)
    assert "reports no API version" in message and "version 0" in message
    assert f"upgrade the server to a release that speaks version {remotelens.API_VERSION}" in message
    assert raised.value.server_api_version == 0
    assert servicer.calls == ["GetModelInfo"]
    # A RemoteLensError (a RuntimeError) like every other error the client raises.
    assert isinstance(raised.value, remotelens.RemoteLensError)


def test_matching_stand_in_is_accepted(stand_in):
    """The check itself, not the stand-in, is what refuses: the same server at the client's
    version connects."""
    servicer, address = stand_in(remotelens.API_VERSION)
    model = remotelens.HookedTransformer.from_server(address)
    try:
        assert servicer.calls == ["GetModelInfo", "CreateSession"]
    finally:
        model._channel.close()
