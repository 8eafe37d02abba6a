#!/usr/bin/env bash
# One-command GPU check: builds remotelens with CMake against the LibTorch it finds, checks parity
# against the Python reference, and measures the serving path against the machine's bounds.
#
#   scripts/gpu_check.sh            on a CUDA machine (PyTorch wheel's LibTorch, offline); < 8 min
#   scripts/gpu_check.sh --cpu      every step that needs no CUDA, on the demo model (Debian LibTorch)
#   scripts/gpu_check.sh --cpu --lean   CI's form: builds only what the steps run (engine, tools,
#                                   forward_bench); the server and C++ tests are Bazel's job there
#                                   (GPU_CHECK_SERVER=bazel-bin/server/remotelens_server for the
#                                   round trip)
#
# The GPU machine has no Debian packages: run scripts/pack_gpu_deps.sh here first and carry
# build/gpu_deps with the tree (the device tool's carry=["build/gpu_deps"]); CMake there then
# finds Abseil, nlohmann-json, PCRE2 and GoogleTest in it. gRPC/protobuf/prometheus-cpp are not
# packed, so the server and its steps are skipped there with a note.
#
# Each step prints "[n/N] what ... ok (12.3 s)", "skipped: why" or "FAILED: what"; the end is one
# markdown table (also written to build/gpu_check/table.md). Exit status: 1 when a parity step or
# any other step failed (the table says which), 0 otherwise. Environment: PYTHON (default python3
# on CUDA, /usr/bin/python3 with --cpu), GPU_CHECK_JOBS (build parallelism), GPU_CHECK_WORK
# (scratch dir; the 8B checkpoint needs ~17 GB there), GPU_CHECK_BUILD (CMake build dir), CCACHE_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

MODE=cuda
LEAN=0
for arg in "$@"; do
  case "$arg" in
    --cpu) MODE=cpu ;;
    --lean) LEAN=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_check: unknown argument \"$arg\"; valid: --cpu, --lean" >&2; exit 2 ;;
  esac
done

if [ "$MODE" = cpu ]; then
  PY=${PYTHON:-/usr/bin/python3}
  BUILD=${GPU_CHECK_BUILD:-build/cmake-cpu}
  DEVICE=cpu
  DTYPE_FAST=float32
else
  PY=${PYTHON:-python3}
  BUILD=${GPU_CHECK_BUILD:-build/cmake-cuda}
  DEVICE=cuda:0
  DTYPE_FAST=bfloat16
fi
JOBS=${GPU_CHECK_JOBS:-$(nproc)}
OUT=$REPO/build/gpu_check
WORK=${GPU_CHECK_WORK:-$OUT/work}
rm -rf "$OUT/steps" "$WORK/parity"
mkdir -p "$OUT/steps" "$WORK"
TABLE=$OUT/rows.md
: >"$TABLE"
export CCACHE_DIR=${CCACHE_DIR:-$REPO/build/ccache}

N_GPUS=0
if [ "$MODE" = cuda ]; then
  N_GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
fi

# ------------------------------------------------------------------ step runner
TOTAL=15
N=0
FAILED=()
PARITY_FAILED=0

# row CHECK MEASURED BOUND NOTE: one line of the final table.
row() { printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4" >>"$TABLE"; }
# skip WHY: ends a step body as skipped.
skip() { echo "$1" >"$OUT/steps/skip"; exit 3; }
# json FILE KEY...: a field of the RESULT line in FILE (nested keys allowed).
json() {
  "$PY" - "$@" <<'EOF'
import json, sys
path, keys = sys.argv[1], sys.argv[2:]
line = [l for l in open(path) if l.startswith(("RESULT ", "load_bench ", "{"))][-1]
v = json.loads(line.split(" ", 1)[1] if not line.startswith("{") else line)
for k in keys:
    v = v[k]
print(v)
EOF
}
# calc EXPR: a Python expression, printed.
calc() { "$PY" -c "print($1)"; }

# step NAME WHAT FUNCTION: runs FUNCTION in a subshell with errexit, its output in steps/NAME.log.
step() {
  local name=$1 what=$2 fn=$3 start end rc
  N=$((N + 1))
  printf '[%d/%d] %s ... ' "$N" "$TOTAL" "$what"
  start=$(date +%s.%N)
  rm -f "$OUT/steps/skip"
  set +e
  ( set -euo pipefail; "$fn" ) >"$OUT/steps/$name.log" 2>&1
  rc=$?
  set -e
  end=$(date +%s.%N)
  local secs
  secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
  if [ "$rc" -eq 0 ]; then
    echo "ok ($secs s)"
  elif [ "$rc" -eq 3 ]; then
    local why
    why=$(cat "$OUT/steps/skip" 2>/dev/null || echo "no reason given")
    echo "skipped: $why ($secs s)"
    row "$what" "skipped" "" "$why"
  else
    echo "FAILED: $what (exit $rc, $secs s; log $OUT/steps/$name.log)"
    tail -n 15 "$OUT/steps/$name.log" | sed 's/^/    /'
    FAILED+=("$what")
    row "$what" "**FAILED**" "" "exit $rc; see build/gpu_check/steps/$name.log"
    case "$name" in parity*) PARITY_FAILED=1 ;; esac
  fi
}

