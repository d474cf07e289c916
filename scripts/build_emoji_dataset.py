"""Build the Noto / Twemoji emoji data sets from the emoji-datasource npm packages.

    python scripts/build_emoji_dataset.py                       # data/emoji/{noto,twemoji}/
    python scripts/build_emoji_dataset.py --write_sample assets/twemoji-sample \\
        --write_eval_reference assets/tiny-emoji-sd-eval/noto_reference.npz

Fetches ``emoji-datasource-google`` and ``emoji-datasource-twitter`` (MIT; images Apache-2.0 Noto and
CC-BY-4.0 Twemoji) with ``npm pack`` into ``--cache_dir``, composites the 64-px RGBA PNGs onto white
and writes one imagefolder per style (``metadata.jsonl`` with ``file_name``, ``text``, ``split``).
The train / held-out split is the fixed one of ``reslora_diffusers.examples.emoji_data.is_heldout``.
Optional outputs: ``--write_sample`` a small Twemoji fine-tuning set of train-split names, and
``--write_eval_reference`` all Noto images at 32 px in one compressed array (for the base-model test).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reslora_diffusers.atomic import atomic_write_folder, atomic_write_text  # noqa: E402
from reslora_diffusers.examples.emoji_data import (  # noqa: E402
    clean_caption,
    sample_order_key,
    split_of,
    write_metadata,
)

VERSION = "16.0.0"
STYLES = {"noto": ("emoji-datasource-google", "google"), "twemoji": ("emoji-datasource-twitter", "twitter")}
ATTRIBUTION = """# Attribution and licences

- Twemoji graphics: Copyright Twitter, Inc. / X Corp. and other contributors, licensed under
  CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/).
- Noto Emoji graphics: Copyright Google Inc., licensed under the Apache License 2.0.
- Emoji images and names were taken from the npm packages `emoji-datasource-twitter` and
  `emoji-datasource-google` version {version} by Iamcal (Cal Henderson), MIT licence.

{what}
"""


class BuildError(Exception):
    """A failure reported to the user as one line, without a traceback."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache_dir", default="data/cache", help="where the npm tarballs are kept")
    p.add_argument("--output_dir", default="data/emoji", help="writes <output_dir>/noto and <output_dir>/twemoji")
    p.add_argument("--version", default=VERSION, help="emoji-datasource package version")
    p.add_argument("--write_sample", default=None, help="also write a small Twemoji train-split set to this folder")
    p.add_argument("--sample_size", type=int, default=300, help="number of images in --write_sample")
    p.add_argument("--write_eval_reference", default=None, help="also write all Noto images at 32 px to this .npz")
    args = p.parse_args(argv)
    if args.sample_size < 1:
        p.error("--sample_size must be >= 1")
    return args


def npm_pack(package: str, version: str, cache_dir: Path) -> Path:
    """Download ``package@version`` as a tarball into ``cache_dir`` (once) and return its path."""
    tgz = cache_dir / f"{package}-{version}.tgz"
    if tgz.is_file():
        return tgz
    npm = shutil.which("npm")
    if npm is None:
        raise BuildError("npm not found on PATH; install Node.js/npm to fetch the emoji packages")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [npm, "pack", f"{package}@{version}", "--pack-destination", tmp, "--loglevel", "error"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise BuildError(f"'npm pack {package}@{version}' timed out; is the npm registry reachable?") from None
        packed = Path(tmp) / tgz.name
        if res.returncode != 0 or not packed.is_file():
            lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "complete log" not in ln]
            reason = next((ln for ln in lines if " code " in ln), lines[0] if lines else "no output")
            raise BuildError(f"'npm pack {package}@{version}' failed (offline?): {reason.strip()}")
        packed.replace(tgz)
    return tgz


