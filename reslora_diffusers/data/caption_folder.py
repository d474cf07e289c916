"""Caption-file data sets as LoRA trainers keep them (kohya sd-scripts, OneTrainer), and choosing between them and
the imagefolder layout.

    my_images/
        10_sks dog/             ← `N_name`: every image below is used N times per epoch (here 10)
            a.png  a.txt        ← the caption of a.png (or a.caption); each non-empty line is one caption,
            b.jpg  b.caption      one of them is drawn at each use (as OneTrainer reads several lines)
        1_style/sub/c.webp c.txt  (folders are read recursively)

Images directly in the root folder, or in a top-level folder without an `N_` prefix, are used once per epoch.
An image without a caption file is an error unless `missing_caption="folder_name"`, which gives it its
`N_name` folder's name (kohya's "class tokens", e.g. "sks dog").
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from reslora_diffusers.data.dataset import METADATA_FILES, DatasetError, Example, decodes, load_imagefolder, read_text_file

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTENSIONS = (".txt", ".caption")
_REPEATS_FOLDER = re.compile(r"(\d+)_(.+)")
MAX_REPEATS = 100_000  # per `N_name` folder; kohya data sets use 1-100 (a typo like 1000000000 filled the memory)
MAX_EPOCH_LENGTH = 10_000_000  # images per epoch, repeats included


def has_metadata(directory: Path) -> bool:
    return any((base / name).is_file() for base in (directory, directory / "train") for name in METADATA_FILES)


def image_files(directory: Path) -> list[Path]:
    """Every image below `directory` (recursive, sorted; hidden files and folders skipped)."""
    return sorted(
        path
        for path in directory.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    )


def repeats_of(path: Path, directory: Path) -> tuple[int, str | None]:
    """(repeats, concept name) from the image's top-level folder `N_name`; (1, None) outside such a folder."""
    parts = path.relative_to(directory).parts
    match = _REPEATS_FOLDER.fullmatch(parts[0]) if len(parts) > 1 else None
    if match is None:
        return 1, None
    if int(match.group(1)) > MAX_REPEATS:
        raise DatasetError(
            f"folder {parts[0]!r} of {directory} repeats its images {int(match.group(1)):,} times per epoch; "
            f"at most {MAX_REPEATS:,} (the number before '_' is the repeat count)"
        )
    return int(match.group(1)), match.group(2)


def read_caption_file(image: Path) -> tuple[str, ...] | None:
    """The captions in `<stem>.txt` / `<stem>.caption` beside `image` (one per non-empty line; an empty file is the
    empty caption); None if there is no caption file. Two caption files that disagree are an error."""
    found: dict[Path, tuple[str, ...]] = {}
    for extension in CAPTION_EXTENSIONS:
        path = image.with_suffix(extension)
        if not path.is_file():
            continue
        text = read_text_file(path, "caption file ")
        found[path] = tuple(line.strip() for line in text.splitlines() if line.strip()) or ("",)
    if len(set(found.values())) > 1:
        raise DatasetError(f"{image} has two caption files that differ: {' and '.join(map(str, found))}; keep one")
    return next(iter(found.values()), None)


def caption_files_present(directory: Path) -> bool:
    return any(path.suffix in CAPTION_EXTENSIONS and path.is_file() for path in directory.rglob("*"))


def looks_like_caption_folder(directory: Path) -> bool:
    """True if `directory` is itself a caption-file data set: a captioned image directly in it, or in one of its
    `N_name` folders. (A folder that merely holds several data sets below it is not one.)"""
    def captioned_image_in(folder: Path) -> bool:  # existence only: listing folders must not read (or choke on) captions
        return any(path.suffix.lower() in IMAGE_EXTENSIONS and any(path.with_suffix(e).is_file() for e in CAPTION_EXTENSIONS)
                   for path in folder.iterdir() if path.is_file())

    if not directory.is_dir():
        return False
    if captioned_image_in(directory):
        return True
    return any(child.is_dir() and _REPEATS_FOLDER.fullmatch(child.name) and any(
        captioned_image_in(folder) for folder in (child, *(p for p in child.rglob("*") if p.is_dir())))
        for child in directory.iterdir())


