#!/usr/bin/env bash
# Builds the engine, generates the built-in demo model if absent, and runs a prompt through it,
# caching every hook point. Usage: scripts/demo.sh [MODEL_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh
model_dir="${1:-demo_model}"
bazel build --noshow_progress //tools:make_demo_model //tools:remotelens_run
[ -f "$model_dir/config.json" ] || bazel-bin/tools/make_demo_model "$model_dir"
bazel-bin/tools/remotelens_run --model_dir "$model_dir" --tokens "507,72,101,108,108,111" \
  --names all --out /tmp/remotelens_demo.safetensors
echo "wrote logits and every hook point for 6 tokens to /tmp/remotelens_demo.safetensors"
