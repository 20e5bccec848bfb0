"""containerd-shim-runm-v2 (the containerd shim v2 for runm)."""

from __future__ import annotations

import sys

import runm


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "-v" in args:
        print(f"containerd-shim-runm-v2:\n  Version:  {runm.__version__}")
        return 0
    print("containerd-shim-runm-v2: the shim v2 is not implemented yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
