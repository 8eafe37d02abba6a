#!/usr/bin/env bash
# Regenerates the Python gRPC stubs of proto/ into the client package, where they import as
# remotelens.v1.*. The stubs are committed; tests/test_python_stubs.py fails if they drift.
# Usage: scripts/gen_python_stubs.sh [OUT_DIR]   (default clients/python)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-clients/python}"
mkdir -p "$out/remotelens/v1"
protoc --proto_path=proto --python_out="$out" --grpc_python_out="$out" \
  --plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin proto/remotelens/v1/*.proto
touch "$out/remotelens/v1/__init__.py"
