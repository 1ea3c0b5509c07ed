"""The one error type users see: what went wrong, and what to do about it."""

from __future__ import annotations


class PcipassError(Exception):
    """An error with a hint. The CLI prints both and exits with `exit_code`.

    `code` is a stable machine-readable name (used in --json output).
    """

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None, code: str = "error") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class UsageError(PcipassError):
    """Bad input on the command line: nothing was changed."""

    exit_code = 2


class NeedsRoot(PcipassError):
    """A command that changes the host was run without root."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"{what} changes the host and needs root",
            hint="run it again as root (sudo pcipass ...); read-only commands need no root",
            code="needs-root",
        )
