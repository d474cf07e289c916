"""Atomic writes: a file or folder appears complete or not at all, so a crash never leaves half an output."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Calls `write(temp_path)` for a temp file beside `path`, then renames it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def swap_in_folder(staged: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Moves a finished folder onto `output`; an existing `output` is removed only once the new one is in place."""
    staged, output = Path(staged), Path(output)
    if output.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", dir=output.parent))
        old.rmdir()
        output.rename(old)
        staged.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staged.rename(output)
    return output


def atomic_write_folder(output: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Calls `write(staged_folder)` for a new folder beside `output`, then swaps it in (see `swap_in_folder`)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    staged.chmod(0o755)  # mkdtemp makes it private; outputs are meant to be shared
    try:
        write(staged)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return swap_in_folder(staged, output)
