"""Atomic output: a failed write leaves the previous file whole and no temporary behind; a
finished write is on disk (the file, then the folder's entry) before it counts as done."""
import os
import stat

import pytest

from mfbench.errors import InputError
from mfbench.files import atomic, write_atomic


def test_failed_write_keeps_the_old_file(tmp_path):
    path = write_atomic(tmp_path / "summary.json", "old")
    with pytest.raises(RuntimeError):
        with atomic(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_write_replaces_whole_and_keeps_the_suffix(tmp_path):
    with atomic(tmp_path / "plot.png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path
        tmp.write_bytes(b"new")
    assert (tmp_path / "plot.png").read_bytes() == b"new"
    assert len(list(tmp_path.iterdir())) == 1


def test_the_file_is_synced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        calls.append(("fsync", st.st_ino) if stat.S_ISDIR(st.st_mode) else ("fsync", st.st_ino, st.st_size))
        real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace",))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = write_atomic(tmp_path / "summary.json", "0123456789")
    # the rename keeps the inode, so the synced file is the one now at `path`, whole
    assert calls == [("fsync", path.stat().st_ino, 10), ("replace",), ("fsync", tmp_path.stat().st_ino)]


def test_a_failed_sync_keeps_the_old_file_and_names_it(tmp_path, monkeypatch):
    path = write_atomic(tmp_path / "summary.json", "old")

    def fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(InputError, match="summary.json: cannot write: No space left on device"):
        write_atomic(path, "new")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_outputs_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_atomic(tmp_path / "results.csv", "a,b\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600
