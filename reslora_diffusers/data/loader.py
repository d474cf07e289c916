"""From the training script's data flags to its data loader: transform, buckets, caption options, caches, batches.

Raises `DatasetError` with a one-line message for settings that cannot work with this data and model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from reslora_diffusers.data.buckets import BucketBatchSampler, BucketLayout
from reslora_diffusers.data.cache import LatentCache, TextEmbeddingCache, module_fingerprint
from reslora_diffusers.data.caption_folder import load_local_folder
from reslora_diffusers.data.dataset import (
    CaptionOptions,
    DatasetError,
    EpochShuffleSampler,
    Example,
    ImageCaptionDataset,
    ImageTransform,
    load_hub_dataset,
    subset,
)
from reslora_diffusers.data.masks import attach_masks
from reslora_diffusers.data.regularisation import RegularisationImages


def examples_from_flags(args) -> tuple[list[Example], list[Example] | None]:
    """(training examples, held-out examples for the validation loss or None). Bad data (empty, unreadable,
    missing columns) raises DatasetError here, before any model loads."""
    folder = None
    if args.dataset_name is not None and not Path(args.dataset_name).is_dir():
        examples = load_hub_dataset(
            args.dataset_name, args.dataset_config_name, args.cache_dir, args.train_data_dir, args.image_column, args.caption_column
        )
    else:
        folder = args.dataset_name if args.dataset_name is not None else args.train_data_dir
        examples = load_local_folder(folder, args.image_column, args.caption_column, args.caption_source, args.missing_caption)
    if args.max_train_samples is not None and args.max_train_samples < len(examples):
        examples = subset(examples, args.max_train_samples, args.seed)
    if args.masked_loss:
        examples = attach_masks(examples, folder, args.mask_data_dir, args.alpha_mask)
    if args.validation_data_dir is not None:
        held_out = load_local_folder(args.validation_data_dir, args.image_column, args.caption_column,
                                     args.caption_source, args.missing_caption)
        return examples, held_out
    if args.validation_split is not None:
        return split_held_out(examples, args.validation_split, args.seed)
    return examples, None


def regularisation_examples(args) -> list[Example] | None:
    """The --reg_data_dir images (any local layout the training data may have; `N_name` repeats honoured)."""
    if getattr(args, "reg_data_dir", None) is None:
        return None
    try:
        return load_local_folder(args.reg_data_dir, args.image_column, args.caption_column, args.caption_source, args.missing_caption)
    except DatasetError as error:
        raise DatasetError(f"--reg_data_dir: {error}") from None


def split_held_out(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(training, held-out): a `fraction` of the distinct images (at least one; one at least stays for training),
    chosen by `seed` alone, so runs with the same seed and data hold out the same images."""
    count = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    if count < 1:
        raise DatasetError(f"--validation_split needs at least 2 images, the data set has {len(examples)}")
    held = set(np.random.default_rng(seed).permutation(len(examples))[:count].tolist())
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


@dataclass
class TrainingData:
    dataset: ImageCaptionDataset
    sampler: EpochShuffleSampler | BucketBatchSampler  # both have set_epoch(epoch)
    dataloader: torch.utils.data.DataLoader
    regularisation: RegularisationImages | None = None


