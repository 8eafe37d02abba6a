"""The committed Python stubs must be exactly what proto/ generates today."""
import filecmp
import os
import subprocess
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_committed_stubs_match_proto():
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([os.path.join(REPO, "scripts", "gen_python_stubs.sh"), out], check=True)
        fresh = os.path.join(out, "remotelens", "v1")
        committed = os.path.join(REPO, "clients", "python", "remotelens", "v1")
        names = sorted(n for n in os.listdir(fresh) if n.endswith(".py"))
        assert names == sorted(n for n in os.listdir(committed) if n.endswith(".py"))
        _, mismatch, errors = filecmp.cmpfiles(fresh, committed, names, shallow=False)
        assert not mismatch and not errors, (
            f"stubs differ from proto/: {mismatch + errors}; run scripts/gen_python_stubs.sh")
