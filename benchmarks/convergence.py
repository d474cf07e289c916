"""Does ResLoRA converge faster? Noto → Twemoji style adaptation of the tiny emoji base, every method side by side.

    python benchmarks/convergence.py --quick                 # CPU, minutes: reduced setting
    python benchmarks/convergence.py --device cuda           # the full setting (GPU)

Each method (LoRA, ResLoRA is / bs / ms with pre_num -1 and a small value, Delta-LoRA) trains an adapter
on the UNet of `--base` with the Twemoji images of the train split, at equal rank, learning rate, batch
and steps, for every seed; a small learning-rate sweep runs each method on the first seed. The VAE
latents and the (frozen) text embeddings are computed once; within a seed, every method starts from
the same A initialisation and sees the same batches, noise and timesteps. Reported:

- the held-out denoising loss (the emoji names of the held-out split, fixed noise and timesteps) every
  `--eval_every` steps, and the steps each method needs to reach plain LoRA's final held-out loss;
- image metrics of generated held-out prompts (fixed initial noise, DPM-Solver) against the true
  Twemoji images: PSNR, SSIM, and the Twemoji probability of a small style classifier trained on the
  train split's Noto vs Twemoji images. References: the base model (no adapter), and the true Twemoji
  images through the VAE (the best any adapter of this UNet can reach).

Results go to `<out_dir>/convergence_<tag>.json` (rewritten after every run) and two PNGs beside it.
"""

from __future__ import annotations

import argparse
import copy
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
from benchmarks.common import AdapterSettings, attach, fmt, format_table, machine_info, parse_methods  # noqa: E402
from reslora_diffusers.emoji_data import load_split  # noqa: E402
from reslora_diffusers.merge import image_psnr  # noqa: E402

DEFAULT_METHODS = "lora,is,bs,bs_m1,ms,ms_m1,delta"
FULL = dict(steps=1000, batch_size=64, seeds="0,1,2", lr_sweep="3e-4,3e-3", eval_every=50, eval_draws=4,
            image_prompts=0, sample_steps=20, tag="full")  # fmt: skip
QUICK = dict(steps=150, batch_size=16, seeds="0", lr_sweep="", eval_every=25, eval_draws=2,
             image_prompts=48, sample_steps=10, tag="quick")  # fmt: skip
# Settings a resumed run must share with the runs it continues.
RESULT_SETTINGS = ("base", "steps", "batch_size", "lr", "rank", "lora_alpha", "delta_lora_ratio", "delta_lora_start", "eval_every",
                   "eval_draws", "image_prompts", "sample_steps", "guidance_scale", "max_train", "classifier_steps")  # fmt: skip
