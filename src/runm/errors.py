"""The one error type that crosses layers: a message that already carries its context."""

from __future__ import annotations


class RunmError(Exception):
    """An expected failure with a user-facing message (no traceback is ever shown for it)."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message

    def context(self, what: str) -> RunmError:
        """The same error with `what: ` in front, as it travels outward."""
        return RunmError(f"{what}: {self.message}", exit_code=self.exit_code)
