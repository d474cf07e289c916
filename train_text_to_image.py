#!/usr/bin/env python
"""Fine-tune Stable Diffusion (text to image) with ResLoRA, LoRA or Delta-LoRA adapters, using 🤗 accelerate.

A drop-in for diffusers' `examples/text_to_image/train_text_to_image_lora.py` (same flags, same data sets)
plus the adapter options. With no arguments it fine-tunes the embedded tiny emoji model on the Twemoji sample:

    accelerate launch train_text_to_image.py            # or: python train_text_to_image.py

    accelerate launch --mixed_precision fp16 train_text_to_image.py \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --train_data_dir my_images --resolution 512 --rank 32 --lora_alpha 64 --res_type is \\
        --train_batch_size 4 --learning_rate 1e-4 --max_train_steps 2000 --output_dir my-reslora

The defaults (batch 8, learning rate 1e-3, 200 steps, rank 8, resolution = the base VAE's sample size) are
tuned for the embedded tiny model, as diffusers' defaults were for its Pokémon example; pass your own for SD.

Data parallel (DDP) through accelerate; every process trains on its own share of each batch:
    one machine, 8 GPUs:   accelerate launch --multi_gpu --num_processes 8 train_text_to_image.py ...
    2 machines × 8 GPUs:   on each: accelerate launch --multi_gpu --num_machines 2 --num_processes 16 \\
                               --machine_rank <0|1> --main_process_ip <ip of rank 0> --main_process_port 29500 ...
                           (--output_dir must be on a file system both machines share, for checkpoints)
    CPU processes (gloo):  ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train_text_to_image.py
"""

import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

# Light imports only: a bad command line fails in seconds, before torch, diffusers, transformers and accelerate
# load (slow on a busy machine); `train` imports them once the flags are known to be good.
from reslora_diffusers.adapters.annealing import DEFAULT_ANNEAL_FRACTION, shortcut_anneal_factor
from reslora_diffusers.adapters.config import CONV_TARGETS, DEFAULT_CONV_TARGETS, MERGE_METHODS, RES_TYPES, ResLoRAConfig
from reslora_diffusers.atomic import atomic_write_text
from reslora_diffusers.cli import OneLineErrorParser, add_threads_argument, exit_with_error, set_threads
from reslora_diffusers.data.dataset import INTERPOLATION_MODES
from reslora_diffusers.data.options import add_data_arguments, add_mask_and_regularisation_arguments, check_data_arguments
from reslora_diffusers.pipeline_io import PIPELINE_FACTOR
from reslora_diffusers.training.checkpoints import CHECKPOINT_MARKER, find_resume_checkpoint, finished_at, save_checkpoint
from reslora_diffusers.training.config_file import parse_with_config
from reslora_diffusers.training.optimizers import OPTIMIZERS, optimizer_name, resolve_optimizer_defaults
from reslora_diffusers.training.preflight import output_error, preflight
from reslora_diffusers.training.run_folder import RunLock, claim_outputs, clear_owned_outputs, release_run_locks
from reslora_diffusers.training.run_safety import WRITE_ERRORS, optimizer_settings, resume_error, run_settings

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = ROOT / "assets" / "tiny-emoji-sd"
DEFAULT_DATA = ROOT / "assets" / "twemoji-sample"
DEFAULT_PROMPTS = ["fish", "french fries", "red apple", "grinning face"]
ADAMW_LEARNING_RATE = 1e-3  # LoRA on the embedded tiny base (5e-3 lost the objects); SD-1.5 LoRAs usually train at 1e-4
FLOAT32_MAX = 3.4028234663852886e38  # the optimizer applies the learning rate as a float32
MAX_SEED = 2**31 - 1  # numpy seeds must stay below 2**32 after accelerate adds each process's index

logger = logging.getLogger(__name__)


