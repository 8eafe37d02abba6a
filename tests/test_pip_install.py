"""`pip install clients/python` on a machine without network, with Debian's Python packages.

Debian's pip refuses installs into the system Python (PEP 668), so the test does what a user does:
a venv that sees the system site-packages (python3-grpcio, -protobuf, -numpy, -torch, -tqdm,
-jinja2 satisfy the declared dependencies), then pip install with --no-index (nothing can be
downloaded) and --no-build-isolation (setuptools comes from Debian too). The package is then
imported from outside the repository, and must report the version pyproject.toml declares.
"""
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENT = os.path.join(REPO, "clients", "python")


def _declared_version():
    """pyproject.toml takes the version from remotelens/_version.py's __version__ literal."""
    with open(os.path.join(CLIENT, "pyproject.toml")) as f:
        pyproject = f.read()
    assert 'version = { attr = "remotelens._version.__version__" }' in pyproject
    with open(os.path.join(CLIENT, "remotelens", "_version.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["__version__"]:
            return ast.literal_eval(node.value)
    raise AssertionError("remotelens/_version.py assigns no __version__ literal")


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory):
    if subprocess.run([sys.executable, "-c", "import venv, ensurepip"],
                      capture_output=True).returncode != 0:
        pytest.fail("python3-venv is missing: scripts/install_deps.sh installs it")
    root = tmp_path_factory.mktemp("pip_install")
    # A copy: setuptools writes build/ and *.egg-info beside the sources it builds.
    source = root / "src"
    shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PYTHONPATH"] = ""
    out = subprocess.run([python, "-m", "pip", "install", "--no-index", "--no-build-isolation",
                          "--disable-pip-version-check", str(source)],
                         capture_output=True, text=True, cwd=str(root), env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return python, str(root), env


def test_installed_package_imports_from_outside_the_repo(venv_python):
    python, cwd, env = venv_python
    script = textwrap.dedent("""
        import importlib.metadata, json, remotelens
        from remotelens.v1 import remotelens_pb2, remotelens_pb2_grpc
        print(json.dumps({"file": remotelens.__file__, "version": remotelens.__version__,
                          "metadata": importlib.metadata.version("remotelens"),
                          "api": remotelens.API_VERSION,
                          "proto_api": remotelens_pb2.API_VERSION_CURRENT,
                          "requires": importlib.metadata.requires("remotelens")}))
    """)
    out = subprocess.run([python, "-c", script], capture_output=True, text=True, cwd=cwd, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert "site-packages" in info["file"] and not info["file"].startswith(REPO), info["file"]
    assert info["version"] == info["metadata"] == _declared_version()
    assert info["api"] == info["proto_api"] >= 1
    names = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in info["requires"]
             if "extra ==" not in r}
    assert names == {"grpcio", "protobuf", "numpy", "torch", "tqdm", "jinja2"}


def test_install_does_not_download(venv_python):
    """pip had no index: every dependency was already there (Debian's packages), and pip check
    finds nothing missing for remotelens."""
    python, cwd, env = venv_python
    listing = subprocess.run([python, "-m", "pip", "list", "--local", "--format=freeze"],
                             capture_output=True, text=True, cwd=cwd, env=env, timeout=120).stdout
    # Only remotelens (and the venv's own pip/setuptools) live in the venv itself.
    local = {line.split("==")[0].lower() for line in listing.split()}
    assert "remotelens" in local
    assert not local & {"grpcio", "protobuf", "numpy", "torch", "tqdm", "jinja2"}, local
    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True,
                           cwd=cwd, env=env, timeout=120)
    # pip check also reports Debian's own packages (e.g. pygobject without pycairo): only
    # remotelens's lines matter here.
    assert not [line for line in check.stdout.splitlines() if line.lower().startswith("remotelens")], \
        check.stdout
