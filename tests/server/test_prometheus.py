"""A real Prometheus (Debian's /usr/bin/prometheus) scrapes the server's /metrics endpoint.

Prometheus listens on 127.0.0.1 at a free port with its TSDB in a temporary directory, scrapes
every second, and the test polls its HTTP query API until the RPC counters it made show up.
"""
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

import wire
from server_helpers import Client, rpc_error, run
from remotelens.v1 import remotelens_pb2 as pb

PROMETHEUS = "/usr/bin/prometheus"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(port, expr):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.fixture
def prometheus(demo_server):
    if not os.access(PROMETHEUS, os.X_OK):
        pytest.skip(f"{PROMETHEUS} is not installed (scripts/install_deps.sh installs Debian's prometheus)")
    assert demo_server.metrics_address and demo_server.metrics_address != "off"
    host, _, mport = demo_server.metrics_address.rpartition(":")
    assert host == "127.0.0.1", demo_server.metrics_address
    d = tempfile.mkdtemp(prefix="remotelens_prom_")
    cfg = os.path.join(d, "prometheus.yml")
    with open(cfg, "w") as f:
        f.write(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: remotelens
    scrape_interval: 1s
    scrape_timeout: 1s
    static_configs:
      - targets: ["127.0.0.1:{mport}"]
""")
    port = free_port()
    log = open(os.path.join(d, "prometheus.log"), "w")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={cfg}", f"--web.listen-address=127.0.0.1:{port}",
                             f"--storage.tsdb.path={os.path.join(d, 'tsdb')}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            assert proc.poll() is None, open(os.path.join(d, "prometheus.log")).read()[-3000:]
            assert time.time() < deadline, "prometheus did not become ready within 30 s"
            time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(d, ignore_errors=True)


def test_prometheus_scrapes_rpc_counters(demo_server, prometheus):
    port = prometheus
    c = Client(demo_server)
    try:
        # Counters are cumulative over the shared server's life: read /metrics first.
        with urllib.request.urlopen(f"http://{demo_server.metrics_address}/metrics", timeout=5) as r:
            text = r.read().decode()
        before = 0.0
        for line in text.splitlines():
            if line.startswith("remotelens_rpc_requests_total{") and 'method="Run"' in line and 'code="OK"' in line:
                before = float(line.rsplit(" ", 1)[1])
        n_runs = 5
        for _ in range(n_runs):
            run(c.stub, tokens=wire.tokens([[1, 2, 3]]))
        code, _ = rpc_error(lambda: list(c.stub.Run(pb.RunRequest())))  # one INVALID_ARGUMENT
        c.stub.GetModelInfo(pb.GetModelInfoRequest())
    finally:
        c.close()

    deadline = time.time() + 30
    ok_value = None
    while time.time() < deadline:
        result = query(port, "remotelens_rpc_requests_total")
        runs = {s["metric"].get("code"): float(s["value"][1]) for s in result
                if s["metric"].get("method") == "Run"}
        ok_value = runs.get("OK")
        if ok_value is not None and ok_value >= before + n_runs and "INVALID_ARGUMENT" in runs:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"Prometheus never saw {before + n_runs} OK Runs within 30 s; last result: "
                    f"{query(port, 'remotelens_rpc_requests_total')}")
    assert ok_value >= n_runs
    for s in result:
        assert s["metric"]["job"] == "remotelens"
    methods = {s["metric"].get("method") for s in result}
    assert {"Run", "GetModelInfo"} <= methods
    up = query(port, 'up{job="remotelens"}')
    assert up and up[0]["value"][1] == "1"
    # Other series the server exports reach Prometheus too.
    assert query(port, "remotelens_tokens_processed_total")
    assert query(port, "remotelens_rpc_latency_seconds_count")
