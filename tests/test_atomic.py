"""Atomic writes: an output appears complete or not at all, and an old output survives a failed rewrite."""

import stat

import pytest

from reslora_diffusers.atomic import atomic_write, atomic_write_folder, atomic_write_text


def entries(folder):
    return sorted(p.name for p in folder.iterdir())


def test_file_is_replaced_only_when_complete_and_is_readable_by_others(tmp_path):
    path = atomic_write_text(tmp_path / "a.json", "old")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's private 0600

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old"
    assert entries(tmp_path) == ["a.json"]  # no temp file left behind


def test_folder_swap_keeps_old_output_until_new_one_is_complete(tmp_path):
    out = tmp_path / "out"
    atomic_write_folder(out, lambda folder: (folder / "x.txt").write_text("v1"))
    assert stat.S_IMODE(out.stat().st_mode) == 0o755

    def fail(folder):
        (folder / "x.txt").write_text("half of v2")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_folder(out, fail)
    assert (out / "x.txt").read_text() == "v1"
    assert entries(tmp_path) == ["out"]

    atomic_write_folder(out, lambda folder: (folder / "y.txt").write_text("v2"))
    assert entries(out) == ["y.txt"]  # replaced as a whole, not merged into the old folder
    assert entries(tmp_path) == ["out"]