GRID_COLUMNS = 8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the reduced CPU setting (defaults below in brackets)")
    p.add_argument("--base", default=str(ROOT / "assets" / "tiny-emoji-sd"), help="StableDiffusionPipeline folder of the base")
    p.add_argument("--twemoji_dir", default=str(ROOT / "data" / "emoji" / "twemoji"), help="Twemoji imagefolder (build_emoji_dataset.py)")
    p.add_argument("--noto_dir", default=str(ROOT / "data" / "emoji" / "noto"), help="Noto imagefolder, for the style classifier")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated method keys (see benchmarks/common.py); must include lora")
    p.add_argument("--seeds", default=None, help=f"comma-separated seeds [{FULL['seeds']}; quick {QUICK['seeds']}]")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps per run [{FULL['steps']}; quick {QUICK['steps']}]")
    p.add_argument("--batch_size", type=int, default=None, help=f"[{FULL['batch_size']}; quick {QUICK['batch_size']}]")
    p.add_argument("--lr", type=float, default=1e-3, help="the learning rate every method uses on every seed")
    p.add_argument("--lr_sweep", default=None,
                   help=f"further learning rates, run for each method on the first seed [{FULL['lr_sweep']}; quick none]")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of every method")
    p.add_argument("--lora_alpha", type=float, default=16.0, help="LoRA alpha (scale alpha / rank)")
    p.add_argument("--delta_lora_ratio", type=float, default=0.5, help="Delta-LoRA lambda")
    p.add_argument("--delta_lora_start", type=int, default=None, help="Delta-LoRA K (default: steps // 10)")
    p.add_argument("--eval_every", type=int, default=None, help=f"held-out loss every N steps [{FULL['eval_every']}; quick {QUICK['eval_every']}]")
    p.add_argument("--eval_draws", type=int, default=None,
                   help=f"fixed (noise, timestep) draws per held-out image [{FULL['eval_draws']}; quick {QUICK['eval_draws']}]")
    p.add_argument("--image_prompts", type=int, default=None, help="held-out prompts generated for image metrics, 0 = all [all; quick 48]")
    p.add_argument("--sample_steps", type=int, default=None, help=f"DPM-Solver steps [{FULL['sample_steps']}; quick {QUICK['sample_steps']}]")
    p.add_argument("--guidance_scale", type=float, default=3.0, help="classifier-free guidance of the generated images")
    p.add_argument("--max_train", type=int, default=0, help="use only this many training images (0: all)")
    p.add_argument("--classifier_steps", type=int, default=1000, help="training steps of the style classifier")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out_dir", default=str(ROOT / "benchmarks" / "results"), help="where JSON and PNGs are written")
    p.add_argument("--tag", default=None, help="name part of the output files [full; quick]")
    p.add_argument("--no_plots", action="store_true", help="skip the PNGs")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished runs of an earlier invocation with the same --tag and settings, run only the rest "
                   "(to split the full setting over several time-limited commands)")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        args.methods = parse_methods(args.methods)
        args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
        args.lr_sweep = [float(x) for x in str(args.lr_sweep).split(",") if x.strip()]
    except ValueError as error:
        p.error(str(error))
    keys = [m.key for m in args.methods]
    if "lora" not in keys:
        p.error("--methods must include lora: every other method is measured against it")
    if any(m.kind != "ours" for m in args.methods):
        p.error("convergence compares our adapters only (floor / peft are speed.py methods)")
    if not args.seeds:
        p.error("--seeds is empty")
    for flag in ("steps", "batch_size", "eval_every", "eval_draws", "sample_steps", "rank", "classifier_steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1")
    if args.lr <= 0 or any(lr <= 0 for lr in args.lr_sweep):
        p.error("learning rates must be > 0")
    if args.delta_lora_start is None:
        args.delta_lora_start = args.steps // 10
    for path in (args.base, args.twemoji_dir, args.noto_dir):
        if not Path(path).exists():
            p.error(f"{path} not found (the base comes from scripts/pretrain_base.py, the data from scripts/build_emoji_dataset.py)")
    return args


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
        return torch.sigmoid(self(self.prepare(images))).numpy()


def train_style_classifier(noto: np.ndarray, twemoji: np.ndarray, steps: int = 1000, seed: int = 0) -> StyleClassifier:
    """Trained on CPU (seconds) on the train split's Noto (label 0) and Twemoji (label 1) images."""
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
class Data:
    """Everything precomputed once: latents and text embeddings of both splits, and the fixed evaluation draws."""

    def __init__(self, pipe, args, device) -> None:
        size = pipe.vae.config.sample_size
        train = load_split(args.twemoji_dir, "train")
        if args.max_train:
            train = train[: args.max_train]
        heldout = load_split(args.twemoji_dir, "heldout")
        if not train or not heldout:
            raise SystemExit(f"{args.twemoji_dir} needs images of both splits (train: {len(train)}, held-out: {len(heldout)})")
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

        # Fixed held-out evaluation: eval_draws (noise, timestep) pairs per image, timesteps stratified over [0, T).
        scheduler_steps = pipe.scheduler.config.num_train_timesteps
        generator = torch.Generator().manual_seed(12345)
        n = len(heldout) * args.eval_draws
        self.eval_index = torch.arange(len(heldout)).repeat(args.eval_draws).to(device)
        strata = (torch.arange(n) + torch.rand(n, generator=generator)) * scheduler_steps / n
        self.eval_timesteps = strata.long().clamp(max=scheduler_steps - 1)[torch.randperm(n, generator=generator)].to(device)
        self.eval_noise = torch.randn((n, *self.heldout_latents.shape[1:]), generator=generator).to(device)
        # Fixed initial noise of the generated images.
        count = args.image_prompts or len(heldout)
        self.image_count = min(count, len(heldout))
        self.image_latents = torch.randn((self.image_count, *self.heldout_latents.shape[1:]), generator=generator)


