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
