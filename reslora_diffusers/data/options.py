"""The training script's flags for caption files, caption randomness, aspect-ratio buckets and caching, and the
checks that need no model. Imports nothing heavy: the command line is parsed before torch loads."""

from __future__ import annotations

import argparse
import math
import sys

CAPTION_SOURCES = ("auto", "metadata", "files")
MISSING_CAPTION = ("error", "folder_name")
BUCKET_FLAGS = ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("caption files, buckets and caching")
    group.add_argument(
        "--caption_source",
        choices=CAPTION_SOURCES,
        default="auto",
        help="Where a local folder's captions come from: its metadata.jsonl / .csv, its <image>.txt / .caption files "
        "(kohya layout, `N_name` folders repeat N times), or 'auto': whichever is there (both must then agree).",
    )
    group.add_argument(
        "--missing_caption",
        choices=MISSING_CAPTION,
        default="error",
        help="An image without a caption file: stop with an error, or caption it with its `N_name` folder's name.",
    )
    group.add_argument("--caption_dropout_rate", type=float, default=0.0, help="Probability of training an image with the empty caption.")
    group.add_argument("--shuffle_caption", action="store_true", help="Shuffle the comma-separated tags of each caption at every use.")
    group.add_argument("--keep_tokens", type=int, default=0, help="With --shuffle_caption: keep the first N tags in place.")
    group.add_argument(
        "--enable_bucket",
        action="store_true",
        help="Aspect-ratio buckets: each image is trained near its own aspect ratio within a budget of --resolution² pixels, "
        "every batch from one bucket (instead of a --resolution square crop).",
    )
    group.add_argument("--min_bucket_reso", type=int, default=None, help="Smallest bucket side (default: --resolution / 2).")
    group.add_argument("--max_bucket_reso", type=int, default=None, help="Largest bucket side (default: --resolution × 2).")
    group.add_argument(
        "--bucket_reso_steps", type=int, default=None, help="Bucket sides are multiples of this (default: 8 × the VAE's downsampling factor)."
    )
    group.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode every image with the VAE once, before training (its posterior mean and variance; each step still "
        "draws a sample). With --random_flip both flips are cached; needs --center_crop when images have pixels to crop.",
    )
    group.add_argument(
        "--cache_text_embeddings",
        action="store_true",
        help="Encode every caption with the frozen text encoder once, before training (not with --train_text_encoder "
        "or --shuffle_caption).",
    )
    group.add_argument(
        "--data_cache_dir",
        type=str,
        default=None,
        help="Keep the cached latents / text embeddings in this folder as safetensors and reuse them in later runs "
        "(an entry is re-encoded when the model, image, size, crop or caption changes). Default: in memory only.",
    )


def add_mask_and_regularisation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("masked loss and regularisation images")
    group.add_argument(
        "--masked_loss",
        action="store_true",
        help="Train only where each image's mask says (white: trained, black: ignored, grey: in between), with the "
        "masks from --mask_data_dir or --alpha_mask. As in kohya's trainer the loss stays a mean over the whole image.",
    )
    group.add_argument(
        "--mask_data_dir",
        type=str,
        default=None,
        help="With --masked_loss: a folder of greyscale masks named as the images (the same path inside it as the image "
        "inside the data folder, any image extension), each of its image's size.",
    )
    group.add_argument(
        "--alpha_mask",
        action="store_true",
        help="With --masked_loss: each image's alpha channel is its mask (transparent pixels are ignored; an image "
        "without transparency trains everywhere).",
    )
    group.add_argument(
        "--reg_data_dir",
        type=str,
        default=None,
        help="Regularisation (class) images, in any layout the training data may have: each batch is joined by as "
        "many of them, and their loss is added times --prior_loss_weight (kohya's reg images, DreamBooth's prior "
        "preservation).",
    )
    group.add_argument("--prior_loss_weight", type=float, default=1.0, help="Weight of the regularisation images' loss.")


def check_data_arguments(args: argparse.Namespace, error) -> None:
    """Calls `error(message)` for flags that cannot work together."""
    if args.masked_loss and (args.mask_data_dir is None) == (not args.alpha_mask):
        error("--masked_loss needs its masks from one place: --mask_data_dir DIR or --alpha_mask")
    if not args.masked_loss and (args.mask_data_dir is not None or args.alpha_mask):
        error(f"{'--mask_data_dir' if args.mask_data_dir is not None else '--alpha_mask'} gives masks for --masked_loss: pass --masked_loss too")
    if not math.isfinite(args.prior_loss_weight) or args.prior_loss_weight < 0:
        error(f"--prior_loss_weight must be a finite number >= 0, got {args.prior_loss_weight}")
    if args.prior_loss_weight != 1.0 and args.reg_data_dir is None:
        error("--prior_loss_weight weighs the images of --reg_data_dir: pass --reg_data_dir too")
    if not 0.0 <= args.caption_dropout_rate <= 1.0:
        error(f"--caption_dropout_rate must be between 0 and 1, got {args.caption_dropout_rate}")
    if args.keep_tokens < 0:
        error(f"--keep_tokens must be >= 0, got {args.keep_tokens}")
    if args.keep_tokens and not args.shuffle_caption:
        error("--keep_tokens keeps tags in place while --shuffle_caption shuffles the rest; pass --shuffle_caption too")
    for name in BUCKET_FLAGS:
        value = getattr(args, name)
        if value is not None and not args.enable_bucket:
            error(f"--{name} sets up aspect-ratio buckets: pass --enable_bucket too")
        if value is not None and value <= 0:
            error(f"--{name} must be > 0, got {value}")
    if args.cache_text_embeddings and args.train_text_encoder:
        error("--cache_text_embeddings needs a frozen text encoder, but --train_text_encoder trains it")
    if args.cache_text_embeddings and args.shuffle_caption:
        error("--cache_text_embeddings cannot cache every order of a shuffled caption; leave out one of it and --shuffle_caption")
    if args.data_cache_dir is not None and not (args.cache_latents or args.cache_text_embeddings):
        error("--data_cache_dir stores cached latents / text embeddings: pass --cache_latents or --cache_text_embeddings too")
    if args.enable_bucket and args.cache_latents and not args.center_crop:
        # A bucket crops only its sides' rounding; kohya's cached latents are centre-cropped, and a random crop
        # cannot be cached, so the centre is used (and recorded: resolved_config.json says center_crop true).
        print("--cache_latents with --enable_bucket: each image's bucket rounding is cropped at the centre "
              "(as kohya's cached latents are; a random crop cannot be cached)", file=sys.stderr)
        args.center_crop = True
        if isinstance(getattr(args, "resolved_config", None), dict):
            args.resolved_config["center_crop"] = True
