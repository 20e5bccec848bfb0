#!/usr/bin/env bash
# The README's first command: install, build the guest image, run a busybox container in a VM.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
scripts/install.sh
runm guest build >/dev/null
bundle=$(mktemp -d /tmp/runm-demo.XXXXXX)
trap 'rm -rf "$bundle"' EXIT
.venv/bin/python -c 'import sys; from pathlib import Path; from runm.sandbox.spec import make_busybox_bundle; make_busybox_bundle(Path(sys.argv[1]), ["sh", "-c", "echo \"hello from a container in a VM, guest kernel $(uname -r) (host: $0)\""] + [sys.argv[2]])' "$bundle" "$(uname -r)"
runm run --bundle "$bundle" "demo-$$"
