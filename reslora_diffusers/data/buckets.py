"""Aspect-ratio buckets: images of many shapes trained near their own aspect ratio, batches of one shape.

The buckets are every (width, height) whose sides are multiples of `step` within [min_side, max_side] and whose
area fits the pixel budget `resolution²` (as kohya sd-scripts makes them), plus the square. Each image goes to
the bucket whose aspect ratio is nearest its own and is resized to cover it, so only the rounding of the bucket
sides is cropped away (more only for an image more elongated than any bucket; `BucketLayout.report` names it).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from reslora_diffusers.data.dataset import DatasetError, Size


def bucket_sizes(resolution: int, min_side: int, max_side: int, step: int) -> list[Size]:
    """Every bucket (width, height), sorted; empty if none fits (the caller says why)."""
    area = resolution * resolution
    sizes = set()
    square = resolution // step * step
    if min_side <= square <= max_side:
        sizes.add((square, square))
    for width in range(math.ceil(min_side / step) * step, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            sizes.update({(width, height), (height, width)})
    return sorted(sizes)


def cropped_fraction(size: Size, bucket: Size) -> float:
    """The share of an image (resized to cover `bucket`) that the crop to `bucket` removes."""
    scale = max(bucket[0] / size[0], bucket[1] / size[1])
    return 1.0 - bucket[0] * bucket[1] / (size[0] * scale * size[1] * scale)


@dataclass(frozen=True)
class BucketLayout:
    """The bucket of each example (in the order of the examples given)."""

    buckets: list[Size]
    assigned: list[Size]
    crops: list[float]

    @classmethod
    def assign(cls, image_sizes: Sequence[Size], resolution: int, min_side: int, max_side: int, step: int) -> BucketLayout:
        buckets = bucket_sizes(resolution, min_side, max_side, step)
        if not buckets:
            raise DatasetError(
                f"no aspect-ratio bucket fits: sides from {min_side} to {max_side} in steps of {step} within a budget of "
                f"{resolution}×{resolution} pixels; lower --min_bucket_reso or raise --resolution / --max_bucket_reso"
            )
        ratios = np.log([w / h for w, h in buckets])
        assigned = [buckets[int(np.abs(ratios - math.log(w / h)).argmin())] for w, h in image_sizes]
        crops = [cropped_fraction(size, bucket) for size, bucket in zip(image_sizes, assigned)]
        return cls(buckets, assigned, crops)

    def report(self, repeats: Sequence[int], names: Sequence[str]) -> str:
        """The histogram (images and uses per epoch in each bucket) and the largest crop, for the log."""
        images, uses = Counter(self.assigned), Counter()
        for bucket, count in zip(self.assigned, repeats):
            uses[bucket] += count
        lines = [f"aspect-ratio buckets: {len(images)} of {len(self.buckets)} in use (width×height: images, uses per epoch)"]
        lines += [f"  {w}×{h}: {images[(w, h)]}, {uses[(w, h)]}" for w, h in sorted(images)]
        worst = int(np.argmax(self.crops))
        lines.append(f"  largest crop: {self.crops[worst]:.1%} of {names[worst]}")
        return "\n".join(lines)


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches drawn from one bucket each, in an order that depends only on (seed, epoch) (so a resumed run,
    skipping the batches it already trained on, sees the same ones).

    Under data parallelism the batches come in groups of `num_processes` from the same bucket, which accelerate
    deals out one per process: at every step all processes train on the same shape. A bucket's last group is
    filled up with its own images drawn again, so every batch is full.
    """

    def __init__(self, targets: Sequence[Size], batch_size: int, seed: int, num_processes: int = 1) -> None:
        self.batch_size, self.seed, self.num_processes, self.epoch = batch_size, seed, num_processes, 0
        self.drop_last = False  # read by accelerate; every batch is full anyway
        members: dict[Size, list[int]] = {}
        for index, target in enumerate(targets):
            members.setdefault(target, []).append(index)
        self.members = [members[key] for key in sorted(members)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        group = self.batch_size * self.num_processes
        groups = []
        for indices in self.members:
            order = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
            needed = math.ceil(len(order) / group) * group
            order = (order * math.ceil(needed / len(order)))[:needed]
            groups += [order[start : start + group] for start in range(0, needed, group)]
        for g in torch.randperm(len(groups), generator=generator).tolist():
            for start in range(0, group, self.batch_size):
                yield groups[g][start : start + self.batch_size]

    def __len__(self) -> int:
        group = self.batch_size * self.num_processes
        return sum(math.ceil(len(indices) / group) for indices in self.members) * self.num_processes
