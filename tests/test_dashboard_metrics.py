"""Every metric the Grafana dashboard queries exists on a live server's /metrics."""
import json
import os
import re
import urllib.request

import server_harness
from remotelens.v1 import remotelens_pb2 as pb


def test_dashboard_queries_only_existing_metrics(demo_server):
    with open(os.path.join(server_harness.REPO, "deploy", "grafana", "remotelens.json")) as f:
        dashboard = json.load(f)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    wanted = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"remotelens_[a-z_]+", e)}
    demo_server.stub().GetModelInfo(pb.GetModelInfoRequest())  # per-RPC series start on first use
    text = urllib.request.urlopen(f"http://{demo_server.metrics_address}/metrics", timeout=10).read().decode()
    served = set(re.findall(r"^# TYPE (remotelens_[a-z_]+)", text, re.M))
    assert wanted and wanted <= served, f"dashboard queries unknown metrics: {sorted(wanted - served)}"
