"""Errors meant for the person running rewardiff, not for a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user asked for; its message is one line that says how to fix it."""


class NonFiniteError(RuntimeError):
    """A loss or reward became NaN or infinite; the message says which step and what was kept."""
