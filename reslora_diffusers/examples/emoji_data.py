"""The emoji data set: captions, the one fixed train / held-out split, and loading.

Two styles of the same emoji come from the npm packages ``emoji-datasource-google`` (Noto, the base
model's style) and ``emoji-datasource-twitter`` (Twemoji, the new style an adapter learns);
``scripts/build_emoji_dataset.py`` writes them as imagefolder data sets.

The split is a pure function of the caption (the cleaned emoji name), so every script and benchmark
that imports :func:`is_heldout` agrees on it without reading any file: an emoji is held out when the
first 8 hex digits of ``sha256("reslora-emoji-split-v1:" + caption)``, read as an integer, are
``< HELDOUT_FRACTION * 16**8`` (about 10 % of the names). Never change the salt or the fraction:
results on the held-out names are only comparable while the split stays the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Iterable, Literal

from reslora_diffusers.atomic import atomic_write_text

SPLIT_SALT = "reslora-emoji-split-v1:"
HELDOUT_FRACTION = 0.10
METADATA_FILE = "metadata.jsonl"

Split = Literal["train", "heldout"]


def clean_caption(name: str) -> str:
    """Turn an emoji-datasource name into a caption: ``"Egypt Flag"`` -> ``"flag: egypt"``."""
    text = unicodedata.normalize("NFKD", name.replace("\u2019", "'"))
    text = text.encode("ascii", "ignore").decode("ascii").lower()
    text = re.sub(r"\s+", " ", text).strip()
    if text.endswith(" flag"):
        text = "flag: " + text[: -len(" flag")]
    return text


def _hash_fraction(caption: str) -> float:
    digest = hashlib.sha256((SPLIT_SALT + caption).encode("utf-8")).hexdigest()
    return int(digest[:8], 16) / 16**8


def is_heldout(caption: str) -> bool:
    """Whether an emoji (given by its caption, see :func:`clean_caption`) is in the held-out split."""
    return _hash_fraction(caption) < HELDOUT_FRACTION


def split_of(caption: str) -> Split:
    """``"heldout"`` or ``"train"`` for a caption."""
    return "heldout" if is_heldout(caption) else "train"


def sample_order_key(caption: str) -> str:
    """A fixed pseudo-random order of captions (independent of the split hash), for subsets."""
    return hashlib.sha256(("reslora-emoji-sample-v1:" + caption).encode("utf-8")).hexdigest()


def write_metadata(records: Iterable[dict], path: str | os.PathLike) -> None:
    """Write ``metadata.jsonl`` atomically; records are sorted by ``file_name`` so output is stable."""
    path = Path(path)
    lines = [json.dumps(r, ensure_ascii=False, sort_keys=True) for r in sorted(records, key=lambda r: r["file_name"])]
    atomic_write_text(path, "\n".join(lines) + "\n")


def load_split(data_dir: str | os.PathLike, split: Split | None = "train") -> list[dict]:
    """Records ``{"file_name", "text", "split", "path"}`` of an imagefolder written by the build script.

    ``split=None`` returns every record. The split is recomputed from the caption and checked against
    the stored field, so a data set written with another split rule is refused rather than mixed in.
    """
    data_dir = Path(data_dir)
    meta = data_dir / METADATA_FILE
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found; run scripts/build_emoji_dataset.py first")
    records = []
    for line in meta.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        expected = split_of(rec["text"])
        if rec.get("split", expected) != expected:
            raise ValueError(f"{meta}: {rec['text']!r} is stored as {rec['split']!r} but the split rule says {expected!r}")
        rec["split"] = expected
        if split is None or expected == split:
            rec["path"] = str(data_dir / rec["file_name"])
            records.append(rec)
    return records
