"""The optimizers LoRA users pick (`--optimizer`), built from the maintained packages, with the learning rate each expects.

| name                 | package (extra)             | learning rate                                    |
|----------------------|-----------------------------|--------------------------------------------------|
| `adamw`              | torch                       | 1e-3 here (LoRA on the tiny base; SD-1.5: 1e-4)  |
| `adamw8bit`          | bitsandbytes                | as AdamW                                         |
| `adafactor`          | transformers                | as AdamW (fixed step: no relative step, no scaling) |
| `prodigy`            | prodigyopt                  | 1.0: Prodigy estimates the step size (no LoRA+)  |
| `schedulefree_adamw` | schedulefree                | as AdamW or a few times higher; constant schedule, warm-up inside |

Names follow kohya sd-scripts' `--optimizer_type` (its spellings `AdamW8bit`, `Prodigy`, `AdamWScheduleFree` are
accepted too). Schedule-free AdamW trains at one point (y) and is evaluated at another (x, the average):
`evaluation_weights` switches to x for validation and restores the training point bit for bit afterwards, so
validating never changes the run; the exports take x.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads only after the command line is checked
    import torch

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy", "schedulefree_adamw")
KOHYA_NAMES = {"adamw8bit": "adamw8bit", "adamwschedulefree": "schedulefree_adamw", "schedulefree": "schedulefree_adamw"}
DEFAULT_LEARNING_RATE = {"prodigy": 1.0}  # every other optimizer: the script's AdamW default
PACKAGES = {"adamw8bit": ("bitsandbytes", "bitsandbytes"), "prodigy": ("prodigyopt", "prodigyopt"),
            "schedulefree_adamw": ("schedulefree", "schedulefree")}
WITHOUT_SCHEDULE = ("schedulefree_adamw",)  # the learning rate is constant; the warm-up happens inside the optimizer


def resolve_optimizer_defaults(args, error, default_learning_rate: float) -> None:
    """Settles --optimizer, --learning_rate and --lr_scheduler from each other (in `args` and in the run's recorded
    flags); calls `error(message)` for combinations that cannot work."""
    if args.use_8bit_adam:
        if args.optimizer not in ("adamw", "adamw8bit"):
            error(f"--use_8bit_adam means --optimizer adamw8bit, but --optimizer {args.optimizer} was given: pass one of them")
        args.optimizer = "adamw8bit"
    if args.optimizer == "prodigy" and getattr(args, "lora_plus_ratio", 1.0) != 1.0:
        error("--optimizer prodigy estimates one step size for all parameters and refuses per-group learning rates, "
              "so LoRA+ (--lora_plus_ratio) cannot be applied: leave out one of them")
    if args.learning_rate is None:
        args.learning_rate = DEFAULT_LEARNING_RATE.get(args.optimizer, default_learning_rate)
    if args.optimizer in WITHOUT_SCHEDULE:
        if args.lr_scheduler not in (None, "constant"):
            error(f"--optimizer {args.optimizer} needs no learning-rate schedule (its warm-up is --lr_warmup_steps, "
                  f"applied inside the optimizer): leave out --lr_scheduler {args.lr_scheduler} or pass constant")
        args.lr_scheduler = "constant"
    elif args.lr_scheduler is None:
        args.lr_scheduler = "cosine"
    recorded = getattr(args, "resolved_config", None)
    if isinstance(recorded, dict):
        recorded.update(optimizer=args.optimizer, learning_rate=args.learning_rate, lr_scheduler=args.lr_scheduler,
                        use_8bit_adam=False)


class OptimizerUnavailable(RuntimeError):
    """An optional package an optimizer needs is not installed (the message is one line with the pip command)."""


def optimizer_name(value: str) -> str:
    """`--optimizer`'s value in this project's spelling (kohya's accepted, case-insensitive)."""
    key = value.strip().lower()
    key = KOHYA_NAMES.get(key, key)
    if key not in OPTIMIZERS:
        # ArgumentTypeError: argparse shows this message (a ValueError's would be replaced by a generic one).
        raise argparse.ArgumentTypeError(f"unknown optimizer {value!r}; choose one of {', '.join(OPTIMIZERS)}")
    return key


def check_installed(name: str) -> None:
    """Raises `OptimizerUnavailable` naming the package when `name` needs one that is missing."""
    if name not in PACKAGES:
        return
    module, package = PACKAGES[name]
    try:
        __import__(module)
    except ImportError:
        raise OptimizerUnavailable(f"--optimizer {name} needs the {package} package (pip install {package})") from None


def build_optimizer(name: str, param_groups: list[dict], *, lr: float, betas: tuple[float, float], weight_decay: float,
                    eps: float, warmup_steps: int = 0) -> torch.optim.Optimizer:
    """The optimizer over `param_groups` (LoRA+ groups keep their own learning rates)."""
    check_installed(name)
    if name == "adamw":
        import torch

        return torch.optim.AdamW(param_groups, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(param_groups, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # kohya's LoRA recipe: a fixed learning rate driven by the scheduler (no relative step, no parameter scaling).
        return Adafactor(param_groups, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    if name == "prodigy":
        from prodigyopt import Prodigy

        # safeguard_warmup: the Prodigy authors' advice when a warm-up runs, so that D is not over-estimated early.
        return Prodigy(param_groups, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, safeguard_warmup=warmup_steps > 0)
    from schedulefree import AdamWScheduleFree

    optimizer = AdamWScheduleFree(param_groups, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, warmup_steps=warmup_steps)
    optimizer.train()
    return optimizer


def has_evaluation_point(optimizer) -> bool:
    """True for optimizers whose weights for evaluation differ from the ones they train (schedule-free)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    return all(hasattr(inner, method) for method in ("eval", "train")) and any("train_mode" in g for g in inner.param_groups)


@contextlib.contextmanager
def evaluation_weights(optimizer, parameters: list[torch.nn.Parameter]) -> Iterator[None]:
    """The weights to evaluate inside the block; afterwards the training weights exactly as they were.

    For schedule-free the switch is a lerp each way, which does not round-trip bit for bit: the training
    point is copied before and written back after, so a run with validation equals one without.
    """
    if not has_evaluation_point(optimizer):
        yield
        return
    import torch

    saved = [p.detach().clone() for p in parameters]
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
        with torch.no_grad():
            for parameter, value in zip(parameters, saved):
                parameter.copy_(value)


def use_evaluation_weights(optimizer) -> None:
    """Leaves the evaluation point in the weights (for the final exports; no training step follows)."""
    if has_evaluation_point(optimizer):
        optimizer.eval()
