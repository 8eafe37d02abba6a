"""Operational surface: grpc.health.v1, server reflection, TLS, and refusing insecure exposure."""
import os
import subprocess
import time
import urllib.request

import grpc
import pytest
import torch

import server_harness
from remotelens._wire import ChunkAssembler, tensor_to_proto
from remotelens.v1 import remotelens_pb2 as pb
from remotelens.v1 import tensor_pb2


def test_health_reports_serving(demo_server):
    # grpc.health.v1.Health/Check with an empty HealthCheckRequest; SERVING is status 1.
    check = demo_server.channel().unary_unary("/grpc.health.v1.Health/Check",
                                              request_serializer=lambda b: b,
                                              response_deserializer=lambda b: b)
    assert check(b"", timeout=5) == b"\x08\x01"


def test_reflection_lists_the_service(demo_server):
    # ServerReflectionRequest{list_services: "*"} (field 7) on the v1alpha reflection stream.
    info = demo_server.channel().stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=lambda b: b, response_deserializer=lambda b: b)
    responses = list(info(iter([b"\x3a\x01*"]), timeout=5))
    assert b"remotelens.v1.RemoteLens" in responses[0]
    assert b"grpc.health.v1.Health" in responses[0]


@pytest.mark.skipif(not os.path.exists("/usr/bin/openssl"), reason="openssl CLI not installed")
def test_tls_serves_encrypted_and_rejects_plaintext(demo_model_dir, tmp_path):
    key, cert = tmp_path / "server.key", tmp_path / "server.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    config = f'tls {{ cert_file: "{cert}" key_file: "{key}" }}'
    with server_harness.ServerProcess(demo_model_dir, config=config) as server:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        secure = grpc.secure_channel(server.address, credentials)
        info = server.stub(secure).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        assert info.model_name == "remotelens-demo"
        with pytest.raises(grpc.RpcError) as error:
            server.stub().GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_refuses_public_address_without_users_file(demo_model_dir):
    server = server_harness.ServerProcess(demo_model_dir, args=["--host", "0.0.0.0"])
    with pytest.raises(RuntimeError) as error:
        server.start()
    assert "without authentication" in str(error.value)
    assert server.proc.wait(timeout=10) == 1


def test_bad_config_is_a_clear_startup_error(tmp_path):
    config = tmp_path / "bad.textproto"
    config.write_text("model_dir: 42 nonsense {")
    out = subprocess.run([server_harness.SERVER_BIN, "--config", str(config)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "not a valid ServerConfig textproto" in out.stderr


def test_intra_op_threads_from_config_and_flag(demo_model_dir, tmp_path):
    for config, args, expected in [("intra_op_threads: 2", [], 2),
                                   ("intra_op_threads: 2", ["--intra_op_threads", "1"], 1)]:
        with server_harness.ServerProcess(demo_model_dir, config=config, args=args) as server:
            line = f"model thread uses {expected} intra-op thread(s)"
            deadline = time.time() + 10
            while time.time() < deadline and not any(line in l for l in server.stderr_lines):
                time.sleep(0.05)
            assert any(line in l for l in server.stderr_lines), server.stderr_lines
            responses = list(server.stub().Run(
                pb.RunRequest(tokens=tensor_to_proto(torch.tensor([[1, 2, 3]]))), timeout=10))
            assert responses[-1].summary.tokens_processed == 3
        assert server.returncode == 0
    bad = server_harness.ServerProcess(demo_model_dir, config="intra_op_threads: -3")
    with pytest.raises(RuntimeError) as error:
        bad.start()
    assert "intra_op_threads must be >= 0" in str(error.value) and "-3" in str(error.value)


def _wait_for_line(server, line):
    deadline = time.time() + 10
    while time.time() < deadline and not any(line in l for l in server.stderr_lines):
        time.sleep(0.05)
    assert any(line in l for l in server.stderr_lines), server.stderr_lines


def test_large_forwards_take_their_own_thread_count_with_the_same_results(demo_model_dir):
    # A forward with >= large_forward_gflop of matrix products switches the model thread to
    # large_forward_threads (server/forward_threads.h); the numbers must not move with it. The
    # demo model multiplies by 0.82M weights a position (1.64 MFLOP): [1, 3] stays below 20 MFLOP,
    # [4, 16] (105 MFLOP) goes above.
    def run_all(server, tokens):
        request = pb.RunRequest(tokens=tensor_to_proto(tokens))
        request.cache.names.append("*")
        request.cache.stream = True
        assembler, out = ChunkAssembler(), {}
        for response in server.stub().Run(request, timeout=30):
            if response.HasField("tensor"):
                done = assembler.add(response.tensor)
                if done is not None:
                    out[done[0]] = done[1].clone()
        return out

    generator = torch.Generator().manual_seed(5)
    small = torch.randint(1, 100, (1, 3), generator=generator)
    large = torch.randint(1, 100, (4, 16), generator=generator)
    switching = server_harness.ServerProcess(
        demo_model_dir, config="intra_op_threads: 1 large_forward_threads: 2 large_forward_gflop: 0.02")
    fixed = server_harness.ServerProcess(demo_model_dir, args=["--intra_op_threads", "1",
                                                               "--large_forward_threads", "1"])
    with switching, fixed:
        _wait_for_line(switching, "model thread uses 1 intra-op thread(s); 2 for forwards of >= 0.02 GFLOP")
        _wait_for_line(fixed, "model thread uses 1 intra-op thread(s); 1 for forwards of >= 0.1 GFLOP")
        for tokens in (small, large, small):
            a, b = run_all(switching, tokens), run_all(fixed, tokens)
            assert set(a) == set(b) and "logits" in a and len(a) > 10
            for name in a:
                torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0, msg=name)
    for config, bad in [("large_forward_threads: -1", "-1"), ("large_forward_threads: 5000", "5000"),
                        ("large_forward_gflop: -2", "-2")]:
        server = server_harness.ServerProcess(demo_model_dir, config=config)
        with pytest.raises(RuntimeError) as error:
            server.start()
        assert "large_forward_threads must be 0..1024" in str(error.value) and bad in str(error.value)


def test_flags_override_the_config(demo_model_dir, tmp_path):
    # The config names a model directory that does not exist and float32; the flags win.
    server = server_harness.ServerProcess(
        str(tmp_path / "no_such_model"), config='dtype: "float32"',
        args=["--model_dir", demo_model_dir, "--dtype", "bfloat16", "--device", "cpu",
              "--port", "0", "--metrics_port", "0"])
    with server:
        info = server.stub().GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        assert info.dtype == tensor_pb2.DTYPE_BFLOAT16
        assert list(info.devices) == ["cpu"]
        assert info.model_name == "remotelens-demo"
        assert not server.address.endswith(":0") and not server.metrics_address.endswith(":0")
        body = urllib.request.urlopen(f"http://{server.metrics_address}/metrics", timeout=10).read()
        assert b'remotelens_model_info{dtype="bfloat16"' in body
    assert server.returncode == 0
