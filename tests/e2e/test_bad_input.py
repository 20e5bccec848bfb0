"""Bad input to `runm run`: runc's words, exit 1, and nothing left behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from runm.sandbox.spec import make_busybox_bundle
from runm.sandbox.state import ContainerRecord, StateStore
from tests.conftest import Runm

pytestmark = pytest.mark.usefixtures("no_leaks")


@pytest.fixture
def good_bundle(tmp_path: Path) -> Path:
    return make_busybox_bundle(tmp_path / "bundle", ["true"])


def error_text(result) -> str:  # type: ignore[no-untyped-def]
    return result.stderr.decode()


def assert_clean(runm: Runm, container_id: str) -> None:
    assert not (runm.root / container_id).exists(), "no state may be left behind"


def test_missing_bundle(runm: Runm, tmp_path: Path) -> None:
    result = runm.run("run", "--bundle", str(tmp_path / "nope"), "c1")
    assert result.returncode == 1
    assert f"chdir {tmp_path / 'nope'}: no such file or directory" in error_text(result)
    assert "Traceback" not in error_text(result)
    assert_clean(runm, "c1")


def test_missing_config(runm: Runm, tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    result = runm.run("run", "--bundle", str(tmp_path / "b"), "c1")
    assert result.returncode == 1
    assert "JSON specification file config.json not found" in error_text(result)


def test_malformed_config(runm: Runm, good_bundle: Path) -> None:
    (good_bundle / "config.json").write_text("{not json")
    result = runm.run("run", "--bundle", str(good_bundle), "c1")
    assert result.returncode == 1
    assert "config.json: invalid JSON" in error_text(result)
    assert "Traceback" not in error_text(result)


def test_missing_rootfs(runm: Runm, good_bundle: Path) -> None:
    shutil.rmtree(good_bundle / "rootfs")
    result = runm.run("run", "--bundle", str(good_bundle), "c1")
    assert result.returncode == 1
    assert "invalid rootfs" in error_text(result)
    assert_clean(runm, "c1")


@pytest.mark.parametrize("bad_id,text", [
    ("", "container id cannot be empty"),
    ("a/b", "invalid container id format"),
    ("..", "invalid container id format"),
    ("../x", "invalid container id format"),
])
def test_bad_container_ids(runm: Runm, good_bundle: Path, bad_id: str, text: str) -> None:
    result = runm.run("run", "--bundle", str(good_bundle), bad_id)
    assert result.returncode == 1
    assert text in error_text(result)
    assert not runm.root.exists() or not any(runm.root.iterdir())


def test_id_already_in_use(runm: Runm, good_bundle: Path) -> None:
    store = StateStore(runm.root)
    store.create(ContainerRecord(id="busy", bundle=str(good_bundle), rootfs="x", status="running"))
    result = runm.run("run", "--bundle", str(good_bundle), "busy")
    assert result.returncode == 1
    assert "container with given ID already exists" in error_text(result)
    assert store.load("busy").status == "running", "the other container's state is untouched"


def test_qemu_not_installed(runm: Runm, good_bundle: Path, guest_image) -> None:  # type: ignore[no-untyped-def]
    env = dict(runm.env, PATH="/nonexistent")
    result = runm.run("run", "--bundle", str(good_bundle), "c1", env=env)
    assert result.returncode == 1
    assert "qemu-system-x86_64 not found" in error_text(result)
    assert_clean(runm, "c1")


def test_missing_guest_image_without_auto_build(runm: Runm, good_bundle: Path,
                                                 tmp_path: Path) -> None:
    env = dict(runm.env, RUNM_DATA_DIR=str(tmp_path / "empty"), RUNM_AUTO_BUILD="0")
    result = runm.run("run", "--bundle", str(good_bundle), "c1", env=env)
    assert result.returncode == 1
    assert "guest image not found" in error_text(result)
    assert "runm guest build" in error_text(result)
    assert_clean(runm, "c1")


@pytest.mark.vm
def test_vm_that_fails_to_boot_shows_the_console(runm: Runm, good_bundle: Path, tmp_path: Path,
                                                  guest_image) -> None:  # type: ignore[no-untyped-def]
    """A corrupt guest root (right size, wrong bytes): the boot fails with the console's tail."""
    from runm.guest.image import default_data_dir

    data = tmp_path / "data"
    image_dir = data / guest_image.rootfs.parent.relative_to(default_data_dir())
    shutil.copytree(guest_image.rootfs.parent, image_dir,
                    ignore=shutil.ignore_patterns("snapshots"))  # make it boot
    rootfs = image_dir / guest_image.rootfs.name
    size = rootfs.stat().st_size
    with open(rootfs, "r+b") as f:
        f.write(b"\0" * min(size, 1 << 20))
    env = dict(runm.env, RUNM_DATA_DIR=str(data), RUNM_AUTO_BUILD="0")
    result = runm.run("run", "--bundle", str(good_bundle), "c1", env=env)
    assert result.returncode == 1
    text = error_text(result)
    assert "booting VM" in text
    assert "runm-init" in text, "the guest console's last lines explain why"
    assert_clean(runm, "c1")


@pytest.mark.parametrize("verb", ["run", "create", "exec"])
def test_preserved_fds_are_refused_not_dropped(runm: Runm, good_bundle: Path,
                                               verb: str) -> None:
    """Open files cannot follow a process into its VM: say so, rather than start it
    without the fds it was promised (socket activation would fail later, obscurely)."""
    args = ["--bundle", str(good_bundle), "c1"] if verb != "exec" else ["c1", "true"]
    result = runm.run(verb, "--preserve-fds", "1", *args)
    assert result.returncode == 1
    assert "--preserve-fds 1: passing open files into the container's VM is not supported" \
        in error_text(result)
    assert_clean(runm, "c1")


def test_zero_preserved_fds_is_what_callers_pass_by_default(runm: Runm,
                                                            good_bundle: Path) -> None:
    assert runm.run("run", "--preserve-fds", "0", "--bundle", str(good_bundle),
                    "c1").returncode == 0
