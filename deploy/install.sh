#!/usr/bin/env bash
# Host install: Debian packages, then an optimised build of the server and tools.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh
bazel build --noshow_progress //server:remotelens_server //tools:all
echo "built bazel-bin/server/remotelens_server; start with --config configs/demo.textproto"
