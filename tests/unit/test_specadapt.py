"""Adapting a host-side spec for the guest: host-only settings are replaced, and said so."""

from __future__ import annotations

import json
from pathlib import Path

from runm.agent.specadapt import adapt_spec, write_guest_bundle


def exists_only(*paths: str):  # type: ignore[no-untyped-def]
    return lambda p: p in paths


def test_host_only_settings_are_adapted_with_notes() -> None:
    spec = {
        "root": {"path": "rootfs"},
        "linux": {"namespaces": [{"type": "pid"},
                                 {"type": "network", "path": "/var/run/netns/cni-1"}],
                  "cgroupsPath": "system.slice:docker:abc"},
        "hooks": {"prestart": [{"path": "/usr/bin/dockerd", "args": ["libnetwork-setkey"]},
                               {"path": "/bin/true"}]},
    }
    adapted, notes = adapt_spec(spec, "/b", "c1", exists=exists_only("/bin/true"))
    assert adapted["root"]["path"] == "/b/rootfs", "the copy lives outside the bundle"
    assert adapted["linux"]["namespaces"] == [{"type": "pid"}], \
        "a host-prepared netns means the VM's network"
    assert adapted["linux"]["cgroupsPath"] == "/runm/c1"
    assert adapted["hooks"]["prestart"] == [{"path": "/bin/true"}]
    assert len(notes) == 3
    assert any("/var/run/netns/cni-1" in n for n in notes)
    assert any("system.slice:docker:abc" in n for n in notes)
    assert any("/usr/bin/dockerd" in n for n in notes)
    assert spec["linux"]["namespaces"][1]["path"] == "/var/run/netns/cni-1", "input untouched"


def test_a_spec_that_applies_as_is_is_not_changed() -> None:
    spec = {"root": {"path": "/abs/rootfs", "readonly": True},
            "linux": {"namespaces": [{"type": "ipc", "path": "/proc/1/ns/ipc"}],
                      "cgroupsPath": "/docker/abc"}}
    adapted, notes = adapt_spec(spec, "/b", "c1", exists=exists_only("/proc/1/ns/ipc"))
    assert adapted == spec and notes == []


def test_write_guest_bundle(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"root": {"path": "rootfs"}}))
    notes = write_guest_bundle(str(bundle), "c1", tmp_path / "guest")
    assert notes == []
    written = json.loads((tmp_path / "guest" / "config.json").read_text())
    assert written["root"]["path"] == str(bundle / "rootfs")


def test_network_namespaces_in_the_vm() -> None:
    """No path: runc's empty namespace (loopback only), unless ports are published."""
    spec = {"root": {"path": "/r"},
            "linux": {"namespaces": [{"type": "network"}, {"type": "uts"},
                                     {"type": "ipc", "path": "/host/only/ipc"}]}}
    adapted, notes = adapt_spec(spec, "/b", "c1", exists=exists_only())
    assert adapted["linux"]["namespaces"] == [{"type": "network"}, {"type": "uts"},
                                              {"type": "ipc"}]
    assert len(notes) == 1
    published, notes = adapt_spec(spec, "/b", "c1", exists=exists_only(), vm_network=True)
    assert published["linux"]["namespaces"] == [{"type": "uts"}, {"type": "ipc"}]
    assert any("ports are published" in n for n in notes)


def test_a_pods_namespaces_named_by_host_pid_mean_the_sandboxs_guest_pid() -> None:
    spec = {"root": {"path": "/r"},
            "linux": {"namespaces": [{"type": "pid", "path": "/proc/4321/ns/pid"},
                                     {"type": "ipc", "path": "/proc/4321/ns/ipc"},
                                     {"type": "uts", "path": "/proc/99/ns/uts"}]}}
    adapted, notes = adapt_spec(spec, "/b", "app", exists=exists_only("/proc/7/ns/pid",
                                                                      "/proc/7/ns/ipc"),
                                pid_alias=(4321, 7))
    assert adapted["linux"]["namespaces"] == [{"type": "pid", "path": "/proc/7/ns/pid"},
                                              {"type": "ipc", "path": "/proc/7/ns/ipc"},
                                              {"type": "uts"}]
    assert len(notes) == 3 and "host pid 4321" in notes[0]