def read_package(tgz: Path, style_dir: str) -> tuple[list[dict], dict[str, bytes]]:
    """The emoji list and the 64-px PNG bytes by image file name from one package tarball."""
    prefix = f"package/img/{style_dir}/64/"
    pngs, emoji = {}, None
    with tarfile.open(tgz, "r:gz") as tar:
        for member in tar:
            if member.name == "package/emoji.json":
                emoji = json.load(tar.extractfile(member))
            elif member.name.startswith(prefix) and member.name.endswith(".png"):
                pngs[member.name[len(prefix):]] = tar.extractfile(member).read()
    if emoji is None:
        raise BuildError(f"{tgz} has no package/emoji.json; is it an emoji-datasource package?")
    return emoji, pngs


def captions_for(emoji: list[dict]) -> dict[str, str]:
    """Caption by image file name; a name shared by two emoji falls back to the short name."""
    by_caption: dict[str, list[dict]] = {}
    for e in emoji:
        by_caption.setdefault(clean_caption(e["name"]), []).append(e)
    out = {}
    for caption, entries in by_caption.items():
        for e in entries:
            out[e["image"]] = caption if len(entries) == 1 else clean_caption(e["short_name"].replace("_", " "))
    if len(set(out.values())) != len(out):
        raise BuildError("captions are not unique after the short-name fallback")
    return out


def on_white(png: bytes) -> Image.Image:
    """Composite an RGBA emoji onto a white background."""
    rgba = Image.open(io.BytesIO(png)).convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def records_for(captions: dict[str, str]) -> list[dict]:
    return [{"file_name": image, "text": text, "split": split_of(text)} for image, text in captions.items()]


def write_imagefolder(out_dir: Path, images: dict[str, Image.Image], records: list[dict], desc: str) -> None:
    """Write PNGs and metadata into a temporary sibling folder, then swap it into place."""

    def write(folder: Path) -> None:
        for rec in tqdm(records, desc=desc, unit="img"):
            images[rec["file_name"]].save(folder / rec["file_name"], optimize=True)
        write_metadata(records, folder / "metadata.jsonl")

    atomic_write_folder(out_dir, write)


def write_eval_reference(path: Path, images: dict[str, Image.Image], records: list[dict]) -> None:
    """All images at 32 px (uint8, N×32×32×3) with their captions and splits, in one ``.npz``."""
    records = sorted(records, key=lambda r: r["text"])
    arr = np.stack([np.asarray(images[r["file_name"]].resize((32, 32), Image.BOX)) for r in records])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez_compressed(tmp, images=arr, texts=np.array([r["text"] for r in records]),
                        splits=np.array([r["split"] for r in records]))
    tmp.replace(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    cache_dir, out_root = Path(args.cache_dir), Path(args.output_dir)
    styles = {}
    for style, (package, img_dir) in STYLES.items():
        tgz = npm_pack(package, args.version, cache_dir)
        emoji, pngs = read_package(tgz, img_dir)
        captions = {img: cap for img, cap in captions_for(emoji).items() if img in pngs}
        images = {img: on_white(pngs[img]) for img in tqdm(captions, desc=f"decode {style}", unit="img")}
        records = records_for(captions)
        write_imagefolder(out_root / style, images, records, desc=f"write {style}")
        n_held = sum(r["split"] == "heldout" for r in records)
        print(f"{style}: {len(records)} images ({n_held} held out) -> {out_root / style}")
        styles[style] = (images, records)

    if args.write_sample:
        images, records = styles["twemoji"]
        train = sorted((r for r in records if r["split"] == "train"), key=lambda r: sample_order_key(r["text"]))
        sample = [{"file_name": r["file_name"], "text": r["text"]} for r in train[: args.sample_size]]
        out = Path(args.write_sample)
        write_imagefolder(out, images, sample, desc="write sample")
        atomic_write_text(out / "ATTRIBUTION.md", ATTRIBUTION.format(
            version=args.version,
            what=f"This folder holds {len(sample)} Twemoji images (train split only) composited onto white, "
                 "written by `scripts/build_emoji_dataset.py --write_sample`."))
        print(f"sample: {len(sample)} Twemoji train-split images -> {out}")

    if args.write_eval_reference:
        images, records = styles["noto"]
        write_eval_reference(Path(args.write_eval_reference), images, records)
        print(f"eval reference: {len(records)} Noto images at 32 px -> {args.write_eval_reference}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BuildError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
