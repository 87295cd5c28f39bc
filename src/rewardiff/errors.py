"""Errors meant for the person running rewardiff, not for a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user asked for; its message is one line that says how to fix it."""


class NonFiniteError(RuntimeError):
    """A loss or reward became NaN or infinite; the message says which step and what was kept."""


class Stopped(Exception):
    """A run stopped on request (SIGINT, SIGTERM) at a safe point, its checkpoint written.

    ``exit_code`` is 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), as a shell
    reports a process that a signal ended; the message says where the checkpoint is.
    """

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.exit_code = int(signum), 128 + int(signum)


def one_line(text: str) -> str:
    """``text`` as one printable line: control characters and line breaks (a file name may hold
    them) written as escapes, so an error message is always exactly one line."""
    import unicodedata

    def show(ch: str) -> str:
        if ch == " " or unicodedata.category(ch) not in ("Cc", "Zl", "Zp"):
            return ch
        return repr(ch)[1:-1] if ch.isascii() or ord(ch) < 0x100 else f"\\u{ord(ch):04x}"

    return "".join(show(ch) for ch in text)
