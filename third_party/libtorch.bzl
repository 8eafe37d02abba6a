"""A repository for LibTorch: Debian's system package, or the directory named by LIBTORCH_DIR."""

_DEBIAN_BUILD = """
package(default_visibility = ["//visibility:public"])

# Debian's libtorch-dev: ATen and c10 headers under /usr/include (already on the compiler's
# path), the C++ frontend's under /usr/include/torch/csrc/api/include (linked in here as api/ so
# that `includes` can propagate it), libraries in the default linker path.
cc_library(
    name = "libtorch",
    hdrs = glob(["api/include/**/*.h"]),
    includes = ["api/include"],
    linkopts = ["-ltorch", "-ltorch_cpu", "-lc10", "-lpthread"],
)
"""

_DIR_BUILD = """
package(default_visibility = ["//visibility:public"])

cc_library(
    name = "libtorch",
    hdrs = glob(["include/**/*.h", "include/**/*.hpp", "include/**/*.cuh"]),
    includes = ["include", "include/torch/csrc/api/include"],
    srcs = glob(["lib/*.so*"]),
    linkopts = ["-Wl,-rpath,{dir}/lib", "-lpthread"],
)
"""

def _libtorch_repository_impl(ctx):
    libtorch_dir = ctx.os.environ.get("LIBTORCH_DIR", "")
    if not libtorch_dir:
        api = ctx.path("/usr/include/torch/csrc/api/include")
        if not api.exists:
            fail("LibTorch headers not found: install libtorch-dev (scripts/install_deps.sh) " +
                 "or set LIBTORCH_DIR")
        ctx.symlink(api, "api/include")
        ctx.file("BUILD", _DEBIAN_BUILD)
        return
    for sub in ["include", "lib"]:
        path = ctx.path(libtorch_dir + "/" + sub)
        if not path.exists:
            fail("LIBTORCH_DIR=%s has no %s/ directory" % (libtorch_dir, sub))
        ctx.symlink(path, sub)
    ctx.file("BUILD", _DIR_BUILD.replace("{dir}", libtorch_dir))

libtorch_repository = repository_rule(
    implementation = _libtorch_repository_impl,
    environ = ["LIBTORCH_DIR"],
    local = True,
)
