#!/usr/bin/env bash
# Packs the engine's build dependencies from this Debian machine into build/gpu_deps/usr (about
# 10 MB), for a GPU machine that has CMake and a PyTorch wheel but no Debian packages and no
# network: Abseil (headers, shared libraries, CMake config), nlohmann-json (headers, config),
# PCRE2 (header, library, pkg-config file) and GoogleTest (static libraries, config). The layout
# mirrors /usr, so the CMake configs' relative import prefixes resolve inside the pack.
# scripts/gpu_check.sh adds the pack to CMake's and pkg-config's search paths when it exists;
# carry build/gpu_deps to the GPU machine with the tree. The server's gRPC, protobuf and
# prometheus-cpp are not packed (their dependency closure is large): the GPU check skips the
# round trip there with a note.
#
# Debian 12's libraries need glibc >= 2.34 and libstdc++ from GCC 12 (GLIBCXX_3.4.30) on the
# GPU machine; the check's build step fails naming the missing symbol version otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
LIB=/usr/lib/x86_64-linux-gnu
DEST=build/gpu_deps/usr
rm -rf build/gpu_deps
mkdir -p "$DEST/include" "$DEST/lib/x86_64-linux-gnu/cmake" "$DEST/lib/x86_64-linux-gnu/pkgconfig" "$DEST/share/cmake"
cp -a /usr/include/absl /usr/include/nlohmann /usr/include/pcre2.h /usr/include/gtest /usr/include/gmock "$DEST/include/"
cp -a "$LIB"/libabsl_*.so* "$LIB"/libpcre2-8.so* "$LIB"/libgtest*.a "$LIB"/libgmock*.a "$DEST/lib/x86_64-linux-gnu/"
cp -a "$LIB/cmake/absl" "$LIB/cmake/GTest" "$DEST/lib/x86_64-linux-gnu/cmake/"
cp -a /usr/share/cmake/nlohmann_json "$DEST/share/cmake/"
# pkg-config files name their prefix absolutely: derive it from the file's own location instead.
sed 's|^prefix=/usr$|prefix=${pcfiledir}/../../..|' "$LIB/pkgconfig/libpcre2-8.pc" \
  >"$DEST/lib/x86_64-linux-gnu/pkgconfig/libpcre2-8.pc"
# No symlinks: copies travel everywhere (the device tool does not carry links).
find "$DEST" -type l | while read -r link; do
  target=$(readlink -f "$link")
  cp --remove-destination "$target" "$link"
done
echo "pack_gpu_deps: $(du -sh build/gpu_deps | cut -f1) in build/gpu_deps"
