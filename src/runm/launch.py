"""Starting runm's own Python processes without TLS.

runm speaks no TLS, but asyncio imports ssl when it can, and with it libssl and libcrypto:
~17 ms of every start and ~3 MiB of PSS for as long as the process lives. That matters for
the processes that live as long as a container (a detached container's monitor, the shim's
task service) and for the short verbs callers run many of. `python -m runm.launch MODULE
ARGS...` runs MODULE as `python -m MODULE ARGS...` would, without ssl.
"""

from __future__ import annotations

import sys


def without_tls() -> None:
    """Make `import ssl` fail (asyncio then goes without); call before importing asyncio."""
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]


def module_argv(module: str, *args: str) -> list[str]:
    """argv that runs `python -m module args...` in this interpreter, without ssl."""
    return [sys.executable, "-m", "runm.launch", module, *args]


def main() -> None:
    import runpy

    without_tls()
    module = sys.argv[1]
    del sys.argv[1]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