# ------------------------------------------------------------------ steps
s_environment() {
  "$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count()); [print(" ", i, torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]'
  cmake --version | head -1
  if [ "$MODE" = cuda ] && [ "$N_GPUS" -lt 1 ]; then
    echo "no CUDA device visible to $PY; run with --cpu on a machine without a GPU" >&2
    exit 1
  fi
  row "Environment" "$("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')" "" \
      "$N_GPUS GPU(s); $(nproc) CPU cores"
}

s_build() {
  local prefix=() launcher=() targets=()
  if [ "$MODE" = cuda ]; then
    local paths
    paths=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
    # The engine's Debian libraries packed by scripts/pack_gpu_deps.sh, carried with the tree.
    if [ -d "$REPO/build/gpu_deps/usr" ]; then
      paths="$paths;$REPO/build/gpu_deps/usr"
      export PKG_CONFIG_PATH="$REPO/build/gpu_deps/usr/lib/x86_64-linux-gnu/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
      echo "using build/gpu_deps (scripts/pack_gpu_deps.sh) for Abseil, nlohmann-json, PCRE2, GoogleTest"
    fi
    prefix=(-DCMAKE_PREFIX_PATH="$paths")
  fi
  command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release "${prefix[@]}" "${launcher[@]}" | tee "$OUT/steps/configure.out"
  if [ "$LEAN" -eq 1 ]; then
    targets=(--target remotelens_run make_demo_model forward_bench)
    [ -f tools/make_checkpoint.cc ] && targets+=(make_checkpoint)
    [ -f tools/load_bench.cc ] && targets+=(load_bench)
  fi
  cmake --build "$BUILD" -j "$JOBS" "${targets[@]}"
  local server="server not built: CMake found no gRPC/protobuf/prometheus-cpp"
  [ -x "$BUILD/remotelens_server" ] && server="engine, server, tools, tests"
  [ "$LEAN" -eq 1 ] && server="lean: engine and tools only"
  row "Build (CMake)" "ok" "" "$(grep -o 'remotelens: Torch.*' "$OUT/steps/configure.out" | sed 's/remotelens: //'); $server"
}

s_ctest() {
  [ "$LEAN" -eq 1 ] && skip "lean build: Bazel runs these tests in CI"
  [ -f "$BUILD/CTestTestfile.cmake" ] || skip "GoogleTest not found by CMake"
  (cd "$BUILD" && ctest --output-on-failure -j "$JOBS") | tee "$OUT/steps/ctest.out"
  row "C++ tests (ctest)" "$(grep -oE '[0-9]+% tests passed.*' "$OUT/steps/ctest.out" | tail -1)" "" "engine$([ -x "$BUILD/remotelens_server" ] && echo ' and server')"
}

