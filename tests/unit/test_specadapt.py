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
    adapted, notes, _ = adapt_spec(spec, "/b", "c1", exists=exists_only("/bin/true"))
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
    adapted, notes, _ = adapt_spec(spec, "/b", "c1", exists=exists_only("/proc/1/ns/ipc"))
    assert adapted == spec and notes == []


def test_write_guest_bundle(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"root": {"path": "rootfs"}}))
    notes, vm_sysctls = write_guest_bundle(str(bundle), "c1", tmp_path / "guest")
    assert notes == [] and vm_sysctls == {}
    written = json.loads((tmp_path / "guest" / "config.json").read_text())
    assert written["root"]["path"] == str(bundle / "rootfs")


def test_network_namespaces_in_the_vm() -> None:
    """No path: runc's empty namespace (loopback only), unless the VM's network is the
    container's (ports published, or the caller's network brought in)."""
    spec = {"root": {"path": "/r"},
            "linux": {"namespaces": [{"type": "network"}, {"type": "uts"},
                                     {"type": "ipc", "path": "/host/only/ipc"}]}}
    adapted, notes, _ = adapt_spec(spec, "/b", "c1", exists=exists_only())
    assert adapted["linux"]["namespaces"] == [{"type": "network"}, {"type": "uts"},
                                              {"type": "ipc"}]
    assert len(notes) == 1
    published, notes, _ = adapt_spec(spec, "/b", "c1", exists=exists_only(), vm_network=True)
    assert published["linux"]["namespaces"] == [{"type": "uts"}, {"type": "ipc"}]
    assert any("the container uses the VM's network" in n for n in notes)


def test_a_pods_namespaces_named_by_host_pid_mean_the_sandboxs_guest_pid() -> None:
    spec = {"root": {"path": "/r"},
            "linux": {"namespaces": [{"type": "pid", "path": "/proc/4321/ns/pid"},
                                     {"type": "ipc", "path": "/proc/4321/ns/ipc"},
                                     {"type": "uts", "path": "/proc/99/ns/uts"}]}}
    adapted, notes, _ = adapt_spec(spec, "/b", "app", exists=exists_only("/proc/7/ns/pid",
                                                                      "/proc/7/ns/ipc"),
                                pid_alias=(4321, 7))
    assert adapted["linux"]["namespaces"] == [{"type": "pid", "path": "/proc/7/ns/pid"},
                                              {"type": "ipc", "path": "/proc/7/ns/ipc"},
                                              {"type": "uts"}]
    assert len(notes) == 3 and "host pid 4321" in notes[0]


def test_a_container_on_the_vms_network_has_its_net_sysctls_set_by_the_agent(
        tmp_path: Path) -> None:
    """runc refuses net.* sysctls for a namespace it did not make: Docker's
    ip_unprivileged_port_start goes to the VM's namespace, the others stay with runc."""
    spec = {"root": {"path": "/r"},
            "linux": {"namespaces": [{"type": "network"}],
                      "sysctl": {"net.ipv4.ip_unprivileged_port_start": "0",
                                 "kernel.msgmax": "9000"}}}
    adapted, notes, vm_sysctls = adapt_spec(spec, "/b", "c1", exists=exists_only(),
                                            vm_network=True)
    assert vm_sysctls == {"net.ipv4.ip_unprivileged_port_start": "0"}
    assert adapted["linux"]["sysctl"] == {"kernel.msgmax": "9000"}
    assert any("net.ipv4.ip_unprivileged_port_start" in n for n in notes)
    own, _, none = adapt_spec(spec, "/b", "c1", exists=exists_only())
    assert none == {} and own["linux"]["sysctl"] == spec["linux"]["sysctl"]


def test_sysctls_are_written_where_the_kernel_has_them(tmp_path: Path) -> None:
    import pytest

    from runm.agent.sysapi import write_sysctl

    (tmp_path / "net" / "ipv4").mkdir(parents=True)
    write_sysctl("net.ipv4.ip_unprivileged_port_start", "0", root=str(tmp_path))
    assert (tmp_path / "net/ipv4/ip_unprivileged_port_start").read_text() == "0"
    with pytest.raises(OSError, match=r"write sysctl key net\.nope\.x: No such file"):
        write_sysctl("net.nope.x", "1", root=str(tmp_path))
    with pytest.raises(OSError, match="invalid sysctl key"):
        write_sysctl("net/../../etc", "1", root=str(tmp_path))
