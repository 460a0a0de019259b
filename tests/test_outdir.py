"""Output reservations: the lock, atomic publishing, and repairing what a killed run left."""

import json
import os
import socket
import subprocess

import pytest

from cfsp import outdir
from cfsp.errors import CfspError
from cfsp.outdir import OWNER_FILE, PLAN_FILE, StagedOutput, clean_stale, dumps, staging_path


def _cfsp_output(path, marker="old"):
    path.mkdir(parents=True)
    (path / PLAN_FILE).write_text("{}")
    (path / "weights").write_text(marker)
    return path


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def _leftover(out, pid, host=None):
    staging = staging_path(out)
    staging.mkdir()
    owner = {"host": host or socket.gethostname(), "pid": pid, "start": None}
    (staging / OWNER_FILE).write_text(json.dumps(owner))
    return staging


def test_publish_writes_the_new_directory_and_removes_the_staging_folder(tmp_path):
    with StagedOutput(tmp_path / "out") as folder:
        assert folder.parent == staging_path(tmp_path / "out")
        (folder / "weights").write_text("new")
    assert (tmp_path / "out" / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("atomic_exchange", [True, False])
def test_overwrite_swaps_whole_directories(tmp_path, monkeypatch, atomic_exchange):
    if not atomic_exchange:
        monkeypatch.setattr(outdir, "_renameat2", lambda source, target, flags: False)
    out = _cfsp_output(tmp_path / "out")
    with StagedOutput(out, overwrite=True) as folder:
        (folder / PLAN_FILE).write_text("{}")
        (folder / "weights").write_text("new")
    assert (out / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_second_rename_puts_the_old_directory_back(tmp_path, monkeypatch):
    monkeypatch.setattr(outdir, "_renameat2", lambda source, target, flags: False)
    out = _cfsp_output(tmp_path / "out")
    real_rename = os.rename

    def failing_rename(source, target):
        if str(source).endswith("/new"):
            raise OSError(5, "I/O error")
        real_rename(source, target)

    monkeypatch.setattr(outdir.os, "rename", failing_rename)
    with pytest.raises(OSError):
        with StagedOutput(out, overwrite=True) as folder:
            (folder / "weights").write_text("new")
    assert (out / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_run_killed_between_the_two_renames_is_repaired(tmp_path):
    out = tmp_path / "out"
    staging = _leftover(out, _dead_pid())
    _cfsp_output(staging / "old")  # the old directory, moved aside; the new one never arrived
    assert clean_stale(tmp_path) == [staging]
    assert (out / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_live_reservation_is_a_lock_and_a_dead_one_is_cleared(tmp_path):
    out = tmp_path / "out"
    live = _leftover(out, os.getpid())
    with pytest.raises(CfspError, match="another cfsp run"):
        with StagedOutput(out):
            pass
    assert live.is_dir()
    (live / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid()}))
    with StagedOutput(out) as folder:
        (folder / "weights").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_folders_of_other_hosts_are_named_not_removed(tmp_path, caplog):
    staging = _leftover(tmp_path / "out", 1, host="elsewhere.invalid")
    assert clean_stale(tmp_path) == []
    assert staging.is_dir() and "another host" in caplog.text


def test_a_file_where_the_output_should_go_is_refused(tmp_path):
    (tmp_path / "out").write_text("user file")
    with pytest.raises(CfspError, match="existing file"):
        StagedOutput(tmp_path / "out", overwrite=True)
    assert (tmp_path / "out").read_text() == "user file"


def test_json_is_strict():
    text = dumps({"a": float("nan"), "b": [1.0, float("inf")], "c": "x"})
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": "x"}
