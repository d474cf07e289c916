"""Writing ``.safetensors`` files atomically, with checked string metadata."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from reslora_diffusers.atomic import atomic_write


def check_string_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    metadata = dict(metadata or {})
    bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise ValueError(f"safetensors metadata must map str to str; offending keys: {bad}")
    return metadata


def sort_metadata_in_place(path: str | Path) -> None:
    """Rewrites a .safetensors file's header with the metadata in sorted order. safetensors writes it in hash-map
    order, which changes from process to process: the same tensors and metadata would give other bytes each time."""
    with open(path, "r+b") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        ordered = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(ordered) <= length:  # the format allows trailing spaces in the header (it pads to 8 bytes itself)
            file.seek(8)
            file.write(ordered + b" " * (length - len(ordered)))


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Write a .safetensors file via a temp file in the same directory, so readers never see half a file; the same
    tensors and metadata always give the same bytes (`sort_metadata_in_place`)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata=metadata)
        sort_metadata_in_place(tmp)

    return atomic_write(path, write)


def require_suffix(path, what: str) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{what} must be a .safetensors file, got {str(path)!r}")
    return path