def parse_args(argv=None):
    parser = OneLineErrorParser(description="Fine-tune Stable Diffusion with ResLoRA / LoRA / Delta-LoRA adapters.")
    for add_arguments in (add_base_arguments, add_data_source_arguments, add_validation_arguments, add_output_arguments,
                          add_optimization_arguments, add_checkpoint_arguments, add_adapter_arguments, add_data_arguments,
                          add_mask_and_regularisation_arguments):
        add_arguments(parser)
    args = parse_with_config(parser, argv)  # --config FILE, overridden by the command line
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1:
        args.local_rank = env_local_rank
    check_arguments(args, parser.error)
    return args


def add_base_arguments(parser) -> None:
    """The base model."""
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



def add_data_source_arguments(parser) -> None:
    """Where the images and captions come from, and how they are prepared."""
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



def add_validation_arguments(parser) -> None:
    """Validation grids, and the validation loss of held-out images."""
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
    # Validation loss (reslora_diffusers/training/validation_loss.py): held-out images, fixed noise, timesteps and captions
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



def add_output_arguments(parser) -> None:
    """Where the run writes, and where it reports."""
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



def add_optimization_arguments(parser) -> None:
    """Batch, steps, optimizer, schedule, precision."""
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
                        help="Learning rate after the warm-up (default 1e-3; 1.0 with --optimizer prodigy).")
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
        "LoRA step gain little from more, and on a busy machine extra threads wait on each other; see BENCHMARKS.md); "
        "the GPU's default otherwise.",
    )



def add_checkpoint_arguments(parser) -> None:
    """Resumable checkpoints."""
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



def add_adapter_arguments(parser) -> None:
    """The adapter: LoRA, ResLoRA shortcut, Delta-LoRA, and how it is merged for export."""
    parser.add_argument("--res_type", type=str, default="is", choices=RES_TYPES, help="'none' = plain LoRA; 'is' / 'bs' / 'ms' ResLoRA shortcut.")
    parser.add_argument("--pre_num", type=int, default=-1, help="How many previous blocks a shortcut reaches (-1: all).")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of every adapter block.")
    parser.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha; the branch is scaled by alpha / rank. Default: the rank.")
    parser.add_argument(
        "--conv_rank", type=int, default=0,
        help="Rank of LoCon adapters on the UNet's ResNet 3x3 convolutions (kohya's conv_dim); 0 = attention only.",
    )  # fmt: skip
    parser.add_argument("--conv_alpha", type=float, default=None, help="Alpha of the conv adapters (scale conv_alpha / conv_rank). Default: --conv_rank.")
    parser.add_argument(
        "--conv_targets", type=str, nargs="+", default=list(DEFAULT_CONV_TARGETS), choices=CONV_TARGETS,
        help="Which Conv2d layers get a conv adapter: the ResNet blocks' conv1 / conv2 (3x3, default), conv_shortcut (1x1), "
        "and conv (the down- / upsamplers).",
    )  # fmt: skip
    parser.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on the LoRA branch input (must be 0 with --delta_lora_ratio > 0).")
    parser.add_argument("--train_text_encoder", action="store_true", help="Also train adapters on the CLIP text encoder's attention.")
    parser.add_argument(
        "--delta_lora_ratio", type=float, default=0.0, help="Delta-LoRA lambda (0: off); needs --res_type none."
    )
    parser.add_argument("--delta_lora_start", type=int, default=500, help="Delta-LoRA K: the step after which the frozen weights move.")
    # Merge-aware training (README "Which merge for is / ms"): the merged model is what users deploy.
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