def is_training_folder(directory: Path) -> bool:
    """A folder the training script reads: imagefolder metadata or caption files (see `load_local_folder`)."""
    return has_metadata(directory) or looks_like_caption_folder(directory)


def load_caption_folder(directory: str | Path, missing_caption: str = "error") -> list[Example]:
    """The examples of a caption-file folder (see the module docstring); corrupt images are skipped with a warning."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"training data folder not found: {directory}")
    images = image_files(directory)
    if not images:
        raise DatasetError(f"{directory} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    examples, skipped, empty = [], [], 0
    for image in images:
        repeats, concept = repeats_of(image, directory)
        if repeats == 0:
            continue  # `0_name`: a folder switched off, as in kohya
        captions = read_caption_file(image)
        if captions is None:
            if missing_caption == "folder_name" and concept is not None:
                captions = (concept,)
            else:
                hint = "" if concept is None else ", or pass --missing_caption folder_name to caption it with its folder's name"
                raise DatasetError(f"{image} has no caption: write {image.with_suffix('.txt').name} beside it{hint}")
        empty += captions == ("",)
        problem = decodes(image)
        if problem is not None:
            skipped.append((image, problem))
            continue
        examples.append(Example(image, captions, repeats))
    for path, problem in skipped:
        logger.warning("skipping unreadable image %s (%s)", path, problem)
    if empty:
        logger.warning("%d caption file(s) are empty: those images train with the empty caption", empty)
    if not examples:
        raise DatasetError(f"no readable image in {directory} ({len(skipped)} found, all corrupt)")
    check_epoch_length(examples, directory)
    return examples


def check_epoch_length(examples: list[Example], directory: Path) -> None:
    total = sum(example.repeats for example in examples)
    if total > MAX_EPOCH_LENGTH:
        raise DatasetError(f"{directory}: its `N_name` repeats make {total:,} images per epoch; at most {MAX_EPOCH_LENGTH:,}")


def load_local_folder(
    directory: str | Path,
    image_column: str = "image",
    caption_column: str = "text",
    caption_source: str = "auto",
    missing_caption: str = "error",
) -> list[Example]:
    """A local training folder: imagefolder metadata, caption files, or both (then they must agree).

    `caption_source` "metadata" / "files" reads only one of the two; "auto" reads what is there and, when both
    are, stops at the first image whose captions differ instead of silently preferring one.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"training data folder not found: {directory}")
    if caption_source == "auto" and not has_metadata(directory) and not caption_files_present(directory):
        raise DatasetError(
            f"{directory} has no metadata.jsonl (or metadata.csv) and no caption files: write one line per image like "
            '{"file_name": "cat.png", "text": "a cat"} into metadata.jsonl, or a cat.txt holding the caption beside cat.png'
        )
    use_metadata = caption_source == "metadata" or (caption_source == "auto" and has_metadata(directory))
    use_files = caption_source == "files" or (caption_source == "auto" and (not use_metadata or caption_files_present(directory)))
    if not use_files:
        return load_imagefolder(directory, image_column, caption_column)
    if not use_metadata:
        return load_caption_folder(directory, missing_caption)
    from_metadata = load_imagefolder(directory, image_column, caption_column)
    for example in from_metadata:
        captions = read_caption_file(example.image)
        if captions is not None and captions != example.captions:
            raise DatasetError(
                f"the captions of {example.image} differ between the metadata file ({list(example.captions)}) and its "
                f"caption file ({list(captions)}): pass --caption_source metadata or files to choose one"
            )
    listed = {example.image.resolve() for example in from_metadata}
    unlisted = [image for image in image_files(directory) if image.resolve() not in listed and read_caption_file(image) is not None]
    if unlisted:
        raise DatasetError(
            f"{unlisted[0]} has a caption file but is not in the metadata file ({len(unlisted)} such images): "
            "pass --caption_source metadata or files to choose one"
        )
    # Metadata and files agree: the folder's `N_name` repeats still apply.
    examples = [Example(e.image, e.captions, repeats_of(e.image, directory)[0]) for e in from_metadata]
    check_epoch_length(examples, directory)
    return examples
