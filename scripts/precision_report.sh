#!/usr/bin/env bash
# The precision report (issue 12 item 4): float32, bfloat16 and float16 (where the device can
# multiply it) against a float32 run without processing, for each processing option the client
# offers, on the logits and every hook point: max, mean, median and std of |difference|.
# Usage: scripts/precision_report.sh MODEL_DIR [--short] [--by_site] [--device cuda:0] [--dtypes ...]
# Needs: bazel build //server:remotelens_server. Details: bench/precision_report.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: scripts/precision_report.sh MODEL_DIR [--short] [--by_site] [--device DEV] [--dtypes LIST]" >&2
  exit 2
fi
exec /usr/bin/python3 bench/precision_report.py "$@"