def check_arguments(args, error) -> None:
    """Every check of the flags on their own (`error` exits with one line); fills in the defaults that depend on others."""
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
            error(f"--{name} must be > 0, got {value}")
    if args.rank <= 0:
        error(f"--rank must be > 0, got {args.rank}")
    if args.conv_rank < 0:
        error(f"--conv_rank must be >= 0 (0: no conv adapters), got {args.conv_rank}")
    resolve_optimizer_defaults(args, error, default_learning_rate=ADAMW_LEARNING_RATE)
    if not 0 < args.learning_rate <= FLOAT32_MAX:
        error(f"--learning_rate must be > 0 and fit a float32 (<= 3.4e38), got {args.learning_rate}")
    if not 0 <= args.seed <= MAX_SEED:
        error(f"--seed must be a whole number in 0..{MAX_SEED} (a fixed seed is what makes a run repeatable and "
                     f"resumable; -1 does not mean 'random' here), got {args.seed}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            error(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    for name in ("adam_weight_decay", "adam_epsilon", "noise_offset"):
        if not 0 <= getattr(args, name) < math.inf:
            error(f"--{name} must be >= 0 and finite, got {getattr(args, name)}")
    if not 0 < args.max_grad_norm < math.inf:
        error(f"--max_grad_norm must be > 0 and finite (0 would clip every gradient to nothing), got {args.max_grad_norm}")
    if args.resolution is not None and args.resolution % PIPELINE_FACTOR:
        error(f"--resolution must be a multiple of {PIPELINE_FACTOR} (diffusers' pipelines need it to draw "
                     f"validation images and calibrate the merge), got {args.resolution}")
    if args.pre_num == 0 and args.res_type != "none":
        error(f"--pre_num 0 links no earlier block, so --res_type {args.res_type} would train plain LoRA; "
                     "pass --pre_num -1 (all) or >= 1, or --res_type none")
    for name in ("num_validation_images", "lr_warmup_steps", "dataloader_num_workers"):
        if getattr(args, name) < 0:
            error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.snr_gamma is not None and args.snr_gamma <= 0:
        error(f"--snr_gamma must be > 0, got {args.snr_gamma}")
    check_data_arguments(args, error)
    if args.validation_split is not None and args.validation_data_dir is not None:
        error("--validation_split holds out training images, --validation_data_dir brings its own: pass one of them")
    if args.validation_split is not None and not 0 < args.validation_split < 1:
        error(f"--validation_split must be a fraction between 0 and 1, got {args.validation_split}")
    if args.validation_loss_steps is not None and args.validation_split is None and args.validation_data_dir is None:
        error("--validation_loss_steps needs held-out images: pass --validation_split or --validation_data_dir")
    for name in ("validation_loss_steps", "validation_loss_timesteps"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            error(f"--{name} must be > 0, got {getattr(args, name)}")
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        error("--overwrite_output_dir starts a new run, --resume_from_checkpoint continues one: pass one of them")
    if args.lora_alpha is None:
        args.lora_alpha = float(args.rank)
    args.optimizer_settings = optimizer_settings(args)  # before main() scales the learning rate or counts the steps
    if not 0 <= args.shortcut_anneal_fraction <= 1:
        error(f"--shortcut_anneal_fraction must be in [0, 1], got {args.shortcut_anneal_fraction}")
    if args.lora_plus_ratio <= 0:
        error(f"--lora_plus_ratio must be > 0, got {args.lora_plus_ratio}")
    try:
        args.adapter_config = ResLoRAConfig(
            res_type=args.res_type,
            pre_num=args.pre_num,
            rank=args.rank,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            conv_rank=args.conv_rank,
            conv_alpha=args.conv_alpha,
            conv_targets=tuple(args.conv_targets),
            delta_lora_ratio=args.delta_lora_ratio,
            delta_lora_start=args.delta_lora_start,
            cross_attention_shortcuts=not args.no_cross_attention_shortcuts,
        )
    except ValueError as config_error:
        message = str(config_error).replace("res_type='none'", "--res_type none").replace("lora_dropout=0", "--lora_dropout 0")
        message = message.replace("conv_alpha is", "--conv_alpha is").replace("set conv_rank", "set --conv_rank")
        message = message.replace("conv_alpha must be", "--conv_alpha must be")
        error(message)


def main(argv=None):
    """Checks the command line, trains, then releases the output folder's lock however the run ended (an in-process
    caller, such as the tests, may start another run)."""
    try:
        args = parse_args(argv)
        # Everything that can be checked without loading models is checked before anything is written.
        preflight(args)
        train(args)
    finally:
        release_run_locks()


def train(args):
    # -- The heavy imports, now that the command line is good ------------------------------------------------------
    import diffusers
    import torch
    import transformers
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler

    from reslora_diffusers.data.dataset import DatasetError
    from reslora_diffusers.data.loader import examples_from_flags, regularisation_examples, training_data
    from reslora_diffusers.training.base_model import set_up_models
    from reslora_diffusers.training.checkpoints import register_adapter_hooks, restore_checkpoint
    from reslora_diffusers.training.distributed import any_process_failed, shut_down
    from reslora_diffusers.training.lora_plus import lora_plus_param_groups
    from reslora_diffusers.training.metrics_file import MetricsFile
    from reslora_diffusers.training.optimizers import build_optimizer
    from reslora_diffusers.training.validation import RunValidation, validation_pipeline

    try:  # bad data (empty, unreadable, missing columns) fails here, before any model loads
        examples, held_out = examples_from_flags(args)
        regularisation = regularisation_examples(args)
    except DatasetError as error:
        exit_with_error(str(error))
    output_dir = Path(args.output_dir)
    resume_from = find_resume_checkpoint(args) if args.resume_from_checkpoint else None

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
    )
    # Make one log on every process with the configuration for debugging.
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    logger = get_logger(__name__, log_level="INFO")
    logger.info(accelerator.state, main_process_only=False)
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint messages would break the progress bar
    if args.enable_xformers_memory_efficient_attention:
        logger.warning("ResLoRA's attention processors use PyTorch scaled_dot_product_attention; xformers is not needed")
    # On CPU, one thread per process unless --threads or OMP_NUM_THREADS says otherwise (see --threads).
    if args.threads is not None or (accelerator.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ):
        set_threads(args.threads or 1)
        logger.info(f"CPU training with {args.threads or 1} thread(s) per process (--threads)")
    # Each process gets its own seed, so processes draw different noise for their different images.
    set_seed(args.seed, device_specific=True)

    # Load the base, freeze it, and add the adapter blocks (reslora_diffusers/training/base_model.py).
    models = set_up_models(args, accelerator, logger)
    adapter, unet, text_encoder, sdxl = models.adapter, models.unet, models.text_encoder, models.sdxl
    if resume_from is not None and (error := resume_error(resume_from, CHECKPOINT_MARKER, run_settings(args))):
        exit_with_error(error)  # again, now that the default resolution is known
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes

    # The optimizer (training/optimizers.py); LoRA+ gives B its own learning rate in a second group.
    optimizer = build_optimizer(
        args.optimizer,
        lora_plus_param_groups(adapter, args.learning_rate, args.lora_plus_ratio),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        warmup_steps=args.lr_warmup_steps,
    )

    # The data (caption files, buckets, caches: data/loader.py); its order is fixed by (seed, epoch), so a resumed
    # run sees the same batches.
    try:
        data = training_data(args, examples, tokenizer=models.tokenizer, vae=models.vae, text_encoder=text_encoder,
                             unet=unet, accelerator=accelerator, vae_dtype=models.vae_dtype, sdxl=sdxl, regularisation=regularisation)
    except DatasetError as error:
        exit_with_error(str(error))

    # Scheduler and math around the number of training steps.
    batches_per_process = math.ceil(len(data.dataloader) / accelerator.num_processes)
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
    trained_models = [unet, *models.text_encoders] if args.train_text_encoder else [unet]
    *trained_models, optimizer, dataloader, lr_scheduler = accelerator.prepare(*trained_models, optimizer, data.dataloader, lr_scheduler)
    if args.train_text_encoder:  # the loop runs the wrapped models
        text_encoder = models.text_encoder = trained_models[1]
        if sdxl is not None:
            sdxl.text_encoder_2 = trained_models[2]
    unet = models.unet = trained_models[0]
    num_update_steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    # Checkpoints hold the adapter as safetensors, never the frozen base (training/checkpoints.py).
    register_adapter_hooks(accelerator, adapter, args.pretrained_model_name_or_path)
    global_step = 0
    if resume_from is not None:
        global_step = restore_checkpoint(accelerator, adapter, resume_from)
        if global_step >= args.max_train_steps and finished_at(output_dir) == global_step:
            accelerator.print(
                f"Nothing left to train: {resume_from} is at step {global_step} and --max_train_steps is {args.max_train_steps}; "
                f"the outputs in {output_dir} are complete and left as they are."
            )
            models = unet = text_encoder = trained_models = None  # their DDP wrappers hold the process group
            shut_down(accelerator)
            return
        if global_step >= args.max_train_steps:  # interrupted after its last checkpoint, before the exports
            accelerator.print(f"{resume_from} is the run's last step; writing the exports it did not finish.")
    elif args.resume_from_checkpoint == "latest":
        accelerator.print(f"No complete checkpoint in {output_dir}: starting a new training run.")

    # From here on, files are written: under a lock on the folder, into names the manifest records first.
    error = None
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        error = RunLock(output_dir).acquire() or output_error(args, resume_from)  # checked again now that no one else can write
    if any_process_failed(accelerator, error):
        exit_with_error(error or "another process of this run stopped before training")
    metrics = open_run_folder(accelerator, args, global_step, MetricsFile) if accelerator.is_main_process else None

    # The validation grids, the held-out loss and the merge's calibration (training/validation.py).
    pipeline = validation_pipeline(accelerator, unet, text_encoder, models.vae, models.tokenizer, models.noise_scheduler, sdxl)
    validation = RunValidation(args, accelerator, adapter, optimizer, pipeline, sdxl, noise_scheduler=models.noise_scheduler,
                               held_out=held_out, vae_dtype=models.vae_dtype, weight_dtype=models.weight_dtype)
    log_plan(logger, args, accelerator, data.dataset, held_out, validation)
    run_started = time.time()
    if validation.held_out is not None and global_step == 0:
        record = {"step": 0, **validation.losses(0)}  # the base model's: the same for every method with this seed
        if metrics is not None:
            metrics.write(record)
    if validation.draws_grids and global_step == 0:
        validation.grid(0)  # the base model, for comparison
    accelerator.wait_for_everyone()

    # Train (`train_steps`, below), then write everything a finished run leaves (training/end_of_run.py).
    run = SimpleNamespace(args=args, accelerator=accelerator, models=models, trained_models=trained_models, optimizer=optimizer,
                          lr_scheduler=lr_scheduler, validation=validation, metrics=metrics, logger=logger)
    facts = train_steps(run, dataloader, data, global_step, resume_from, num_update_steps_per_epoch)
    facts.total_seconds = time.time() - run_started
    models.unet = models.text_encoder = unet = text_encoder = trained_models = run.trained_models = None  # see shut_down
    finish_run(run, facts)


def open_run_folder(accelerator, args, global_step: int, metrics_file):
    """The main process claims --output_dir (under its lock): the manifest, the resolved config, the trackers, the
    metrics file (returned). Only what the manifest lists is ever cleared; anything else in the folder stays."""
    output_dir = Path(args.output_dir)
    if args.overwrite_output_dir:
        clear_owned_outputs(output_dir)
    claim_outputs(output_dir, args.logging_dir)
    for leftover in output_dir.glob("checkpoint-*.tmp"):
        shutil.rmtree(leftover)  # a checkpoint a crash cut short; never complete, never resumed from
    # The flags this run was started with (config file and command line merged): `--config` reads it back.
    atomic_write_text(output_dir / "resolved_config.json", json.dumps(args.resolved_config, indent=2))
    tracker_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
    accelerator.init_trackers("reslora-text2image", config=tracker_config)
    return metrics_file(output_dir / "metrics.jsonl", global_step)


def log_plan(logger, args, accelerator, dataset, held_out, validation) -> None:
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(dataset)}")
    logger.info(f"  Num Epochs = {args.num_train_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size(args, accelerator)}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")
    if validation.held_out is not None:
        logger.info(f"  Validation loss = {validation.held_out.size} items ({len(held_out)} held-out images), every {validation.loss_every} steps")


