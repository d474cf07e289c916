"""The comparison the app draws: one base pipeline, adapters swapped in and out, the same initial noise for every image.

Only one pipeline is kept in memory. Each adapter is applied with `load_adapter` for its image and taken out
again (`adapter.remove()`) before the next one, under a lock, so the base image is always the base model's.
"""

from __future__ import annotations

import contextlib
import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from PIL import Image
from runs import resolve_inside

from reslora_diffusers import load_adapter
from reslora_diffusers.io import CONFIG_NAME
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


@dataclass(frozen=True)
class Limits:
    """What a request may ask for: beyond these, a request is refused with a message instead of tying up the app."""

    max_steps: int = 150
    max_size: int = 512
    max_guidance: float = 30.0
    max_prompt_chars: int = 1000


@dataclass(frozen=True)
class Request:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0  # -1: draw one
    steps: int = 20
    guidance: float = 3.0
    size: int = 64
    scheduler: str = MODEL_DEFAULT
    lora: str = ""  # adapter folders; "" leaves that image out
    reslora: str = ""
    merged: bool = False
    merge_method: str = "input"


@dataclass
class Panel:
    """One image of the comparison and what it took."""

    title: str
    image: Image.Image
    seconds: float  # the pipeline call: text encoder, denoising loop and VAE decoder
    adapter: str = ""
    weights: str = ""  # "unmerged" or "merged (<method>)"
    setup_seconds: float = 0.0  # loading (and merging) the adapter
    mean_difference: float | None = None  # mean |pixel − base pixel| in 0..255


def _integer(value, name: str) -> int:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserInputError(f"{name} must be a whole number, got {value!r}")
    if float(value) != int(value):
        raise UserInputError(f"{name} must be a whole number, got {value}")
    return int(value)


