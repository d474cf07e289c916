#!/usr/bin/env python
"""Fine-tune Stable Diffusion (text to image) with ResLoRA, LoRA or Delta-LoRA adapters, using 🤗 accelerate.

A drop-in for diffusers' `examples/text_to_image/train_text_to_image_lora.py` (same flags, same data sets)
plus the adapter options. With no arguments it fine-tunes the embedded tiny emoji model on the Twemoji sample:

    accelerate launch train_text_to_image.py            # or: python train_text_to_image.py

    accelerate launch --mixed_precision fp16 train_text_to_image.py \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --train_data_dir my_images --resolution 512 --rank 32 --lora_alpha 64 --res_type is \\
        --train_batch_size 4 --learning_rate 1e-4 --max_train_steps 2000 --output_dir my-reslora

The defaults (batch 8, learning rate 5e-3, 200 steps, rank 8, resolution = the base VAE's sample size) are
tuned for the embedded tiny model, as diffusers' defaults were for its Pokémon example; pass your own for SD.

Data parallel (DDP) through accelerate; every process trains on its own share of each batch:
    one machine, 8 GPUs:   accelerate launch --multi_gpu --num_processes 8 train_text_to_image.py ...
    2 machines × 8 GPUs:   on each: accelerate launch --multi_gpu --num_machines 2 --num_processes 16 \\
                               --machine_rank <0|1> --main_process_ip <ip of rank 0> --main_process_port 29500 ...
                           (--output_dir must be on a file system both machines share, for checkpoints)
    CPU processes (gloo):  ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train_text_to_image.py
"""

import gc
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

# Light imports only up to the heavy-import block below: the command line is checked first.
from reslora_diffusers.annealing import DEFAULT_ANNEAL_FRACTION, shortcut_anneal_factor
from reslora_diffusers.cli import OneLineErrorParser, add_threads_argument, exit_with_error, first_line, set_threads
from reslora_diffusers.config import MERGE_METHODS, RES_TYPES, ResLoRAConfig
from reslora_diffusers.config_file import parse_with_config
from reslora_diffusers.data_options import add_data_arguments, check_data_arguments
from reslora_diffusers.optimizers import OPTIMIZERS, optimizer_name, resolve_optimizer_defaults
from reslora_diffusers.pipeline_io import hub_access_error
from reslora_diffusers.run_folder import (
    RunLock,
    claim_outputs,
    clear_owned_outputs,
    nested_output_error,
    ownership_error,
    release_run_locks,
)
from reslora_diffusers.run_safety import WRITE_ERRORS, optimizer_settings, resume_error, run_settings
from reslora_diffusers.training_data import INTERPOLATION_MODES

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = ROOT / "assets" / "tiny-emoji-sd"
DEFAULT_DATA = ROOT / "assets" / "twemoji-sample"
DEFAULT_PROMPTS = ["fish", "french fries", "red apple", "grinning face"]
CHECKPOINT_MARKER = "reslora_checkpoint.json"
ADAMW_LEARNING_RATE = 5e-3  # LoRA on the embedded tiny base; SD-1.5 LoRAs usually train at 1e-4
CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
PIPELINE_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
FLOAT32_MAX = 3.4028234663852886e38  # the optimizer applies the learning rate as a float32
MAX_SEED = 2**31 - 1  # numpy seeds must stay below 2**32 after accelerate adds each process's index
PIPELINE_FACTOR = 8  # diffusers' pipelines refuse heights and widths that are not multiples of 8


