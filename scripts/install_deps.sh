#!/usr/bin/env bash
# Installs every Debian package remotelens needs to build, test and serve. Idempotent and
# non-interactive: packages already present are skipped without touching apt.
set -euo pipefail

PACKAGES=(
  # build
  bazel-bootstrap bazel-platforms bazel-skylib bazel-rules-java bazel-rules-proto
  g++ cmake
  # scripts/gpu_check.sh's CMake build reuses objects across runs through it
  ccache pkg-config
  # engine
  libtorch-dev libabsl-dev nlohmann-json3-dev libpcre2-dev
  # Optimised BLAS for LibTorch's CPU matmuls (Debian's default is the netlib reference BLAS,
  # ~8x slower here). It plugs in through update-alternatives for C++ and Python alike.
  libopenblas0-pthread
  # oneDNN's sgemm for CPU float32 products (engine/cpu_gemm.h): it picks kernels by instruction
  # set, where this OpenBLAS falls back to SSE3 on CPUs it does not know by model number.
  libdnnl-dev
  # server (tcmalloc: the serving binaries' allocator)
  libtcmalloc-minimal4 libssl-dev libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc prometheus-cpp-dev
  # tests and benchmarks
  libgtest-dev libgmock-dev libbenchmark-dev prometheus openssl
  python3 python3-torch python3-numpy python3-pytest python3-grpcio python3-protobuf
  python3-grpc-tools python3-tqdm python3-yaml
  # the client's apply_chat_template renders chat templates with jinja2
  python3-jinja2
  # tests/test_pip_install.py: `pip install clients/python` into a venv, offline, as a user would
  python3-venv python3-pip python3-setuptools python3-wheel
  # fuzzing (scripts/fuzz.sh): clang 14 and its runtime libraries, libFuzzer among them. The
  # sanitizer builds (scripts/sanitize.sh) use gcc's libasan/libubsan/libtsan, which g++ brings.
  clang libclang-rt-14-dev
)

# Node.js runs Hugging Face's tokenizers.js, the tokenizer tests' reference; machines that already
# have a node (not from Debian) keep theirs.
command -v node >/dev/null && command -v npm >/dev/null || PACKAGES+=(nodejs npm)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install_deps: all ${#PACKAGES[@]} packages present"
  exit 0
fi
echo "install_deps: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install_deps: done"