def total_batch_size(args, accelerator) -> int:
    return args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps


def train_steps(run, dataloader, data, global_step: int, resume_from, num_update_steps_per_epoch: int):
    """The training loop, from `global_step` to --max_train_steps; returns the RunFacts of what it did."""
    import torch
    from tqdm.auto import tqdm

    from reslora_diffusers.data.dataset import DatasetError
    from reslora_diffusers.training.distributed import shut_down
    from reslora_diffusers.training.end_of_run import RunFacts
    from reslora_diffusers.training.run_safety import TrainingStopped, require_finite_state
    from reslora_diffusers.training.step_loss import batch_loss

    args, accelerator, models, optimizer, lr_scheduler = run.args, run.accelerator, run.models, run.optimizer, run.lr_scheduler
    adapter, noise_scheduler = models.adapter, models.noise_scheduler
    validation, metrics, batch_total = run.validation, run.metrics, total_batch_size(args, accelerator)
    progress_bar = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)  # only once on each machine
    first_epoch = global_step // num_update_steps_per_epoch
    resume_batches = (global_step % num_update_steps_per_epoch) * args.gradient_accumulation_steps
    last_checkpoint, start_time, start_step, train_loss = resume_from, time.time(), global_step, 0.0
    part_losses = {"instance": 0.0, "prior": 0.0}
    # Batches seen since the run began (a resume starts at a step boundary): numbers the regularisation batches.
    batch_number = first_epoch * len(dataloader) + resume_batches
    try:
        for epoch in range(first_epoch, args.num_train_epochs):
            for model in run.trained_models:
                model.train()
            epoch_batches = dataloader
            if epoch == first_epoch and resume_batches:
                epoch_batches = accelerator.skip_first_batches(dataloader, resume_batches)
            # accelerate re-sets the sampler's epoch from its own counter, which starts at 0 after a resume.
            epoch_batches.set_epoch(epoch)
            data.sampler.set_epoch(epoch)
            data.dataset.set_epoch(epoch)
            for batch in epoch_batches:
                if global_step >= args.max_train_steps:
                    break
                # Shortcut annealing: γ of the step being taken (a function of the step, so a resumed run agrees).
                adapter.set_shortcut_scale(shortcut_anneal_factor(global_step + 1, args.max_train_steps, args.shortcut_anneal_fraction))
                with accelerator.accumulate(*run.trained_models):
                    # The batch's loss (regularisation images, when given, joined in the same UNet call)
                    regularisation = None
                    if data.regularisation is not None:
                        regularisation = data.regularisation.for_batch(batch_number, batch, accelerator.device)
                    batch_number += 1
                    losses = batch_loss(args, models, batch, accelerator.device, regularisation)
                    loss, bsz = losses.loss, len(batch["input_ids"])

                    # Gather the losses across all processes for logging; every process sees the same value,
                    # so a non-finite loss stops all of them together, before the adapter is touched.
                    avg_loss = accelerator.gather(loss.detach().repeat(bsz)).mean()
                    if not torch.isfinite(avg_loss):
                        raise TrainingStopped(
                            f"the loss became {avg_loss.item()} at step {global_step + 1}; training stopped without saving "
                            "the broken state (try a lower --learning_rate, or --mixed_precision bf16 instead of fp16)"
                        )
                    train_loss += avg_loss.item() / args.gradient_accumulation_steps
                    if losses.prior is not None:
                        for name, part in (("instance", losses.instance), ("prior", losses.prior)):
                            part_losses[name] += accelerator.gather(part.detach().repeat(bsz)).mean().item() / args.gradient_accumulation_steps

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
                        "images_per_second": round((global_step - start_step) * batch_total / max(seconds, 1e-9), 3),
                    }
                    if data.regularisation is not None:  # the two parts of the loss (before --prior_loss_weight)
                        record.update({f"loss_{name}": value for name, value in part_losses.items()})
                        part_losses = dict.fromkeys(part_losses, 0.0)
                    accelerator.log({"train_loss": train_loss, "lr": record["lr"],
                                     **{f"train_{k}": v for k, v in record.items() if k.startswith("loss_")}}, step=global_step)
                    if validation.loss_due(global_step):
                        record.update(validation.losses(global_step))
                    if metrics is not None:
                        metrics.write(record)
                    progress_bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{record['lr']:.2e}")
                    train_loss = 0.0

                    if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
                        # Every process holds the same adapter, so all of them stop here together.
                        require_finite_state(adapter, optimizer, global_step)
                        last_checkpoint = save_checkpoint(accelerator, args, global_step, epoch)
                        run.logger.info(f"saved checkpoint {last_checkpoint}")
                    if validation.draws_grids and args.validation_steps and global_step % args.validation_steps == 0 \
                            and global_step < args.max_train_steps:
                        validation.grid(global_step)

            end_of_run = global_step >= args.max_train_steps
            if validation.draws_grids and not args.validation_steps and (epoch + 1) % args.validation_epochs == 0 and not end_of_run:
                validation.grid(global_step)
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
        models.unet = models.text_encoder = run.trained_models = None  # as at the end of a run
        shut_down(accelerator)
        exit_with_error(f"{stop}; {kept}", code=1)
    progress_bar.close()
    return RunFacts(
        global_step=global_step, start_step=start_step, resumed_from=resume_from, last_checkpoint=last_checkpoint,
        train_seconds=time.time() - start_time, total_seconds=0.0, total_batch_size=batch_total,
        base_dtype=str(models.weight_dtype), prediction_type=noise_scheduler.config.prediction_type,
        replica_difference=0.0, sdxl=models.sdxl is not None,
    )


