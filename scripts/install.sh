#!/usr/bin/env bash
# Install what runm needs on Debian 12 (as root): QEMU, the guest image's build tools, and runm
# itself in a virtualenv (./.venv), linked into /usr/local/bin. `--dev` adds the test tools.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."

APT_PACKAGES=(qemu-system-x86 runc busybox-static erofs-utils squashfs-tools mmdebstrap lz4 iproute2
              ca-certificates python3 python3-venv)
# --dev: the real callers the end-to-end tests drive (tests/e2e/callers.py). The fixtures start
# private daemons of their own and never use (or conflict with) system-wide ones.
DEV_APT_PACKAGES=(podman conmon containerd docker.io)
dev=0
[ "${1:-}" = "--dev" ] && dev=1
[ "$dev" = 1 ] && APT_PACKAGES+=("${DEV_APT_PACKAGES[@]}")
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "runm: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  # Quiet unless it fails, then show apt's log.
  log=$(mktemp)
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
      >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"; exit 1
  fi
  rm -f "$log"
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
extra=""
[ "$dev" = 1 ] && extra="[dev]"
.venv/bin/pip install -q --disable-pip-version-check -e ".${extra}"
# An editable install is not byte-compiled, and with PYTHONDONTWRITEBYTECODE set nothing ever
# writes the .pyc files: every runm process (CLI, monitor, stand-in, shim) would compile its
# imports again, ~0.2 s each under load. Python ignores a .pyc whose source has changed.
.venv/bin/python -m compileall -q src/runm
ln -sf "$PWD/.venv/bin/runm" /usr/local/bin/runm
ln -sf "$PWD/.venv/bin/containerd-shim-runm-v2" /usr/local/bin/containerd-shim-runm-v2
