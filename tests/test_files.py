"""Atomic output: a failed write leaves the previous file whole and no temporary behind."""
import pytest

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
