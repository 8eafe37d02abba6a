#!/usr/bin/env bash
# Builds the libFuzzer targets in fuzz/ with clang++ (-fsanitize=fuzzer,address,undefined) against
# Debian's libraries and runs each for FUZZ_SECONDS (default 20) from its seed corpus in
# fuzz/corpus/<target>/. Bazel does not build these: Bazel 4 here is set up for gcc, and libFuzzer
# needs clang; each target compiles only the units it fuzzes.
#
#   scripts/fuzz.sh                          # build and run every target, 20 s each
#   FUZZ_SECONDS=600 scripts/fuzz.sh tokenizer_fuzz   # one target, longer
#   FUZZ_BUILD_ONLY=1 scripts/fuzz.sh        # build only
#   build/fuzz/safetensors_fuzz fuzz/corpus/safetensors_fuzz/crash-...  # replay one input
#
# New inputs found while fuzzing go to build/fuzz/corpus/<target>/ (not the repo). A crash
# leaves build/fuzz/crash-* and fails the run; fix the bug and copy the input into
# fuzz/corpus/<target>/ so every later run replays it. Ends with "fuzz: N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."

FUZZ_SECONDS=${FUZZ_SECONDS:-20}
OUT=build/fuzz
OBJ=$OUT/obj
mkdir -p "$OBJ" "$OUT/proto"
CXX=${FUZZ_CXX:-clang++}
command -v "$CXX" >/dev/null || { echo "fuzz: $CXX not found (scripts/install_deps.sh installs clang)"; echo "fuzz: 0 passed, 1 failed"; exit 1; }

# -O1 -g: fast enough to fuzz, readable stack traces. Units are instrumented for coverage
# (fuzzer-no-link) and checked by ASan+UBSan; LibTorch, protobuf and the rest are not.
SAN=(-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer)
CXXFLAGS=(-std=c++17 -O1 -g -w "${SAN[@]}" -I. -I"$OUT/proto" -I/usr/include/torch/csrc/api/include)
LIBS_ABSL=(-labsl_statusor -labsl_status -labsl_cord -labsl_cordz_info -labsl_cord_internal
  -labsl_cordz_functions -labsl_cordz_handle -labsl_hash -labsl_city -labsl_low_level_hash
  -labsl_raw_hash_set -labsl_str_format_internal -labsl_strings -labsl_strings_internal
  -labsl_synchronization -labsl_graphcycles_internal -labsl_stacktrace -labsl_symbolize
  -labsl_debugging_internal -labsl_demangle_internal -labsl_malloc_internal -labsl_time
  -labsl_civil_time -labsl_time_zone -labsl_int128 -labsl_throw_delegate
  -labsl_raw_logging_internal -labsl_log_severity -labsl_base -labsl_spinlock_wait
  -labsl_bad_optional_access -labsl_bad_variant_access -labsl_strerror)
LIBS_TORCH=(-ltorch -ltorch_cpu -lc10)
LIBS_PROTO=(-lprotobuf)

# target: "sources | libraries". Sources compile once into build/fuzz/obj and are shared.
declare -A TARGETS=(
  [hook_names_fuzz]="engine/hook_names.cc engine/llama_config.cc|ABSL"
  [llama_config_fuzz]="engine/llama_config.cc|ABSL"
  [tokenizer_fuzz]="engine/tokenizer.cc engine/byte_level.cc|ABSL PCRE"
  [safetensors_fuzz]="engine/safetensors.cc engine/safetensors_internal.cc engine/safetensors_writer.cc|ABSL TORCH"
  [checkpoint_index_fuzz]="engine/safetensors.cc engine/safetensors_internal.cc engine/safetensors_writer.cc|ABSL TORCH"
  [tensor_codec_fuzz]="PROTO server/tensor_codec.cc|ABSL TORCH PROTO"
  [textproto_fuzz]="PROTO server/auth.cc|ABSL PROTO SSL"
  [metrics_http_fuzz]="server/metrics_http.cc|ABSL PROM"
)
ORDER=(hook_names_fuzz llama_config_fuzz tokenizer_fuzz safetensors_fuzz checkpoint_index_fuzz
       tensor_codec_fuzz textproto_fuzz metrics_http_fuzz)
