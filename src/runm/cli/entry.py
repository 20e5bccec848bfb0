"""The `runm` command's entry point (pyproject's console script).

runm's host CLI speaks no TLS: asyncio imports ssl only if it can, and leaving it (with
libssl and libcrypto) unloaded saves ~17 ms of every invocation, which callers such as
podman and containerd's shim make many of (`state`, `kill`, `delete`). This is a module of
its own so that importing runm.cli.main (tests, other programs) changes nothing.
"""

from __future__ import annotations

import sys


def main() -> int:
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]
    from runm.cli.main import main as cli_main

    return cli_main()


if __name__ == "__main__":  # `python -m runm.cli.entry`: exactly what the `runm` script runs
    sys.exit(main())