parity() {  # DTYPE TOL DEVICE
  local ref_device=cpu
  [ "$MODE" = cuda ] && ref_device=cuda:0
  "$PY" scripts/gpu_check.py parity --run "$BUILD/remotelens_run" --make_demo_model "$BUILD/make_demo_model" \
    --work "$WORK" --dtype "$1" --tol "$2" --device "$3" --ref_device "$ref_device" | tee "$OUT/steps/parity_$1.json"
  local f=$OUT/steps/parity_$1.json
  row "Parity $1 on $3 (demo model, every hook)" \
      "max diff $(calc "'%.2g' % $(json "$f" worst "all hooks" diff)"); fast path $(calc "'%.2g' % $(json "$f" worst "fast path" diff)")" \
      "$([ "$1" = float32 ] && echo "abs <= $2" || echo "rel <= $2")" \
      "reference on $(json "$f" reference_device), float32"
}
s_parity_f32() { mkdir -p "$WORK/parity"; parity float32 1e-4 "$DEVICE"; }
# bfloat16 tolerance: the engine computes in bfloat16 (8-bit significand, unit roundoff 2^-8 =
# 0.39%) where the reference computes the same bf16-rounded weights in float32. Each cached tensor
# is a few rounded operations past the last bf16 rounding of the residual stream, and the residual
# errors add over the demo model's layers, so a tensor's max error is bounded at ~10 roundoffs of
# its own scale: |engine - reference| <= 0.04 * max|reference|, per tensor. A real bug (a wrong
# rotary, mask or scale) moves values by O(1) of that scale, far above 0.04.
s_parity_bf16() { mkdir -p "$WORK/parity"; parity bfloat16 0.04 "$DEVICE"; }
s_parity_multi() {
  [ "$MODE" = cpu ] && skip "needs CUDA"
  [ "$N_GPUS" -ge 2 ] || skip "one GPU visible; --device cuda:0,cuda:1 needs two"
  mkdir -p "$WORK/parity"
  parity float32 1e-4 "cuda:0,cuda:1"
}

s_checkpoint() {
  MODEL=$WORK/model
  if [ "$MODE" = cpu ]; then
    rm -rf "$MODEL"
    if [ -x "$BUILD/make_checkpoint" ]; then
      "$BUILD/make_checkpoint" --preset demo --dtype bfloat16 --shards 4 --out "$MODEL"
    else
      "$BUILD/make_demo_model" "$MODEL"
    fi
    row "Checkpoint" "demo model" "" "$(du -sh "$MODEL" | cut -f1) on local disk"
    return
  fi
  if [ -f "$MODEL/model.safetensors.index.json" ] && [ -f "$MODEL/.complete" ]; then
    echo "reusing $MODEL"
  elif [ -x "$BUILD/make_checkpoint" ]; then
    rm -rf "$MODEL"
    "$BUILD/make_checkpoint" --preset llama3.1-8b --dtype bfloat16 --shards 4 --out "$MODEL"
    touch "$MODEL/.complete"
  else
    rm -rf "$MODEL"
    "$PY" scripts/gpu_check.py checkpoint --out "$MODEL" --shards 4
    touch "$MODEL/.complete"
  fi
  row "Checkpoint (Llama 3.1 8B config, random bf16, 4 shards + index)" "$(du -sh "$MODEL" | cut -f1)" "" "$WORK/model"
}

s_load() {
  MODEL=$WORK/model
  [ -x "$BUILD/load_bench" ] || skip "tools/load_bench.cc not on this branch yet (issue 14)"
  local dtype_flag=()
  [ "$MODE" = cuda ] && dtype_flag=(--dtype bfloat16)
  "$BUILD/load_bench" --model_dir "$MODEL" --device "$DEVICE" "${dtype_flag[@]}" | tee "$OUT/steps/load.json"
  local f=$OUT/steps/load.json
  row "Cold load" "$(calc "'%.2f s' % $(json "$f" load_seconds)")" "$(calc "'%.2f s read' % $(json "$f" read_seconds)")" \
      "load/read $(calc "'%.2f' % $(json "$f" load_over_read)"); files $(calc "'%.2f GB' % ($(json "$f" file_bytes) / 1e9)")"
  local resident
  resident=$(json "$f" device_memory_bytes)
  [ "$MODE" = cpu ] && resident=$(json "$f" rss_after_load_bytes)
  row "Resident memory after load ($([ "$MODE" = cpu ] && echo RSS || echo 'CUDA allocator'))" \
      "$(calc "'%.2f GB' % ($resident / 1e9)")" "$(calc "'%.2f GB weights' % ($(json "$f" weight_bytes) / 1e9)")" \
      "ratio $(calc "'%.2f' % ($resident / max(1, $(json "$f" weight_bytes)))")"
}

