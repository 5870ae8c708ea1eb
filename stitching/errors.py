"""One exception type for every mistake a user can make.

Entry points catch :class:`StitchingError` and print its message on one line, so bad
input never ends in a stack trace.
"""

from __future__ import annotations

import errno
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


#: what a write can fail on that the user can fix: a full disk or quota, a read-only folder, a
#: path through a file or too long
WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                          errno.EISDIR, errno.ENAMETOOLONG})

#: what an interrupted command keeps and how to resume it, said when Ctrl-C ends it
_interrupt_note = ["what finished is kept; rerun the same command to resume"]


def config_error(err: BaseException) -> StitchingError:
    """Hydra's error as one line: its first line, which names the bad override, with what Hydra
    says to do about it where it says so (``use +key=value`` for a key the config lacks)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    advice = next((line for line in lines[1:] if line.startswith("To append to your config use")), None)
    return StitchingError(lines[0] + (f" ({advice[0].lower()}{advice[1:]})" if advice else "") if lines else repr(err))


def on_interrupt(note: str) -> None:
    """Say ``note`` (what is kept, how to resume) if this command is interrupted."""
    _interrupt_note[0] = note


def one_line(err: BaseException) -> str | None:
    """The one line a user-facing failure ends with, or ``None`` for a bug (kept as a traceback)."""
    if isinstance(err, KeyboardInterrupt):
        return f"interrupted: {_interrupt_note[0]}"
    if isinstance(err, StitchingError):
        return f"error: {err}"
    if isinstance(err, OSError) and err.errno in WRITE_ERRORS:
        return (f"error: cannot write {err.filename or 'a file'} ({err.strerror}); free some space or choose a "
                f"writable folder (nothing half-written is kept as a result)")
    return None


def exit_on_user_error(fn):
    """End ``fn`` on one line: a :class:`StitchingError` or a failed write as ``error: …`` (exit
    code 2), an interrupt as ``interrupted: …`` saying what is kept (exit code 130)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (KeyboardInterrupt, StitchingError, OSError) as err:
            line = one_line(err)
            if line is None:
                raise
            print(line, file=sys.stderr)
            sys.exit(130 if isinstance(err, KeyboardInterrupt) else 2)

    return wrapper
