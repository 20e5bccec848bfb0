"""`runm guest build` for real: Debian packages in, a bootable image out (booted by test_run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from runm.guest.image import GuestImageError, build_image, ensure_image, find_image, image_digest
from tests.conftest import ROOT


def test_build_from_scratch_then_cached(tmp_path: Path) -> None:
    steps: list[str] = []
    image = build_image(tmp_path, progress=steps.append, force=True)
    assert image.digest == image_digest()
    # Debian's generic kernel: the cloud one has no 9p, which pooled VMs share over
    assert image.kernel_release.endswith("-amd64") and "cloud" not in image.kernel_release
    modules = json.loads((image.kernel.parent / "manifest.json").read_text())["modules"]
    assert {"9p", "9pnet_virtio", "virtiofs"} <= set(modules)
    assert image.kernel.read_bytes()[:4] == b"\x7fELF", "a PVH-bootable vmlinux"
    assert image.rootfs.stat().st_size > 10 << 20
    assert image.initrd.read_bytes()[:2] == b"\x1f\x8b", "a gzip'd initramfs"
    assert steps, "progress is reported"

    started = time.monotonic()
    again = ensure_image(tmp_path)
    assert again == image
    assert time.monotonic() - started < 2, "a cached image is found without rebuilding"

    with open(image.rootfs, "r+b") as f:
        f.truncate(1024)
    try:
        find_image(tmp_path)
    except GuestImageError as err:
        assert "corrupt" in str(err) and "runm guest build" in str(err)
    else:
        raise AssertionError("a truncated root image must be reported as corrupt")


def test_guest_build_cli_is_quiet_without_a_terminal(tmp_path: Path) -> None:
    from runm.guest.image import default_data_dir

    ensure_image(default_data_dir())
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    result = subprocess.run([sys.executable, "-m", "runm.cli.main", "guest", "build"],
                            capture_output=True, env=env, check=False, timeout=600)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b"", "no progress noise when stderr is not a terminal"
    assert Path(result.stdout.decode().strip()) == find_image(default_data_dir()).rootfs.parent