s_bounds() {
  "$PY" scripts/gpu_check.py bounds --device "$DEVICE" | tee "$OUT/steps/bounds.json"
  local f=$OUT/steps/bounds.json
  row "Bounds used" "$(calc "'%.0f GB/s, %.1f TFLOP/s' % ($(json "$f" bandwidth_Bps) / 1e9, $(json "$f" flops) / 1e12)")" "" \
      "$(json "$f" device): $(json "$f" source)"
}

s_forward() {
  MODEL=$WORK/model
  local f=$OUT/steps/bounds.json bw flops pb pp
  [ -f "$f" ] || skip "no bounds (the bounds step failed)"
  bw=$(json "$f" bandwidth_Bps)
  flops=$(json "$f" flops)
  if [ "$MODE" = cpu ]; then pb=2; pp=64; else pb=8; pp=512; fi
  "$BUILD/forward_bench" --model_dir "$MODEL" --device "$DEVICE" --dtype "$DTYPE_FAST" \
    --batch 1 --pos 128 --modes decode --iters 20 --warmup 3 | tee "$OUT/steps/decode.json"
  "$BUILD/forward_bench" --model_dir "$MODEL" --device "$DEVICE" --dtype "$DTYPE_FAST" \
    --batch "$pb" --pos "$pp" --modes none,resid_post --iters 5 --warmup 2 | tee "$OUT/steps/prefill.json"
  local d=$OUT/steps/decode.json wb params none resid
  wb=$(json "$d" weight_bytes)
  params=$(json "$d" params)
  local dec bound_dec
  dec=$(json "$d" median_ms)
  bound_dec=$(calc "1000 * $wb / $bw")
  row "Decode, 1 token at batch 1 (after 128 cached, $DTYPE_FAST)" "$(calc "'%.2f ms' % $dec")" \
      "$(calc "'%.2f ms (weights %.3g GB / bandwidth)' % ($bound_dec, $wb / 1e9)")" \
      "$(calc "'%.0f%% of bandwidth bound' % (100 * $bound_dec / $dec)")"
  none=$(grep '"mode": "none"' "$OUT/steps/prefill.json" | "$PY" -c 'import json,sys; print(json.loads(sys.stdin.read())["median_ms"])')
  resid=$(grep '"mode": "resid_post"' "$OUT/steps/prefill.json" | "$PY" -c 'import json,sys; print(json.loads(sys.stdin.read())["median_ms"])')
  local bound_pre
  bound_pre=$(calc "1000 * 2 * $params * $pb * $pp / $flops")
  row "Prefill ${pb}x${pp}, no hooks ($DTYPE_FAST)" "$(calc "'%.1f ms' % $none")" \
      "$(calc "'%.1f ms (2 x %.3gG params x %d tokens / peak)' % ($bound_pre, $params / 1e9, $pb * $pp)")" \
      "$(calc "'%.0f%% of compute bound' % (100 * $bound_pre / $none)")"
  row "Prefill ${pb}x${pp}, caching every hook_resid_post to host" "$(calc "'%.1f ms' % $resid")" \
      "$(calc "'%.1f ms (no hooks)' % $none")" "$(calc "'%.2fx the no-hook forward' % ($resid / $none)")"
}

# What sharing forwards between users can gain on this device (issue 8's ratios, engine alone):
# 16 users' 1x16-token runs as one 16x16 forward, and 16 users' decode steps as one 16-row step.
s_batching() {
  MODEL=$WORK/model
  local args=(--model_dir "$MODEL" --device "$DEVICE" --dtype "$DTYPE_FAST" --warmup 2)
  "$BUILD/forward_bench" "${args[@]}" --batch 1 --pos 16 --modes none --iters 10 | tee "$OUT/steps/run1.json"
  "$BUILD/forward_bench" "${args[@]}" --batch 16 --pos 16 --modes none --iters 5 | tee "$OUT/steps/run16.json"
  "$BUILD/forward_bench" "${args[@]}" --batch 1 --pos 128 --modes decode --iters 20 | tee "$OUT/steps/step1.json"
  "$BUILD/forward_bench" "${args[@]}" --batch 16 --pos 128 --modes decode --iters 20 | tee "$OUT/steps/step16.json"
  local r1 r16 s1 s16
  r1=$(json "$OUT/steps/run1.json" median_ms)
  r16=$(json "$OUT/steps/run16.json" median_ms)
  s1=$(json "$OUT/steps/step1.json" median_ms)
  s16=$(json "$OUT/steps/step16.json" median_ms)
  row "Batching ceiling: 16 users' 1x16 runs in one forward ($DTYPE_FAST)" \
      "$(calc "'%.2fx' % (16 * $r1 / $r16)")" "issue 8 asks >= 2x served" \
      "$(calc "'1x16 %.2f ms, 16x16 %.2f ms' % ($r1, $r16)")"
  row "Batching ceiling: 16 users' decode steps in one ($DTYPE_FAST, 128 cached)" \
      "$(calc "'%.2fx' % (16 * $s1 / $s16)")" "issue 8 asks >= 4x served" \
      "$(calc "'1 row %.2f ms, 16 rows %.2f ms' % ($s1, $s16)")"
}

