"""The GPU deployment files agree with the server: flags, config, probes, GPU requests.

Nothing here builds an image (no container engine on these machines); these checks catch the
drift that would make an image or manifest fail at start.
"""
import os
import re
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "clients", "python"))

yaml = pytest.importorskip("yaml")
from google.protobuf import text_format  # noqa: E402

from remotelens.v1 import config_pb2  # noqa: E402


def _read(*parts):
    with open(os.path.join(REPO, *parts)) as f:
        return f.read()


def _server_flags():
    return set(re.findall(r"ABSL_FLAG\([^,]+,\s*(\w+),", _read("server", "main.cc")))


def _entrypoint(dockerfile):
    m = re.search(r"ENTRYPOINT\s+(\[.*?\])\s*$", dockerfile.replace("\\\n", " "), re.M | re.S)
    assert m, "Dockerfile has no exec-form ENTRYPOINT"
    return eval(m.group(1), {})  # a JSON-style list of strings


def test_cuda_dockerfile_runs_the_server_with_known_flags_and_a_real_config():
    entry = _entrypoint(_read("deploy", "docker", "Dockerfile.cuda"))
    assert entry[0] == "remotelens_server"
    flags = {a[2:] for a in entry[1:] if a.startswith("--")}
    assert flags <= _server_flags(), f"unknown flags {flags - _server_flags()}"
    config_path = entry[entry.index("--config") + 1]
    assert config_path.startswith("/src/")
    config = text_format.Parse(_read(config_path[len("/src/"):]), config_pb2.ServerConfig())
    assert config.dtype == "bfloat16"
    assert list(config.devices) == ["cuda:0"]


def test_cuda_and_cpu_images_share_the_entry_point_shape():
    cpu = _entrypoint(_read("deploy", "docker", "Dockerfile.cpu"))
    cuda = _entrypoint(_read("deploy", "docker", "Dockerfile.cuda"))
    assert [a for a in cpu if a.startswith("--")] == [a for a in cuda if a.startswith("--")]


def test_cuda_manifest_requests_a_gpu_and_probes_grpc_health():
    docs = [d for d in yaml.safe_load_all(_read("deploy", "kubernetes", "remotelens-cuda.yaml")) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port, probe
    args = container["args"]
    assert {a[2:] for a in args if a.startswith("--")} <= _server_flags()
    assert args[args.index("--config") + 1] == "/src/configs/llama3.1-8b-cuda.textproto"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/models/model" in mounts and "/etc/remotelens" in mounts
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    config = text_format.Parse(_read("configs", "llama3.1-8b-cuda.textproto"), config_pb2.ServerConfig())
    assert grace > config.shutdown_grace_seconds
    assert config.model_dir == "/models/model"
