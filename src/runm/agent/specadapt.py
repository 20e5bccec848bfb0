"""Adapting a host-side OCI spec for the guest, saying what changed.

The guest's runc reads the caller's config.json at its host path, but a few settings only mean
something on the host: namespace paths (a netns under /var/run/netns), hooks that run host
binaries, systemd cgroup paths when the guest has no systemd. Such settings are rewritten in a
guest-local copy of the spec, and every change is reported back (the host logs them).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any


def adapt_spec(spec: dict[str, Any], bundle: str, container_id: str,
               exists: Any = os.path.exists, vm_network: bool = False,
               pid_alias: tuple[int, int] = (0, 0)
               ) -> tuple[dict[str, Any], list[str], dict[str, str]]:
    """Return (the spec for the guest's runc, human-readable notes on what was changed,
    the network sysctls the agent sets in the VM's network namespace instead).

    The VM is the container's network sandbox: a network namespace the caller prepared on the
    host (a path that exists only there) means "give it a network", so the container uses the
    VM's; so does vm_network (ports published). A new namespace without a path stays what runc
    makes of it: loopback only. A container that joins the VM's network has its `net.*`
    sysctls set in that namespace by the agent: runc refuses them for a namespace it did not
    create (Docker asks for net.ipv4.ip_unprivileged_port_start). pid_alias (host pid, guest
    pid): a namespace path under /proc/<host pid>/ means the same under /proc/<guest pid>/
    (a pod's sandbox container).
    """
    out = copy.deepcopy(spec)
    notes: list[str] = []
    root = out.setdefault("root", {})
    root_path = str(root.get("path", "rootfs"))
    if not os.path.isabs(root_path):
        root["path"] = os.path.join(bundle, root_path)  # the copy lives outside the bundle
    linux = out.get("linux") or {}
    kept_namespaces = []
    vm_sysctls: dict[str, str] = {}
    host_pid, guest_pid = pid_alias
    for ns in linux.get("namespaces") or []:
        path = ns.get("path")
        if host_pid and guest_pid and path and path.startswith(f"/proc/{host_pid}/"):
            ns["path"] = path = f"/proc/{guest_pid}/" + path.removeprefix(f"/proc/{host_pid}/")
            notes.append(f"{ns.get('type')} namespace: {ns['path']} (the sandbox's, named "
                         f"by its host pid {host_pid})")
        host_only = bool(path) and not exists(path)
        if ns.get("type") == "network" and (host_only or vm_network):
            notes.append(f"network namespace{f' {path}' if path else ''}: the container "
                         "uses the VM's network")
            sysctls = linux.get("sysctl") or {}
            for key in [k for k in sysctls if k.startswith("net.")]:
                vm_sysctls[key] = str(sysctls.pop(key))
                notes.append(f"sysctl {key}: set in the VM's network namespace")
            continue
        if host_only:
            del ns["path"]
            notes.append(f"{ns.get('type')} namespace: {path} exists only on the host; "
                         "the container gets a new one in the VM")
        kept_namespaces.append(ns)
    if "namespaces" in linux:
        linux["namespaces"] = kept_namespaces
    cgroups_path = linux.get("cgroupsPath")
    if isinstance(cgroups_path, str) and ":" in cgroups_path:
        linux["cgroupsPath"] = f"/runm/{container_id}"
        notes.append(f"cgroupsPath {cgroups_path!r} is a systemd slice on the host; "
                     f"using {linux['cgroupsPath']!r} in the VM")
    hooks = out.get("hooks") or {}
    for stage in list(hooks):
        kept = []
        for hook in hooks[stage] or []:
            if exists(str(hook.get("path", ""))):
                kept.append(hook)
            else:
                notes.append(f"{stage} hook {hook.get('path')} is a host binary; not run in "
                             "the VM")
        hooks[stage] = kept
    return out, notes, vm_sysctls


def write_guest_bundle(bundle: str, container_id: str, guest_dir: Path,
                       vm_network: bool = False,
                       pid_alias: tuple[int, int] = (0, 0)) -> tuple[list[str], dict[str, str]]:
    """Write the adapted spec into guest_dir/config.json; return the notes and the sysctls
    for the VM's network namespace (see adapt_spec)."""
    import json

    with open(Path(bundle) / "config.json") as f:
        spec = json.load(f)
    adapted, notes, vm_sysctls = adapt_spec(spec, bundle, container_id, vm_network=vm_network,
                                            pid_alias=pid_alias)
    guest_dir.mkdir(parents=True, exist_ok=True)
    (guest_dir / "config.json").write_text(json.dumps(adapted))
    return notes, vm_sysctls