# Issue 8's served figures: 16 clients through two servers on this device, batching on and
# --max_batch_requests 1, taking turns (bench/batch_bench.py, one short round).
s_served_batching() {
  MODEL=$WORK/model
  local server=${GPU_CHECK_SERVER:-$BUILD/remotelens_server}
  [ "$LEAN" -eq 1 ] && skip "lean: CI runs batch_bench's smoke test instead"
  [ -x "$server" ] || skip "server not built here (CMake found no gRPC/protobuf/prometheus-cpp)"
  "$PY" -c 'import grpc' 2>/dev/null || skip "grpcio not importable by $PY"
  REMOTELENS_SERVER_BIN=$server "$PY" bench/batch_bench.py --model_dir "$MODEL" \
    --server_config "dtype: \"$DTYPE_FAST\" devices: \"$DEVICE\"" \
    --forward_bench "$BUILD/forward_bench" --forward_bench_args "--device $DEVICE --dtype $DTYPE_FAST" \
    --clients 16 --seconds 8 --rounds 1 --new_tokens 32 --lone_iters 20 --json | tee "$OUT/steps/batching.json"
  local f=$OUT/steps/batching.json
  row "Served: 16 clients' steered 1x16 runs, batching / one per forward" \
      "$(calc "'%.2fx' % $(json "$f" runs_ratio)")" \
      "$(calc "'ceiling %.2fx; target >= 2x' % $(json "$f" ceilings runs)")" \
      "$(calc "'%.1f vs %.1f requests/s' % ($(json "$f" runs_per_s batched), $(json "$f" runs_per_s alone))")"
  row "Served: 16 clients' steered generations (32 tokens)" \
      "$(calc "'%.2fx' % $(json "$f" generate_ratio)")" \
      "$(calc "'ceiling %.2fx; target >= 4x' % $(json "$f" ceilings generate)")" \
      "$(calc "'%.0f vs %.0f tokens/s' % ($(json "$f" generated_tokens_per_s batched), $(json "$f" generated_tokens_per_s alone))")"
  row "Served: a lone 1x16 run, p50 with batching / without" \
      "$(calc "'%.3fx' % $(json "$f" lone_ratio)")" "target <= 1.05x" \
      "$(calc "'%.2f vs %.2f ms' % ($(json "$f" lone_p50_ms batched), $(json "$f" lone_p50_ms alone))")"
}

s_roundtrip() {
  MODEL=$WORK/model
  # GPU_CHECK_SERVER: a server binary built elsewhere (CI's lean form passes Bazel's).
  local server=${GPU_CHECK_SERVER:-$BUILD/remotelens_server} origin="this CMake build"
  [ -n "${GPU_CHECK_SERVER:-}" ] && origin="$GPU_CHECK_SERVER"
  if [ ! -x "$server" ]; then
    [ "$LEAN" -eq 1 ] && skip "lean build has no server and GPU_CHECK_SERVER is unset"
    skip "server not built here (CMake found no gRPC/protobuf/prometheus-cpp)"
  fi
  "$PY" -c 'import grpc' 2>/dev/null || skip "grpcio not importable by $PY"
  "$PY" scripts/gpu_check.py roundtrip --server "$server" --model_dir "$MODEL" \
    --device "$DEVICE" --dtype "$DTYPE_FAST" --batch 1 --pos 16 | tee "$OUT/steps/roundtrip.json"
  local f=$OUT/steps/roundtrip.json
  row "Run over loopback (Python client, 1x16, resid_post x all layers)" \
      "$(calc "'%.1f ms' % $(json "$f" median_ms)")" "" "median of 5; server: $origin"
}

