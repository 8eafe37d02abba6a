#!/usr/bin/env bash
# Sanitizer runs of the C++ tests and the server, with gcc through Bazel (.bazelrc configs asan
# and tsan). Each sanitizer gets its own Bazel output base and makes no convenience symlinks
# (--symlink_prefix=/: links in the workspace would put a second execroot under `//...`), so the
# normal bazel-bin/ is not overwritten and switching back costs nothing; the shared disk cache
# still serves actions built before. Outputs: `bazel --output_base=~/.cache/remotelens-bazel-asan
# info --config=asan bazel-bin` (the script prints it).
#
#   scripts/sanitize.sh asan          # CI form: ASan+UBSan unit tests of engine/ and server/
#                                     # units, then the ASan server under an e2e subset
#   scripts/sanitize.sh asan full     # every test in //engine/... //server/..., and the whole
#                                     # tests/server suite against the ASan server
#   scripts/sanitize.sh tsan          # TSan: scheduler, outbox, session store, metrics tests
#
# Ends with "sanitize <kind>: N passed, N failed" (Bazel test targets + pytest tests).
set -uo pipefail
cd "$(dirname "$0")/.."

kind=${1:-}
form=${2:-ci}
case $kind in asan | tsan) ;; *) echo "usage: scripts/sanitize.sh asan|tsan [full]"; exit 2 ;; esac

BAZEL=(bazel --output_base="$HOME/.cache/remotelens-bazel-$kind")
FLAGS=(--config="$kind" --symlink_prefix=/ --noshow_progress)
[ "${CI:-}" = "true" ] && FLAGS+=(--color=no --curses=no)

if [ "$kind" = asan ]; then
  if [ "$form" = full ]; then
    TARGETS=(//engine/... //server/...)
  else
    # The units that parse, decode, schedule or store what clients send; the model-math tests
    # (llama_model, fused_ops, generator, run_job) are left to the full form: ASan makes their
    # LibTorch-heavy builds and runs the slowest, and their inputs are not client bytes.
    TARGETS=(//engine:safetensors_test //engine:llama_config_test //engine:hook_names_test
             //engine:tokenizer_test //engine:byte_level_test //engine:hook_plan_test
             //engine:sampler_test //server:tensor_codec_test //server:auth_test
             //server:scheduler_test //server:session_store_test //server:outbox_test
             //server:metrics_test //server:request_builder_test)
  fi
else
  # TSan sees races only in code it instrumented. Debian's Abseil, gRPC, protobuf and LibTorch are
  # not; scripts/tsan.supp lists what that makes it misreport and why.
  TARGETS=(//server:scheduler_test //server:outbox_test //server:session_store_test
           //server:metrics_test)
  export TSAN_OPTIONS="suppressions=$PWD/scripts/tsan.supp halt_on_error=1 second_deadlock_stack=1"
  FLAGS+=(--test_env=TSAN_OPTIONS)
fi

start=$(date +%s)
log=/tmp/remotelens_sanitize_$kind.log
"${BAZEL[@]}" test "${FLAGS[@]}" "${TARGETS[@]}" 2>&1 | tee "$log"
summary=$(grep -E "^Executed [0-9]+ out of [0-9]+ tests?" "$log" | tail -1)
total=$(echo "$summary" | sed -E 's/^Executed [0-9]+ out of ([0-9]+) tests?.*/\1/')
failed=$(grep -cE "^//.*(FAILED|TIMEOUT|NO STATUS|FAILED TO BUILD)" "$log" || true)
total=${total:-0}
[ "$total" -eq 0 ] && failed=$((failed + 1))
passed=$((total - failed < 0 ? 0 : total - failed))
echo "sanitize $kind: bazel tests took $(( $(date +%s) - start )) s; logs under" \
  "$("${BAZEL[@]}" info --config="$kind" bazel-testlogs 2>/dev/null)"

if [ "$kind" = asan ]; then
  # The ASan-built server under the Python end-to-end tests. Reports go to files (the harness
  # keeps the server's stderr), and any report file fails the run even if every test passed.
  start=$(date +%s)
  "${BAZEL[@]}" build "${FLAGS[@]}" //server:remotelens_server //tools:make_demo_model 2>&1 | tail -3
  bin=$("${BAZEL[@]}" info --config="$kind" bazel-bin 2>/dev/null)
  echo "sanitize asan: server binary $bin/server/remotelens_server"
  reports=$(mktemp -d /tmp/remotelens_asan_reports.XXXXXX)
  if [ "$form" = full ]; then
    PYTESTS=(tests/server)
  else
    PYTESTS=(tests/server/test_bad_input.py tests/server/test_isolation.py
             "tests/server/test_e2e.py::test_session_lifecycle"
             "tests/server/test_e2e.py::test_store_fetch_delete_cache"
             "tests/server/test_e2e.py::test_interactive_multiple_callbacks"
             "tests/server/test_e2e.py::test_generate_greedy_matches_reference"
             tests/server/test_faults.py)
  fi
  # Deadline races a queued job: under ASan's slower server the job can start before the deadline
  # passes (seen once in CI, passed the run before). Not a memory-safety check; the normal suite runs it.
  DESELECT=(--deselect tests/server/test_bad_input.py::test_deadline_while_queued)
  # detect_leaks=0: LibTorch and gRPC keep process-lifetime allocations at exit; leaks that
  # matter show as RSS growth in bench/soak.py instead.
  REMOTELENS_BIN_DIR="$bin/tools" REMOTELENS_REQUIRE_BINARIES=1 \
    ASAN_OPTIONS="detect_leaks=0:log_path=$reports/asan:abort_on_error=1" \
    UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$reports/ubsan" \
    /usr/bin/python3 -m pytest -q -p no:cacheprovider "${PYTESTS[@]}" "${DESELECT[@]}" 2>&1 | tee "$log.pytest"
  line=$(grep -E "^(=+ )?[0-9]+ (passed|failed)" "$log.pytest" | tail -1)
  py_passed=$(echo "$line" | grep -oE "[0-9]+ passed" | grep -oE "[0-9]+" || echo 0)
  py_failed=0
  for n in $(echo "$line" | grep -oE "[0-9]+ (failed|errors?)" | grep -oE "[0-9]+"); do
    py_failed=$((py_failed + n))
  done
  [ -z "$line" ] && py_failed=1
  if ls "$reports"/* >/dev/null 2>&1; then
    echo "sanitize asan: the server reported errors:"
    head -60 "$reports"/*
    py_failed=$((${py_failed:-0} + 1))
  fi
  passed=$((passed + ${py_passed:-0}))
  failed=$((failed + ${py_failed:-0}))
  echo "sanitize asan: server e2e took $(( $(date +%s) - start )) s"
fi
echo "sanitize $kind: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
