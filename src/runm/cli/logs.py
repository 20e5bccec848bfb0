"""runc-style logging: `--log FILE --log-format text|json`, and how fatal errors are shown."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import TextIO

from runm.sandbox.state import rfc3339_now

LEVEL_NAMES = {"CRITICAL": "fatal", "ERROR": "error", "WARNING": "warning", "INFO": "info",
               "DEBUG": "debug"}


def _time() -> str:
    return rfc3339_now(6)


class JsonFormatter(logging.Formatter):
    """runc's (logrus') JSON lines: {"level","msg","time"}."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"level": LEVEL_NAMES.get(record.levelname, "info"),
                           "msg": record.getMessage(), "time": _time()})


class TextFormatter(logging.Formatter):
    """logrus' text format: time="..." level=error msg="..." (on a terminal: ERRO[0000] msg)."""

    def __init__(self, terminal: bool = False) -> None:
        super().__init__()
        self.terminal = terminal

    def format(self, record: logging.LogRecord) -> str:
        level = LEVEL_NAMES.get(record.levelname, "info")
        if self.terminal:
            return f"{level[:4].upper()}[0000] {record.getMessage()}"
        return f'time="{_time()}" level={level} msg={json.dumps(record.getMessage())}'


class Logging:
    def __init__(self, path: str | None, fmt: str, debug: bool) -> None:
        self.to_stderr = not path or path in ("/dev/stderr", "-")
        self.stream: TextIO
        if self.to_stderr:
            self.stream = sys.stderr
        else:
            assert path is not None
            self.stream = open(path, "a", buffering=1)  # noqa: SIM115 - lives for the process
        handler = logging.StreamHandler(self.stream)
        terminal = self.to_stderr and stderr_is_terminal()
        handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(terminal))
        root = logging.getLogger()
        root.handlers[:] = [handler]
        # runc logs info and up to its --log file; on a terminal only what needs attention
        root.setLevel(logging.DEBUG if debug else logging.WARNING if self.to_stderr
                      else logging.INFO)

    def fatal(self, message: str) -> None:
        """runc's fatal(): log the error; also print it if the log is not stderr."""
        logging.getLogger("runm").error(message)
        if not self.to_stderr:
            print(message, file=sys.stderr)


def stderr_is_terminal() -> bool:
    return os.isatty(2)