s_hf() {
  MODEL=$WORK/model
  "$PY" -c 'import transformers' 2>/dev/null || skip "transformers not importable by $PY"
  local pb=8 pp=512
  [ "$MODE" = cpu ] && { pb=2; pp=64; }
  "$PY" scripts/gpu_check.py hf --model_dir "$MODEL" --device "$DEVICE" --dtype "$DTYPE_FAST" \
    --batch "$pb" --pos "$pp" | tee "$OUT/steps/hf.json"
  local f=$OUT/steps/hf.json impl shape hooks
  for impl in eager sdpa; do
    for shape in decode prefill; do
      for hooks in "no hooks" "resid_post hooks"; do
        row "transformers $impl, $shape ($([ "$shape" = decode ] && echo 1x1 || echo "${pb}x${pp}")), $hooks" \
            "$(calc "'%.2f ms' % $(json "$f" median_ms "$impl $shape $hooks")")" "" \
            "LlamaForCausalLM, same weights, no KV cache; forward hooks cache block outputs"
      done
    done
  done
}

s_oom() {
  [ "$MODE" = cpu ] && skip "needs CUDA (a CPU allocation this size would take the machine's memory)"
  MODEL=$WORK/model
  # A prefill far past the GPU's memory (its logits alone are 64 x 16384 x 128256 bf16 = 269 GB)
  # must come back as RESOURCE_EXHAUSTED naming the request. No hooks: caching resid_post here
  # would pin ~275 GB of host memory first.
  set +e
  "$BUILD/forward_bench" --model_dir "$MODEL" --device "$DEVICE" --dtype bfloat16 \
    --batch 64 --pos 16384 --modes none --iters 1 --warmup 0 >"$OUT/steps/oom.out" 2>&1
  local rc=$?
  set -e
  cat "$OUT/steps/oom.out"
  [ "$rc" -ne 0 ] || { echo "a 64x16384 prefill fit in memory: no out-of-memory case exercised"; exit 1; }
  grep -q "RESOURCE_EXHAUSTED.*out of memory during the forward of 64 rows x 16384 positions" "$OUT/steps/oom.out"
  row "Out-of-memory request (64x16384 prefill)" "RESOURCE_EXHAUSTED, no crash" "" "message names rows, positions, dtype, device"
}

step environment "Environment ($MODE)" s_environment
step build "Build $([ "$LEAN" -eq 1 ] && echo "engine and tools" || echo "engine, server, tools, C++ tests") (CMake, $BUILD)" s_build
step ctest "C++ tests (ctest)" s_ctest
step parity_f32 "Parity float32 on $DEVICE" s_parity_f32
step parity_bf16 "Parity bfloat16 on $DEVICE" s_parity_bf16
step parity_multi "Parity float32 split across cuda:0,cuda:1" s_parity_multi
step checkpoint "Checkpoint on local disk" s_checkpoint
step load "Cold load and resident memory" s_load
step bounds "Bandwidth and compute bounds of $DEVICE" s_bounds
step forward "Decode, prefill, resid_post caching" s_forward
step batching "Batching ceilings (shared forwards, engine alone)" s_batching
step served_batching "Served batching, 16 clients (bench/batch_bench.py)" s_served_batching
step roundtrip "Run round trip through the Python client" s_roundtrip
step hf "transformers LlamaForCausalLM (eager, sdpa) with forward hooks" s_hf
step oom "Out-of-memory request" s_oom

{
  echo
  echo "### remotelens gpu_check ($MODE$([ "$LEAN" -eq 1 ] && echo ', lean'), $(date -u +%Y-%m-%d))"
  echo
  echo "| Check | Measured | Bound / baseline | Note |"
  echo "|---|---|---|---|"
  cat "$TABLE"
} | tee "$OUT/table.md"
echo
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "gpu_check: FAILED: ${FAILED[*]}$([ "$PARITY_FAILED" -eq 1 ] && echo ' (parity)')"
  exit 1
fi
echo "gpu_check: all steps passed or skipped"
