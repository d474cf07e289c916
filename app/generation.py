"""What the app draws: for each prompt and seed, the base model and every adapter setting from the same noise.

One pipeline is kept in memory. Each adapter is put on for its images and taken off again before the next one,
under a lock, so the base image is always the base model's: native adapters with `load_adapter` /
`adapter.remove()`, users' LoRA files with diffusers' `load_lora_weights` / `unload_lora_weights`.
A running job stops within a fraction of a denoising step once `cancel()` is called (block pre-hooks).
"""

from __future__ import annotations

import contextlib
import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from adapters import AdapterSource, adapter_at, users_lora
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from PIL import Image

from reslora_diffusers import load_adapter
from reslora_diffusers.formats import LoRAFactors
from reslora_diffusers.merge import MERGE_METHODS, baked_weights, merge_adapter
from reslora_diffusers.pipeline_io import UserInputError

MODEL_DEFAULT = "model default"
# Overrides keep Stable Diffusion's conventions when a scheduler is built from another one's config.
SCHEDULERS: dict[str, tuple[type, dict]] = {
    "DPM-Solver++ 2M": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "Euler": (EulerDiscreteScheduler, {}),
    "Euler ancestral": (EulerAncestralDiscreteScheduler, {}),
    "DDIM": (DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": False}),
    "UniPC": (UniPCMultistepScheduler, {}),
    "PNDM": (PNDMScheduler, {"skip_prk_steps": True}),
}
MAX_SEED = 2**32 - 1
MAX_STRENGTH = 4.0


class Cancelled(Exception):
    """The user pressed Cancel: the job stopped at a denoising step, and the model is as before."""


@dataclass(frozen=True)
class Limits:
    """What a request may ask for: beyond these, a request is refused with a message instead of tying up the app."""

    max_steps: int = 150
    max_size: int = 512
    max_guidance: float = 30.0
    max_prompt_chars: int = 1000
    max_cells: int = 64  # images in one grid


@dataclass(frozen=True)
class Sampling:
    """How one image is sampled: the same for the base and for every adapter setting."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0  # -1: draw one
    steps: int = 20
    guidance: float = 3.0
    size: int = 64
    scheduler: str = MODEL_DEFAULT


@dataclass(frozen=True)
class Setting:
    """One adapter setting: which adapter ("" = the base model alone), its strength, merged or not."""

    adapter: str = ""
    strength: float = 1.0
    merged: bool = False
    merge_method: str = "input"


@dataclass
class Cell:
    """One image and what it took."""

    image: Image.Image
    seconds: float  # the pipeline call: text encoder, denoising loop and VAE decoder
    source: AdapterSource | None = None
    setting: Setting = Setting()
    weights: str = ""  # "unmerged", "merged (<method>)", "diffusers LoRA layers"
    setup_seconds: float = 0.0  # loading (and merging) the adapter
    mean_difference: float | None = None  # mean |pixel − base pixel| in 0..255


def _integer(value, name: str) -> int:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserInputError(f"{name} must be a whole number, got {value!r}")
    if float(value) != int(value):
        raise UserInputError(f"{name} must be a whole number, got {value}")
    return int(value)


@contextlib.contextmanager
def native_strength(adapter, strength: float) -> Iterator[None]:
    """A native adapter's unmerged branches at `strength` (1: as trained, 0: the base model alone)."""
    saved = {name: block.scale for name, block in adapter.blocks.items()}
    adapter.set_scale(strength)
    try:
        yield
    finally:
        for name, block in adapter.blocks.items():
            block.scale = saved[name]


def scaled_factors(factors: dict[str, LoRAFactors], strength: float) -> dict[str, LoRAFactors]:
    """Merged factors at `strength`: ΔW = strength · (alpha / rank) · up @ down (merges are always at strength 1;
    the factors hold the whole change from the base weights, Delta-LoRA's move included)."""
    if strength == 1:
        return factors
    return {name: LoRAFactors(f.down, f.up * strength, f.alpha) for name, f in factors.items()}


class Comparer:
    """Draws the cells of a comparison; callable from several threads (one job at a time)."""

    def __init__(self, pipe, base: Path, roots: list[Path], limits: Limits = Limits(), loader: Callable[[Path], object] | None = None):
        self.roots = [Path(root).resolve() for root in roots]
        self.limits = limits
        self.loader = loader
        self.lock = threading.Lock()
        self.cancel_requested = threading.Event()
        self._use(pipe, base)

    def _use(self, pipe, base: Path) -> None:
        self.pipe, self.base = pipe, Path(base)
        self.default_scheduler = pipe.scheduler
        self.vae_scale = pipe.vae_scale_factor
        # Every UNet level halves the latent: the image side must survive that many halvings.
        self.size_multiple = self.vae_scale * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
        self.native_size = pipe.unet.config.sample_size * self.vae_scale

    def use_base(self, base: Path) -> None:
        """Switches to another base model (loaded by `loader`); call with the lock held."""
        if Path(base) == self.base:
            return
        if self.loader is None:
            raise UserInputError("this app was started with one base model only")
        pipe = self.loader(Path(base))
        self.pipe = None  # let the old pipeline go before the new one is kept
        self._use(pipe, base)

    @property
    def max_steps(self) -> int:
        """The limit, or fewer: a scheduler cannot take more steps than the model's training timesteps."""
        config = self.default_scheduler.config
        timesteps = config.get("num_train_timesteps", self.limits.max_steps) - config.get("steps_offset", 0)
        return min(self.limits.max_steps, timesteps)

    @property
    def busy(self) -> bool:
        return self.lock.locked()

    def cancel(self, wait_s: float = 0.0) -> bool:
        """Stops the running job at its next denoising step; with no job running it does nothing.

        Waits up to `wait_s` for the job to stop; True when it has (False: none was running, or it is still stopping).
        """
        if not self.lock.locked():
            return False
        self.cancel_requested.set()
        if wait_s <= 0 or not self.lock.acquire(timeout=wait_s):
            return False
        self.lock.release()  # the job has let go of the model: it stopped
        return True

    @property
    def scheduler_choices(self) -> list[tuple[str, str]]:
        default = f"{MODEL_DEFAULT} ({type(self.default_scheduler).__name__})"
        return [(default, MODEL_DEFAULT)] + [(name, name) for name in SCHEDULERS]

    # -- checks ---------------------------------------------------------------------------------------
    def check_sampling(self, sampling: Sampling) -> Sampling:
        """The sampling with numbers as ints and a drawn seed, or `UserInputError` saying what is wrong."""
        limits = self.limits
        prompt = (sampling.prompt or "").strip()
        if not prompt:
            raise UserInputError("Type a prompt first: with an empty prompt there is nothing to compare.")
        if len(prompt) > limits.max_prompt_chars or len(sampling.negative_prompt or "") > limits.max_prompt_chars:
            raise UserInputError(f"prompts are limited to {limits.max_prompt_chars} characters")
        steps = _integer(sampling.steps, "steps")
        if not 1 <= steps <= self.max_steps:
            raise UserInputError(f"steps must be between 1 and {self.max_steps}, got {steps}")
        size = _integer(sampling.size, "size")
        if not (self.size_multiple <= size <= limits.max_size and size % self.size_multiple == 0):
            raise UserInputError(
                f"size must be a multiple of {self.size_multiple} between {self.size_multiple} and {limits.max_size} px "
                f"(this model was trained at {self.native_size} px), got {size}"
            )
        guidance = sampling.guidance
        if not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or not 0 <= guidance <= limits.max_guidance:
            raise UserInputError(f"guidance must be between 0 and {limits.max_guidance:g}, got {guidance!r}")
        seed = _integer(sampling.seed, "seed")
        if not -1 <= seed <= MAX_SEED:
            raise UserInputError(f"seed must be between 0 and {MAX_SEED} (or -1 for a random one), got {seed}")
        if seed == -1:
            seed = random.randrange(MAX_SEED + 1)
        if sampling.scheduler != MODEL_DEFAULT and sampling.scheduler not in SCHEDULERS:
            raise UserInputError(f"unknown scheduler {sampling.scheduler!r}; choose one of {[MODEL_DEFAULT, *SCHEDULERS]}")
        return replace(
            sampling, prompt=prompt, negative_prompt=(sampling.negative_prompt or "").strip(), seed=seed, steps=steps,
            guidance=float(guidance), size=size,
        )

    def check_setting(self, setting: Setting) -> tuple[Setting, AdapterSource | None]:
        strength = setting.strength
        if not isinstance(strength, (int, float)) or not math.isfinite(strength) or not -MAX_STRENGTH <= strength <= MAX_STRENGTH:
            raise UserInputError(f"strength must be between {-MAX_STRENGTH:g} and {MAX_STRENGTH:g}, got {strength!r}")
        if setting.merge_method not in MERGE_METHODS:
            raise UserInputError(f"unknown merge method {setting.merge_method!r}; choose one of {list(MERGE_METHODS)}")
        source = adapter_at(setting.adapter, self.roots) if (setting.adapter or "").strip() else None
        return replace(setting, strength=float(strength)), source

    # -- drawing --------------------------------------------------------------------------------------
    def compare(
        self,
        samplings: list[Sampling],
        settings: list[Setting],
        base: Path | None = None,
        on_progress: Callable[[int, int, str], None] | None = None,
    ) -> tuple[list[Sampling], list[Cell], list[list[Cell]]]:
        """(checked samplings, base cell per sampling, cells[sampling][setting]), all from each sampling's noise.

        Raises `Cancelled` when `cancel()` is called meanwhile; the model is then as it was.
        """
        if len(samplings) * max(1, len(settings)) > self.limits.max_cells:
            raise UserInputError(f"at most {self.limits.max_cells} images per job, asked for {len(samplings) * len(settings)}")
        with self.lock:
            try:
                return self._compare_locked(samplings, settings, base, on_progress)
            finally:
                self.cancel_requested.clear()  # a cancel stops the job it was meant for, never the next one

    def _compare_locked(self, samplings, settings, base, on_progress):
        if base is not None:
            self.use_base(base)
        samplings = [self.check_sampling(s) for s in samplings]
        checked = [self.check_setting(s) for s in settings]
        adapted = sum(1 for _, source in checked if source is not None)
        total = sum(s.steps for s in samplings) * (1 + adapted)
        done = 0

        def advance(title: str) -> Callable[[], None]:
            def step() -> None:
                nonlocal done
                if self.cancel_requested.is_set():
                    raise Cancelled("cancelled")
                done += 1
                if on_progress is not None:
                    on_progress(done, total, title)

            return step

        noise = [self._initial_latents(s) for s in samplings]
        bases = []
        for sampling, latents in zip(samplings, noise):
            image, seconds = self._draw(sampling, latents, advance("base"))
            bases.append(Cell(image, seconds, weights="base model"))
        columns = []
        for setting, source in checked:
            if source is None:
                columns.append([replace(cell, setting=setting) for cell in bases])
            else:
                columns.append(self._draw_adapted(source, setting, samplings, noise, advance(source.label)))
        cells = [[column[row] for column in columns] for row in range(len(samplings))]
        for row, base_cell in zip(cells, bases):
            reference = np.asarray(base_cell.image, dtype=np.float64)
            for cell in row:
                cell.mean_difference = float(np.abs(np.asarray(cell.image, dtype=np.float64) - reference).mean())
        return samplings, bases, cells

    def _scheduler(self, name: str):
        if name == MODEL_DEFAULT:
            return self.default_scheduler
        cls, overrides = SCHEDULERS[name]
        return cls.from_config(self.default_scheduler.config, **overrides)

    def _initial_latents(self, sampling: Sampling) -> torch.Tensor:
        side = sampling.size // self.vae_scale
        shape = (1, self.pipe.unet.config.in_channels, side, side)
        return torch.randn(shape, generator=torch.Generator().manual_seed(sampling.seed), dtype=torch.float32)

    def _draw(self, sampling: Sampling, latents: torch.Tensor, advance: Callable[[], None], **overrides) -> tuple[Image.Image, float]:
        def on_step_end(_pipe, _step, _timestep, _tensors):
            advance()
            return {}

        arguments = {
            "prompt": sampling.prompt,
            "negative_prompt": sampling.negative_prompt or None,
            "num_inference_steps": sampling.steps,
            "guidance_scale": sampling.guidance,
            "height": sampling.size,
            "width": sampling.size,
            "latents": latents.clone().to(self.pipe.unet.dtype),
            # Ancestral schedulers draw fresh noise every step: the same generator seed keeps that equal too.
            "generator": torch.Generator().manual_seed(sampling.seed),
            "callback_on_step_end": on_step_end,
        }
        self.pipe.scheduler = self._scheduler(sampling.scheduler)
        start = time.perf_counter()
        handles = self._stop_inside_steps()
        try:
            output = self.pipe(**{**arguments, **overrides})
        finally:
            for handle in handles:
                handle.remove()
            self.pipe.scheduler = self.default_scheduler
        return output.images[0], time.perf_counter() - start

    def _stop_inside_steps(self) -> list:
        """Pre-hooks on the UNet's and the VAE decoder's blocks that raise `Cancelled` once a cancel is asked.

        The step callback alone stops only between denoising steps, and one step of a large image can take
        seconds on a CPU; a cancel must take effect within a fraction of a step.
        """

        def check(_module, _args):
            if self.cancel_requested.is_set():
                raise Cancelled("cancelled")

        unet, decoder = self.pipe.unet, self.pipe.vae.decoder
        blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks, *decoder.up_blocks]
        return [block.register_forward_pre_hook(check) for block in blocks if block is not None]

    def _draw_adapted(self, source: AdapterSource, setting: Setting, samplings, noise, advance) -> list[Cell]:
        start = time.perf_counter()
        cells = []
        if not source.is_native:
            # Users' files run through diffusers' PEFT layers, as in a user's own script: no merge step here.
            with users_lora(self.pipe, source, setting.strength):
                setup = time.perf_counter() - start
                for sampling, latents in zip(samplings, noise):
                    image, seconds = self._draw(sampling, latents, advance)
                    cells.append(Cell(image, seconds, source, setting, "diffusers LoRA layers", setup))
            return cells
        with self._applied(source.path) as adapter:
            if not setting.merged:
                with native_strength(adapter, setting.strength):
                    setup = time.perf_counter() - start
                    for sampling, latents in zip(samplings, noise):
                        image, seconds = self._draw(sampling, latents, advance)
                        cells.append(Cell(image, seconds, source, setting, "unmerged", setup))
                return cells

            def calibration():  # lstsq: the unmerged model on the first prompt, from other noise than the image's
                first = samplings[0]
                other = torch.randn(noise[0].shape, generator=torch.Generator().manual_seed(first.seed + 1))
                self._draw(first, other, lambda: None, output_type="latent")

            result = merge_adapter(adapter, setting.merge_method, calibration)
            setup = time.perf_counter() - start
            with baked_weights(adapter, scaled_factors(result.factors, setting.strength)):
                for sampling, latents in zip(samplings, noise):
                    image, seconds = self._draw(sampling, latents, advance)
                    cells.append(Cell(image, seconds, source, setting, f"merged ({result.method})", setup))
            return cells

    @contextlib.contextmanager
    def _applied(self, folder: Path) -> Iterator:
        adapter = load_adapter(self.pipe.unet, folder, text_encoder=self.pipe.text_encoder)
        try:
            yield adapter
        finally:
            adapter.remove()  # the base weights are untouched (Delta-LoRA too): the next image starts from W_0
