"""One exception type for every mistake a user can make.

Entry points catch :class:`StitchingError` and print its message on one line, so bad
input never ends in a stack trace.
"""

from __future__ import annotations

import functools
import sys


class StitchingError(Exception):
    """A problem with the user's input, stated so that it says what to do."""


class NonFiniteError(StitchingError):
    """Stitch training diverged: the loss or a stitch weight stopped being finite."""

    def __init__(self, what: str, value: float, step: int):
        super().__init__(f"the stitch diverged: {what} became {value} at training step {step}; "
                         f"the run is recorded as failed (a lower stitch.lr usually helps)")
        self.what, self.value, self.step = what, value, step


def exit_on_user_error(fn):
    """Turn a :class:`StitchingError` raised by ``fn`` into ``error: …`` and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StitchingError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper
