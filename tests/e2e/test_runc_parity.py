"""runm next to the real runc on the same bundle: same JSON shapes, texts and exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from runm.sandbox.spec import make_busybox_bundle
from tests.conftest import ROOT, wait_until

RUNC = shutil.which("runc")
pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("guest_image", "no_leaks"),
              pytest.mark.skipif(RUNC is None, reason="needs runc on the host")]


@dataclass
class Runtime:
    name: str
    argv: list[str]
    env: dict[str, str]

    def run(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        """stdio through files: the container keeps create's stdio, as with runc."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            result = subprocess.run([*self.argv, *args], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, env=self.env, timeout=300, check=False)
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(result.args, result.returncode, out.read(),
                                               err.read())

    def state(self, cid: str) -> dict:  # type: ignore[type-arg]
        result = self.run("state", cid)
        assert result.returncode == 0, (self.name, result.stderr)
        return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.fixture
def runtimes(tmp_path: Path) -> Iterator[list[Runtime]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), RUNM_RUN_DIR=str(tmp_path / "vm"))
    assert RUNC is not None
    both = [Runtime("runc", [RUNC, "--root", str(tmp_path / "runc")], env),
            Runtime("runm", [sys.executable, "-m", "runm.cli.main", "--root",
                             str(tmp_path / "runm")], env)]
    yield both
    for rt in both:
        for cid in ("p1",):
            rt.run("delete", "--force", cid)


def test_lifecycle_outputs_match_runc(runtimes: list[Runtime], tmp_path: Path) -> None:
    bundle = make_busybox_bundle(tmp_path / "bundle", ["sleep", "600"])
    states: dict[str, dict] = {}  # type: ignore[type-arg]
    errors: dict[str, dict[str, tuple[int, bytes]]] = {}
    for rt in runtimes:
        pid_file = tmp_path / f"{rt.name}.pid"
        created = rt.run("create", "--bundle", str(bundle), "--pid-file", str(pid_file), "p1")
        assert created.returncode == 0, (rt.name, created.stderr)
        assert pid_file.read_text().isdigit()
        created_state = rt.state("p1")
        assert created_state["status"] == "created"
        assert created_state["pid"] == int(pid_file.read_text())
        assert rt.run("start", "p1").returncode == 0
        states[rt.name] = rt.state("p1")
        ps = rt.run("ps", "--format", "json", "p1")
        assert ps.returncode == 0 and all(isinstance(p, int) for p in json.loads(ps.stdout))
        listed = rt.run("list", "--format", "json")
        assert [s["id"] for s in json.loads(listed.stdout)] == ["p1"]
        assert rt.run("list", "-q").stdout == b"p1\n"
        errors[rt.name] = {
            "delete running": rt.run("delete", "p1"),
            "bad signal": rt.run("kill", "p1", "NOPE"),
            "state missing": rt.run("state", "nope"),
            "kill missing": rt.run("kill", "nope", "KILL"),
        }  # type: ignore[dict-item]
        assert rt.run("kill", "p1", "KILL").returncode == 0
        assert wait_until(lambda rt=rt: rt.state("p1")["status"] == "stopped", timeout=60)
        stopped = rt.state("p1")
        assert stopped["pid"] == 0
        errors[rt.name]["kill stopped"] = rt.run("kill", "p1", "TERM")  # type: ignore[assignment]
        assert rt.run("delete", "p1").returncode == 0
        assert rt.run("delete", "--force", "p1").returncode == 0, "force: gone is fine"

    runc_state, runm_state = states["runc"], states["runm"]
    assert set(runm_state) == set(runc_state), "the same state fields as runc"
    for key in ("ociVersion", "id", "status", "bundle", "rootfs"):
        assert runm_state[key] == runc_state[key], key
    assert isinstance(runm_state["pid"], int) and isinstance(runm_state["created"], str)

    for case, runc_result in errors["runc"].items():
        runm_result = errors["runm"][case]
        assert runm_result.returncode == runc_result.returncode == 1, case  # type: ignore[attr-defined]
    texts = {"delete running": b"cannot delete container p1 that is not stopped: running",
             "bad signal": b"unknown signal", "state missing": b"container does not exist",
             "kill missing": b"container does not exist", "kill stopped": b"container not running"}
    for case, text in texts.items():
        for name in ("runc", "runm"):
            assert text in errors[name][case].stderr, (name, case, errors[name][case].stderr)  # type: ignore[attr-defined]


def test_version_and_spec_match_runc(runtimes: list[Runtime], tmp_path: Path) -> None:
    outputs = {}
    for rt in runtimes:
        version = rt.run("--version")
        assert version.returncode == 0
        assert version.stdout.decode().splitlines()[0].startswith("runc version ")
        spec_dir = tmp_path / f"spec-{rt.name}"
        spec_dir.mkdir()
        assert rt.run("spec", "--bundle", str(spec_dir)).returncode == 0
        outputs[rt.name] = json.loads((spec_dir / "config.json").read_text())
        again = rt.run("spec", "--bundle", str(spec_dir))
        assert again.returncode == 1 and b"File config.json exists. Remove it first" \
            in again.stderr
    assert outputs["runm"]["process"] == outputs["runc"]["process"]
    assert outputs["runm"]["linux"]["namespaces"] == outputs["runc"]["linux"]["namespaces"]
    assert outputs["runm"]["mounts"] == outputs["runc"]["mounts"]