def diffusion_target(scheduler, latents, noise, timesteps):
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        return noise
    raise ValueError(f"unsupported prediction_type {scheduler.config.prediction_type!r}")


@torch.no_grad()
def heldout_loss(unet, noise_scheduler, data: Data, chunk: int = 256) -> float:
    unet.eval()
    total, count = 0.0, 0
    for i in range(0, len(data.eval_index), chunk):
        idx = data.eval_index[i : i + chunk]
        latents, noise, t = data.heldout_latents[idx], data.eval_noise[i : i + chunk], data.eval_timesteps[i : i + chunk]
        pred = unet(noise_scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=data.heldout_text[idx]).sample
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
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def train_run(pipe, noise_scheduler, data: Data, m, seed: int, lr: float, args, device, want_images: bool) -> dict:
    """One method, one seed, one learning rate; returns its held-out loss curve (and images if asked)."""
    unet = copy.deepcopy(pipe.unet)
    settings = AdapterSettings(args.rank, args.lora_alpha, args.delta_lora_ratio, args.delta_lora_start)
    torch.manual_seed(seed)  # the same A initialisation for every method of this seed
    attached = attach(m, unet, settings)
    optimizer = torch.optim.AdamW(attached.params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)  # the same batches, noise and timesteps for every method
    num_train, order = len(data.train_latents), torch.empty(0, dtype=torch.long)
    curve, train_losses, running = [heldout_loss(unet, noise_scheduler, data)], [], []
    started = time.perf_counter()
    unet.train()
    for step in range(1, args.steps + 1):
        if len(order) < args.batch_size:  # a new shuffled epoch
            order = torch.cat([order, torch.randperm(num_train, generator=generator)])
        idx, order = order[: args.batch_size], order[args.batch_size :]
        latents, text = data.train_latents[idx.to(device)], data.train_text[idx.to(device)]
        # sample noise and timesteps, add the noise
        noise = torch.randn(latents.shape, generator=generator).to(device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=generator).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        # predict the target and step
        pred = unet(noisy, t, encoder_hidden_states=text).sample
        loss = F.mse_loss(pred, diffusion_target(noise_scheduler, latents, noise, t))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        attached.after_optimizer_step(step)
        running.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            curve.append(heldout_loss(unet, noise_scheduler, data))
            train_losses.append(statistics.fmean(running))
            running = []
    train_seconds = time.perf_counter() - started
    images = generate(pipe, unet, data, args, device) if want_images else None
    return {
        "method": m.key, "seed": seed, "lr": lr, "heldout_loss": curve, "train_loss": train_losses,
        "train_seconds": train_seconds, "images": images,
    }  # fmt: skip


# -- summary --------------------------------------------------------------------------------------------------
def crossing_step(steps: list[int], curve: list[float], target: float) -> float | None:
    """The first step at which `curve` reaches `target`, linearly interpolated between evaluations; None if never."""
    for i in range(1, len(curve)):
        if curve[i] <= target:
            if curve[i - 1] <= target:
                return float(steps[i - 1])
            frac = (curve[i - 1] - target) / (curve[i - 1] - curve[i])
            return steps[i - 1] + frac * (steps[i] - steps[i - 1])
    return None


def mean_curve(runs: list[dict]) -> list[float]:
    return [statistics.fmean(values) for values in zip(*(r["heldout_loss"] for r in runs))]


def speedup(steps: list[int], reference: list[float], curve: list[float]) -> dict:
    """Steps to reach the reference's final loss, for the reference and the curve, and their ratio."""
    target = reference[-1]
    ref_steps, own_steps = crossing_step(steps, reference, target), crossing_step(steps, curve, target)
    return {
        "target_loss": target,
        "lora_steps": ref_steps,
        "steps": own_steps,
        "speedup": ref_steps / own_steps if own_steps else None,
        # Not reached: the speed-up is below lora_steps / last step.
        "speedup_below": None if own_steps else ref_steps / steps[-1],
        "last_step": steps[-1],
    }


