"""Paths typed or chosen in the page: each must lie inside the folders the app was given for its kind.

Every path input of the app (adapters, base models, training data, run folders) goes through `resolve_inside`,
so a request can never make the app read or write elsewhere, whatever `..` or symbolic links it uses.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from reslora_diffusers.pipeline_io import UserInputError


def resolve_inside(path: str | os.PathLike, roots: list[Path], what: str = "adapter") -> Path:
    """The real path of `path` if it lies inside one of `roots` (symbolic links followed), else `UserInputError`.

    A relative path is looked up in each root in turn; one that none of them has is reported as missing
    (not as outside: the user meant a path inside a root and mistyped it).
    """
    text = str(path).strip()
    if not text:
        raise UserInputError(f"no {what} path given")
    allowed = [Path(root).resolve() for root in roots]
    where = ", ".join(str(root) for root in allowed)
    candidate = Path(text).expanduser()
    if not candidate.is_absolute():
        found = next((root / candidate for root in allowed if (root / candidate).exists()), None)
        if found is None:
            inside = all((root / candidate).resolve().is_relative_to(root) for root in allowed)
            if inside:
                raise UserInputError(f"{text} not found in the {what} folders ({where})")
            raise UserInputError(f"{text} is outside the {what} folders this app may read ({where})")
        candidate = found
    resolved = candidate.resolve()
    if not any(resolved.is_relative_to(root) for root in allowed):
        raise UserInputError(f"{text} is outside the {what} folders this app may read ({where})")
    if not resolved.exists():
        raise UserInputError(f"{text} not found")
    return resolved


def check_root(path: str | os.PathLike, flag: str) -> Path:
    """A root folder given on the command line: it must exist and be a folder (`UserInputError` otherwise)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise UserInputError(f"{flag} {path} does not exist")
    if not root.is_dir():
        raise UserInputError(f"{flag} {path} is not a folder")
    return root.resolve()


MAX_DEPTH = 4  # deep enough for outputs/<experiment>/<run>/<file>


def walk_inside(root: Path) -> Iterator[tuple[Path, list[str], list[str]]]:
    """`os.walk` of a root without hidden folders (half-written temp folders) nor `checkpoint-*` folders, at most
    `MAX_DEPTH` levels deep; the caller may empty the yielded subfolder list to skip a folder's insides."""
    root = Path(root).resolve()
    if not root.is_dir():
        return
    for directory, subdirs, files in os.walk(root):
        folder = Path(directory)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and not d.startswith("checkpoint-"))
        if len(folder.relative_to(root).parts) >= MAX_DEPTH:
            subdirs.clear()
        yield folder, subdirs, sorted(files)
