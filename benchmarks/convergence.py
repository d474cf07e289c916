"""Does ResLoRA converge faster, and does the gain survive the merge? Noto → Twemoji adaptation of the tiny emoji base.

    python benchmarks/convergence.py --quick                 # CPU: the reduced setting (the merge-aware study)
    python benchmarks/convergence.py --device cuda           # the full setting (GPU)

Every method (see benchmarks/common.py: LoRA, LoRA+, ResLoRA is / bs / ms, their `_nokv` / `_anneal` / `+`
variants, Delta-LoRA) trains an adapter on the UNet of `--base` with the Twemoji images of the train split
(minus a validation tenth), at equal rank, batch and steps. Users deploy the *merged* model, so that is
what is judged:

1. Learning rate: each method runs the `--lr_grid` on the first seed; the grid is extended while the best
   point sits at its edge (`--lr_extend`). The best lr and merge estimator are chosen by the merged
   model's loss on the *validation* names (never on the reported held-out names). `_nokv` / `_anneal`
   variants use the lr chosen for their parent (the key without those suffixes) when it is in the study.
2. Every seed then trains at the chosen lr. Reported per method: the held-out loss curve of the unmerged
   model (fixed noise and timesteps, the same for every model) and, at the end, the held-out loss of the
   merged model for every α estimator (input, weight, lstsq, lstsq_joint, calibrated; exact methods merge
   exactly); mean, sample std, and the paired difference to LoRA (same seed) with a 95 % t-interval over
   seeds; steps to LoRA's final loss on monotone-smoothed seed-mean curves; image metrics of generated
   held-out prompts for the unmerged and the merged model (PSNR, SSIM, a style classifier's Twemoji
   probability). References: the base, and the true Twemoji images through the VAE.

Within a seed every method starts from the same A initialisation and sees the same batches, noise and
timesteps. Results go to `<out_dir>/convergence_<tag>.json` (rewritten after every run, with the SHA-256
of the base UNet's weights) and two PNGs beside it; `--resume` continues an interrupted study.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import AdapterSettings, attach, machine_info, parse_methods  # noqa: E402
from benchmarks.convergence_stats import summarise  # noqa: E402
from reslora_diffusers.adapters.annealing import DEFAULT_ANNEAL_FRACTION, shortcut_anneal_factor  # noqa: E402
from reslora_diffusers.cli import exit_with_error  # noqa: E402
from reslora_diffusers.examples.emoji_data import load_split  # noqa: E402
from reslora_diffusers.merge import (  # noqa: E402
    MERGE_METHODS,
    alpha_statistics,
    baked_weights,
    image_psnr,
    is_exact,
    merge_adapter,
)

DEFAULT_METHODS = "lora,lora+,is,ms,bs,ms+,is_anneal,ms_anneal,is_nokv,ms_nokv"
FULL = dict(steps=1000, batch_size=64, seeds="0,1,2", eval_every=50, eval_draws=4, image_prompts=0, sample_steps=20, tag="merged_full")
QUICK = dict(steps=150, batch_size=16, seeds="0,1,2", eval_every=25, eval_draws=2, image_prompts=48, sample_steps=10, tag="merged_quick")
# Settings a resumed run must share with the runs it continues (the thread count changes CPU results).
RESULT_SETTINGS = ("base_unet_sha256", "steps", "batch_size", "rank", "lora_alpha", "delta_lora_ratio", "delta_lora_start",
                   "eval_every", "eval_draws", "val_draws", "image_prompts", "sample_steps", "guidance_scale", "max_train",
                   "classifier_steps", "threads", "lora_plus_ratio", "anneal_fraction", "calibration_batches",
                   "estimators", "val_fraction")  # fmt: skip
GRID_COLUMNS = 8
VALIDATION_SALT = "reslora-emoji-validation-v1:"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the reduced CPU setting (defaults below in brackets)")
    p.add_argument("--base", default=str(ROOT / "assets" / "tiny-emoji-sd"), help="StableDiffusionPipeline folder of the base")
    p.add_argument("--twemoji_dir", default=str(ROOT / "data" / "emoji" / "twemoji"), help="Twemoji imagefolder (build_emoji_dataset.py)")
    p.add_argument("--noto_dir", default=str(ROOT / "data" / "emoji" / "noto"), help="Noto imagefolder, for the style classifier")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated method keys (see benchmarks/common.py); must include lora")
    p.add_argument("--seeds", default=None, help=f"comma-separated seeds; the first one also runs the lr grid [{FULL['seeds']}]")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps per run [{FULL['steps']}; quick {QUICK['steps']}]")
    p.add_argument("--batch_size", type=int, default=None, help=f"[{FULL['batch_size']}; quick {QUICK['batch_size']}]")
    p.add_argument("--lr_grid", default="1e-3,2e-3,4e-3,8e-3", help="learning rates (of A) every method tries on the first seed")
    p.add_argument("--lr_extend", type=int, default=2,
                   help="extend the grid by one point (×/÷ the grid's last ratio) while the best lr is at an edge, at most this often")
    p.add_argument("--lora_plus_ratio", type=float, default=16.0, help="LoRA+ methods (`+`): B's learning rate / A's (paper: 16)")
    p.add_argument("--anneal_fraction", type=float, default=DEFAULT_ANNEAL_FRACTION,
                   help="`_anneal` methods: the shortcut scale goes 1 → 0 (half cosine) over this last fraction of the steps")
    p.add_argument("--estimators", default=",".join(MERGE_METHODS), help="merge estimators measured for is / ms")
    p.add_argument("--calibration_batches", type=int, default=4, help="training batches (noised as in training) the calibrated merges see")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of every method")
    p.add_argument("--lora_alpha", type=float, default=16.0, help="LoRA alpha (scale alpha / rank)")
    p.add_argument("--delta_lora_ratio", type=float, default=0.5, help="Delta-LoRA lambda")
    p.add_argument("--delta_lora_start", type=int, default=None, help="Delta-LoRA K (default: steps // 10)")
    p.add_argument("--eval_every", type=int, default=None, help=f"held-out loss every N steps [{FULL['eval_every']}; quick {QUICK['eval_every']}]")
    p.add_argument("--eval_draws", type=int, default=None,
                   help=f"fixed (noise, timestep) draws per held-out image [{FULL['eval_draws']}; quick {QUICK['eval_draws']}]")
    p.add_argument("--val_draws", type=int, default=2, help="fixed draws per validation image")
    p.add_argument("--val_fraction", type=float, default=0.1, help="share of the train split's names kept out of training for lr selection")
    p.add_argument("--image_prompts", type=int, default=None, help="held-out prompts generated for image metrics, 0 = all [all; quick 48]")
    p.add_argument("--sample_steps", type=int, default=None, help=f"DPM-Solver steps [{FULL['sample_steps']}; quick {QUICK['sample_steps']}]")
    p.add_argument("--guidance_scale", type=float, default=3.0, help="classifier-free guidance of the generated images")
    p.add_argument("--max_train", type=int, default=0, help="use only this many training images (0: all)")
    p.add_argument("--classifier_steps", type=int, default=1000, help="training steps of the style classifier")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (results on the CPU depend on it; --resume checks it)")
    p.add_argument("--out_dir", default=str(ROOT / "benchmarks" / "results"), help="where JSON and PNGs are written")
    p.add_argument("--tag", default=None, help="name part of the output files [merged_full; quick merged_quick]")
    p.add_argument("--no_plots", action="store_true", help="skip the PNGs")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished runs of an earlier invocation with the same --tag and settings, run only the rest")
    p.add_argument("--combine", default="",
                   help="comma-separated tags of parallel invocations (same settings, e.g. --methods split over cores, "
                        "each with lora) whose finished runs join this --tag's; implies --resume")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.combine = [t.strip() for t in args.combine.split(",") if t.strip()]
    args.resume = args.resume or bool(args.combine)
    try:
        args.methods = parse_methods(args.methods)
        args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
        args.lr_grid = sorted({float(x) for x in str(args.lr_grid).split(",") if x.strip()})
    except ValueError as error:
        p.error(str(error))
    args.estimators = [e.strip() for e in args.estimators.split(",") if e.strip()]
    unknown = sorted(set(args.estimators) - set(MERGE_METHODS))
    if unknown or not args.estimators:
        p.error(f"--estimators: unknown {unknown}; choose from {', '.join(MERGE_METHODS)}")
    keys = [m.key for m in args.methods]
    if "lora" not in keys:
        p.error("--methods must include lora: every other method is measured against it")
    if any(m.kind != "ours" for m in args.methods):
        p.error("convergence compares our adapters only (floor / peft are speed.py methods)")
    if not args.seeds:
        p.error("--seeds is empty")
    for flag in ("steps", "batch_size", "eval_every", "eval_draws", "val_draws", "sample_steps", "rank", "classifier_steps",
                 "calibration_batches", "threads"):  # fmt: skip
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1")
    if not args.lr_grid or any(lr <= 0 for lr in args.lr_grid):
        p.error("--lr_grid needs learning rates > 0")
    if args.lr_extend < 0 or args.lora_plus_ratio <= 0 or not 0 < args.anneal_fraction <= 1 or not 0 < args.val_fraction < 1:
        p.error("--lr_extend must be >= 0, --lora_plus_ratio > 0, --anneal_fraction in (0, 1], --val_fraction in (0, 1)")
    if args.delta_lora_start is None:
        args.delta_lora_start = args.steps // 10
    for path in (args.base, args.twemoji_dir, args.noto_dir):
        if not Path(path).exists():
            p.error(f"{path} not found (the base comes from scripts/pretrain_base.py, the data from scripts/build_emoji_dataset.py)")
    args.base_unet_sha256 = unet_weights_sha256(Path(args.base))
    return args


def unet_weights_sha256(base: Path) -> str:
    """SHA-256 of the base UNet's weights file(s): which base a result was measured on."""
    files = sorted((base / "unet").glob("*.safetensors")) or sorted((base / "unet").glob("*.bin"))
    if not files:
        exit_with_error(f"no UNet weights under {base / 'unet'}")
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def is_validation(caption: str, fraction: float) -> bool:
    """A fixed tenth of the train split's names, by hash (independent of the held-out split's hash)."""
    digest = hashlib.sha256((VALIDATION_SALT + caption).encode("utf-8")).hexdigest()
    return int(digest[:8], 16) / 16**8 < fraction