def summarise(runs: list[dict], args, steps: list[int]) -> dict:
    keys = [m.key for m in args.methods]
    main = [r for r in runs if r["lr"] == args.lr]
    summary = {"methods": {}, "lr_sweep": {}}
    lora_runs = {r["seed"]: r for r in main if r["method"] == "lora"}
    for key in keys:
        mine = [r for r in main if r["method"] == key]
        if not mine or not lora_runs:
            continue
        seeds = [r["seed"] for r in mine if r["seed"] in lora_runs]
        curve = mean_curve(mine)
        row = {
            "seeds": [r["seed"] for r in mine],
            "mean_curve": curve,
            "final_loss_mean": curve[-1],
            "final_loss_std": statistics.pstdev([r["heldout_loss"][-1] for r in mine]),
            "vs_lora_mean_curve": speedup(steps, mean_curve([lora_runs[s] for s in seeds]), mean_curve([r for r in mine if r["seed"] in seeds])),
            "vs_lora_per_seed": [speedup(steps, lora_runs[r["seed"]]["heldout_loss"], r["heldout_loss"]) for r in mine if r["seed"] in lora_runs],
            "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in mine),
        }  # fmt: skip
        # How much of the base's held-out loss the method removed, relative to what LoRA removed (same seeds).
        lora_curve = mean_curve([lora_runs[s] for s in seeds])
        own = mean_curve([r for r in mine if r["seed"] in seeds])
        row["loss_drop_x_lora"] = (own[0] - own[-1]) / (lora_curve[0] - lora_curve[-1]) if lora_curve[0] != lora_curve[-1] else None
        metrics = [r["image_metrics"] for r in mine if r.get("image_metrics")]
        if metrics:
            row["image_metrics_mean"] = {k: statistics.fmean(mm[k] for mm in metrics) for k in metrics[0]}
            row["image_metrics_std"] = {k: statistics.pstdev(mm[k] for mm in metrics) for k in metrics[0]}
        summary["methods"][key] = row
    # The sweep (first seed): each method's final loss per learning rate, and the tuned comparison.
    first = args.seeds[0]
    for key in keys:
        per_lr = {r["lr"]: r["heldout_loss"] for r in runs if r["method"] == key and r["seed"] == first}
        if len(per_lr) > 1:
            best = min(per_lr, key=lambda lr: per_lr[lr][-1])
            summary["lr_sweep"][key] = {"final_loss": {str(lr): c[-1] for lr, c in sorted(per_lr.items())}, "best_lr": best}
    if "lora" in summary["lr_sweep"]:
        lora_best = [r for r in runs if r["method"] == "lora" and r["seed"] == first and r["lr"] == summary["lr_sweep"]["lora"]["best_lr"]][0]
        for key, sweep in summary["lr_sweep"].items():
            best = [r for r in runs if r["method"] == key and r["seed"] == first and r["lr"] == sweep["best_lr"]][0]
            sweep["vs_lora_best_lr"] = speedup(steps, lora_best["heldout_loss"], best["heldout_loss"])
    return summary


def speedup_text(s: dict) -> str:
    if s["speedup"] is not None:
        return f"{s['speedup']:.2f}x ({s['steps']:.0f} vs {s['lora_steps']:.0f} steps)"
    return f"< {s['speedup_below']:.2f}x (not reached in {s['last_step']} steps)"


