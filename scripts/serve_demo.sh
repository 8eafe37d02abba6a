#!/usr/bin/env bash
# Installs packages, builds the server, and serves the built-in demo model (generated into
# demo_model/ on first start) on 127.0.0.1:50051, metrics on 127.0.0.1:9464/metrics.
# Extra flags go to remotelens_server, e.g. scripts/serve_demo.sh --port 50052
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh
bazel build --noshow_progress //server:remotelens_server //tools:all
exec bazel-bin/server/remotelens_server --config configs/demo.textproto "$@"
