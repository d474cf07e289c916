"""Who owns what in a training run's --output_dir: a run replaces or removes only what a run wrote.

A run records the names it writes in a manifest (`.reslora_run.json`) before writing any of them; a later
`--overwrite_output_dir` removes exactly those names, and a new run refuses a folder where one of the names it
would write already exists without a manifest entry (the user's own `README.md`, `logs/`, ...). Names it would not
write never matter. A lock file keeps a second live run out of the folder, and an output folder inside the
training data or the base model (validation PNGs in the data set, a model card over the base's README) is refused.

Light on purpose (no torch import): the training script runs these checks before its heavy imports.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from reslora_diffusers.atomic import atomic_write_text

MANIFEST_NAME = ".reslora_run.json"
LOCK_NAME = ".reslora_run.lock"
# What a training run writes into its --output_dir (besides its logging folder and its checkpoints).
RUN_OUTPUT_FILES = (
    "reslora_adapter.safetensors",
    "reslora_config.json",
    "pytorch_lora_weights.safetensors",
    "training_summary.json",
    "metrics.jsonl",
    "resolved_config.json",
    "README.md",
)
RUN_OUTPUT_FOLDERS = ("kohya", "validation")
CHECKPOINTS = "checkpoint-*"  # one manifest entry for every checkpoint-<step> folder of the run


def planned_outputs(logging_dir: str) -> list[str]:
    """The top-level names a run writes into its output folder (its logging folder when that lies inside)."""
    names = [*RUN_OUTPUT_FILES, *RUN_OUTPUT_FOLDERS, CHECKPOINTS]
    logging = Path(logging_dir)
    if not logging.is_absolute() and logging.parts and logging.parts[0] not in ("..", "."):
        names.append(logging.parts[0])
    return names


def read_manifest(output_dir: Path) -> set[str] | None:
    """The names a run in `output_dir` recorded as its own; None when no run of this script wrote a manifest there."""
    try:
        owned = json.loads((output_dir / MANIFEST_NAME).read_text(encoding="utf-8")).get("owned")
    except (OSError, ValueError, AttributeError):
        return None
    return {name for name in owned if isinstance(name, str)} if isinstance(owned, list) else None


def _existing(output_dir: Path, name: str) -> list[str]:
    if name == CHECKPOINTS:
        return sorted(p.name for p in output_dir.glob(CHECKPOINTS))
    return [name] if (output_dir / name).exists() or (output_dir / name).is_symlink() else []


def _entries(output_dir: Path, names: list[str]) -> list[str]:
    return [found for name in names for found in _existing(output_dir, name)]


def _shown(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def ownership_error(output_dir: Path, logging_dir: str, resuming: bool, overwrite: bool) -> str | None:
    """Why a run may not write into `output_dir` (None when it may).

    A resume continues the run of its own checkpoint (a folder from before manifests is adopted); a new run may
    start only where none of its names exists unowned, and over an owned earlier run only with `overwrite`.
    """
    if output_dir.exists() and not output_dir.is_dir():
        return f"--output_dir {output_dir} is a file, not a folder"
    if not output_dir.is_dir():
        return None
    owned = read_manifest(output_dir)
    if resuming:
        return None
    names = planned_outputs(logging_dir)
    if owned is None:
        unowned = _entries(output_dir, names)
    else:
        unowned = [entry for name in names if name not in owned for entry in _existing(output_dir, name)]
    if unowned:
        return (
            f"{output_dir} holds {_shown(unowned)}, which no training run of this script wrote and this run would replace; "
            "move them away or choose another --output_dir (nothing was changed)"
        )
    previous = _entries(output_dir, sorted(owned or ()))
    previous = [name for name in previous if name not in (MANIFEST_NAME, LOCK_NAME)]
    if previous and not overwrite:
        return (
            f"{output_dir} holds another training run ({_shown(previous)}); pass --resume_from_checkpoint latest to continue it, "
            "--overwrite_output_dir to replace it, or another --output_dir"
        )
    return None


def clear_owned_outputs(output_dir: Path) -> list[str]:
    """`--overwrite_output_dir`: removes what the manifest lists, nothing else; returns what it removed."""
    owned = read_manifest(output_dir) or set()
    removed = []
    for entry in _entries(output_dir, sorted(owned - {MANIFEST_NAME, LOCK_NAME})):
        path = output_dir / entry
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(entry)
    return removed


def claim_outputs(output_dir: Path, logging_dir: str) -> None:
    """Records the run's names in the manifest before any of them is written (a crash later leaves them owned)."""
    owned = (read_manifest(output_dir) or set()) | set(planned_outputs(logging_dir))
    record = {"about": "names written by train_text_to_image.py; --overwrite_output_dir removes these only",
              "owned": sorted(owned)}
    atomic_write_text(output_dir / MANIFEST_NAME, json.dumps(record, indent=2) + "\n")


_HELD: list[RunLock] = []


def release_run_locks() -> None:
    """Releases every lock this process holds (the end of a run, also one that stopped with an error)."""
    while _HELD:
        _HELD.pop().release()


class RunLock:
    """An exclusive lock on the output folder for the life of the run (released by the OS if the process dies)."""

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / LOCK_NAME
        self.file = None

    def acquire(self) -> str | None:
        """None once locked; else why not (another live run holds the folder)."""
        import fcntl

        self.file = self.path.open("a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            self.file = None
            return f"another training run ({holder}) is writing to {self.path.parent} right now; wait for it to end or choose another --output_dir"
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}\n")
        self.file.flush()
        _HELD.append(self)
        return None

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing drops the lock
            self.file = None


def _resolved(path: str | os.PathLike | None) -> Path | None:
    if path is None or not Path(path).exists():
        return None
    return Path(path).resolve()


def is_same_or_inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def nested_output_error(
    output: str | os.PathLike, protected: dict[str, str | os.PathLike | None], contains: bool = True
) -> str | None:
    """Why `output` may not be written: it is, or lies inside, one of the `protected` local folders / files
    (training data, base model, adapter), or (`contains`: for an output replaced as a whole) contains one of them.
    Hub ids and missing paths are not local and never match."""
    target = Path(output).resolve()
    for label, path in protected.items():
        folder = _resolved(path)
        if folder is None:
            continue
        if is_same_or_inside(target, folder):
            where = "is" if target == folder else "lies inside"
            return f"{output} {where} {label} {path}; write the output somewhere else"
        if contains and is_same_or_inside(folder, target):
            return f"{output} contains {label} {path}, which replacing it would destroy; write the output somewhere else"
    return None