def print_tables(summary: dict, references: dict, args, labels: dict) -> None:
    print(f"\n## Held-out denoising loss after {args.steps} steps (lr {args.lr:g}, rank {args.rank}, batch {args.batch_size}, "
          f"seeds {','.join(map(str, args.seeds))}); steps to reach LoRA's final held-out loss")  # fmt: skip
    headers = ["method", "final held-out loss", "± std (seeds)", "loss drop x LoRA", "speed-up vs LoRA (mean curve)", "per seed",
               "PSNR", "SSIM", "P(Twemoji)"]  # fmt: skip
    rows = []
    for key, row in summary["methods"].items():
        im = row.get("image_metrics_mean", {})
        per_seed = ", ".join("-" if s["speedup"] is None else f"{s['speedup']:.2f}" for s in row["vs_lora_per_seed"])
        rows.append([labels[key], fmt(row["final_loss_mean"], 5), fmt(row["final_loss_std"], 5), fmt(row["loss_drop_x_lora"], 3),
                     speedup_text(row["vs_lora_mean_curve"]),
                     per_seed, fmt(im.get("psnr"), 2), fmt(im.get("ssim"), 3), fmt(im.get("p_twemoji"), 3)])  # fmt: skip
    for name, ref in references.items():
        if name.startswith("image_metrics_"):
            rows.append([name.removeprefix("image_metrics_") + " (reference)", fmt(references.get("heldout_loss_base"), 5) if name.endswith("base") else "-",
                         "-", "-", "-", "-", fmt(ref["psnr"], 2), fmt(ref["ssim"], 3), fmt(ref["p_twemoji"], 3)])  # fmt: skip
    print(format_table(headers, rows))
    if summary["lr_sweep"]:
        lrs = sorted({lr for s in summary["lr_sweep"].values() for lr in s["final_loss"]}, key=float)
        print(f"\n## Learning-rate sweep (seed {args.seeds[0]}): final held-out loss; tuned = each at its best lr vs LoRA at its best")
        rows = [[labels[k], *(fmt(s["final_loss"].get(lr), 5) for lr in lrs), f"{s['best_lr']:g}",
                 speedup_text(s["vs_lora_best_lr"]) if "vs_lora_best_lr" in s else "-"] for k, s in summary["lr_sweep"].items()]  # fmt: skip
        print(format_table(["method", *(f"lr {float(lr):g}" for lr in lrs), "best lr", "tuned speed-up vs LoRA"], rows))


