"""runm's own processes start without OpenSSL: `python -m runm.launch`, and runm.sha."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from runm.sha import sha256_hex

SRC = Path(__file__).resolve().parents[2] / "src"

PROBE = """
import sys
import asyncio  # tries `import ssl`
import runm.sandbox.monitor, runm.shim.main, runm.sandbox.pool, runm.guest.image
from runm.sandbox.rundir import vm_run_dir
vm_run_dir(__import__("pathlib").Path("/r"), "c1")
print(sys.argv[1:], "_ssl" in sys.modules, "_hashlib" in sys.modules)
sys.exit(3)
"""


def test_a_launched_module_gets_its_argv_and_exit_status_but_no_openssl(tmp_path: Path) -> None:
    (tmp_path / "probe_mod.py").write_text(PROBE)
    # without pytest-cov's subprocess hook, which imports hashlib itself: runm's processes as
    # they run outside the test suite
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COV_CORE_", "COVERAGE_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(tmp_path)])
    done = subprocess.run([sys.executable, "-m", "runm.launch", "probe_mod", "a", "-b"],
                          capture_output=True, env=env, timeout=60, check=False)
    assert done.returncode == 3, done.stderr.decode()
    assert done.stdout.decode().split() == ["['a',", "'-b']", "False", "False"]


def test_sha256_hex_is_sha256_of_the_parts_joined() -> None:
    assert sha256_hex(b"") == hashlib.sha256(b"").hexdigest()
    assert sha256_hex(b"ab", [b"c", b""], (b"d" for _ in range(2))) == \
        hashlib.sha256(b"abcdd").hexdigest()
