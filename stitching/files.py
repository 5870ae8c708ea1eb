"""Small file helpers: hashing, and the folders a command writes into.

Every output, zoo and data folder is checked before any work (created, writable, not a
file, not out of space), and a folder a command writes its results into has one writer at
a time: a second command into the same folder is refused in one line instead of
overwriting what the first one finished.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from filelock import FileLock, Timeout

from stitching.errors import StitchingError

#: below this much free space a folder is refused before work starts, not when a write fails
MIN_FREE_BYTES = 32 << 20

_HELD: dict[str, FileLock] = {}


def sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def writable_folder(folder: str | Path, setting: str) -> Path:
    """``folder``, created if missing, or one line naming ``setting`` when it cannot be written
    (a file is in its place, it is read-only, the disk is full)."""
    folder = Path(folder).expanduser()
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise StitchingError(f"{setting}: {blocker} is a file, so the folder {folder} cannot be made there; "
                             f"choose another folder")
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("stitching")
        probe.unlink()
    except OSError as err:
        raise StitchingError(f"{setting}: cannot write {folder} ({err.strerror or type(err).__name__}); "
                             f"choose a writable folder") from None
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_BYTES:
        raise StitchingError(f"{setting}: {folder} has only {free >> 20} MiB free; free some space or choose "
                             f"another folder")
    return folder


def hold_folder(folder: str | Path, setting: str) -> Path:
    """Make ``folder`` this process's to write (checked as :func:`writable_folder`), until the
    process ends; another command already writing there is one line."""
    folder = writable_folder(folder, setting)
    key = str(folder.resolve())
    if key in _HELD:
        return folder
    if any(os.environ.get(rank, "0") != "0" for rank in ("LOCAL_RANK", "NODE_RANK")):
        # a DDP worker the holding command launched itself (Lightning sets the ranks of the processes
        # it starts): the same command, whose first process writes the results, not another writer
        return folder
    lock = FileLock(str(folder / ".writer.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise StitchingError(f"another command is writing into {folder}; wait for it to finish, or set {setting} "
                             f"to another folder") from None
    except OSError as err:
        raise StitchingError(f"{setting}: cannot lock {folder} ({err.strerror or type(err).__name__}); "
                             f"choose a writable folder") from None
    _HELD[key] = lock
    return folder


def release_folder(folder: str | Path) -> None:
    """Let another command write into ``folder`` (held by :func:`hold_folder`)."""
    lock = _HELD.pop(str(Path(folder).expanduser().resolve()), None)
    if lock is not None:
        lock.release()


def release_all() -> None:
    """Release every folder this process holds (what its end would do)."""
    for folder in list(_HELD):
        release_folder(folder)