def plot(summary: dict, runs: list[dict], steps: list[int], args, labels: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for key, row in summary["methods"].items():
        curves = np.array([r["heldout_loss"] for r in runs if r["method"] == key and r["lr"] == args.lr])
        (line,) = ax.plot(steps, row["mean_curve"], label=labels[key], lw=1.6, ls="-" if key in ("lora", "delta") else "--")
        if len(curves) > 1:
            ax.fill_between(steps, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.12)
    lora_final = summary["methods"]["lora"]["final_loss_mean"]
    ax.axhline(lora_final, color="grey", lw=0.8, ls=":", label="LoRA final")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out denoising loss (v-MSE)")
    # From the lowest point of any curve (not only the finals: curves can dip below them) to the highest after step 0.
    shown = [c for row in summary["methods"].values() for c in row["mean_curve"][1:]]
    ax.set_ylim(min(shown) - 0.05 * (max(shown) - min(shown)), max(shown) * 1.02)
    ax.set_title(f"Noto → Twemoji, held-out names: mean of seeds {','.join(map(str, args.seeds))} (band: min-max)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sample_grid(rows: list[tuple[str, np.ndarray]], count: int, path: Path) -> None:
    """One row per model (label on the left), `count` held-out prompts per row, 64 px each."""
    from PIL import ImageDraw

    size, label_width = rows[0][1].shape[1], 150
    grid = Image.new("RGB", (label_width + size * count, size * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (label, images) in enumerate(rows):
        draw.text((4, i * size + size // 2 - 6), label, fill="black")
        for j, image in enumerate(images[:count]):
            grid.paste(Image.fromarray(image), (label_width + j * size, i * size))
    # 256 colours keep the PNG small (the pictures illustrate; the metrics are computed on the full images).
    grid.quantize(256).save(path, optimize=True)


def previous_runs(json_path: Path, rows_path: Path, args, plan) -> tuple[list[dict], dict[str, np.ndarray]]:
    """With --resume: the runs of the plan an earlier invocation with the same settings finished, and their sample rows."""
    if not (args.resume and json_path.is_file()):
        return [], {}
    old = json.loads(json_path.read_text())
    mismatch = [k for k in RESULT_SETTINGS if old["settings"].get(k) != getattr(args, k)]
    if mismatch:
        raise SystemExit(f"--resume: {json_path} was written with other settings ({', '.join(mismatch)}); use another --tag")
    wanted = {(m.key, seed, lr) for m, seed, lr in plan}
    runs = [r for r in old["runs"] if (r["method"], r["seed"], r["lr"]) in wanted]
    rows = dict(np.load(rows_path)) if rows_path.is_file() else {}
    print(f"--resume: {len(runs)} of {len(plan)} runs already in {json_path}", flush=True)
    return runs, rows


def write_json(path: Path, argv, args, device, steps, references, runs, started) -> dict:
    """(Re)writes the results file after every run, so a run cut short keeps what it finished; returns the summary."""
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
    path.write_text(json.dumps(result, indent=2) + "\n")
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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
    print(f"base {args.base}; {len(data.train_latents)} train / {len(data.heldout_captions)} held-out images; "
          f"style classifier held-out accuracy: Noto {np.mean(classifier.twemoji_probability(data.noto_heldout) < 0.5):.3f}, "
          f"Twemoji {np.mean(classifier.twemoji_probability(data.heldout_images) > 0.5):.3f}", flush=True)  # fmt: skip

    truth = data.heldout_images[: data.image_count]
    base_images = generate(pipe, pipe.unet, data, args, device)
    references = {
        "heldout_loss_base": heldout_loss(pipe.unet, noise_scheduler, data),
        "image_metrics_base": image_metrics(base_images, truth, classifier),
        "image_metrics_vae_roundtrip": image_metrics(decode_latents(pipe.vae, data.heldout_latents[: data.image_count]), truth, classifier),
        "classifier_heldout_accuracy": {
            "noto": float(np.mean(classifier.twemoji_probability(data.noto_heldout) < 0.5)),
            "twemoji": float(np.mean(classifier.twemoji_probability(data.heldout_images) > 0.5)),
        },
    }
    steps = [0] + [s for s in range(1, args.steps + 1) if s % args.eval_every == 0 or s == args.steps]
    plan = [(m, seed, args.lr) for seed in args.seeds for m in args.methods]
    plan += [(m, args.seeds[0], lr) for lr in args.lr_sweep if lr != args.lr for m in args.methods]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The sample rows of finished runs, kept for --resume (a cache, not a result).
    json_path, rows_path = out_dir / f"convergence_{args.tag}.json", out_dir / f".convergence_{args.tag}_samples.npz"
    runs, sample_rows = previous_runs(json_path, rows_path, args, plan)
    done = {(r["method"], r["seed"], r["lr"]) for r in runs}
    for n, (m, seed, lr) in enumerate(plan, start=1):
        if (m.key, seed, lr) in done:
            continue
        run = train_run(pipe, noise_scheduler, data, m, seed, lr, args, device, want_images=lr == args.lr)
        images = run.pop("images")
        if images is not None:
            run["image_metrics"] = image_metrics(images, truth, classifier)
            if seed == args.seeds[0]:
                sample_rows[m.key] = images[:GRID_COLUMNS]
                np.savez_compressed(rows_path, **sample_rows)
        runs.append(run)
        print(f"[{n}/{len(plan)}] {m.key:8s} seed {seed} lr {lr:g}: held-out loss {run['heldout_loss'][0]:.5f} -> "
              f"{run['heldout_loss'][-1]:.5f} ({run['train_seconds']:.0f} s)", flush=True)  # fmt: skip
        write_json(json_path, argv, args, device, steps, references, runs, started)

    summary = write_json(json_path, argv, args, device, steps, references, runs, started)
    print_tables(summary, references, args, labels)
    if not args.no_plots:
        plot(summary, runs, steps, args, labels, out_dir / f"convergence_{args.tag}.png")
        rows = [("true Twemoji", truth), ("base (Noto)", base_images)]
        rows += [(labels[m.key], sample_rows[m.key]) for m in args.methods if m.key in sample_rows]
        sample_grid(rows, min(GRID_COLUMNS, data.image_count), out_dir / f"convergence_{args.tag}_samples.png")
    print(f"\nwrote {json_path} ({(time.perf_counter() - started) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
