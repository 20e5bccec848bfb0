"""`containerd-shim-runm-v2`'s entry point (pyproject's console script): containerd runs it
for every task's `start` and `delete`, and it serves the task API for as long as the pod lives;
without ssl (runm.launch) both are cheaper."""

from __future__ import annotations

import sys


def main() -> int:
    from runm.launch import without_tls

    without_tls()
    from runm.shim.main import main as shim_main

    return shim_main()


if __name__ == "__main__":
    sys.exit(main())