class Comparer:
    """Draws base | LoRA | ResLoRA for one request; callable from several threads (one comparison at a time)."""

    def __init__(self, pipe, roots: list[Path], limits: Limits = Limits()) -> None:
        self.pipe = pipe
        self.roots = [Path(root).resolve() for root in roots]
        self.limits = limits
        self.default_scheduler = pipe.scheduler
        self.lock = threading.Lock()
        self.vae_scale = pipe.vae_scale_factor
        # Every UNet level halves the latent: the image side must survive that many halvings.
        self.size_multiple = self.vae_scale * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
        self.native_size = pipe.unet.config.sample_size * self.vae_scale

    @property
    def scheduler_choices(self) -> list[tuple[str, str]]:
        default = f"{MODEL_DEFAULT} ({type(self.default_scheduler).__name__})"
        return [(default, MODEL_DEFAULT)] + [(name, name) for name in SCHEDULERS]

    # -- checks ---------------------------------------------------------------------------------------
    def check(self, request: Request) -> Request:
        """The request with numbers as ints and a drawn seed, or `UserInputError` saying what is wrong."""
        limits = self.limits
        prompt = (request.prompt or "").strip()
        if not prompt:
            raise UserInputError("Type a prompt first: with an empty prompt there is nothing to compare.")
        if len(prompt) > limits.max_prompt_chars or len(request.negative_prompt or "") > limits.max_prompt_chars:
            raise UserInputError(f"prompts are limited to {limits.max_prompt_chars} characters")
        steps = _integer(request.steps, "steps")
        if not 1 <= steps <= limits.max_steps:
            raise UserInputError(f"steps must be between 1 and {limits.max_steps}, got {steps}")
        size = _integer(request.size, "size")
        if not (self.size_multiple <= size <= limits.max_size and size % self.size_multiple == 0):
            raise UserInputError(
                f"size must be a multiple of {self.size_multiple} between {self.size_multiple} and {limits.max_size} px "
                f"(this model was trained at {self.native_size} px), got {size}"
            )
        guidance = request.guidance
        if not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or not 0 <= guidance <= limits.max_guidance:
            raise UserInputError(f"guidance must be between 0 and {limits.max_guidance:g}, got {guidance!r}")
        seed = _integer(request.seed, "seed")
        if not -1 <= seed <= MAX_SEED:
            raise UserInputError(f"seed must be between 0 and {MAX_SEED} (or -1 for a random one), got {seed}")
        if seed == -1:
            seed = random.randrange(MAX_SEED + 1)
        if request.scheduler != MODEL_DEFAULT and request.scheduler not in SCHEDULERS:
            raise UserInputError(f"unknown scheduler {request.scheduler!r}; choose one of {[MODEL_DEFAULT, *SCHEDULERS]}")
        if request.merge_method not in MERGE_METHODS:
            raise UserInputError(f"unknown merge method {request.merge_method!r}; choose one of {list(MERGE_METHODS)}")
        return Request(
            prompt=prompt,
            negative_prompt=(request.negative_prompt or "").strip(),
            seed=seed,
            steps=steps,
            guidance=float(guidance),
            size=size,
            scheduler=request.scheduler,
            lora=request.lora,
            reslora=request.reslora,
            merged=bool(request.merged),
            merge_method=request.merge_method,
        )

    def adapter_folder(self, path: str) -> Path:
        """The folder of an adapter the user chose: inside the adapter roots and holding an adapter."""
        folder = resolve_inside(path, self.roots)
        if not (folder / CONFIG_NAME).is_file():
            raise UserInputError(f"{path} is not an adapter folder (it has no {CONFIG_NAME})")
        return folder

    # -- drawing --------------------------------------------------------------------------------------
    def compare(self, request: Request, on_progress: Callable[[int, int, str], None] | None = None) -> tuple[Request, list[Panel]]:
        """(the checked request, its panels): base first, then each chosen adapter, all from the same noise."""
        request = self.check(request)
        slots = [(title, self.adapter_folder(path)) for title, path in (("LoRA", request.lora), ("ResLoRA", request.reslora)) if path]
        total = request.steps * (1 + len(slots))
        done = 0

        def step(title: str) -> Callable[[], None]:
            def advance() -> None:
                nonlocal done
                done += 1
                if on_progress is not None:
                    on_progress(done, total, title)

            return advance

        with self.lock:
            self.pipe.scheduler = self._scheduler(request.scheduler)
            try:
                latents = self._initial_latents(request)
                image, seconds = self._draw(request, latents, step("base"))
                panels = [Panel("base", image, seconds)]
                for title, folder in slots:
                    panels.append(self._draw_adapted(title, folder, request, latents, step(title)))
            finally:
                self.pipe.scheduler = self.default_scheduler
        base = np.asarray(panels[0].image, dtype=np.float64)
        for panel in panels[1:]:
            panel.mean_difference = float(np.abs(np.asarray(panel.image, dtype=np.float64) - base).mean())
        return request, panels

    def _scheduler(self, name: str):
        if name == MODEL_DEFAULT:
            return self.default_scheduler
        cls, overrides = SCHEDULERS[name]
        return cls.from_config(self.default_scheduler.config, **overrides)

    def _initial_latents(self, request: Request) -> torch.Tensor:
        side = request.size // self.vae_scale
        shape = (1, self.pipe.unet.config.in_channels, side, side)
        return torch.randn(shape, generator=torch.Generator().manual_seed(request.seed), dtype=torch.float32)

    def _draw(self, request: Request, latents: torch.Tensor, advance: Callable[[], None], **overrides) -> tuple[Image.Image, float]:
        def on_step_end(_pipe, _step, _timestep, _tensors):
            advance()
            return {}

        arguments = {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt or None,
            "num_inference_steps": request.steps,
            "guidance_scale": request.guidance,
            "height": request.size,
            "width": request.size,
            "latents": latents.clone().to(self.pipe.unet.dtype),
            # Ancestral schedulers draw fresh noise every step: the same generator seed keeps that equal too.
            "generator": torch.Generator().manual_seed(request.seed),
            "callback_on_step_end": on_step_end,
        }
        start = time.perf_counter()
        output = self.pipe(**{**arguments, **overrides})
        return output.images[0], time.perf_counter() - start

    def _draw_adapted(self, title: str, folder: Path, request: Request, latents: torch.Tensor, advance) -> Panel:
        start = time.perf_counter()
        with self._applied(folder) as adapter:
            if not request.merged:
                setup = time.perf_counter() - start
                image, seconds = self._draw(request, latents, advance)
                return Panel(title, image, seconds, str(folder), "unmerged", setup)

            def calibration():  # lstsq: the unmerged model on this prompt, from other noise than the image's
                other = torch.randn(latents.shape, generator=torch.Generator().manual_seed(request.seed + 1))
                self._draw(request, other, lambda: None, output_type="latent")

            result = merge_adapter(adapter, request.merge_method, calibration)
            setup = time.perf_counter() - start
            with baked_weights(adapter, result.factors):
                image, seconds = self._draw(request, latents, advance)
            return Panel(title, image, seconds, str(folder), f"merged ({result.method})", setup)

    @contextlib.contextmanager
    def _applied(self, folder: Path) -> Iterator:
        adapter = load_adapter(self.pipe.unet, folder, text_encoder=self.pipe.text_encoder)
        try:
            yield adapter
        finally:
            if adapter.delta_lora is not None:
                # load_adapter moved the frozen weights to Delta-LoRA's W_T; the next image needs the base W_0.
                with torch.no_grad():
                    for name, layer in adapter.base_layers.items():
                        layer.weight.sub_(adapter.delta_lora.total_weight_change(name).to(layer.weight.dtype))
            adapter.remove()
