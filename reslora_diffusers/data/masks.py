"""Loss masks (`--masked_loss`): where in each image the diffusion loss counts.

A mask is a greyscale image: white trains, black is ignored, grey weighs in between (kohya's convention). It
comes from a folder of same-named mask images (`--mask_data_dir`: `<mask_dir>/<the image's path inside the
data folder, any image extension>`) or from the image's own alpha channel (`--alpha_mask`; an image without
transparency trains everywhere). Masks are decoded by `Example.open_mask`, resized, cropped and flipped with their
image (`ImageTransform.apply_mask`) and averaged down to the latent grid by the loss
(`training/validation_loss.diffusion_loss`).

Every mask file is found, decoded and checked against its image's size when the data set is indexed, before any
model loads (as the images themselves are).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from reslora_diffusers.data.caption_folder import IMAGE_EXTENSIONS
from reslora_diffusers.data.dataset import ALPHA_MASK, DatasetError, Example, decodes, oriented_size


def _mask_file(example: Example, data_root: Path, mask_dir: Path) -> Path:
    relative = Path(example.image).resolve().relative_to(data_root.resolve())
    candidates = [mask_dir / relative.with_suffix(extension) for extension in IMAGE_EXTENSIONS]
    candidates += [path.with_suffix(path.suffix.upper()) for path in candidates]
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise DatasetError(f"--mask_data_dir {mask_dir} has no mask for {example.name} (expected {candidates[0]}, "
                           f"or another image extension)")
    return found


def attach_masks(examples: Sequence[Example], data_root: str | Path | None, mask_dir: str | Path | None,
                 alpha_mask: bool) -> list[Example]:
    """The examples with their masks: each one's mask file (checked: it exists, decodes and has the image's
    size), or the alpha channel as mask."""
    if alpha_mask:
        return [dataclasses.replace(example, mask=ALPHA_MASK) for example in examples]
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise DatasetError(f"--mask_data_dir {mask_dir} is not a folder")
    attached = []
    for example in examples:
        if not isinstance(example.image, Path) or data_root is None:
            raise DatasetError("--mask_data_dir names masks by their image's file; a Hub data set's images have none "
                               "(use --alpha_mask, or a local folder)")
        path = _mask_file(example, Path(data_root), mask_dir)
        problem = decodes(path)
        if problem is not None:
            raise DatasetError(f"mask {path} cannot be read: {problem}")
        with Image.open(path) as mask:
            mask_size, image_size = oriented_size(mask), example.size
        if mask_size != image_size:
            raise DatasetError(f"mask {path} is {mask_size[0]}×{mask_size[1]} but its image {example.name} is "
                               f"{image_size[0]}×{image_size[1]}: a mask must have its image's size")
        attached.append(dataclasses.replace(example, mask=path))
    return attached
