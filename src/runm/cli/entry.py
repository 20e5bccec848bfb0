"""The `runm` command's entry point (pyproject's console script).

Without ssl (runm.launch): callers such as podman and containerd's shim run many short verbs
(`state`, `kill`, `delete`). This is a module of its own so that importing runm.cli.main
(tests, other programs) changes nothing.
"""

from __future__ import annotations

import sys


def main() -> int:
    from runm.launch import without_tls

    without_tls()
    from runm.cli.main import main as cli_main

    return cli_main()


if __name__ == "__main__":  # `python -m runm.cli.entry`: exactly what the `runm` script runs
    sys.exit(main())