def finish_run(run, facts) -> None:
    """Exports and the summary on the main process (training/end_of_run.py), then every process shuts down in order."""
    from reslora_diffusers.training.distributed import adapter_replica_difference, shut_down
    from reslora_diffusers.training.end_of_run import write_outputs
    from reslora_diffusers.training.optimizers import use_evaluation_weights
    from reslora_diffusers.training.run_safety import NonFiniteError

    args, accelerator, adapter = run.args, run.accelerator, run.models.adapter
    use_evaluation_weights(run.optimizer)  # schedule-free: its averaged weights are the ones to export
    # The replicas of a data-parallel run must agree; this is checked, not assumed.
    facts.replica_difference = adapter_replica_difference(accelerator, adapter)
    if facts.replica_difference != 0.0:
        run.logger.warning(f"adapter replicas differ across processes by up to {facts.replica_difference:.3g}")
    # γ after the last step taken (0 when annealing finished: the adapter is then a plain LoRA and merges exactly).
    step = facts.global_step
    adapter.set_shortcut_scale(shortcut_anneal_factor(step, args.max_train_steps, args.shortcut_anneal_fraction) if step else 1.0)
    if accelerator.is_main_process:
        records = run.metrics.close() if run.metrics is not None else []
        try:
            write_outputs(accelerator, args, adapter, run.validation, records, facts)
        except NonFiniteError as error:
            shut_down(accelerator)  # the other processes wait there
            exit_with_error(f"the merged exports were not written: {error}; the native adapter in {args.output_dir} is finite", code=1)
    shut_down(accelerator)


if __name__ == "__main__":
    try:
        main()
    except OSError as error:  # a full disk, a folder made read-only mid-run: one line, not a traceback
        if error.errno not in WRITE_ERRORS:
            raise
        exit_with_error(f"cannot write {error.filename or 'an output'}: {error.strerror}; the files written before are "
                        "complete (atomic writes), and --resume_from_checkpoint latest continues from the last checkpoint", code=1)
