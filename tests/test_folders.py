"""Folders and interrupts: every output folder is checked before work and has one writer at a
time; a failed write or an interrupt ends on one line and never leaves a half-written record."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from filelock import FileLock

from stitching.errors import StitchingError, exit_on_user_error, on_interrupt
from stitching.files import hold_folder, release_folder, writable_folder
from stitching.runtime import write_json_atomic
from tests.conftest import TINY, train_cli


def test_a_folder_under_a_file_is_one_line(tmp_path):
    (tmp_path / "taken").write_text("a file")
    for folder in (tmp_path / "taken", tmp_path / "taken" / "below"):
        with pytest.raises(StitchingError, match=r"--out: .*taken is a file, so the folder .* cannot be made there"):
            writable_folder(folder, "--out")


def test_a_folder_without_space_is_refused_before_work(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(StitchingError, match=r"has only 1 MiB free; free some space or choose another folder"):
        writable_folder(tmp_path / "out", "--out")


def test_a_second_writer_is_refused_and_the_first_keeps_its_folder(tmp_path):
    other = FileLock(str(tmp_path / ".writer.lock"))  # another process's command writing here
    other.acquire()
    try:
        with pytest.raises(StitchingError, match="another command is writing into .*; wait for it to finish, or set --out"):
            hold_folder(tmp_path, "--out")
    finally:
        other.release()
    assert hold_folder(tmp_path, "--out") == tmp_path and hold_folder(tmp_path, "--out") == tmp_path  # held, re-entrant
    release_folder(tmp_path)


def test_a_grid_into_a_folder_another_grid_writes_is_refused(tmp_path, capsys):
    from stitching.grid import main as grid_main

    other = FileLock(str(tmp_path / ".writer.lock"))
    other.acquire()
    try:
        with pytest.raises(SystemExit) as exit_info:
            grid_main(["--out", str(tmp_path), *TINY, "objective=dm", "grid.pairs=diagonal"])
    finally:
        other.release()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: another command is writing into") and "\n" not in err
    assert not list(tmp_path.rglob("results.json"))


def test_a_run_into_a_held_folder_is_refused(tmp_path, zoo_dir, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    other = FileLock(str(run_dir / ".writer.lock"))
    other.acquire()
    try:
        code, output = train_cli([*TINY, f"paths.zoo_dir={zoo_dir}", f"hydra.run.dir={run_dir}"], monkeypatch, capsys)
    finally:
        other.release()
    assert code == 2 and "error: another command is writing into" in output and "Traceback" not in output
    assert not (run_dir / "results.json").exists()


def test_a_write_that_fails_leaves_nothing_half_written(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "results.json"))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        write_json_atomic(tmp_path / "results.json", {"status": "ok"})
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_and_an_interrupt_each_end_on_one_line(capsys):
    @exit_on_user_error
    def fails(err):
        raise err

    on_interrupt("every finished cell keeps its results.json in out; rerun the same command with --out out")
    for err, code, start in [(OSError(errno.ENOSPC, "No space left on device", "out/results.json"), 2,
                              "error: cannot write out/results.json (No space left on device); free some space"),
                             (KeyboardInterrupt(), 130, "interrupted: every finished cell keeps its results.json in out")]:
        with pytest.raises(SystemExit) as exit_info:
            fails(err)
        line = capsys.readouterr().err.strip()
        assert exit_info.value.code == code and line.startswith(start) and "\n" not in line
    with pytest.raises(ValueError):  # a bug stays a traceback
        fails(ValueError("a bug"))


def test_ctrl_c_in_a_run_says_what_was_kept(tmp_path, zoo_dir, monkeypatch, capsys):
    import sys

    from stitching import runs, train
    from stitching.files import release_all

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "run", interrupted)
    monkeypatch.setattr(sys, "argv", ["stitching.train", *TINY, f"paths.zoo_dir={zoo_dir}",
                                      f"hydra.run.dir={tmp_path / 'run'}"])
    try:
        with pytest.raises(SystemExit) as exit_info:
            train.cli()
    finally:
        release_all()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 130 and "Traceback" not in "\n".join(err)
    assert err[-1] == "interrupted: a run writes results.json only when it finishes, so this one kept no result; rerun it"
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_run_whose_folder_fills_records_nothing_and_says_so(tmp_path, zoo_dir, monkeypatch, capsys):
    from stitching import runs

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "stitch.pt"))

    monkeypatch.setattr(runs, "run", full)
    code, output = train_cli([*TINY, f"paths.zoo_dir={zoo_dir}", f"hydra.run.dir={tmp_path / 'run'}"], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in output
    assert f"error: cannot write {tmp_path / 'run' / 'stitch.pt'} (No space left on device)" in output
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "failed" and "No space left" in record["error"]
