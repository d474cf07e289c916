"""Training data for `train_text_to_image.py`: image + caption data sets read with PIL and numpy.

The layout is 🤗 datasets' *imagefolder*, as diffusers' text-to-image scripts use it: a folder of images and a
`metadata.jsonl` (or `metadata.csv`) whose `file_name` column names each image (a path relative to the
folder) and whose other columns hold the captions, a string or a list of strings per image:

    {"file_name": "1f41f.png", "text": "fish"}
    {"file_name": "1f35f.png", "text": ["french fries", "fries"]}

The image column of such a folder is called `image` (as in 🤗 datasets). Every image is decoded once when
the data set is indexed, so a corrupt file is skipped with a warning then, never found in the middle of a run.
Caption-file folders (kohya / OneTrainer layout) are read by `caption_folder.py`, aspect-ratio buckets made by
`buckets.py`, and cached latents / text embeddings by `data_cache.py`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
IMAGE_COLUMN = "image"
FILE_NAME_COLUMN = "file_name"
INTERPOLATION_MODES = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


class DatasetError(ValueError):
    """Training data that cannot be used, with a message that says what to fix."""


# Part of every cache key of decoded pixels: raise it when `to_rgb` changes what an image decodes to.
DECODE_VERSION = 2
_TRANSPARENT_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ROTATING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
ALPHA_MASK = "alpha"  # Example.mask: the image's own alpha channel is its loss mask (masks.py)


def to_rgb(image: Image.Image, name: str = "an image") -> Image.Image:
    """8-bit RGB as an image viewer shows the file, whatever its mode (Pillow's own `convert("RGB")` does not):

    - EXIF orientation applied (a phone photo stored sideways trains upright);
    - 16-bit greyscale scaled to 8 bits (`convert` clips it: a 16-bit PNG came out pure white);
    - transparency (an alpha channel, or a palette / tRNS transparent colour) composited over white, as the emoji
      data are, instead of dropped (`convert` keeps whatever colour the transparent pixels happen to hold).
    A mode with no defined range (32-bit float, 32-bit integer) is a DatasetError.
    """
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":  # Pillow opens 16-bit PNGs as "I;16" or as "I"
        values = np.asarray(image, dtype=np.float64)
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise DatasetError(f"{name}: a 32-bit integer image has no fixed range; save it as an 8- or 16-bit image")
        image = Image.fromarray(np.round(values / 257.0).astype(np.uint8), "L")  # 0..65535 -> 0..255
    elif mode == "F":
        raise DatasetError(f"{name}: a 32-bit floating-point image has no fixed range; save it as an 8- or 16-bit image")
    if image.mode in _TRANSPARENT_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise DatasetError(f"{name}: cannot read its {image.mode} pixels as RGB ({error})") from None


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after the EXIF orientation is applied, from the header alone."""
    width, height = image.size
    try:
        orientation = image.getexif().get(0x0112)
    except (OSError, ValueError, SyntaxError):
        orientation = None
    return (height, width) if orientation in _ROTATING_ORIENTATIONS else (width, height)


@dataclass(frozen=True, eq=False)
class Example:
    """One training image (a file, or an image already in memory), its captions (one is drawn per use), how
    many times an epoch uses it (a caption folder's `N_name` prefix) and, with --masked_loss, its loss mask: a
    mask image's path or `ALPHA_MASK` (masks.py)."""

    image: Path | Image.Image
    captions: tuple[str, ...]
    repeats: int = 1
    mask: Path | str | None = None

    @property
    def name(self) -> str:
        return str(self.image) if isinstance(self.image, Path) else "an in-memory image"

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), read from the file's header."""
        if isinstance(self.image, Image.Image):
            return oriented_size(self.image)
        with Image.open(self.image) as image:
            return oriented_size(image)

    def open(self) -> Image.Image:
        """The decoded image as 8-bit RGB (`to_rgb`); a file that became unreadable since the data set was indexed
        is a DatasetError."""
        if isinstance(self.image, Image.Image):
            return to_rgb(self.image, self.name)
        try:
            with Image.open(self.image) as image:
                image.load()
                return to_rgb(image, self.name)
        except DatasetError:
            raise
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise DatasetError(f"image {self.image} became unreadable during training: {error}") from None

    def open_mask(self) -> Image.Image:
        """The loss mask as 8-bit greyscale of the image's (oriented) size: the mask file's luminance, or the
        alpha channel (an image without transparency trains everywhere)."""
        source = self.image if self.mask == ALPHA_MASK else self.mask
        try:
            if isinstance(source, Image.Image):
                image = ImageOps.exif_transpose(source)
            else:
                with Image.open(source) as opened:
                    opened.load()
                    image = ImageOps.exif_transpose(opened)
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise DatasetError(f"mask {source} became unreadable during training: {error}") from None
        if self.mask != ALPHA_MASK:
            return to_rgb(image, str(source)).convert("L")
        if image.mode in _TRANSPARENT_MODES or "transparency" in image.info:
            return image.convert("RGBA").getchannel("A")
        return Image.new("L", image.size, 255)