[ $# -gt 0 ] && ORDER=("$@")

PROTOS=(remotelens/v1/config.proto remotelens/v1/hooks.proto remotelens/v1/remotelens.proto remotelens/v1/tensor.proto)
proto_objs() {
  # Messages only (no gRPC stubs): the fuzzed units use the message classes.
  if [ ! -f "$OUT/proto/.stamp" ] || [ -n "$(find proto -name '*.proto' -newer "$OUT/proto/.stamp")" ]; then
    protoc --proto_path=proto --cpp_out="$OUT/proto" "${PROTOS[@]}" || return 1
    touch "$OUT/proto/.stamp"
  fi
  for p in "${PROTOS[@]}"; do echo "$OUT/proto/${p%.proto}.pb.cc"; done
}

compile() {  # source -> object path on stdout; rebuilt only when the source or a header changed
  local src=$1 obj=$OBJ/$(echo "$1" | tr / _).o
  if [ ! -f "$obj" ] || [ "$src" -nt "$obj" ] || [ -n "$(find engine server fuzz -name '*.h' -newer "$obj" | head -1)" ]; then
    "$CXX" "${CXXFLAGS[@]}" -fsanitize=fuzzer-no-link -c "$src" -o "$obj" >&2 || return 1
  fi
  echo "$obj"
}

build() {
  local target=$1 spec=${TARGETS[$1]:-}
  [ -n "$spec" ] || { echo "fuzz: unknown target $target" >&2; return 1; }
  local srcs=${spec%%|*} libs=${spec##*|} objs=() s
  for s in $srcs; do
    if [ "$s" = PROTO ]; then
      local p; for p in $(proto_objs) ; do objs+=("$(compile "$p")") || return 1; done
    else
      objs+=("$(compile "$s")") || return 1
    fi
  done
  objs+=("$(compile "fuzz/$target.cc")") || return 1
  local link=()
  for l in $libs; do
    case $l in
      ABSL) link+=("${LIBS_ABSL[@]}") ;;
      TORCH) link+=("${LIBS_TORCH[@]}") ;;
      PROTO) link+=("${LIBS_PROTO[@]}") ;;
      PCRE) link+=(-lpcre2-8) ;;
      SSL) link+=(-lcrypto) ;;
      PROM) link+=(-lprometheus-cpp-core -lpthread) ;;
    esac
  done
  "$CXX" "${SAN[@]}" -fsanitize=fuzzer "${objs[@]}" "${link[@]}" -lpthread \
    -o "$OUT/$target"
}

passed=0
failed=0
for t in "${ORDER[@]}"; do
  start=$(date +%s)
  if ! build "$t"; then
    echo "fuzz: $t FAILED TO BUILD"
    failed=$((failed + 1))
    continue
  fi
  echo "fuzz: built $t in $(( $(date +%s) - start )) s"
  [ -n "${FUZZ_BUILD_ONLY:-}" ] && { passed=$((passed + 1)); continue; }
  mkdir -p "$OUT/corpus/$t" "fuzz/corpus/$t"
  # detect_leaks=0: LibTorch and protobuf keep process-lifetime allocations that LeakSanitizer
  # would report on exit; per-input leaks in our code still show up as RSS growth (-rss_limit_mb).
  # -timeout: one input taking 10 s is a finding (a parser stuck in a loop).
  if ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1 UBSAN_OPTIONS=print_stacktrace=1 \
     "$OUT/$t" -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
       -print_final_stats=0 -artifact_prefix="$OUT/" "$OUT/corpus/$t" "fuzz/corpus/$t" \
       > "$OUT/$t.log" 2>&1; then
    echo "fuzz: $t ok ($(grep -oE 'DONE +cov: [0-9]+' "$OUT/$t.log" | grep -oE '[0-9]+$' || echo '?') edges, ${FUZZ_SECONDS} s)"
    passed=$((passed + 1))
  else
    echo "fuzz: $t FAILED; last lines of $OUT/$t.log:"
    grep -vE "^#[0-9]+\s+(NEW|REDUCE|pulse)" "$OUT/$t.log" | tail -40 | cut -c1-300
    failed=$((failed + 1))
  fi
done
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