def parse_args(argv=None):
    parser = OneLineErrorParser(description="Fine-tune Stable Diffusion with ResLoRA / LoRA / Delta-LoRA adapters.")
    # Base model
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=str(DEFAULT_MODEL),
        help="Base model: a diffusers StableDiffusionPipeline folder, a Hub id, or a single-file .safetensors "
        "checkpoint (see --base_config). Default: the embedded tiny emoji model.",
    )
    parser.add_argument(
        "--base_config",
        type=str,
        default=None,
        help="For a single-file checkpoint: a diffusers folder (or Hub id) whose configs and tokenizer describe it.",
    )
    parser.add_argument("--revision", type=str, default=None, help="Revision of a Hub base model.")
    parser.add_argument("--variant", type=str, default=None, help="Variant of the base model's files, e.g. 'fp16'.")
    parser.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help="A VAE to use instead of the base's (e.g. madebyollin/sdxl-vae-fp16-fix). SDXL's own VAE gives NaNs in "
        "fp16, so without this flag an SDXL base's VAE runs in fp32 under --mixed_precision fp16.",
    )
    # Data
    parser.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="A 🤗 Hub data set (needs the `datasets` package) or a local imagefolder. Overrides --train_data_dir.",
    )
    parser.add_argument("--dataset_config_name", type=str, default=None, help="Config of a Hub data set, if it has several.")
    parser.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="An imagefolder: images plus a metadata.jsonl (or metadata.csv) with a 'file_name' and a caption column. "
        "Default (when --dataset_name is not given either): the embedded Twemoji sample.",
    )
    parser.add_argument("--image_column", type=str, default="image", help="The column of the data set holding the images.")
    parser.add_argument(
        "--caption_column", type=str, default="text", help="The column holding a caption or a list of captions per image."
    )
    parser.add_argument("--max_train_samples", type=int, default=None, help="Train on this many examples only (chosen with --seed).")
    parser.add_argument("--cache_dir", type=str, default=None, help="Where Hub models and data sets are cached.")
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Training resolution: images are resized (shorter side) and cropped to it. Default: the base VAE's sample size.",
    )
    parser.add_argument("--center_crop", action="store_true", help="Crop the centre of each image (default: a random crop).")
    parser.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random.")
    parser.add_argument(
        "--image_interpolation_mode",
        type=str,
        default="lanczos",
        choices=sorted(INTERPOLATION_MODES),
        help="Resampling filter used to resize images.",
    )
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loading worker processes (0: the main process).")
    # Validation
    parser.add_argument(
        "--validation_prompt",
        type=str,
        nargs="+",
        default=DEFAULT_PROMPTS,
        help="Prompt(s) sampled for the validation grids (one row each).",
    )
    parser.add_argument(
        "--num_validation_images", type=int, default=4, help="Images per validation prompt (one column each); 0 turns validation off."
    )
    parser.add_argument("--validation_epochs", type=int, default=3, help="Validate every X epochs (and before and after training).")
    parser.add_argument(
        "--validation_steps", type=int, default=None, help="Validate every X optimizer steps instead of every --validation_epochs."
    )
    parser.add_argument("--validation_inference_steps", type=int, default=20, help="Denoising steps (DPM-Solver) of validation images.")
    parser.add_argument("--validation_guidance_scale", type=float, default=7.5, help="Classifier-free guidance scale of validation images.")
    # Validation loss (reslora_diffusers/validation_loss.py): held-out images, fixed noise, timesteps and captions
    parser.add_argument(
        "--validation_split", type=float, default=None,
        help="Hold out this fraction of the training images (chosen by --seed alone) for the validation loss.",
    )
    parser.add_argument(
        "--validation_data_dir", type=str, default=None,
        help="A folder of held-out images for the validation loss, in any layout --train_data_dir reads.",
    )
    parser.add_argument(
        "--validation_loss_steps", type=int, default=None,
        help="Compute the validation loss (training-time and merged model) every X optimizer steps, before the first "
        "and after the last (default: a fifth of the run). Needs --validation_split or --validation_data_dir.",
    )
    parser.add_argument(
        "--validation_loss_timesteps", type=int, default=2,
        help="Timesteps per held-out image, spread over the whole noise schedule (the cost grows with it).",
    )
    # Output
    parser.add_argument(
        "--output_dir",
        type=str,
        default="outputs/sd-model-finetuned-reslora",
        help="Where the adapter, exports, validation images, logs and checkpoints are written.",
    )
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Replace another run's checkpoints and outputs in --output_dir (without it, a new run there is refused).",
    )
    parser.add_argument(
        "--logging_dir", type=str, default="logs", help="TensorBoard log folder, relative to --output_dir."
    )
    parser.add_argument(
        "--report_to",
        type=str,
        default="tensorboard",
        help="Where to report metrics: 'tensorboard', 'wandb', 'comet_ml', 'all' or 'none'.",
    )
    parser.add_argument("--push_to_hub", action="store_true", help="Upload --output_dir (without checkpoints) to the Hub at the end.")
    parser.add_argument("--hub_token", type=str, default=None, help="Token for --push_to_hub.")
    parser.add_argument("--hub_model_id", type=str, default=None, help="Hub repository for --push_to_hub (default: the output folder's name).")
    # Training
    parser.add_argument("--seed", type=int, default=0, help="Seed of the whole run (data order, noise, adapter init, validation).")
    parser.add_argument("--train_batch_size", type=int, default=8, help="Batch size per process.")
    parser.add_argument("--num_train_epochs", type=int, default=100, help="Epochs to train (unless --max_train_steps is given).")
    parser.add_argument(
        "--max_train_steps", type=int, default=200, help="Optimizer steps to train; overrides --num_train_epochs. Pass 0 to use epochs."
    )
    parser.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="Batches accumulated before each optimizer step."
    )
    parser.add_argument(
        "--gradient_checkpointing", action="store_true", help="Recompute activations in backward to save memory (slower)."
    )
    parser.add_argument(
        "--optimizer", type=optimizer_name, default="adamw", metavar="|".join(OPTIMIZERS),
        help="adamw; adamw8bit (bitsandbytes); adafactor (transformers, fixed step); prodigy (prodigyopt: learning rate "
        "1.0, it finds the step size); schedulefree_adamw (schedulefree: constant schedule, the warm-up inside the "
        "optimizer, exports its averaged weights). kohya's names (AdamW8bit, Prodigy, AdamWScheduleFree) work too.",
    )
    parser.add_argument("--learning_rate", type=float, default=None,
                        help="Learning rate after the warm-up (default 5e-3; 1.0 with --optimizer prodigy).")
    parser.add_argument(
        "--scale_lr", action="store_true", help="Multiply the learning rate by processes × accumulation steps × batch size."
    )
    parser.add_argument(
        "--lr_scheduler",
        type=str,
        default=None,
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
        help="Learning-rate schedule (default cosine; constant with --optimizer schedulefree_adamw, which needs no schedule).",
    )
    parser.add_argument("--lr_warmup_steps", type=int, default=20, help="Warm-up steps of the learning-rate schedule.")
    parser.add_argument(
        "--snr_gamma", type=float, default=None, help="Min-SNR loss weighting gamma (arXiv 2303.09556); 5.0 is usual. Off by default."
    )
    parser.add_argument("--use_8bit_adam", action="store_true", help="The same as --optimizer adamw8bit (diffusers' flag).")
    parser.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere or newer GPUs.")
    parser.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    parser.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    parser.add_argument("--adam_epsilon", type=float, default=1e-08, help="AdamW epsilon.")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    parser.add_argument(
        "--prediction_type",
        type=str,
        default=None,
        choices=["epsilon", "v_prediction"],
        help="Training target; default: the base scheduler's prediction_type.",
    )
    parser.add_argument("--noise_offset", type=float, default=0, help="Scale of the offset noise (0: off).")
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Mixed precision; default: accelerate's setting. The frozen base runs in it, the adapters stay fp32.",
    )
    parser.add_argument(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="Accepted for compatibility; ResLoRA's attention processors always use PyTorch scaled_dot_product_attention.",
    )
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by the distributed launcher.")
    add_threads_argument(
        parser,
        default=None,
        help="torch CPU threads per process. Default: OMP_NUM_THREADS when set, else 1 on CPU (the small matrices of a "
        "LoRA step gain little from more, and on a busy machine extra threads wait on each other: 4x slower measured "
        "on 2 cores); the GPU's default otherwise.",
    )
    # Checkpoints
    parser.add_argument(
        "--checkpointing_steps", type=int, default=100, help="Save a resumable checkpoint every X optimizer steps."
    )
    parser.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    parser.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="Resume from a checkpoint folder, or 'latest' for the newest complete one in --output_dir.",
    )
    # Adapter
    parser.add_argument("--res_type", type=str, default="is", choices=RES_TYPES, help="'none' = plain LoRA; 'is' / 'bs' / 'ms' ResLoRA shortcut.")
    parser.add_argument("--pre_num", type=int, default=-1, help="How many previous blocks a shortcut reaches (-1: all).")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of every adapter block.")
    parser.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha; the branch is scaled by alpha / rank. Default: the rank.")
    parser.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on the LoRA branch input (must be 0 with --delta_lora_ratio > 0).")
    parser.add_argument("--train_text_encoder", action="store_true", help="Also train adapters on the CLIP text encoder's attention.")
    parser.add_argument(
        "--delta_lora_ratio", type=float, default=0.0, help="Delta-LoRA lambda (0: off); needs --res_type none."
    )
    parser.add_argument("--delta_lora_start", type=int, default=500, help="Delta-LoRA K: the step after which the frozen weights move.")
    # Merge-aware training (issue 17; README "Which merge for is / ms"): the merged model is what users deploy.
    parser.add_argument(
        "--shortcut_anneal_fraction", type=float, default=0.0,
        help="Scale the is / ms / bs shortcut terms from 1 to 0 (half cosine) over this last fraction of the steps, so the "
        f"trained model is a plain LoRA that merges exactly (0: off, the default; the benchmark's setting was {DEFAULT_ANNEAL_FRACTION}). "
        "Measured (BENCHMARKS.md): exact, but it loses more than the calibrated merge of an unannealed run.",
    )  # fmt: skip
    parser.add_argument(
        "--no_cross_attention_shortcuts", action="store_true",
        help="Leave the cross-attention to_k / to_v blocks unlinked (they all read the same text embedding).",
    )  # fmt: skip
    parser.add_argument(
        "--lora_plus_ratio", type=float, default=1.0,
        help="LoRA+: B's learning rate = this × --learning_rate (A's); the LoRA+ paper uses 16. 1: plain LoRA (any --res_type).",
    )  # fmt: skip
    parser.add_argument(
        "--merge_method",
        type=str,
        default="calibrated",
        choices=MERGE_METHODS,
        help="How 'is' / 'ms' shortcuts are folded into the exported plain-LoRA files (exact for none / bs / Delta-LoRA and "
        "annealed runs); calibrated fits each merged down-projection to the unmerged branch on the validation prompts "
        "and gave the lowest merged held-out loss of all estimators (BENCHMARKS.md, merge-aware study); "
        "`python -m reslora_diffusers.merge` measures them all.",
    )

    add_data_arguments(parser)

    args = parse_with_config(parser, argv)  # --config FILE, overridden by the command line
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1:
        args.local_rank = env_local_rank

    # Sanity checks
    if args.dataset_name is None and args.train_data_dir is None:
        args.train_data_dir = str(DEFAULT_DATA)
    if args.max_train_steps == 0:
        args.max_train_steps = None
    required = ["train_batch_size", "num_train_epochs", "gradient_accumulation_steps", "checkpointing_steps"]
    required += ["validation_epochs", "validation_inference_steps"]
    optional = ["max_train_steps", "max_train_samples", "resolution", "checkpoints_total_limit", "validation_steps"]
    for name in required + optional:
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name} must be > 0, got {value}")
    if args.rank <= 0:
        parser.error(f"--rank must be > 0, got {args.rank}")
    resolve_optimizer_defaults(args, parser.error, default_learning_rate=ADAMW_LEARNING_RATE)
    if not 0 < args.learning_rate <= FLOAT32_MAX:
        parser.error(f"--learning_rate must be > 0 and fit a float32 (<= 3.4e38), got {args.learning_rate}")
    if not 0 <= args.seed <= MAX_SEED:
        parser.error(f"--seed must be a whole number in 0..{MAX_SEED} (a fixed seed is what makes a run repeatable and "
                     f"resumable; -1 does not mean 'random' here), got {args.seed}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            parser.error(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    for name in ("adam_weight_decay", "adam_epsilon", "noise_offset"):
        if not 0 <= getattr(args, name) < math.inf:
            parser.error(f"--{name} must be >= 0 and finite, got {getattr(args, name)}")
    if not 0 < args.max_grad_norm < math.inf:
        parser.error(f"--max_grad_norm must be > 0 and finite (0 would clip every gradient to nothing), got {args.max_grad_norm}")
    if args.resolution is not None and args.resolution % PIPELINE_FACTOR:
        parser.error(f"--resolution must be a multiple of {PIPELINE_FACTOR} (diffusers' pipelines need it to draw "
                     f"validation images and calibrate the merge), got {args.resolution}")
    if args.pre_num == 0 and args.res_type != "none":
        parser.error(f"--pre_num 0 links no earlier block, so --res_type {args.res_type} would train plain LoRA; "
                     "pass --pre_num -1 (all) or >= 1, or --res_type none")
    for name in ("num_validation_images", "lr_warmup_steps", "dataloader_num_workers"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.snr_gamma is not None and args.snr_gamma <= 0:
        parser.error(f"--snr_gamma must be > 0, got {args.snr_gamma}")
    check_data_arguments(args, parser.error)
    if args.validation_split is not None and args.validation_data_dir is not None:
        parser.error("--validation_split holds out training images, --validation_data_dir brings its own: pass one of them")
    if args.validation_split is not None and not 0 < args.validation_split < 1:
        parser.error(f"--validation_split must be a fraction between 0 and 1, got {args.validation_split}")
    if args.validation_loss_steps is not None and args.validation_split is None and args.validation_data_dir is None:
        parser.error("--validation_loss_steps needs held-out images: pass --validation_split or --validation_data_dir")
    for name in ("validation_loss_steps", "validation_loss_timesteps"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name} must be > 0, got {getattr(args, name)}")
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        parser.error("--overwrite_output_dir starts a new run, --resume_from_checkpoint continues one: pass one of them")
    if args.lora_alpha is None:
        args.lora_alpha = float(args.rank)
    args.optimizer_settings = optimizer_settings(args)  # before main() scales the learning rate or counts the steps
    if not 0 <= args.shortcut_anneal_fraction <= 1:
        parser.error(f"--shortcut_anneal_fraction must be in [0, 1], got {args.shortcut_anneal_fraction}")
    if args.lora_plus_ratio <= 0:
        parser.error(f"--lora_plus_ratio must be > 0, got {args.lora_plus_ratio}")
    try:
        args.adapter_config = ResLoRAConfig(
            res_type=args.res_type,
            pre_num=args.pre_num,
            rank=args.rank,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            delta_lora_ratio=args.delta_lora_ratio,
            delta_lora_start=args.delta_lora_start,
            cross_attention_shortcuts=not args.no_cross_attention_shortcuts,
        )
    except ValueError as error:
        message = str(error).replace("res_type='none'", "--res_type none").replace("lora_dropout=0", "--lora_dropout 0")
        parser.error(message)
    return args


# -- the base model -----------------------------------------------------------------------------------------
def check_base(args) -> None:
    """Fails early (before anything is written or loaded) on a base model path that cannot work."""
    path = Path(args.pretrained_model_name_or_path)
    if path.is_file():
        if path.suffix != ".safetensors":
            exit_with_error(f"{path}: a single-file base must be a .safetensors checkpoint (pickled .ckpt files are unsafe)")
        if args.base_config is not None and not Path(args.base_config).exists() and not _hub_id(args.base_config):
            exit_with_error(f"--base_config not found: {args.base_config}")
        return
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            exit_with_error(f"{path} is not a Stable Diffusion pipeline folder: it has no model_index.json")
        try:
            components = json.loads(index.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            exit_with_error(f"{index} is not valid JSON: {error}")
        missing = [c for c in PIPELINE_COMPONENTS if not (isinstance(components.get(c), list) and components[c][0])]
        missing += [c for c in PIPELINE_COMPONENTS if c not in missing and not (path / c).is_dir()]
        if missing:
            exit_with_error(f"{path} is not a Stable Diffusion pipeline folder: it lacks {', '.join(missing)}")
        return
    if not _hub_id(args.pretrained_model_name_or_path):
        exit_with_error(f"base model not found: {path}")


def _hub_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.startswith((".", "/"))


def output_error(args, resume_from: Path | None) -> str | None:
    """Why this run may not write into --output_dir (see reslora_diffusers/run_folder.py), or None."""
    output_dir = Path(args.output_dir)
    data = args.dataset_name if args.dataset_name and Path(args.dataset_name).is_dir() else args.train_data_dir
    protected = {"the training data": data, "the base model": args.pretrained_model_name_or_path,
                 "the base config": args.base_config, "the VAE": args.pretrained_vae_model_name_or_path,
                 "the validation data": args.validation_data_dir}
    error = nested_output_error(output_dir, protected, contains=False)
    if error:
        return error.replace(f"{output_dir} ", f"--output_dir {output_dir} ", 1)
    # A resume continues its own folder's run; `latest` without a checkpoint starts a new run.
    resuming = resume_from is not None and resume_from.resolve().parent == output_dir.resolve()
    return ownership_error(output_dir, args.logging_dir, resuming=resuming, overwrite=args.overwrite_output_dir)


def writable_folder_error(flag: str, folder: str | None) -> str | None:
    """Why `folder` (to be created if missing) cannot be written, checked before any work is done."""
    if folder is None:
        return None
    path = Path(folder)
    if path.exists() and not path.is_dir():
        return f"{flag} {folder} is a file, not a folder"
    existing = next((p for p in [path, *path.resolve().parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        return f"{flag} {folder} cannot be created: {existing} is a file"
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        return f"{flag} {folder} cannot be written: {existing} is read-only"
    return None


def preflight(args) -> None:
    """Every check that needs no model: the base path, the output folder's owner, the resume's settings, the network."""
    check_base(args)
    resume_from = find_resume_checkpoint(args) if args.resume_from_checkpoint else None
    for flag, folder in (("--output_dir", args.output_dir), ("--data_cache_dir", args.data_cache_dir)):
        error = writable_folder_error(flag, folder)
        if error:
            exit_with_error(error)
    error = output_error(args, resume_from)
    if error:
        exit_with_error(error)
    if resume_from is not None:
        error = incomplete_checkpoint_error(resume_from) or resume_error(resume_from, CHECKPOINT_MARKER, run_settings(args))
        if error:
            exit_with_error(error)
    for name in (args.pretrained_model_name_or_path, args.base_config):
        if name is not None and not Path(name).exists() and _hub_id(name):
            error = hub_access_error(name, revision=args.revision, cache_dir=args.cache_dir)
            if error:
                exit_with_error(error)


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first. Folders still being written have another name."""
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = CHECKPOINT_PATTERN.fullmatch(child.name)
        if match and (child / CHECKPOINT_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def find_resume_checkpoint(args) -> Path | None:
    output_dir = Path(args.output_dir)
    if args.resume_from_checkpoint == "latest":
        checkpoints = complete_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    path = Path(args.resume_from_checkpoint)
    if not path.exists():
        path = output_dir / path.name
    if not (path / CHECKPOINT_MARKER).is_file():
        exit_with_error(f"{args.resume_from_checkpoint} is not a complete checkpoint of this script (no {CHECKPOINT_MARKER})")
    return path


# What accelerate's save_state writes for this script (random_states_<process>.pkl one per process), besides the
# adapter: the optimizer and scheduler state (torch pickles, read back with weights_only) and the RNG states.
CHECKPOINT_FILES = ("reslora_adapter.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl")


def incomplete_checkpoint_error(checkpoint: Path) -> str | None:
    missing = [name for name in CHECKPOINT_FILES if not (checkpoint / name).is_file()]
    if missing:
        return (f"cannot resume from {checkpoint}: it lacks {', '.join(missing)} (deleted or never written); "
                "resume from an earlier checkpoint")
    return None


if __name__ == "__main__":
    # Bad input fails here, in seconds, before the imports below (diffusers, transformers, accelerate take
    # 10-90 s on a busy machine); main() repeats these cheap checks for callers that import this file.
    preflight(parse_args())

# -- the heavy imports ------------------------------------------------------------------------------------------
import numpy as np  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.logging import get_logger  # noqa: E402
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.optimization import get_scheduler  # noqa: E402
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

from reslora_diffusers import apply_reslora, save_adapter  # noqa: E402
from reslora_diffusers.formats import kohya_model_configs, save_diffusers_lora, save_kohya_lora  # noqa: E402
from reslora_diffusers.image_grid import labelled_grid  # noqa: E402
from reslora_diffusers.atomic import atomic_write, atomic_write_text, swap_in_folder  # noqa: E402
from reslora_diffusers.io import WEIGHTS_NAME, read_adapter  # noqa: E402
from reslora_diffusers.lora_plus import lora_plus_param_groups  # noqa: E402
from reslora_diffusers.validation_loss import (  # noqa: E402
    ValidationLoss,
    diffusion_loss,
    loss_target,
    split_held_out,
    trained_and_merged_losses,
)
from reslora_diffusers.optimizers import (  # noqa: E402
    OptimizerUnavailable,
    build_optimizer,
    check_installed,
    evaluation_weights,
    use_evaluation_weights,
)
from reslora_diffusers.merge import merge_adapter  # noqa: E402
from reslora_diffusers.sdxl import SDXLConditioning, encode_prompt  # noqa: E402
from reslora_diffusers.model_card import model_card  # noqa: E402
from reslora_diffusers.run_safety import (  # noqa: E402
    NonFiniteError,
    factor_tensors,
    optimizer_tensors,
    require_finite,
)
from reslora_diffusers.caption_folder import load_local_folder  # noqa: E402
from reslora_diffusers.data_pipeline import latent_distribution, training_data  # noqa: E402
from reslora_diffusers.training_data import DatasetError, load_hub_dataset, subset  # noqa: E402

logger = get_logger(__name__, log_level="INFO")


class TrainingStopped(Exception):
    """Training cannot go on (a non-finite loss, data that broke mid-run); the message says why and what is kept."""


def load_base(args):
    """(tokenizer, noise scheduler, text encoder, vae, unet, sdxl) of a diffusers folder, Hub id or single file.

    `sdxl` is None for SD-1.x / 2.x; for an SDXL base (detected from the model) it holds the second
    tokenizer and text encoder.
    """
    from reslora_diffusers.pipeline_io import SDXL_PIPELINE, UserInputError, load_pipeline

    name = args.pretrained_model_name_or_path
    if Path(name).is_file():
        try:
            pipe = load_pipeline(name, args.base_config)
        except UserInputError as error:
            exit_with_error(str(error))
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        sdxl = SDXLConditioning(pipe.tokenizer_2, pipe.text_encoder_2) if hasattr(pipe, "text_encoder_2") else None
        return pipe.tokenizer, scheduler, pipe.text_encoder, load_vae(args, pipe.vae), pipe.unet, sdxl
    common = {"revision": args.revision, "cache_dir": args.cache_dir}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **common)
        scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler", **common)
        text_encoder = CLIPTextModel.from_pretrained(name, subfolder="text_encoder", variant=args.variant, **common)
        vae = load_vae(args, None) or AutoencoderKL.from_pretrained(name, subfolder="vae", variant=args.variant, **common)
        unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", variant=args.variant, **common)
        sdxl = None
        if diffusers.DiffusionPipeline.load_config(name, **common).get("_class_name") == SDXL_PIPELINE:
            sdxl = SDXLConditioning(
                CLIPTokenizer.from_pretrained(name, subfolder="tokenizer_2", **common),
                CLIPTextModelWithProjection.from_pretrained(name, subfolder="text_encoder_2", variant=args.variant, **common),
            )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        exit_with_error(f"cannot load the Stable Diffusion model {name}: {first_line(error)}")
    return tokenizer, scheduler, text_encoder, vae, unet, sdxl


def load_vae(args, default):
    """The VAE of --pretrained_vae_model_name_or_path (a folder holding the VAE, or a Hub id), else `default`."""
    name = args.pretrained_vae_model_name_or_path
    if name is None:
        return default
    subfolder = "vae" if (Path(name) / "vae").is_dir() else None  # a whole pipeline folder, or the VAE alone
    try:
        return AutoencoderKL.from_pretrained(name, subfolder=subfolder, revision=args.revision, cache_dir=args.cache_dir)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        exit_with_error(f"cannot load the VAE {name}: {first_line(error)}")


def load_examples(args):
    """The training examples; bad data (empty, unreadable, missing columns) fails here, before training starts."""
    try:
        if args.dataset_name is not None and not Path(args.dataset_name).is_dir():
            examples = load_hub_dataset(
                args.dataset_name, args.dataset_config_name, args.cache_dir, args.train_data_dir, args.image_column, args.caption_column
            )
        else:
            folder = args.dataset_name if args.dataset_name is not None else args.train_data_dir
            examples = load_local_folder(folder, args.image_column, args.caption_column, args.caption_source, args.missing_caption)
    except DatasetError as error:
        exit_with_error(str(error))
    if args.max_train_samples is not None and args.max_train_samples < len(examples):
        examples = subset(examples, args.max_train_samples, args.seed)
    return examples


def held_out_examples(args, examples):
    """(training examples, held-out examples for the validation loss or None)."""
    try:
        if args.validation_data_dir is not None:
            held_out = load_local_folder(args.validation_data_dir, args.image_column, args.caption_column,
                                         args.caption_source, args.missing_caption)
            return examples, held_out
        if args.validation_split is not None:
            return split_held_out(examples, args.validation_split, args.seed)
    except (DatasetError, ValueError) as error:
        exit_with_error(str(error))
    return examples, None


# -- checkpoints ----------------------------------------------------------------------------------------------
def save_checkpoint(accelerator: Accelerator, args, global_step: int, epoch: int) -> Path:
    """`accelerator.save_state` into a temporary folder, renamed to `checkpoint-<step>` once every file is there.

    A crash while writing leaves only `checkpoint-<step>.tmp`, which `latest` never picks (and the next save removes);
    an interrupt (Ctrl-C, the app's Cancel) removes it on the way out, so a cancelled run leaves complete checkpoints only.
    """
    output_dir = Path(args.output_dir)
    final = output_dir / f"checkpoint-{global_step}"
    staging = output_dir / f"checkpoint-{global_step}.tmp"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            marker = {"global_step": global_step, "epoch": epoch, "num_processes": accelerator.num_processes, "settings": run_settings(args)}
            atomic_write_text(staging / CHECKPOINT_MARKER, json.dumps(marker, indent=2))
            # The same step saved before a resume is replaced only now that the new one is complete.
            swap_in_folder(staging, final)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        # Older checkpoints go only after the new one is complete.
        if args.checkpoints_total_limit is not None:
            for _, folder in complete_checkpoints(output_dir)[: -args.checkpoints_total_limit]:
                shutil.rmtree(folder)
    accelerator.wait_for_everyone()
    return final


# -- metrics, validation, outputs ---------------------------------------------------------------------------------
class MetricsFile:
    """`metrics.jsonl`: one JSON line per optimizer step. On resume, lines after the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        kept = []
        if resume_step > 0 and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    break  # a line cut by a crash
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        self.file = path.open("a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def validation_pipeline(accelerator, args, unet, text_encoder, vae, tokenizer, noise_scheduler, sdxl=None):
    """The base pipeline running through the live adapter (no copy), with a fast DPM-Solver sampler."""
    # Imported here, once transformers' logging is quiet: the pipeline module pulls in image processors that
    # warn about optional backends the training never uses.
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if sdxl is not None:
        # The VAE may be kept fp32 (fp16 overflow) while the UNet's latents come out fp16, and the pipeline
        # hands them to the VAE as they are (it casts only a VAE it upcasts itself): its first layer casts them.
        first = vae.post_quant_conv if getattr(vae, "post_quant_conv", None) is not None else vae.decoder
        first.register_forward_pre_hook(lambda module, args: (args[0].to(vae.dtype), *args[1:]))
        pipeline = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=accelerator.unwrap_model(text_encoder),
            text_encoder_2=accelerator.unwrap_model(sdxl.text_encoder_2),
            tokenizer=tokenizer,
            tokenizer_2=sdxl.tokenizer_2,
            unet=accelerator.unwrap_model(unet),
            scheduler=DPMSolverMultistepScheduler.from_config(noise_scheduler.config),
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=accelerator.unwrap_model(text_encoder),
        tokenizer=tokenizer,
        unet=accelerator.unwrap_model(unet),
        scheduler=DPMSolverMultistepScheduler.from_config(noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def log_validation(pipeline, accelerator, args, step: int) -> Path:
    """One grid (a row per prompt, the same seeds every time) saved as PNG and sent to TensorBoard."""
    unet, text_encoder = pipeline.unet, pipeline.text_encoder
    was_training = unet.training, text_encoder.training
    unet.eval()
    text_encoder.eval()
    rows = []
    with accelerator.autocast():
        for prompt in args.validation_prompt:
            generators = [torch.Generator(device="cpu").manual_seed(args.seed + i) for i in range(args.num_validation_images)]
            rows.append(
                pipeline(
                    prompt,
                    num_images_per_prompt=args.num_validation_images,
                    num_inference_steps=args.validation_inference_steps,
                    guidance_scale=args.validation_guidance_scale,
                    height=args.resolution,
                    width=args.resolution,
                    generator=generators,
                ).images
            )
    unet.train(was_training[0])
    text_encoder.train(was_training[1])
    # A row per prompt, labelled with it; a column per seed (the same seeds at every validation).
    grid = labelled_grid(rows, list(args.validation_prompt), [f"seed {args.seed + i}" for i in range(args.num_validation_images)])
    path = Path(args.output_dir) / "validation" / f"step-{step:06d}.png"
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
    return path


def export_merged(adapter, args, calibration) -> tuple[str, Path, Path]:
    """Merges the adapter into plain LoRA factors and writes the diffusers and kohya files (NonFiniteError: none)."""
    result = merge_adapter(adapter, method=args.merge_method, calibration=calibration)
    require_finite(factor_tensors(result.factors), f"the {result.method} merge")
    output_dir = Path(args.output_dir)
    metadata = {
        "reslora_res_type": adapter.config.res_type,
        "reslora_pre_num": str(adapter.config.pre_num),
        "reslora_merge_method": result.method,
        "reslora_config": adapter.config.to_json(),
        "reslora_base_model": args.pretrained_model_name_or_path,
    }
    diffusers_file = save_diffusers_lora(result.factors, output_dir, metadata=metadata)
    name = re.sub(r"[^\w.-]+", "_", output_dir.resolve().name) or "reslora"
    kohya_file = save_kohya_lora(
        result.factors, output_dir / "kohya" / f"{name}.safetensors", metadata, **kohya_model_configs(adapter)
    )
    return result.method, Path(diffusers_file), Path(kohya_file)


def require_finite_state(adapter, optimizer, global_step: int) -> None:
    """Stops the run (TrainingStopped) when the adapter or the optimizer state is not finite: it is never written."""
    try:
        require_finite(adapter.state_dict(), "the adapter")
        require_finite(optimizer_tensors(optimizer), "the optimizer state")
    except NonFiniteError as error:
        raise TrainingStopped(
            f"the weights became non-finite at step {global_step} ({error}); training stopped without saving them "
            "(try a lower --learning_rate, or --mixed_precision bf16 instead of fp16)"
        ) from None


def shut_down(accelerator) -> None:
    """Ends a run so that every process exits, in order: trackers flushed, models freed, then the process group.

    A data-parallel model holds the process group; destroyed at interpreter exit instead, gloo's destructor
    could wait forever for a peer that had already gone (2 of 8 CPU runs hung after writing every output).
    """
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # drops the accelerator's references to the prepared (DDP-wrapped) models
    gc.collect()
    accelerator.wait_for_everyone()  # every process has freed its wrappers before any destroys the group
    accelerator.end_training()  # finishes the trackers and destroys the process group


def finished_at(output_dir: Path) -> int | None:
    """The step whose exports a run completed in `output_dir` (its training summary, written last), else None."""
    try:
        return json.loads((output_dir / "training_summary.json").read_text())["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def any_process_failed(accelerator, error: str | None) -> bool:
    """True on every process when any of them has an `error`, so that all stop together instead of one waiting."""
    if accelerator.num_processes == 1:
        return error is not None
    flag = torch.tensor([0.0 if error is None else 1.0], device=accelerator.device)
    return bool(accelerator.gather(flag).sum() > 0)


def adapter_replica_difference(accelerator, adapter) -> float:
    """Largest difference between this process's adapter and any other's (0.0: all replicas identical)."""
    flat = torch.cat([p.detach().float().flatten() for p in adapter.trainable_parameters()])
    gathered = accelerator.gather(flat.unsqueeze(0))
    return float((gathered - gathered[0]).abs().max())


def main(argv=None):
    """Trains, then releases the output folder's lock however the run ended (an in-process caller may start another)."""
    try:
        train(argv)
    finally:
        release_run_locks()


def train(argv=None):
    args = parse_args(argv)
    # Everything that can be checked without loading models is checked before anything is written.
    preflight(args)
    examples, held_out = held_out_examples(args, load_examples(args))
    output_dir = Path(args.output_dir)
    resume_from = find_resume_checkpoint(args) if args.resume_from_checkpoint else None
    try:
        check_installed(args.optimizer)
    except OptimizerUnavailable as error:
        exit_with_error(str(error))
    if args.report_to in ("tensorboard", "all"):
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            exit_with_error("--report_to tensorboard needs the tensorboard package (pip install tensorboard), or pass --report_to none")

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
    )
    # Make one log on every process with the configuration for debugging.
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint messages would break the progress bar
    if args.enable_xformers_memory_efficient_attention:
        logger.warning("ResLoRA's attention processors use PyTorch scaled_dot_product_attention; xformers is not needed")

    # On CPU, one thread per process unless --threads or OMP_NUM_THREADS says otherwise (see --threads).
    if args.threads is not None:
        set_threads(args.threads)
    elif accelerator.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        set_threads(1)
        logger.info("CPU training with 1 thread per process (pass --threads to use more)")

    # Each process gets its own seed, so processes draw different noise for their different images.
    set_seed(args.seed, device_specific=True)

    # Load the tokenizer, noise scheduler and models.
    tokenizer, noise_scheduler, text_encoder, vae, unet, sdxl = load_base(args)
    text_encoders = [text_encoder] if sdxl is None else [text_encoder, sdxl.text_encoder_2]
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        exit_with_error(f"the base scheduler predicts {noise_scheduler.config.prediction_type!r}; pass --prediction_type epsilon or v_prediction")
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.resolution is None:
        args.resolution = int(vae.config.sample_size)
    factor = math.lcm(vae_scale_factor, PIPELINE_FACTOR)
    if args.resolution % factor:
        exit_with_error(f"--resolution must be a multiple of {factor} (the VAE downsamples by {vae_scale_factor}, and "
                        f"diffusers' pipelines need multiples of {PIPELINE_FACTOR}), got {args.resolution}")
    if resume_from is not None and (error := resume_error(resume_from, CHECKPOINT_MARKER, run_settings(args))):
        exit_with_error(error)  # again, now that the default resolution is known

    # The frozen base runs in the mixed-precision dtype (the adapters stay fp32; Delta-LoRA never writes W).
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    # SDXL's VAE overflows to NaN in fp16 (diffusers' SDXL scripts keep it in fp32 unless a fixed VAE is given).
    vae_dtype = weight_dtype
    if sdxl is not None and weight_dtype == torch.float16 and args.pretrained_vae_model_name_or_path is None:
        vae_dtype = torch.float32
        logger.info("SDXL: the VAE runs in fp32 (its fp16 activations overflow); --pretrained_vae_model_name_or_path takes a fixed VAE")
    vae.requires_grad_(False)
    vae.to(accelerator.device, dtype=vae_dtype)
    unet.to(accelerator.device, dtype=weight_dtype)
    for model in text_encoders:
        model.to(accelerator.device, dtype=weight_dtype)
        model.requires_grad_(False)

    # Add the adapter blocks (fp32) to the UNet attention projections (and the text encoders'); the base stays frozen.
    trained_encoders = {}
    if args.train_text_encoder:
        trained_encoders = {"text_encoder": text_encoder}
        if sdxl is not None:
            trained_encoders["text_encoder_2"] = sdxl.text_encoder_2
    adapter = apply_reslora(unet, args.adapter_config, **trained_encoders)
    logger.info(f"{adapter}: {sum(p.numel() for p in adapter.trainable_parameters()):,} trainable parameters")
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            for model in text_encoders:
                model.gradient_checkpointing_enable()
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes

    # The optimizer (reslora_diffusers/optimizers.py); LoRA+ gives B its own learning rate in a second group.
    optimizer = build_optimizer(
        args.optimizer,
        lora_plus_param_groups(adapter, args.learning_rate, args.lora_plus_ratio),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        warmup_steps=args.lr_warmup_steps,
    )

    # The data (caption files, buckets, caches: reslora_diffusers/data_pipeline.py); its order is fixed by
    # (seed, epoch), so a resumed run sees the same batches.
    try:
        data = training_data(args, examples, tokenizer=tokenizer, vae=vae, text_encoder=text_encoder, unet=unet,
                             accelerator=accelerator, vae_dtype=vae_dtype, sdxl=sdxl)
    except DatasetError as error:
        exit_with_error(str(error))
    train_dataset, sampler, train_dataloader = data.dataset, data.sampler, data.dataloader

    # Scheduler and math around the number of training steps.
    batches_per_process = math.ceil(len(train_dataloader) / accelerator.num_processes)
    num_update_steps_per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )

    # Prepare everything with our `accelerator` (DDP wraps the models whose adapter blocks are trained).
    if args.train_text_encoder and sdxl is not None:
        unet, text_encoder, sdxl.text_encoder_2, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            unet, text_encoder, sdxl.text_encoder_2, optimizer, train_dataloader, lr_scheduler
        )
        text_encoders = [text_encoder, sdxl.text_encoder_2]
    elif args.train_text_encoder:
        unet, text_encoder, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            unet, text_encoder, optimizer, train_dataloader, lr_scheduler
        )
    else:
        unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, train_dataloader, lr_scheduler)
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    # Checkpoints hold the adapter (factors, input-norm windows, Delta-LoRA step-K factors) as safetensors,
    # not the frozen base, which is reloaded from --pretrained_model_name_or_path.
    def save_model_hook(models, weights, checkpoint_dir):
        if accelerator.is_main_process:
            save_adapter(adapter, checkpoint_dir, extra={"base_model": args.pretrained_model_name_or_path})
        weights.clear()

    def load_model_hook(models, checkpoint_dir):
        models.clear()
        try:
            metadata, tensors = read_adapter(checkpoint_dir)
            if metadata["config"] != adapter.config.to_dict():
                raise ValueError(f"it was trained with other adapter settings ({metadata['config']}); pass the same flags to resume")
            adapter.load_state_dict(tensors)
        except (ValueError, FileNotFoundError) as error:  # AdapterMismatchError is a ValueError
            exit_with_error(f"cannot resume from {checkpoint_dir}: {error}")

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    global_step, first_epoch = 0, 0
    if resume_from is not None:
        marker = json.loads((resume_from / CHECKPOINT_MARKER).read_text())
        saved_processes = marker.get("num_processes", accelerator.num_processes)
        if saved_processes != accelerator.num_processes:
            # accelerate steps the scheduler once per process and splits each batch over the processes: another
            # count would restore the learning rate at another point of its schedule and change the data order.
            exit_with_error(f"cannot resume from {resume_from}: it was trained on {saved_processes} process(es), this run has "
                            f"{accelerator.num_processes}; launch it with --num_processes {saved_processes}")
        accelerator.print(f"Resuming from checkpoint {resume_from}")
        try:
            accelerator.load_state(str(resume_from))
        except SystemExit:
            raise
        except Exception as error:  # a truncated optimizer.bin / scheduler.bin / RNG state: torch raises many types
            exit_with_error(f"cannot resume from {resume_from}: {first_line(error)} (a file of it is damaged); "
                            "resume from an earlier checkpoint")
        global_step = marker["global_step"]
        first_epoch = global_step // num_update_steps_per_epoch
        try:  # a checkpoint is checked when written; one from an older version of this script may not have been
            require_finite(adapter.state_dict(), f"the adapter in {resume_from}")
        except NonFiniteError as error:
            exit_with_error(f"cannot resume: {error}; resume from an earlier checkpoint")
        if global_step >= args.max_train_steps and finished_at(output_dir) == global_step:
            accelerator.print(
                f"Nothing left to train: {resume_from} is at step {global_step} and --max_train_steps is {args.max_train_steps}; "
                f"the outputs in {output_dir} are complete and left as they are."
            )
            unet = text_encoder = None  # their DDP wrappers hold the process group; shut_down frees it in order
            shut_down(accelerator)
            return
        if global_step >= args.max_train_steps:  # interrupted after its last checkpoint, before the exports
            accelerator.print(f"{resume_from} is the run's last step; writing the exports it did not finish.")
    elif args.resume_from_checkpoint == "latest":
        accelerator.print(f"No complete checkpoint in {output_dir}: starting a new training run.")
    resume_batches = (global_step % num_update_steps_per_epoch) * args.gradient_accumulation_steps

    # From here on, files are written: under a lock on the folder, into names the manifest records first.
    metrics = None
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        error = RunLock(output_dir).acquire() or output_error(args, resume_from)  # checked again now that no one else can write
    else:
        error = None
    if any_process_failed(accelerator, error):
        exit_with_error(error or "another process of this run stopped before training")
    if accelerator.is_main_process:
        if args.overwrite_output_dir:
            clear_owned_outputs(output_dir)  # what the manifest lists only; anything else in the folder stays
        claim_outputs(output_dir, args.logging_dir)
        for leftover in output_dir.glob("checkpoint-*.tmp"):
            shutil.rmtree(leftover)  # a checkpoint a crash cut short; never complete, never resumed from
        # The flags this run was started with (config file and command line merged): `--config` reads it back.
        atomic_write_text(output_dir / "resolved_config.json", json.dumps(args.resolved_config, indent=2))
        tracker_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("reslora-text2image", config=tracker_config)
        metrics = MetricsFile(output_dir / "metrics.jsonl", global_step)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(train_dataset)}")
    logger.info(f"  Num Epochs = {args.num_train_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")

    validate = args.num_validation_images > 0 and bool(args.validation_prompt)
    pipeline = validation_pipeline(accelerator, args, unet, text_encoder, vae, tokenizer, noise_scheduler, sdxl)
    grids = []

    def calibration():  # the lstsq / calibrated merge: the unmerged model (in eval mode) on the validation prompts
        for model in (pipeline.unet, pipeline.text_encoder):
            model.eval()
        pipeline(list(args.validation_prompt), num_inference_steps=8, height=args.resolution, width=args.resolution,
                 generator=torch.Generator().manual_seed(args.seed), output_type="latent")

    # The validation loss of the training-time and the merged model on held-out images, with fixed noise, timesteps
    # and captions (reslora_diffusers/validation_loss.py); through the pipeline's unwrapped models, so no process
    # waits on another inside a forward pass.
    validation_set, validation_seconds = None, 0.0
    if held_out is not None:
        with torch.no_grad():
            validation_set = ValidationLoss(
                held_out, resolution=args.resolution, interpolation=args.image_interpolation_mode,
                encode=lambda pixels: vae.encode(pixels.to(accelerator.device, dtype=vae_dtype)).latent_dist.mean * vae.config.scaling_factor,
                noise_scheduler=noise_scheduler, seed=args.seed, timesteps_per_image=args.validation_loss_timesteps,
                batch_size=args.train_batch_size, snr_gamma=args.snr_gamma,
            )
        loss_every = args.validation_loss_steps or max(1, args.max_train_steps // 5)
        logger.info(f"  Validation loss = {validation_set.size} items ({len(held_out)} held-out images), every {loss_every} steps")

    def predict_held_out(noisy_latents, timesteps, captions):
        ids = tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                        return_tensors="pt").input_ids.to(accelerator.device)
        added = None
        with accelerator.autocast():
            if sdxl is None:
                hidden = pipeline.text_encoder(ids, return_dict=False)[0]
            else:
                hidden, pooled = encode_prompt(pipeline.text_encoder, pipeline.text_encoder_2, ids, sdxl.tokenize(captions).to(accelerator.device))
                sizes = [(args.resolution, args.resolution)] * len(captions)
                added = sdxl.added_conditions(pooled, sizes, [(0, 0)] * len(captions), sizes)
            return pipeline.unet(noisy_latents.to(weight_dtype), timesteps, hidden, added_cond_kwargs=added, return_dict=False)[0]

    def merged_factors() -> dict:
        """The export's merge, computed once (the main process's adapter, as exported) and shared with the others."""
        factors = merge_adapter(adapter, method=args.merge_method, calibration=calibration).factors if accelerator.is_main_process else None
        return broadcast_object_list([factors])[0] if accelerator.num_processes > 1 else factors

    def validation_losses(step: int) -> dict:
        nonlocal validation_seconds
        started = time.perf_counter()
        models = [pipeline.unet, pipeline.text_encoder] + ([pipeline.text_encoder_2] if sdxl is not None else [])
        with evaluation_weights(optimizer, adapter.trainable_parameters()):
            trained, merged = trained_and_merged_losses(
                validation_set, adapter, predict_held_out, merged_factors=merged_factors, models=models,
                device=accelerator.device, dtype=weight_dtype, process_index=accelerator.process_index,
                num_processes=accelerator.num_processes, reduce=lambda losses: accelerator.reduce(losses, "sum"),
            )
        validation_seconds += time.perf_counter() - started
        record = {"validation_loss": trained, "validation_loss_merged": merged}
        accelerator.log(record, step=step)
        return record

    run_started = time.time()
    if validation_set is not None and global_step == 0:
        record = {"step": 0, **validation_losses(0)}  # the base model's: the same for every method with this seed
        if metrics is not None:
            metrics.write(record)
    if validate and accelerator.is_main_process and global_step == 0:
        grids.append(log_validation(pipeline, accelerator, args, 0))  # the base model, for comparison
    accelerator.wait_for_everyone()

    progress_bar = tqdm(
        range(args.max_train_steps),
        initial=global_step,
        desc="Steps",
        # Only show the progress bar once on each machine.
        disable=not accelerator.is_local_main_process,
    )
    train_models = [unet, *text_encoders] if args.train_text_encoder else [unet]
    last_checkpoint = resume_from
    start_time, start_step = time.time(), global_step
    train_loss = 0.0
    try:
        for epoch in range(first_epoch, args.num_train_epochs):
            for model in train_models:
                model.train()
            dataloader = train_dataloader
            if epoch == first_epoch and resume_batches:
                dataloader = accelerator.skip_first_batches(train_dataloader, resume_batches)
            # accelerate re-sets the sampler's epoch from its own counter, which starts at 0 after a resume.
            dataloader.set_epoch(epoch)
            sampler.set_epoch(epoch)
            train_dataset.set_epoch(epoch)
            for batch in dataloader:
                if global_step >= args.max_train_steps:
                    break
                # Shortcut annealing: γ of the step being taken (a function of the step, so a resumed run agrees).
                adapter.set_shortcut_scale(shortcut_anneal_factor(global_step + 1, args.max_train_steps, args.shortcut_anneal_fraction))
                with accelerator.accumulate(*train_models):
                    # Convert images to latent space
                    with torch.no_grad():
                        latents = latent_distribution(vae, batch, accelerator.device, vae_dtype).sample()
                    latents = (latents * vae.config.scaling_factor).to(weight_dtype)

                    # Sample noise that we'll add to the latents
                    noise = torch.randn_like(latents)
                    if args.noise_offset:
                        # https://www.crosslabs.org//blog/diffusion-with-offset-noise
                        noise += args.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=latents.device)

                    # Sample a random timestep for each image
                    bsz = latents.shape[0]
                    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device).long()

                    # Add noise to the latents according to the noise magnitude at each timestep (the forward diffusion process)
                    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)

                    # Get the text embedding for conditioning
                    added_cond_kwargs = None
                    if "encoder_hidden_states" in batch:  # --cache_text_embeddings (SD 1.x / 2.x only)
                        encoder_hidden_states = batch["encoder_hidden_states"].to(accelerator.device)
                    else:
                        with torch.set_grad_enabled(args.train_text_encoder):
                            input_ids = batch["input_ids"].to(accelerator.device)
                            if sdxl is None:
                                encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
                            else:  # both encoders' penultimate states, the pooled embedding and size / crop ids
                                encoder_hidden_states, pooled = sdxl.encode(text_encoder, input_ids, batch["input_ids_2"].to(accelerator.device))
                                added_cond_kwargs = sdxl.added_conditions(
                                    pooled, batch["original_sizes"], batch["crop_top_lefts"], batch["target_sizes"]
                                )

                    # Predict the noise residual (or velocity, by the prediction type) and compute the loss
                    # (Min-SNR-weighted with --snr_gamma; the validation loss uses the same function).
                    target = loss_target(noise_scheduler, latents, noise, timesteps)
                    model_pred = unet(
                        noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs, return_dict=False
                    )[0]
                    loss = diffusion_loss(noise_scheduler, model_pred, target, timesteps, args.snr_gamma)

                    # Gather the losses across all processes for logging; every process sees the same value,
                    # so a non-finite loss stops all of them together, before the adapter is touched.
                    avg_loss = accelerator.gather(loss.detach().repeat(bsz)).mean()
                    if not torch.isfinite(avg_loss):
                        raise TrainingStopped(
                            f"the loss became {avg_loss.item()} at step {global_step + 1}; training stopped without saving "
                            "the broken state (try a lower --learning_rate, or --mixed_precision bf16 instead of fp16)"
                        )
                    train_loss += avg_loss.item() / args.gradient_accumulation_steps

                    # Backpropagate
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(adapter.trainable_parameters(), args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)

                # Checks if the accelerator has performed an optimization step behind the scenes
                if accelerator.sync_gradients:
                    global_step += 1
                    adapter.step(global_step)  # Delta-LoRA's step count follows global_step (also after a resume)
                    progress_bar.update(1)
                    seconds = time.time() - start_time
                    record = {
                        "step": global_step,
                        "epoch": epoch,
                        "loss": train_loss,
                        "lr": lr_scheduler.get_last_lr()[0],
                        "seconds": round(seconds, 3),
                        "images_per_second": round((global_step - start_step) * total_batch_size / max(seconds, 1e-9), 3),
                    }
                    accelerator.log({"train_loss": train_loss, "lr": record["lr"]}, step=global_step)
                    if validation_set is not None and (global_step % loss_every == 0 or global_step == args.max_train_steps):
                        record.update(validation_losses(global_step))
                    if metrics is not None:
                        metrics.write(record)
                    progress_bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{record['lr']:.2e}")
                    train_loss = 0.0

                    if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
                        # Every process holds the same adapter, so all of them stop here together.
                        require_finite_state(adapter, optimizer, global_step)
                        last_checkpoint = save_checkpoint(accelerator, args, global_step, epoch)
                        logger.info(f"saved checkpoint {last_checkpoint}")
                    if validate and args.validation_steps and global_step % args.validation_steps == 0:
                        if accelerator.is_main_process and global_step < args.max_train_steps:
                            with evaluation_weights(optimizer, adapter.trainable_parameters()):
                                grids.append(log_validation(pipeline, accelerator, args, global_step))
                        accelerator.wait_for_everyone()

            end_of_run = global_step >= args.max_train_steps
            if validate and not args.validation_steps and (epoch + 1) % args.validation_epochs == 0 and not end_of_run:
                if accelerator.is_main_process:
                    with evaluation_weights(optimizer, adapter.trainable_parameters()):
                        grids.append(log_validation(pipeline, accelerator, args, global_step))
                accelerator.wait_for_everyone()
            if end_of_run:
                break
        require_finite_state(adapter, optimizer, global_step)  # the final state, whether or not a checkpoint saved it
    except (TrainingStopped, DatasetError) as stop:
        kept = f"the last finite checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        progress_bar.close()
        if isinstance(stop, DatasetError) and accelerator.num_processes > 1:
            # Only this process read the bad example; the others wait in this step's all-reduce and would wait
            # forever in the barriers of an orderly shut-down. Exiting at once lets the launcher stop them.
            print(f"error: {stop}; {kept} (process {accelerator.process_index} of {accelerator.num_processes} stopped "
                  "the run)", file=sys.stderr, flush=True)
            os._exit(1)
        unet = text_encoder = train_models = None  # as at the end of a run: the DDP wrappers go before the process group
        shut_down(accelerator)
        exit_with_error(f"{stop}; {kept}", code=1)
    progress_bar.close()
    train_seconds = time.time() - start_time
    use_evaluation_weights(optimizer)  # schedule-free: its averaged weights are the ones to export

    # The replicas of a data-parallel run must agree; this is checked, not assumed.
    replica_difference = adapter_replica_difference(accelerator, adapter)
    if replica_difference != 0.0:
        logger.warning(f"adapter replicas differ across processes by up to {replica_difference:.3g}")

    # Save the adapter, the merged exports, the last validation grid and the model card.
    # γ after the last step taken (0 when annealing finished: the adapter is then a plain LoRA and merges exactly).
    adapter.set_shortcut_scale(shortcut_anneal_factor(global_step, args.max_train_steps, args.shortcut_anneal_fraction) if global_step else 1.0)
    if accelerator.is_main_process:
        final_loss, final_validation = None, {}
        if metrics is not None:
            metrics.close()
            records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
            final_loss = next((r["loss"] for r in reversed(records) if "loss" in r), None)
            final_validation = next((r for r in reversed(records) if "validation_loss" in r), {})
        save_adapter(adapter, output_dir, extra={"base_model": args.pretrained_model_name_or_path, "global_step": global_step})
        if validate:
            grids.append(log_validation(pipeline, accelerator, args, global_step))

        try:
            merge, diffusers_file, kohya_file = export_merged(adapter, args, calibration)
        except NonFiniteError as error:
            shut_down(accelerator)  # the other processes wait there
            exit_with_error(f"the merged exports were not written: {error}; the native adapter in {output_dir} is finite", code=1)
        adapter_dtypes = sorted({str(p.dtype) for p in adapter.trainable_parameters()})
        trained_steps = global_step - start_step
        summary = {
            "global_step": global_step,
            "steps_this_run": trained_steps,
            "resumed_from": str(resume_from) if resume_from else None,
            "train_seconds": round(train_seconds, 1),
            "images_per_second": round(trained_steps * total_batch_size / max(train_seconds, 1e-9), 2),
            "final_loss": final_loss,
            "num_processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,
            "base_dtype": str(weight_dtype),
            "adapter_dtypes": adapter_dtypes,
            "replica_max_difference": replica_difference,
            "merge": merge,
        }
        if final_validation:
            summary.update(
                validation_loss=final_validation["validation_loss"],
                validation_loss_merged=final_validation["validation_loss_merged"],
                validation_loss_step=final_validation["step"],
                validation_loss_seconds=round(validation_seconds, 1),
                validation_loss_share_of_training=round(validation_seconds / max(train_seconds + start_time - run_started, 1e-9), 4),
            )
        atomic_write_text(output_dir / "training_summary.json", json.dumps(summary, indent=2))
        dataset = args.dataset_name or args.train_data_dir
        card = model_card(
            output_dir=output_dir,
            base_model=args.pretrained_model_name_or_path,
            dataset=dataset,
            config=adapter.config,
            merge_method=args.merge_method,
            settings={
                "resolution": args.resolution,
                "batch size (total)": total_batch_size,
                "optimizer steps": global_step,
                "learning rate / schedule / warm-up": f"{args.learning_rate:g} / {args.lr_scheduler} / {args.lr_warmup_steps}",
                "prediction type": noise_scheduler.config.prediction_type,
                "snr_gamma": args.snr_gamma,
                "mixed precision": accelerator.mixed_precision,
                "processes": accelerator.num_processes,
                "seed": args.seed,
            },
            results={
                "final loss": f"{final_loss:.4f}" if final_loss is not None else "n/a",
                "training time": f"{train_seconds:.0f} s ({summary['images_per_second']} images/s)",
                "merge": merge,
                **({"validation loss (training-time / merged)": f"{final_validation['validation_loss']:.5f} / "
                    f"{final_validation['validation_loss_merged']:.5f} at step {final_validation['step']}"} if final_validation else {}),
            },
            kohya_file=kohya_file,
            validation_grids=grids,
            validation_prompts=list(args.validation_prompt),
            trained_text_encoder=args.train_text_encoder,
            resolved_config=args.resolved_config,
            sdxl=sdxl is not None,
            repo_id=(args.hub_model_id or output_dir.resolve().name) if args.push_to_hub else None,
        )
        atomic_write_text(output_dir / "README.md", card)
        if args.push_to_hub:
            push_to_hub(args, output_dir)

        # A final summary of where everything went.
        where = [
            ("native adapter", output_dir / WEIGHTS_NAME),
            ("diffusers LoRA", diffusers_file),
            ("kohya / A1111 / ComfyUI LoRA", kohya_file),
            ("model card", output_dir / "README.md"),
            ("validation grids", output_dir / "validation" if grids else "off"),
            ("metrics", output_dir / "metrics.jsonl"),
            ("tensorboard", f"tensorboard --logdir {output_dir / args.logging_dir}" if args.report_to != "none" else "off"),
            ("last checkpoint", last_checkpoint),
        ]
        loss_text = f"final loss {final_loss:.4f}" if final_loss is not None else "no step run"
        accelerator.print(
            f"\nTrained {adapter} for {trained_steps} steps in {train_seconds:.0f} s "
            f"({summary['images_per_second']} images/s, {loss_text}, merge: {merge})."
        )
        for label, value in where:
            accelerator.print(f"  {label:<30} {value}")
    del unet, text_encoder, train_models  # their DDP wrappers hold the process group; shut_down frees it in order
    shut_down(accelerator)


def push_to_hub(args, output_dir: Path) -> None:
    from huggingface_hub import create_repo, upload_folder

    try:
        repo_id = create_repo(args.hub_model_id or output_dir.resolve().name, exist_ok=True, token=args.hub_token).repo_id
        upload_folder(repo_id=repo_id, folder_path=output_dir, ignore_patterns=["checkpoint-*", "checkpoint-*/**"], token=args.hub_token)
    except Exception as error:  # the upload is the last step: the files are all on disk whatever happens here
        logger.warning(f"upload to the Hub failed: {error}")


if __name__ == "__main__":
    try:
        main()
    except OSError as error:  # a full disk, a folder made read-only mid-run: one line, not a traceback
        if error.errno not in WRITE_ERRORS:
            raise
        exit_with_error(f"cannot write {error.filename or 'an output'}: {error.strerror}; the files written before are "
                        "complete (atomic writes), and --resume_from_checkpoint latest continues from the last checkpoint", code=1)