# -- data ---------------------------------------------------------------------------------------------------
def load_images(records: list[dict], size: int) -> np.ndarray:
    """uint8 N×size×size×3."""
    images = []
    for r in records:
        with Image.open(r["path"]) as im:
            im = im.convert("RGB")
            images.append(np.asarray(im if im.size == (size, size) else im.resize((size, size), Image.Resampling.LANCZOS)))
    return np.stack(images)


def to_model_range(images: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(device)


@torch.no_grad()
def encode_images(vae, images: np.ndarray, device, chunk=128) -> torch.Tensor:
    """Scaled posterior means (the VAE is frozen; one deterministic latent per image)."""
    out = [vae.encode(to_model_range(images[i : i + chunk], device)).latent_dist.mean for i in range(0, len(images), chunk)]
    return torch.cat(out) * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, chunk=128) -> np.ndarray:
    out = [vae.decode(latents[i : i + chunk] / vae.config.scaling_factor).sample for i in range(0, len(latents), chunk)]
    pixels = torch.cat(out).clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def encode_text(pipe, captions: list[str], device) -> torch.Tensor:
    tokenizer = pipe.tokenizer
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
    return pipe.text_encoder(ids.input_ids.to(device))[0]


# -- image metrics --------------------------------------------------------------------------------------------
def _gaussian_blur(x: np.ndarray, window: int = 11, sigma: float = 1.5) -> np.ndarray:
    """'Valid' separable Gaussian filter over axes 1 and 2 of N×H×W×C."""
    k = np.exp(-0.5 * ((np.arange(window) - window // 2) / sigma) ** 2)
    k /= k.sum()
    x = np.lib.stride_tricks.sliding_window_view(x, window, axis=1) @ k
    return np.lib.stride_tricks.sliding_window_view(x, window, axis=2) @ k


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM (Wang et al. 2004: 11-px Gaussian window, σ 1.5, K1 0.01, K2 0.03) per image pair, channels averaged."""
    x, y = a.astype(np.float64) / 255.0, b.astype(np.float64) / 255.0
    c1, c2 = 0.01**2, 0.03**2
    mx, my = _gaussian_blur(x), _gaussian_blur(y)
    vx, vy = _gaussian_blur(x * x) - mx * mx, _gaussian_blur(y * y) - my * my
    cov = _gaussian_blur(x * y) - mx * my
    value = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return value.mean(axis=(1, 2, 3))


class StyleClassifier(nn.Module):
    """A small CNN on 32-px images: logit of 'Twemoji' against 'Noto'."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 1),
        )  # fmt: skip

    @staticmethod
    def prepare(images: np.ndarray) -> torch.Tensor:
        return F.avg_pool2d(to_model_range(images, "cpu"), images.shape[1] // 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)

    @torch.no_grad()
    def twemoji_probability(self, images: np.ndarray) -> np.ndarray:
        with single_thread():
            return torch.sigmoid(self(self.prepare(images))).numpy()


@contextlib.contextmanager
def single_thread():
    """One CPU thread inside: the classifier's scores must not depend on --threads (they moved by 0.1 with it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_style_classifier(noto: np.ndarray, twemoji: np.ndarray, steps: int = 1000, seed: int = 0) -> StyleClassifier:
    """Trained on CPU (seconds) on the train split's Noto (label 0) and Twemoji (label 1) images, in one thread."""
    with single_thread():
        return _train_style_classifier(noto, twemoji, steps, seed)


def _train_style_classifier(noto: np.ndarray, twemoji: np.ndarray, steps: int, seed: int) -> StyleClassifier:
    torch.manual_seed(seed)
    model = StyleClassifier()
    x = torch.cat([StyleClassifier.prepare(noto), StyleClassifier.prepare(twemoji)])
    y = torch.cat([torch.zeros(len(noto)), torch.ones(len(twemoji))])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (128,), generator=generator)
        batch = x[idx]
        flip = torch.rand(len(idx), generator=generator) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        loss = F.binary_cross_entropy_with_logits(model(batch), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def image_metrics(generated: np.ndarray, truth: np.ndarray, classifier: StyleClassifier) -> dict:
    psnr = [image_psnr(g, t) for g, t in zip(generated, truth)]
    return {
        "psnr": float(np.mean([p for p in psnr if math.isfinite(p)])),
        "ssim": float(ssim(generated, truth).mean()),
        "p_twemoji": float(classifier.twemoji_probability(generated).mean()),
    }


# -- training and evaluation ---------------------------------------------------------------------------------
class EvalSet:
    """Fixed (noise, timestep) draws for a set of images: every model is scored on exactly the same inputs.

    Timesteps are stratified over [0, T) so few draws still cover the whole noise range.
    """

    def __init__(self, latents: torch.Tensor, text: torch.Tensor, draws: int, scheduler_steps: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        n = len(latents) * draws
        device = latents.device
        self.latents, self.text = latents, text
        self.index = torch.arange(len(latents)).repeat(draws).to(device)
        strata = (torch.arange(n) + torch.rand(n, generator=generator)) * scheduler_steps / n
        self.timesteps = strata.long().clamp(max=scheduler_steps - 1)[torch.randperm(n, generator=generator)].to(device)
        self.noise = torch.randn((n, *latents.shape[1:]), generator=generator).to(device)


class Data:
    """Everything precomputed once: latents and text embeddings of the three name sets, and the fixed evaluation draws."""

    def __init__(self, pipe, args, device) -> None:
        size = pipe.vae.config.sample_size
        records = load_split(args.twemoji_dir, "train")
        validation = [r for r in records if is_validation(r["text"], args.val_fraction)]
        train = [r for r in records if not is_validation(r["text"], args.val_fraction)]
        if args.max_train:
            train = train[: args.max_train]
        heldout = load_split(args.twemoji_dir, "heldout")
        if not train or not heldout or not validation:
            raise SystemExit(f"{args.twemoji_dir} needs train, validation and held-out names "
                             f"({len(train)}, {len(validation)}, {len(heldout)})")  # fmt: skip
        self.counts = {"train": len(train), "validation": len(validation), "heldout": len(heldout)}
        self.twemoji_train = load_images(train, size)
        self.train_latents = encode_images(pipe.vae, self.twemoji_train, device)
        self.train_text = encode_text(pipe, [r["text"] for r in train], device)
        self.heldout_captions = [r["text"] for r in heldout]
        self.heldout_images = load_images(heldout, size)
        self.heldout_latents = encode_images(pipe.vae, self.heldout_images, device)
        self.heldout_text = encode_text(pipe, self.heldout_captions, device)
        self.empty_text = encode_text(pipe, [""], device)
        self.noto_train = load_images(load_split(args.noto_dir, "train"), size)
        self.noto_heldout = load_images(load_split(args.noto_dir, "heldout"), size)
        steps = pipe.scheduler.config.num_train_timesteps
        self.heldout = EvalSet(self.heldout_latents, self.heldout_text, args.eval_draws, steps, seed=12345)
        val_latents = encode_images(pipe.vae, load_images(validation, size), device)
        self.validation = EvalSet(val_latents, encode_text(pipe, [r["text"] for r in validation], device), args.val_draws, steps, seed=54321)
        generator = torch.Generator().manual_seed(777)
        self.image_count = min(args.image_prompts or len(heldout), len(heldout))
        self.image_latents = torch.randn((self.image_count, *self.heldout_latents.shape[1:]), generator=generator)


def diffusion_target(scheduler, latents, noise, timesteps):
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        return noise
    raise ValueError(f"unsupported prediction_type {scheduler.config.prediction_type!r}")


@torch.no_grad()
def eval_loss(unet, noise_scheduler, eval_set: EvalSet, chunk: int = 256) -> float:
    """Mean denoising loss over the fixed draws of `eval_set` (eval mode; the UNet is put back in train mode)."""
    unet.eval()
    total, count = 0.0, 0
    for i in range(0, len(eval_set.index), chunk):
        idx = eval_set.index[i : i + chunk]
        latents, noise, t = eval_set.latents[idx], eval_set.noise[i : i + chunk], eval_set.timesteps[i : i + chunk]
        pred = unet(noise_scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=eval_set.text[idx]).sample
        total += F.mse_loss(pred, diffusion_target(noise_scheduler, latents, noise, t), reduction="sum").item()
        count += pred.numel()
    unet.train()
    return total / count


@torch.no_grad()
def generate(pipe, unet, data: Data, args, device) -> np.ndarray:
    """The first `image_count` held-out prompts, from the same initial noise for every model."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    components = {**pipe.components, "unet": unet, "scheduler": DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)}
    sampler = StableDiffusionPipeline(**components, requires_safety_checker=False)
    sampler.set_progress_bar_config(disable=True)
    unet.eval()
    count = data.image_count
    images = sampler(
        prompt_embeds=data.heldout_text[:count],
        negative_prompt_embeds=data.empty_text.expand(count, -1, -1),
        latents=data.image_latents.to(device),
        num_inference_steps=args.sample_steps,
        guidance_scale=args.guidance_scale,
        height=data.heldout_images.shape[1],
        width=data.heldout_images.shape[2],
        output_type="np",
    ).images
    unet.train()
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def training_batch(data: Data, noise_scheduler, generator, order, batch_size, device):
    """The next batch of the shuffled epoch: (noisy latents, timesteps, text, target, remaining order)."""
    if len(order) < batch_size:  # a new shuffled epoch
        order = torch.cat([order, torch.randperm(len(data.train_latents), generator=generator)])
    idx, order = order[:batch_size], order[batch_size:]
    latents, text = data.train_latents[idx.to(device)], data.train_text[idx.to(device)]
    noise = torch.randn(latents.shape, generator=generator).to(device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=generator).to(device)
    return noise_scheduler.add_noise(latents, noise, t), t, text, diffusion_target(noise_scheduler, latents, noise, t), order


class Trained:
    """A finished run's model, kept in memory until its images are made (`keep`), and the merge it was judged by."""

    def __init__(self, unet, attached, factors) -> None:
        self.unet, self.attached, self.factors = unet, attached, factors


def merged_evaluation(unet, attached, noise_scheduler, data: Data, args, device, seed: int) -> tuple[dict, object]:
    """Held-out and validation loss of the merged model for every estimator; (results, the best-on-validation factors).

    Exact methods (LoRA, bs, annealed to 0) are merged once ("exact"); the loss is measured anyway, which
    checks the merge. Calibrated estimators see `calibration_batches` training batches, noised as in training.
    """
    adapter = attached.adapter
    generator = torch.Generator().manual_seed(10_000 + seed)

    def calibration():
        order = torch.empty(0, dtype=torch.long)
        unet.eval()
        for _ in range(args.calibration_batches):
            noisy, t, text, _target, order = training_batch(data, noise_scheduler, generator, order, args.batch_size, device)
            unet(noisy, t, encoder_hidden_states=text)
        unet.train()

    estimators = ["exact"] if is_exact(adapter) else list(args.estimators)
    if adapter.config.res_type == "is" and "lstsq" in estimators and "lstsq_joint" in estimators:
        estimators.remove("lstsq_joint")  # one link per block: the same α as lstsq
    results, best = {}, None
    for estimator in estimators:
        result = merge_adapter(adapter, "input" if estimator == "exact" else estimator, calibration)
        with baked_weights(adapter, result.factors):
            entry = {"heldout": eval_loss(unet, noise_scheduler, data.heldout), "val": eval_loss(unet, noise_scheduler, data.validation)}
        entry["alpha"] = alpha_statistics(result.alphas)
        entry.update(result.report)
        results[estimator] = entry
        if best is None or entry["val"] < results[best[0]]["val"]:
            best = (estimator, result.factors)
    return results, best


def train_run(pipe, noise_scheduler, data: Data, m, seed: int, lr: float, args, device) -> tuple[dict, Trained]:
    """One method, one seed, one learning rate: the held-out curve, and the final losses unmerged and merged."""
    unet = copy.deepcopy(pipe.unet)
    settings = AdapterSettings(args.rank, args.lora_alpha, args.delta_lora_ratio, args.delta_lora_start)
    torch.manual_seed(seed)  # the same A initialisation for every method of this seed
    attached = attach(m, unet, settings)
    optimizer = torch.optim.AdamW(attached.param_groups(lr, args.lora_plus_ratio), weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)  # the same batches, noise and timesteps for every method
    order = torch.empty(0, dtype=torch.long)
    curve, train_losses, running, scales = [eval_loss(unet, noise_scheduler, data.heldout)], [], [], []
    started = time.perf_counter()
    unet.train()
    for step in range(1, args.steps + 1):
        if m.anneal:
            attached.adapter.set_shortcut_scale(shortcut_anneal_factor(step, args.steps, args.anneal_fraction))
        noisy, t, text, target, order = training_batch(data, noise_scheduler, generator, order, args.batch_size, device)
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=text).sample, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        attached.after_optimizer_step(step)
        running.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            curve.append(eval_loss(unet, noise_scheduler, data.heldout))
            train_losses.append(statistics.fmean(running))
            scales.append(attached.adapter.shortcut_scale)
            running = []
    train_seconds = time.perf_counter() - started
    merged, (estimator, factors) = merged_evaluation(unet, attached, noise_scheduler, data, args, device, seed)
    run = {
        "method": m.key, "seed": seed, "lr": lr, "heldout_loss": curve, "train_loss": train_losses, "shortcut_scale": scales,
        "val_loss": eval_loss(unet, noise_scheduler, data.validation), "merged": merged, "best_estimator": estimator,
        "train_seconds": train_seconds, "seconds": time.perf_counter() - started + 0.0,
    }  # fmt: skip
    run["merged_val_best"] = merged[estimator]["val"]
    return run, Trained(unet, attached, factors)


def add_images(run: dict, trained: Trained, pipe, data: Data, args, device, truth, classifier) -> tuple[np.ndarray, np.ndarray]:
    """Image metrics of the unmerged and the merged model (best estimator on validation); returns both image sets."""
    unmerged = generate(pipe, trained.unet, data, args, device)
    with baked_weights(trained.attached.adapter, trained.factors):
        merged = generate(pipe, trained.unet, data, args, device)
    run["image_metrics"] = image_metrics(unmerged, truth, classifier)
    run["image_metrics_merged"] = image_metrics(merged, truth, classifier)
    return unmerged, merged


# -- learning-rate selection ----------------------------------------------------------------------------------
def lr_candidates(grid: list[float], tried: dict[float, float], extend: int) -> list[float]:
    """The lrs still to try: the grid, then one more point beyond an edge where the best (lowest) value sits, `extend` times."""
    missing = [lr for lr in grid if lr not in tried]
    if missing:
        return missing
    lrs = sorted(tried)
    if len(lrs) - len(grid) >= extend or len(lrs) < 2:
        return []
    best = min(lrs, key=lambda lr: tried[lr])
    if best == lrs[0]:
        return [lrs[0] * lrs[0] / lrs[1]]
    if best == lrs[-1]:
        return [lrs[-1] * lrs[-1] / lrs[-2]]
    return []


def selected_lr(runs: list[dict], key: str, seed: int) -> float | None:
    """The lr whose merged model (best estimator) has the lowest validation loss on `seed`."""
    mine = [r for r in runs if r["method"] == key and r["seed"] == seed]
    return min(mine, key=lambda r: r["merged_val_best"])["lr"] if mine else None


# -- output ---------------------------------------------------------------------------------------------------
def plot(summary: dict, runs: list[dict], steps: list[int], args, labels: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for key, row in summary["methods"].items():
        curves = np.array([r["heldout_loss"] for r in runs if r["method"] == key and r["lr"] == row["lr"]])
        (line,) = ax.plot(steps, row["mean_curve"], label=f"{labels[key]} (lr {row['lr']:g})", lw=1.4, ls="-" if key == "lora" else "--")
        if len(curves) > 1:
            ax.fill_between(steps, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.10)
        ax.plot([steps[-1] + 3], [row["merged_best"]["mean"]], marker="o", color=line.get_color(), ms=4)
    ax.axhline(summary["methods"]["lora"]["merged_best"]["mean"], color="grey", lw=0.8, ls=":", label="LoRA final")
    ax.set_xlabel("optimizer step (dots right of the last step: the merged models)")
    ax.set_ylabel("held-out denoising loss (v-MSE)")
    shown = [c for row in summary["methods"].values() for c in row["mean_curve"][1:]]
    ax.set_ylim(min(shown) - 0.05 * (max(shown) - min(shown)), max(shown) * 1.02)
    ax.set_title(f"Noto → Twemoji, held-out names: mean of seeds {','.join(map(str, args.seeds))} at each method's lr (band: min-max)", fontsize=8)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sample_grid(rows: list[tuple[str, np.ndarray]], count: int, path: Path) -> None:
    """One row per model (label on the left), `count` held-out prompts per row, 64 px each."""
    from PIL import ImageDraw

    size, label_width = rows[0][1].shape[1], 170
    grid = Image.new("RGB", (label_width + size * count, size * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (label, images) in enumerate(rows):
        draw.text((4, i * size + size // 2 - 6), label, fill="black")
        for j, image in enumerate(images[:count]):
            grid.paste(Image.fromarray(image), (label_width + j * size, i * size))
    # 256 colours keep the PNG small (the pictures illustrate; the metrics are computed on the full images).
    grid.quantize(256).save(path, optimize=True)


def previous_runs(json_path: Path, rows_path: Path, args) -> tuple[list[dict], dict[str, np.ndarray]]:
    """With --resume: the runs that earlier invocations with the same settings finished (this --tag's and those of
    the --combine tags), and their sample rows."""
    sources = [(json_path, rows_path)] + [(json_path.with_name(f"convergence_{tag}.json"),
                                           rows_path.with_name(f".convergence_{tag}_samples.npz")) for tag in args.combine]
    for path, _ in sources[1:]:
        if not path.is_file():
            exit_with_error(f"--combine: {path} not found")
    if not args.resume:
        return [], {}
    keys = {m.key for m in args.methods}
    found: dict[tuple, dict] = {}
    rows: dict[str, np.ndarray] = {}
    for path, samples in sources:
        if not path.is_file():
            continue
        old = json.loads(path.read_text())
        mismatch = [k for k in RESULT_SETTINGS if old["settings"].get(k) != getattr(args, k)]
        if mismatch:
            exit_with_error(f"--resume: {path} was written with other settings ({', '.join(mismatch)}); use another --tag")
        for run in old["runs"]:
            if run["method"] in keys and run["seed"] in args.seeds:
                key = (run["method"], run["seed"], run["lr"])
                # The same run from two invocations is the same numbers (fixed seed); keep the one with images.
                if key not in found or ("image_metrics" in run and "image_metrics" not in found[key]):
                    found[key] = run
        if samples.is_file():
            rows.update({k: v for k, v in np.load(samples).items() if k not in rows})
        print(f"--resume: {len(old['runs'])} runs in {path}", flush=True)
    return list(found.values()), rows


def write_json(path: Path, argv, args, device, steps, references, runs, started) -> dict:
    """(Re)writes the results file after every run, so a run cut short keeps what it finished; returns the summary."""
    from reslora_diffusers.atomic import atomic_write_text

    summary = summarise(runs, args, steps)
    result = {
        "command": " ".join(["python", "benchmarks/convergence.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(device),
        "settings": {k: v for k, v in vars(args).items() if k != "methods"} | {"methods": [m.key for m in args.methods]},
        "eval_steps": steps,
        "references": references,
        "summary": summary,
        "runs": runs,
        "wall_seconds_this_invocation": time.perf_counter() - started,
    }
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return summary


def main(argv=None) -> int:
    from benchmarks.convergence_stats import print_tables

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The sample rows of finished runs, kept for --resume (a cache, not a result).
    json_path, rows_path = out_dir / f"convergence_{args.tag}.json", out_dir / f".convergence_{args.tag}_samples.npz"
    runs, sample_rows = previous_runs(json_path, rows_path, args)  # checks the settings before any work
    device = torch.device(args.device)
    import diffusers
    import transformers
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    started = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(args.base, local_files_only=True, safety_checker=None, requires_safety_checker=False)
    pipe.to(device)
    for model in (pipe.vae, pipe.text_encoder, pipe.unet):
        model.requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    data = Data(pipe, args, device)
    classifier = train_style_classifier(data.noto_train, data.twemoji_train, steps=args.classifier_steps)
    labels = {m.key: m.label for m in args.methods}
    accuracy = {
        "noto": float(np.mean(classifier.twemoji_probability(data.noto_heldout) < 0.5)),
        "twemoji": float(np.mean(classifier.twemoji_probability(data.heldout_images) > 0.5)),
    }
    print(f"base {args.base} (UNet sha256 {args.base_unet_sha256[:12]}); names: {data.counts}; "
          f"style classifier held-out accuracy: {accuracy}", flush=True)  # fmt: skip

    truth = data.heldout_images[: data.image_count]
    base_images = generate(pipe, pipe.unet, data, args, device)
    references = {
        "heldout_loss_base": eval_loss(pipe.unet, noise_scheduler, data.heldout),
        "val_loss_base": eval_loss(pipe.unet, noise_scheduler, data.validation),
        "image_metrics_base": image_metrics(base_images, truth, classifier),
        "image_metrics_vae_roundtrip": image_metrics(decode_latents(pipe.vae, data.heldout_latents[: data.image_count]), truth, classifier),
        "classifier_heldout_accuracy": accuracy,
        "names": data.counts,
    }
    steps = [0] + [s for s in range(1, args.steps + 1) if s % args.eval_every == 0 or s == args.steps]
    first, keys = args.seeds[0], [m.key for m in args.methods]

    def finish(m, seed, lr, want_images: bool, kept: dict | None = None) -> None:
        run, trained = train_run(pipe, noise_scheduler, data, m, seed, lr, args, device)
        if want_images:
            keep_images(m, run, trained)
        elif kept is not None:
            kept[lr] = (run, trained)
        runs.append(run)
        merged = run["merged"][run["best_estimator"]]["heldout"]
        print(f"[{len(runs)}] {m.key:14s} seed {seed} lr {lr:g}: held-out {run['heldout_loss'][0]:.5f} -> {run['heldout_loss'][-1]:.5f}, "
              f"merged ({run['best_estimator']}) {merged:.5f}; validation merged {run['merged_val_best']:.5f} ({run['seconds']:.0f} s)", flush=True)  # fmt: skip
        write_json(json_path, argv, args, device, steps, references, runs, started)

    def keep_images(m, run, trained) -> None:
        unmerged, merged = add_images(run, trained, pipe, data, args, device, truth, classifier)
        if run["seed"] == first:
            sample_rows[m.key], sample_rows[m.key + " merged"] = unmerged[:GRID_COLUMNS], merged[:GRID_COLUMNS]
            np.savez_compressed(rows_path, **sample_rows)

    # 1. the lr grid on the first seed (methods whose parent is in the study inherit its lr)
    swept = [m for m in args.methods if m.parent == m.key or m.parent not in keys]
    for m in swept:
        kept: dict = {}
        while True:
            tried = {r["lr"]: r["merged_val_best"] for r in runs if r["method"] == m.key and r["seed"] == first}
            todo = lr_candidates(args.lr_grid, tried, args.lr_extend)
            if not todo:
                break
            for lr in todo:
                finish(m, first, lr, want_images=False, kept=kept)
        best = selected_lr(runs, m.key, first)
        best_run = next(r for r in runs if r["method"] == m.key and r["seed"] == first and r["lr"] == best)
        if "image_metrics" not in best_run and best in kept:
            keep_images(m, *kept[best])
            write_json(json_path, argv, args, device, steps, references, runs, started)
        kept.clear()
    # 2. every seed at the chosen lr
    for m in args.methods:
        lr = selected_lr(runs, m.parent if m not in swept else m.key, first)
        for seed in args.seeds:
            previous = next((r for r in runs if r["method"] == m.key and r["seed"] == seed and r["lr"] == lr), None)
            if previous is not None and "image_metrics" not in previous:
                # A sweep run whose images died with an interrupted process (--resume): train it again (the same
                # seed gives the same run) rather than report this seed without image metrics.
                runs.remove(previous)
                previous = None
            if previous is None:
                finish(m, seed, lr, want_images=True)

    summary = write_json(json_path, argv, args, device, steps, references, runs, started)
    print_tables(summary, references, args, labels)
    if not args.no_plots:
        plot(summary, runs, steps, args, labels, out_dir / f"convergence_{args.tag}.png")
        rows = [("true Twemoji", truth), ("base (Noto)", base_images)]
        for m in args.methods:
            rows += [(labels[m.key] + suffix, sample_rows[m.key + suffix]) for suffix in ("", " merged") if m.key + suffix in sample_rows]
        sample_grid(rows, min(GRID_COLUMNS, data.image_count), out_dir / f"convergence_{args.tag}_samples.png")
    print(f"\nwrote {json_path} ({(time.perf_counter() - started) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