def bucket_layout(args, examples: list[Example], vae_scale_factor: int, unet_downsampling: int) -> BucketLayout:
    """Each example's bucket; the step must keep latents divisible through every UNet downsampling."""
    unit = vae_scale_factor * unet_downsampling
    step = args.bucket_reso_steps or 8 * vae_scale_factor
    if step % unit:
        raise DatasetError(f"--bucket_reso_steps must be a multiple of {unit} (VAE factor × UNet downsampling), got {step}")
    min_side = args.min_bucket_reso or max(step, args.resolution // 2 // step * step)
    max_side = args.max_bucket_reso or max(step, args.resolution * 2 // step * step)
    for name, value in (("--min_bucket_reso", min_side), ("--max_bucket_reso", max_side)):
        if value % step:
            raise DatasetError(f"{name} must be a multiple of the bucket step {step}, got {value}")
    return BucketLayout.assign([example.size for example in examples], args.resolution, min_side, max_side, step)


def caption_options(args) -> CaptionOptions:
    return CaptionOptions(dropout_rate=args.caption_dropout_rate, shuffle=args.shuffle_caption, keep_tokens=args.keep_tokens)


def latent_distribution(vae, batch: dict, device: torch.device, dtype: torch.dtype) -> DiagonalGaussianDistribution:
    """The VAE posterior of a batch: from its cached parameters (`--cache_latents`) or by encoding its pixels.

    Always in the contiguous layout: `torch.randn_like(latents)` fills the noise in memory order, and a VAE on the
    CPU returns channels-last tensors (for some shapes), so the layout would decide which noise meets which latent
    and a cached run would not repeat an uncached one."""
    if "latent_parameters" in batch:
        parameters = batch["latent_parameters"].to(device, dtype=dtype)
    else:
        parameters = vae.encode(batch["pixel_values"].to(device, dtype=dtype)).latent_dist.parameters
    return DiagonalGaussianDistribution(parameters.contiguous())


def training_data(args, examples: list[Example], *, tokenizer, vae, text_encoder, unet, accelerator, vae_dtype, sdxl=None,
                  regularisation: list[Example] | None = None) -> TrainingData:
    """The data set, its sampler and loader; with --enable_bucket prints the bucket histogram, with caching fills
    the caches (the main process first when they are on disk, so the others read its files). With `sdxl`
    (`sdxl.SDXLConditioning`) batches also hold the second tokenizer's ids and the size / crop conditioning.
    `regularisation` examples (--reg_data_dir) are read from their pixels at each batch's size; their captions
    join the text-embedding cache."""
    if sdxl is not None and args.cache_text_embeddings:
        # SDXL needs both encoders' states and the pooled embedding, which the cache does not hold.
        raise DatasetError("--cache_text_embeddings is for SD 1.x / 2.x bases; an SDXL base encodes captions every step (drop the flag)")
    transform = ImageTransform(args.resolution, args.center_crop, args.random_flip, args.image_interpolation_mode)
    layout = None
    if args.enable_bucket:
        vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        layout = bucket_layout(args, examples, vae_scale_factor, 2 ** (len(unet.config.block_out_channels) - 1))
        accelerator.print(layout.report([e.repeats for e in examples], [e.name for e in examples]))
    targets = layout.assigned if layout is not None else [(args.resolution, args.resolution)] * len(examples)
    dataset = ImageCaptionDataset(examples, transform, seed=args.seed, targets=layout.assigned if layout else None, caption_options=caption_options(args))

    def tokenize(captions: list[str]) -> torch.Tensor:
        return tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt").input_ids

    text_cache = None
    on_disk = args.data_cache_dir is not None
    show_progress = accelerator.is_local_main_process
    with accelerator.main_process_first() if on_disk else contextlib.nullcontext(), torch.no_grad():
        if args.cache_latents:
            dataset.latent_cache = LatentCache.build(
                examples, targets, transform,
                encode=lambda pixels: vae.encode(pixels.to(accelerator.device, dtype=vae_dtype)).latent_dist.parameters,
                fingerprint=module_fingerprint(vae) if on_disk else "", dtype=vae_dtype,
                batch_size=args.train_batch_size, cache_dir=args.data_cache_dir, show_progress=show_progress,
            )
        if args.cache_text_embeddings:
            captions = [caption for example in [*examples, *(regularisation or [])] for caption in example.captions]
            text_cache = TextEmbeddingCache.build(
                captions + ([""] if args.caption_dropout_rate > 0 else []), tokenize,
                encode=lambda ids: text_encoder(ids.to(accelerator.device), return_dict=False)[0],
                fingerprint=module_fingerprint(text_encoder) if on_disk else "",
                batch_size=args.train_batch_size, cache_dir=args.data_cache_dir, show_progress=show_progress,
            )

    def collate_fn(batch: list[dict]) -> dict:
        captions = [example["caption"] for example in batch]
        target_height, target_width = batch[0]["target_size"]
        collated = {"input_ids": tokenize(captions), "image_size": (target_width, target_height)}
        if "latent_parameters" in batch[0]:
            collated["latent_parameters"] = torch.stack([example["latent_parameters"] for example in batch])
        else:
            collated["pixel_values"] = torch.stack([example["pixel_values"] for example in batch]).contiguous()
        if "mask" in batch[0]:
            collated["mask"] = torch.stack([example["mask"] for example in batch])
        if text_cache is not None:
            collated["encoder_hidden_states"] = text_cache.stack(captions)
        if sdxl is not None:  # the second tokenizer and SDXL's size / crop conditioning
            collated["input_ids_2"] = sdxl.tokenize(captions)
            for key in ("original_size", "crop_top_left", "target_size"):
                collated[key + "s"] = [example[key] for example in batch]
        return collated

    # Its own generator: creating an iterator then draws nothing from the global one that noise comes from.
    loader_options = {"collate_fn": collate_fn, "num_workers": args.dataloader_num_workers, "generator": torch.Generator().manual_seed(args.seed)}
    if layout is not None:
        sampler = BucketBatchSampler(dataset.targets, args.train_batch_size, args.seed, accelerator.num_processes)
        dataloader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, **loader_options)
    else:
        # A new order every epoch, fixed by (seed, epoch), so a resumed run sees the same batches.
        sampler = EpochShuffleSampler(len(dataset), args.seed)
        dataloader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=args.train_batch_size, **loader_options)
    reg = None
    if regularisation is not None:
        reg = RegularisationImages(regularisation, transform, caption_options(args), args.seed, collate_fn,
                                   accelerator.process_index, accelerator.num_processes)
    return TrainingData(dataset, sampler, dataloader, reg)