def _captions(value, column: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0 and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise DatasetError(f"{where}: caption column {column!r} must hold a string or a non-empty list of strings, got {value!r}")


def read_text_file(path: Path, what: str = "") -> str:
    """A caption or metadata file as text: UTF-8 (a byte-order mark is dropped, not kept as a character), or
    UTF-16 / UTF-32 when a byte-order mark says so. Anything else is a DatasetError naming the file."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"cannot read {what}{path}: {error.strerror or error}") from None
    for bom, codec in ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
                       (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")):
        if data.startswith(bom):
            break
    else:
        codec = "utf-8-sig"
    try:
        return data.decode(codec)
    except UnicodeDecodeError as error:
        raise DatasetError(f"cannot read {what}{path}: it is not {codec.replace('-sig', '')} text ({error.reason} at byte {error.start})") from None


def _read_metadata(path: Path) -> list[dict]:
    text = read_text_file(path)
    if path.suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path}, line {number} is not valid JSON: {error.msg} (column {error.colno})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{path}, line {number} must be a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _inside(folder: Path, name: str, where: str) -> Path:
    """`folder / name` for a relative `name` that stays inside `folder` (lexically: symlinks inside are fine)."""
    path = Path(os.path.normpath(folder / name))
    if Path(name).is_absolute() or not (path == folder or Path(os.path.normpath(folder)) in path.parents):
        raise DatasetError(
            f"{where}: file_name {name!r} lies outside the data folder {folder}; name files by their path inside it"
        )
    return path


def _check_columns(columns: Sequence[str], image_column: str, caption_column: str, where: str) -> None:
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in columns:
            raise DatasetError(f"{flag} {column!r} is not a column of {where}; its columns are: {', '.join(columns)}")


def decodes(image: Path | Image.Image) -> str | None:
    """None if the image decodes, else why not (in a few words)."""
    if isinstance(image, Image.Image):
        return None
    try:
        with Image.open(image) as opened:
            opened.load()
            to_rgb(opened, str(image))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        return str(error) or type(error).__name__
    return None


def load_imagefolder(directory: str | Path, image_column: str = IMAGE_COLUMN, caption_column: str = "text") -> list[Example]:
    """The examples of an imagefolder with captions; corrupt or missing images are skipped with a warning."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"training data folder not found: {directory}")
    metadata = next((directory / name for name in METADATA_FILES if (directory / name).is_file()), None)
    if metadata is None:
        metadata = next((directory / "train" / name for name in METADATA_FILES if (directory / "train" / name).is_file()), None)
    if metadata is None:
        raise DatasetError(
            f"{directory} has no metadata.jsonl (or metadata.csv) giving each image's caption: "
            'write one line per image like {"file_name": "cat.png", "text": "a cat"}'
        )
    rows = _read_metadata(metadata)
    if not rows:
        raise DatasetError(f"{metadata} lists no images: the training data set is empty")
    columns = [IMAGE_COLUMN] + [c for c in rows[0] if c != FILE_NAME_COLUMN]
    _check_columns(columns, image_column, caption_column, metadata)

    examples, skipped = [], []
    for number, row in enumerate(rows, start=1):
        where = f"{metadata}, entry {number}"
        if FILE_NAME_COLUMN not in row or caption_column not in row:
            raise DatasetError(f"{where} lacks the {FILE_NAME_COLUMN!r} or {caption_column!r} field")
        path = _inside(metadata.parent, str(row[FILE_NAME_COLUMN]), where)
        problem = "file not found" if not path.is_file() else decodes(path)
        if problem is not None:
            skipped.append((path, problem))
            continue
        examples.append(Example(path, _captions(row[caption_column], caption_column, where)))
    if not examples:
        raise DatasetError(f"no readable image in {directory} ({len(skipped)} listed, all missing or corrupt)")
    for path, problem in skipped:
        logger.warning("skipping unreadable image %s (%s)", path, problem)
    return examples


def load_hub_dataset(
    name: str, config_name: str | None, cache_dir: str | None, data_dir: str | None, image_column: str, caption_column: str
) -> list[Example]:
    """The 'train' split of a 🤗 Hub data set (needs the `datasets` package); images are kept in memory."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise DatasetError(
            f"--dataset_name {name!r} is not a local folder, and loading Hub data sets needs the `datasets` "
            "package (pip install datasets); or pass a local imagefolder with --train_data_dir"
        ) from None
    try:
        dataset = load_dataset(name, config_name, cache_dir=cache_dir, data_dir=data_dir)["train"]
    except Exception as error:  # the datasets library raises many error types for a name it cannot load
        raise DatasetError(f"cannot load data set {name!r}: {error}") from None
    _check_columns(dataset.column_names, image_column, caption_column, f"data set {name!r}")
    examples = []
    for number, row in enumerate(dataset):
        image = row[image_column]
        if not isinstance(image, Image.Image):
            raise DatasetError(f"--image_column {image_column!r} of {name!r} does not hold images")
        examples.append(Example(image, _captions(row[caption_column], caption_column, f"{name!r} row {number}")))
    if not examples:
        raise DatasetError(f"data set {name!r} has no training examples")
    return examples


Size = tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class Augmentation:
    """The random choices for one use of an image: where the crop starts and whether it is flipped."""

    left: int
    top: int
    flip: bool


class ImageTransform:
    """Resize to cover the target size (keeping the aspect ratio), crop it (centre or random), maybe flip, scale
    to [-1, 1]. The target is a `resolution`-sided square, or an aspect-ratio bucket's size."""

    def __init__(self, resolution: int, center_crop: bool, random_flip: bool, interpolation: str = "lanczos") -> None:
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.interpolation = INTERPOLATION_MODES[interpolation]

    def resized_size(self, size: Size, target: Size) -> Size:
        scale = max(target[0] / size[0], target[1] / size[1])
        return max(target[0], round(size[0] * scale)), max(target[1], round(size[1] * scale))

    def draw(self, size: Size, target: Size, generator: torch.Generator) -> Augmentation:
        """The crop and flip for an image of `size`; draws from `generator` in a fixed order (crop x, crop y, flip)."""
        width, height = self.resized_size(size, target)
        spare_x, spare_y = width - target[0], height - target[1]
        if self.center_crop:
            left, top = spare_x // 2, spare_y // 2
        else:
            left = int(torch.randint(spare_x + 1, (), generator=generator))
            top = int(torch.randint(spare_y + 1, (), generator=generator))
        flip = bool(self.random_flip and torch.rand((), generator=generator) < 0.5)
        return Augmentation(left, top, flip)

    def _placed(self, image: Image.Image, target: Size, augmentation: Augmentation, resample) -> Image.Image:
        """Resized to cover `target`, cropped and maybe flipped as `augmentation` says."""
        size = self.resized_size(image.size, target)
        if size != image.size:
            image = image.resize(size, resample)
        left, top = augmentation.left, augmentation.top
        image = image.crop((left, top, left + target[0], top + target[1]))
        if augmentation.flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image

    def apply(self, image: Image.Image, target: Size, augmentation: Augmentation) -> torch.Tensor:
        image = to_rgb(image) if image.mode != "RGB" else image
        image = self._placed(image, target, augmentation, self.interpolation)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
        return pixels / 127.5 - 1.0

    def apply_mask(self, mask: Image.Image, target: Size, augmentation: Augmentation) -> torch.Tensor:
        """A loss mask moved as `apply` moves its image: 1×H×W in [0, 1]."""
        mask = self._placed(mask, target, augmentation, Image.Resampling.BILINEAR)  # no overshoot: stays within [0, 1]
        return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]

    def crop_top_left(self, size: Size, target: Size, augmentation: Augmentation) -> tuple[int, int]:
        """SDXL's crop conditioning: the crop's (top, left) in the resized image; a flipped image's crop is
        measured in the flipped image."""
        width = self.resized_size(size, target)[0]
        left = width - target[0] - augmentation.left if augmentation.flip else augmentation.left
        return augmentation.top, left

    def __call__(self, image: Image.Image, generator: torch.Generator, target: Size | None = None) -> torch.Tensor:
        return self.with_geometry(image, generator, target)[0]

    def with_geometry(
        self, image: Image.Image, generator: torch.Generator, target: Size | None = None
    ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """The pixels, the original (height, width) and the crop's (top, left): SDXL's size and crop conditioning."""
        target = target or (self.resolution, self.resolution)
        augmentation = self.draw(image.size, target, generator)
        original_size = (image.height, image.width)
        return self.apply(image, target, augmentation), original_size, self.crop_top_left(image.size, target, augmentation)


@dataclass(frozen=True)
class CaptionOptions:
    """Caption randomness as kohya applies it: with probability `dropout_rate` the caption becomes empty (training
    the unconditional case); `shuffle` shuffles its comma-separated tags except the first `keep_tokens`."""

    dropout_rate: float = 0.0
    shuffle: bool = False
    keep_tokens: int = 0

    @property
    def random(self) -> bool:
        return self.dropout_rate > 0 or self.shuffle

    def __call__(self, caption: str, generator: torch.Generator) -> str:
        if self.dropout_rate > 0 and torch.rand((), generator=generator) < self.dropout_rate:
            return ""
        if self.shuffle:
            tags = [tag.strip() for tag in caption.split(",")]
            kept, rest = tags[: self.keep_tokens], tags[self.keep_tokens :]
            order = torch.randperm(len(rest), generator=generator).tolist()
            caption = ", ".join(kept + [rest[i] for i in order])
        return caption


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Yields {"pixel_values": 3×H×W in [-1, 1], "caption": str, "original_size", "crop_top_left", "target_size"}
    ((height, width) pairs and the crop's (top, left), SDXL's conditioning); an image with several captions gets a
    random one.

    `targets` gives each example's size (its aspect-ratio bucket); by default every example is a
    `resolution`-sided square. An example with `repeats` N appears N times. With a latent cache
    (`data_cache.LatentCache`), items hold "latent_parameters" (the VAE posterior's mean and log-variance)
    instead of pixels. An example with a loss mask adds "mask" (1×H×W in [0, 1], cropped and flipped as the image).

    The random crop, flip and caption of an example depend only on (seed, epoch, index), never on a global
    generator: data loaders fetch ahead, so a resumed run would otherwise draw them in another order.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        transform: ImageTransform,
        seed: int = 0,
        targets: Sequence[Size] | None = None,
        caption_options: CaptionOptions = CaptionOptions(),
    ) -> None:
        self.examples = [example for example in examples for _ in range(example.repeats)]
        if targets is not None:
            targets = [target for example, target in zip(examples, targets, strict=True) for _ in range(example.repeats)]
        self.targets = targets
        self.transform, self.caption_options, self.seed, self.epoch = transform, caption_options, seed, 0
        self.latent_cache = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples)

    def target(self, index: int) -> Size:
        return self.targets[index] if self.targets is not None else (self.transform.resolution,) * 2

    def __getitem__(self, index: int) -> dict:
        return self.item(index, self.target(index))

    def item(self, index: int, target: Size) -> dict:
        """Example `index` at size `target` (regularisation images take their batch's size)."""
        example = self.examples[index]
        seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(seed)
        if self.latent_cache is not None:
            # The same draws as from pixels, so the caption below is drawn from the same generator state.
            size = self.latent_cache.image_size(example)
            augmentation = self.transform.draw(size, target, generator)
            item = {"latent_parameters": self.latent_cache.get(example, augmentation.flip)}
            if example.mask is not None:
                item["mask"] = self.latent_cache.mask(example, augmentation.flip)
        else:
            image = example.open()
            size = image.size
            augmentation = self.transform.draw(size, target, generator)
            item = {"pixel_values": self.transform.apply(image, target, augmentation)}
            if example.mask is not None:
                item["mask"] = self.transform.apply_mask(example.open_mask(), target, augmentation)
        item["original_size"] = (size[1], size[0])
        item["crop_top_left"] = self.transform.crop_top_left(size, target, augmentation)
        item["target_size"] = (target[1], target[0])
        captions = example.captions
        caption = captions[int(torch.randint(len(captions), (), generator=generator))] if len(captions) > 1 else captions[0]
        item["caption"] = self.caption_options(caption, generator) if self.caption_options.random else caption
        return item


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A new random order each epoch that depends only on (seed, epoch): a resumed run sees the same order."""

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


def subset(examples: Sequence[Example], count: int, seed: int) -> list[Example]:
    """`count` examples chosen at random (the same for the same seed), like diffusers' `--max_train_samples`."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in sorted(order[:count])]
