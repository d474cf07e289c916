"""Writing ``.safetensors`` files atomically, with checked string metadata."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..atomic import atomic_write


def check_string_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    metadata = dict(metadata or {})
    bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise ValueError(f"safetensors metadata must map str to str; offending keys: {bad}")
    return metadata


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Write a .safetensors file via a temp file in the same directory, so readers never see half a file."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def require_suffix(path, what: str) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{what} must be a .safetensors file, got {str(path)!r}")
    return path
