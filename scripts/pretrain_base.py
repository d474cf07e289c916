"""Pretrain the embedded default base model: a tiny Stable-Diffusion-shaped pipeline drawn on Noto emoji.

The base has SD's own VAE factor: 64 px images become 8×8×4 latents (four VAE levels), which makes each UNet step
several times cheaper than 16×16 latents and lets a base that draws be trained on one CPU core. The commands that
made ``assets/tiny-emoji-sd`` (one core each, ``chrt -f 1`` so other work cannot slow it; the ablation table and
the measured curve are in BENCHMARKS.md, "The embedded base"):

    python scripts/build_emoji_dataset.py
    # 1. the VAE alone (14 minutes, then continued for 26: the log has its held-out PSNR every few minutes)
    nohup chrt -f 1 python scripts/pretrain_base.py --vae_only --vae_minutes 14 --max_minutes 15 --num_threads 1 \
        --eval_minutes 3 --log_jsonl data/abl/vae_A.jsonl --output_dir data/abl/vae_A > data/abl/vae_A.log 2>&1 &
    nohup chrt -f 1 python scripts/pretrain_base.py --vae_only --vae_from data/abl/vae_A --vae_minutes 26 --max_minutes 27 \
        --num_threads 1 --eval_minutes 5 --log_jsonl data/abl/vae_A2.jsonl --output_dir data/abl/vae_A2 > data/abl/vae_A2.log 2>&1 &
    # 2. text encoder + UNet on its frozen latents, retrieval logged every 10 minutes, a checkpoint every 10
    nohup chrt -f 1 python scripts/pretrain_base.py --vae_from data/abl/vae_A2 --vae_minutes 0 --max_minutes 95 \
        --num_threads 1 --eval_minutes 10 --checkpoint_minutes 10 --unet_channels 64,128,256 --attention_levels 1,1,0 \
        --log_jsonl data/long/base.jsonl --output_dir data/long/tiny-emoji-sd --checkpoint_dir data/long/checkpoint \
        --sample_grid data/long/samples.png > data/long/base.log 2>&1 &
    python scripts/pretrain_base.py ... --resume      # after a crash: the UNet phase goes on from the checkpoint

Continuing a base on a later machine (the same architecture and tokenizer; ``--vae_train decoder`` freezes the
VAE encoder so the latents, and the UNet trained on them, stay valid while the decoder sharpens):

    nohup chrt -f 1 python scripts/pretrain_base.py --init_from assets/tiny-emoji-sd --vae_train decoder \
        --vae_minutes 15 --max_minutes 90 --num_threads 1 --eval_minutes 10 --output_dir data/tiny-emoji-sd-next &

(``chrt -f 1`` gives the run one core to itself on a machine where other work runs: under Linux's autogroup
scheduling ``nice`` does not.) ``--eval_minutes`` logs the tested retrieval measure of the EMA weights (48 train
prompts, 8 steps, guidance 3, seed 0) with the CPU-minutes spent, so candidates are compared per CPU-minute;
``scripts/evaluate_embedded_default.py --base <folder>`` measures a finished candidate and draws its pictures, and
``benchmarks/pretrain_throughput.py`` times the step itself (eager / channels_last / torch.compile). Every run
writes the command, the machine, the wall time and what it continued from into ``training_info.json``.

Phases, each time-boxed (the step count is re-fitted to the time left while it runs):
1. a byte-level BPE tokenizer in CLIP's conventions (``</w>`` suffix, ``<|startoftext|>`` /
   ``<|endoftext|>``, lower case) trained on the captions, saved as a ``CLIPTokenizer``;
2. an ``AutoencoderKL`` (64 px -> 8x8x4 latents with the default four levels); then it is frozen and the
   latents of the whole Noto set are computed once;
3. the ``CLIPTextModel`` and an SD-shaped ``UNet2DConditionModel`` trained jointly from scratch with
   v-prediction (as SD-2), min-SNR weighting, 10 % caption dropout for classifier-free guidance,
   a warm-up + cosine learning rate and an EMA of the weights.
The result is saved atomically as a standard ``StableDiffusionPipeline`` folder (safetensors, no
safety checker) with a DPM-Solver++ scheduler, and a sample grid is written to ``--sample_grid``.
The base model is trained on every Noto emoji (both splits): the held-out split is for the adapters.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reslora_diffusers.atomic import atomic_write_folder  # noqa: E402
from reslora_diffusers.examples.emoji_data import load_split  # noqa: E402
from reslora_diffusers.examples.emoji_eval import reconstruction_psnr  # noqa: E402

CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SAMPLE_PROMPTS = [
    "french fries", "fish", "flag: egypt", "red apple", "grinning face", "dog face", "pizza", "rocket",
    "flag: japan", "sun", "hot beverage", "birthday cake", "smiling face with heart-shaped eyes", "turtle",
    "automobile", "snowman", "heavy black heart", "octopus", "penguin", "christmas tree",
]
ATTRIBUTION = """# Attribution and licences

This model (VAE, text encoder, tokenizer and UNet, all trained from scratch by
`scripts/pretrain_base.py`) was trained on the Noto Emoji images:

- Noto Emoji graphics: Copyright Google Inc., licensed under the Apache License 2.0.
- Images and names taken from the npm package `emoji-datasource-google` 16.0.0 by Iamcal
  (Cal Henderson), MIT licence.
- The Twemoji style used for fine-tuning (not in this model): Copyright Twitter, Inc. / X Corp. and
  other contributors, CC-BY 4.0.
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Pretrain the tiny emoji Stable Diffusion base model from scratch.")
    p.add_argument("--data_dir", default="data/emoji/noto", help="Noto imagefolder from build_emoji_dataset.py")
    p.add_argument("--output_dir", default="assets/tiny-emoji-sd", help="where the pipeline folder is written")
    p.add_argument("--sample_grid", default="data/pretrain_samples.png", help="PNG grid of samples after training")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--num_threads", type=int, default=2,
                   help="torch CPU threads; on a shared, busy CPU 1 thread was 5x faster than 2 (no spin-waiting)")
    p.add_argument("--max_minutes", type=float, default=46.0, help="wall-clock budget of the whole run")
    p.add_argument("--vae_minutes", type=float, default=9.0, help="part of the budget for the VAE phase")
    p.add_argument("--vae_steps", type=int, default=20000, help="upper bound on VAE steps (time box may cut it)")
    p.add_argument("--unet_steps", type=int, default=100000, help="upper bound on UNet steps (time box may cut it)")
    p.add_argument("--vae_batch_size", type=int, default=16, help="VAE batch size")
    p.add_argument("--batch_size", type=int, default=32, help="UNet / text encoder batch size")
    p.add_argument("--vae_lr", type=float, default=1e-3, help="VAE peak learning rate")
    p.add_argument("--lr", type=float, default=8e-4, help="UNet and text encoder peak learning rate")
    p.add_argument("--warmup_steps", type=int, default=100, help="linear warm-up steps of each phase")
    p.add_argument("--ema_decay", type=float, default=0.995, help="EMA decay of UNet/text encoder (0: off)")
    p.add_argument("--uncond_prob", type=float, default=0.1, help="caption dropout for classifier-free guidance")
    p.add_argument("--snr_gamma", type=float, default=5.0, help="min-SNR loss weighting gamma (0: off)")
    p.add_argument("--vocab_size", type=int, default=2048, help="tokenizer vocabulary size incl. 512 byte tokens")
    p.add_argument("--max_length", type=int, default=20, help="tokenizer model_max_length / text positions")
    p.add_argument("--unet_channels", default="32,64,128", help="UNet block_out_channels")
    p.add_argument("--vae_channels", default="16,32,64,128",
                   help="VAE block_out_channels: 4 levels downsample 64 px by 8 to 8x8 latents (as SD's VAE), 3 levels by 4")
    p.add_argument("--latent_channels", type=int, default=4, help="VAE latent channels (4: SD-1's layout)")
    p.add_argument("--vae_layers", type=int, default=1, help="VAE layers_per_block (the decoder gets one more)")
    p.add_argument("--vae_edge_weight", type=float, default=0.0,
                   help="weight of an L1 loss on the images' horizontal/vertical differences (sharper edges; 0: off)")
    p.add_argument("--vae_only", action="store_true", help="stop after the VAE phase and save only the VAE (ablations)")
    p.add_argument("--vae_from", default=None,
                   help="start from the VAE of this pipeline (or vae/) folder (--vae_minutes 0: use it as it is); tokenizer, text encoder and UNet are new")
    p.add_argument("--attention_levels", default="1,1,0",
                   help="per UNet level, 1 = CrossAttn blocks, 0 = plain ResNet blocks (the SD layout has attention on all but the last)")
    p.add_argument("--heads", type=int, default=4, help="attention heads per UNet transformer (diffusers' attention_head_dim)")
    p.add_argument("--unet_layers", type=int, default=1, help="UNet layers_per_block")
    p.add_argument("--channels_last", action="store_true", help="UNet in channels_last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (pays back only on long runs)")
    p.add_argument("--eval_minutes", type=float, default=0.0,
                   help="every this many minutes, the EMA model's retrieval (the tested measure) is logged to --log_jsonl (0: off)")
    p.add_argument("--log_jsonl", default=None, help="JSON-lines log of the evaluations (VAE PSNR, retrieval) with CPU-minutes")
    p.add_argument("--text_hidden", type=int, default=128, help="text encoder width = UNet cross_attention_dim")
    p.add_argument("--text_layers", type=int, default=3, help="text encoder layers")
    p.add_argument("--init_from", default=None,
                   help="continue from this pipeline folder (tokenizer, VAE, text encoder, UNet); the width flags are then ignored")
    p.add_argument("--vae_extra_data", default=None,
                   help="an imagefolder whose train-split images the VAE also trains on (e.g. Twemoji, so the decoder can draw "
                        "the style an adapter moves towards); the UNet and the held-out PSNR stay on --data_dir")
    p.add_argument("--vae_train", choices=("full", "decoder"), default="full",
                   help="'decoder' freezes the VAE encoder, so the latents (and a UNet trained on them) stay valid")
    p.add_argument("--checkpoint_dir", default="data/pretrain_checkpoint",
                   help="UNet-phase checkpoint (safetensors + JSON), rewritten atomically every --checkpoint_minutes")
    p.add_argument("--checkpoint_minutes", type=float, default=10.0, help="minutes between checkpoints")
    p.add_argument("--resume", action="store_true",
                   help="continue the UNet phase from --checkpoint_dir (VAE phase skipped; needs the same --init_from/widths)")
    args = p.parse_args(argv)
    args.unet_channels = tuple(int(c) for c in args.unet_channels.split(","))
    args.vae_channels = tuple(int(c) for c in args.vae_channels.split(","))
    args.attention_levels = tuple(int(c) for c in args.attention_levels.split(","))
    if len(args.unet_channels) != len(args.attention_levels) or not 2 <= len(args.unet_channels) <= 4:
        p.error("--unet_channels and --attention_levels need the same number (2-4) of comma-separated values")
    if len(args.vae_channels) not in (3, 4):
        p.error("--vae_channels needs three (factor 4) or four (factor 8) comma-separated widths")
    if not 0 <= args.vae_minutes < args.max_minutes:
        p.error("--vae_minutes must be at least 0 and below --max_minutes")
    if args.vae_minutes == 0 and args.init_from is None and args.vae_from is None:
        p.error("--vae_minutes 0 (no VAE training) needs --init_from or --vae_from with a trained VAE")
    if args.vae_from and args.init_from:
        p.error("--vae_from and --init_from exclude each other (--init_from already brings a VAE)")
    if args.resume and not (args.init_from or args.vae_from):
        p.error("--resume needs --init_from or --vae_from (the checkpoint holds the UNet phase, not the VAE)")
    if args.vae_train == "decoder" and args.init_from is None and args.vae_from is None:
        p.error("--vae_train decoder needs --init_from or --vae_from (the frozen encoder comes from there)")
    return args


class EvalLog:
    """JSON lines of the measurements taken while training (for the ablation table): what, when, how far."""

    def __init__(self, path, every_minutes: float):
        self.path = Path(path) if path else None
        self.every = every_minutes * 60
        self.started, self.cpu_started = time.time(), time.process_time()
        self.last = time.time()

    def due(self) -> bool:
        if self.every <= 0 or time.time() - self.last < self.every:
            return False
        self.last = time.time()
        return True

    def write(self, **fields) -> None:
        fields = {"wall_minutes": round((time.time() - self.started) / 60, 2),
                  "cpu_minutes": round((time.process_time() - self.cpu_started) / 60, 2), **fields}
        print("eval:", json.dumps(fields), flush=True)
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(fields) + "\n")


def edge_l1(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical pixel differences: a cheap push towards sharp outlines."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return F.l1_loss(dx(recon), dx(x)) + F.l1_loss(dy(recon), dy(x))


class TimeBox:
    """Fits a phase's step count to its time budget, re-estimated from the measured step time."""

    def __init__(self, max_steps: int, seconds: float, first_step: int = 0):
        self.total, self.max_steps, self.deadline, self.start = max_steps, max_steps, time.time() + seconds, None
        self.first_step = first_step  # > 0 when a resumed run continues an earlier one

    def update(self, step: int) -> None:
        if step == self.first_step + 5:  # the first steps are slow (allocations); measure from here
            self.start = (time.time(), step)
        elif self.start is not None and step % 25 == 0:
            per_step = (time.time() - self.start[0]) / (step - self.start[1])
            left = max(self.deadline - time.time(), 0.0)
            self.total = max(step + 1, min(self.max_steps, step + int(left / per_step)))

    def lr_factor(self, step: int, warmup: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(self.total - warmup, 1), 1.0)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def train_tokenizer(captions: list[str], out_dir: Path, vocab_size: int, max_length: int):
    """Train a byte-level BPE in CLIP's layout and return it loaded as a ``CLIPTokenizer``."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  end_of_word_suffix="</w>", min_frequency=1, show_progress=False)
    bpe.train_from_iterator(captions, trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]

    # CLIP's order: 256 byte symbols, the same with "</w>", the merge results, then the two special tokens.
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    tokens += [BOS, EOS]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(vocab=str(out_dir / "vocab.json"), merges=str(out_dir / "merges.txt"), model_max_length=max_length)
    tok.save_pretrained(out_dir)
    return CLIPTokenizer.from_pretrained(out_dir)


def load_images(records: list[dict]) -> torch.Tensor:
    """All images as one uint8 tensor N×3×64×64."""
    arr = np.stack([np.asarray(Image.open(r["path"]).convert("RGB")) for r in tqdm(records, desc="load images")])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def to_model_range(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 127.5 - 1.0


def make_vae(channels, latent_channels=4, layers=1):
    from diffusers import AutoencoderKL

    levels = len(channels)  # each level after the first halves the resolution: 4 levels = SD's factor 8
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, sample_size=64, layers_per_block=layers,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=channels, norm_num_groups=8,
    )


def make_unet(channels, cross_dim, latent_size, latent_channels=4, attention_levels=(1, 1, 0), heads=4, layers=1):
    from diffusers import UNet2DConditionModel

    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels))
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels, layers_per_block=layers,
        down_block_types=down, mid_block_type="UNetMidBlock2DCrossAttn", up_block_types=up,
        block_out_channels=channels, cross_attention_dim=cross_dim, attention_head_dim=heads, norm_num_groups=16,
    )


def make_text_encoder(tokenizer, hidden: int, layers: int, max_length: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=max_length, projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def train_vae(vae, images_u8, args, device, seconds, log=None, heldout_u8=None):
    """Reconstruction (L1 + MSE) with a tiny KL term; returns the trained VAE in eval mode.

    With ``--vae_train decoder`` the encoder stays frozen: the latents do not move, so a UNet already
    trained on them stays valid while the decoder learns to reconstruct sharper images.
    """
    if args.vae_train == "decoder":
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    trained = [q for q in vae.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trained, lr=args.vae_lr, weight_decay=0.0)
    box = TimeBox(args.vae_steps, seconds)
    gen = torch.Generator().manual_seed(args.seed)
    vae.train()
    step, bar = 0, tqdm(desc="vae", unit="step")
    while step < box.total:
        idx = torch.randint(0, len(images_u8), (args.vae_batch_size,), generator=gen)
        x = to_model_range(images_u8[idx]).to(device)
        if torch.rand((), generator=gen) < 0.5:  # flips only help the autoencoder generalise
            x = x.flip(-1)
        with torch.set_grad_enabled(args.vae_train == "full"):
            posterior = vae.encode(x).latent_dist
            z = posterior.sample()
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        if args.vae_edge_weight > 0:
            loss = loss + args.vae_edge_weight * edge_l1(recon, x)
        for g in opt.param_groups:
            g["lr"] = args.vae_lr * box.lr_factor(step, args.warmup_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        step += 1
        box.update(step)
        bar.update(1)
        bar.total = box.total
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if log is not None and heldout_u8 is not None and log.due():
            log.write(phase="vae", step=step, heldout_psnr_db=round(reconstruction_psnr(vae.eval(), heldout_u8, device), 2))
            vae.train()
    bar.close()
    print(f"vae: {step} steps", flush=True)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae, images_u8, device, batch=128):
    """Posterior mean and std of every image, computed once (the VAE is frozen from here on)."""
    means, stds = [], []
    for i in tqdm(range(0, len(images_u8), batch), desc="encode latents"):
        dist = vae.encode(to_model_range(images_u8[i:i + batch]).to(device)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def save_checkpoint(directory: Path, params, ema, opt, step: int, gen: torch.Generator, order: torch.Tensor) -> None:
    """Everything the UNet phase needs to continue, as safetensors + JSON (no pickle), swapped in atomically."""
    from safetensors.torch import save_file

    tensors = {f"param.{i}": p.detach().contiguous() for i, p in enumerate(params)}
    if ema is not None:
        tensors.update({f"ema.{i}": e.contiguous() for i, e in enumerate(ema)})
    for i, p in enumerate(params):
        for key, value in opt.state.get(p, {}).items():
            tensors[f"adam.{i}.{key}"] = value.detach().reshape(-1) if value.ndim == 0 else value.detach().contiguous()
    tensors["generator_state"] = gen.get_state()
    tensors["epoch_order"] = order.contiguous()

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / "state.safetensors"))
        (folder / "progress.json").write_text(json.dumps({"step": step, "saved_at": time.time()}) + "\n")

    atomic_write_folder(directory, write)


def load_checkpoint(directory: Path, params, ema, opt, gen: torch.Generator) -> tuple[int, torch.Tensor]:
    """Restores what ``save_checkpoint`` wrote; returns (step, the rest of the epoch's order)."""
    from safetensors.torch import load_file

    tensors = load_file(str(directory / "state.safetensors"))
    step = json.loads((directory / "progress.json").read_text())["step"]
    with torch.no_grad():
        for i, p in enumerate(params):
            if tensors[f"param.{i}"].shape != p.shape:
                raise SystemExit(f"error: {directory} was saved for another model (parameter {i} has another shape)")
            p.copy_(tensors[f"param.{i}"])
            if ema is not None:
                ema[i].copy_(tensors[f"ema.{i}"])
            state = {key.split(".", 2)[2]: value for key, value in tensors.items() if key.startswith(f"adam.{i}.")}
            if state:
                state["step"] = state["step"].reshape(())
                opt.state[p] = state
    gen.set_state(tensors["generator_state"])
    return step, tensors["epoch_order"]


def train_unet(unet, text_encoder, ids, empty_ids, mean, std, scaling, scheduler, args, device, seconds,
               log=None, evaluate=None):
    """Joint UNet + text encoder training; returns the number of steps done (this run and resumed ones).

    ``evaluate()`` (the retrieval measure) runs on the EMA weights whenever ``log`` says it is due; the
    training weights and the training generator are left exactly as they were.
    """
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema = [p.detach().clone() for p in params] if args.ema_decay > 0 else None
    gen = torch.Generator().manual_seed(args.seed + 1)
    n, step, order = len(ids), 0, torch.empty(0, dtype=torch.long)
    checkpoint_dir = Path(args.checkpoint_dir)
    if args.resume:
        step, order = load_checkpoint(checkpoint_dir, params, ema, opt, gen)
        print(f"resumed the UNet phase at step {step} from {checkpoint_dir}", flush=True)
    box = TimeBox(args.unet_steps, seconds, first_step=step)
    last_save = time.time()
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    unet.train()
    text_encoder.train()
    bar = tqdm(desc="unet", unit="step", initial=step)
    while step < box.total:
        if len(order) < args.batch_size:  # reshuffle once per epoch
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        idx, order = order[: args.batch_size], order[args.batch_size:]
        # sample the latents from the frozen VAE posterior
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen).to(device)) * scaling
        # drop some captions so the model also learns the unconditional prediction
        tokens = ids[idx].clone()
        drop = (torch.rand(len(idx), generator=gen) < args.uncond_prob).to(device)
        tokens[drop] = empty_ids
        # add noise at random timesteps
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen).to(device)
        noisy = scheduler.add_noise(latents, noise, t)
        target = scheduler.get_velocity(latents, noise, t)
        # predict the velocity
        pred = unet(noisy, t, text_encoder(tokens)[0]).sample
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        if args.snr_gamma > 0:
            snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
            per_sample = per_sample * torch.clamp(snr, max=args.snr_gamma) / (snr + 1)
        loss = per_sample.mean()
        for g in opt.param_groups:
            g["lr"] = args.lr * box.lr_factor(step, args.warmup_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        step += 1
        box.update(step)
        bar.update(1)
        bar.total = box.total
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{opt.param_groups[0]['lr']:.1e}")
        if time.time() - last_save > args.checkpoint_minutes * 60:
            save_checkpoint(checkpoint_dir, params, ema, opt, step, gen, order)
            last_save = time.time()
        if log is not None and evaluate is not None and log.due():
            with ema_weights(params, ema):
                log.write(phase="unet", step=step, samples=step * args.batch_size, loss=round(loss.item(), 4), **evaluate())
            unet.train()
            text_encoder.train()
    bar.close()
    save_checkpoint(checkpoint_dir, params, ema, opt, step, gen, order)
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
    return step


class ema_weights:
    """Context manager: the EMA weights in the model for a while, the training weights back afterwards."""

    def __init__(self, params, ema):
        self.params, self.ema = params, ema

    def __enter__(self):
        if self.ema is not None:
            self.saved = [p.detach().clone() for p in self.params]
            with torch.no_grad():
                for p, e in zip(self.params, self.ema):
                    p.copy_(e)

    def __exit__(self, *exc):
        if self.ema is not None:
            with torch.no_grad():
                for p, s in zip(self.params, self.saved):
                    p.copy_(s)


def make_pipeline(vae, text_encoder, tokenizer, unet):
    """The in-memory StableDiffusionPipeline the base is saved as (DPM-Solver++, v-prediction)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction", algorithm_type="dpmsolver++", solver_order=2,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@torch.no_grad()
def retrieval_of(pipe) -> dict:
    """The tested measure (tests/test_embedded_default.py): 48 train prompts, 8 steps, guidance 3, seed 0."""
    from reslora_diffusers.examples.emoji_eval import load_reference, retrieval_ranks, summarize_ranks

    pipe.unet.eval()
    pipe.text_encoder.eval()
    pipe.set_progress_bar_config(disable=True)
    reference = load_reference()
    prompts = reference.prompts("train", 48)
    images = pipe(prompts, num_inference_steps=8, guidance_scale=3.0, height=64, width=64,
                  generator=torch.Generator().manual_seed(0)).images
    return summarize_ranks(retrieval_ranks(images, prompts, reference))


def save_pipeline(out_dir: Path, vae, text_encoder, tokenizer, unet, tok_dir: Path, info: dict) -> None:
    """Save a StableDiffusionPipeline folder through a temporary sibling folder, then swap it in.

    ``save_pretrained`` of a tokenizers-backed CLIPTokenizer writes only ``tokenizer.json``; the CLIP
    ``vocab.json`` / ``merges.txt`` from ``tok_dir`` are copied beside it for other CLIP loaders.
    """
    pipe = make_pipeline(vae, text_encoder, tokenizer, unet)

    def write(folder: Path) -> None:
        pipe.save_pretrained(folder, safe_serialization=True)
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(tok_dir / name, folder / "tokenizer" / name)
        (folder / "ATTRIBUTION.md").write_text(ATTRIBUTION, encoding="utf-8")
        (folder / "training_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    atomic_write_folder(out_dir, write)


@torch.no_grad()
def sample_grid(model_dir: Path, prompts: list[str], path: Path, device, seed: int) -> None:
    """Reload the saved folder with plain diffusers and draw one image per prompt into a grid."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir).to(device)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(seed)
    images = pipe(prompts, num_inference_steps=20, guidance_scale=3.0, generator=gen, height=64, width=64).images
    cols = 5
    grid = Image.new("RGB", (64 * cols, 64 * math.ceil(len(images) / cols)), "white")
    for i, im in enumerate(images):
        grid.paste(im, (64 * (i % cols), 64 * (i // cols)))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def load_init(folder: Path):
    """Tokenizer, VAE, text encoder and UNet of an earlier base, to continue training it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    previous = folder / "training_info.json"
    lineage = json.loads(previous.read_text()) if previous.is_file() else None
    return tokenizer, vae, text_encoder, unet, lineage


def machine_description(args) -> dict:
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"device": args.device, "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": args.num_threads,
            "torch": torch.__version__, "python": platform.python_version()}


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    from diffusers import DDPMScheduler

    records = load_split(args.data_dir, split=None)
    captions = [r["text"] for r in records]
    images_u8 = load_images(records)
    heldout_u8 = images_u8[[i for i, r in enumerate(records) if r["split"] == "heldout"]]

    tok_dir = Path(tempfile.mkdtemp(prefix="emoji-tokenizer-"))
    lineage = None
    if args.init_from:
        tokenizer, vae, text_encoder, unet, lineage = load_init(Path(args.init_from))
        tokenizer.save_pretrained(tok_dir)
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(Path(args.init_from) / "tokenizer" / name, tok_dir / name)
        vae, text_encoder, unet = vae.to(device), text_encoder.to(device), unet.to(device)
    else:
        tokenizer = train_tokenizer(captions, tok_dir, args.vocab_size, args.max_length)
        if args.vae_from:
            from diffusers import AutoencoderKL

            vae_dir = Path(args.vae_from) / "vae" if (Path(args.vae_from) / "vae").is_dir() else Path(args.vae_from)
            vae = AutoencoderKL.from_pretrained(vae_dir).to(device)
        else:
            vae = make_vae(args.vae_channels, args.latent_channels, args.vae_layers).to(device)
    log = EvalLog(args.log_jsonl, args.eval_minutes)
    max_length = tokenizer.model_max_length
    enc = tokenizer(captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    ids = enc.input_ids.to(device)
    n_long = sum(len(x) > max_length for x in tokenizer(captions).input_ids)
    empty_ids = tokenizer([""], padding="max_length", max_length=max_length, return_tensors="pt").input_ids.to(device)
    print(f"tokenizer: {len(tokenizer)} tokens, {n_long} captions truncated; 'french fries' -> "
          f"{tokenizer.tokenize('french fries')}", flush=True)

    # phase 1: the autoencoder (skipped on --resume: the checkpointed run already trained it)
    psnr_before = reconstruction_psnr(vae.eval(), heldout_u8, device) if args.init_from else None
    vae_seconds = 0.0 if args.resume else args.vae_minutes * 60 - (time.time() - started)
    if vae_seconds > 0:
        vae_images = images_u8
        if args.vae_extra_data:  # never its held-out split: those images are what adapters are judged on
            extra = load_split(args.vae_extra_data, split="train")
            vae_images = torch.cat([images_u8, load_images(extra)])
            print(f"vae: {len(images_u8)} + {len(extra)} images ({args.vae_extra_data})", flush=True)
        vae = train_vae(vae, vae_images, args, device, vae_seconds, log, heldout_u8)
    vae = vae.eval().requires_grad_(False)
    psnr_after = reconstruction_psnr(vae, heldout_u8, device)
    print(f"vae: held-out reconstruction PSNR {psnr_after:.2f} dB (before: {psnr_before})", flush=True)
    mean, std = encode_all(vae, images_u8, device)
    if args.init_from or args.vae_train == "decoder" or (args.vae_from and vae_seconds <= 0):  # latents unchanged: keep the scaling
        scaling = float(vae.config.scaling_factor)
    else:
        scaling = float(1.0 / mean.std())
        vae.register_to_config(scaling_factor=scaling)
    vae_minutes = (time.time() - started) / 60
    print(f"vae done after {vae_minutes:.1f} min; latent scaling_factor {scaling:.4f}", flush=True)
    log.write(phase="vae", heldout_psnr_db=round(psnr_after, 2), final=True)
    vae_lineage = None
    if args.vae_from and (Path(args.vae_from) / "training_info.json").is_file():
        vae_lineage = json.loads((Path(args.vae_from) / "training_info.json").read_text())
    if args.vae_only:
        vae.save_pretrained(Path(args.output_dir) / "vae", safe_serialization=True)
        vae_info = {"command": "python scripts/pretrain_base.py " + " ".join(sys.argv[1:] if argv is None else argv),
                    "machine": machine_description(args), "minutes": round((time.time() - started) / 60, 2),
                    "vae_heldout_psnr_db": round(psnr_after, 2), "continued_from": vae_lineage}
        (Path(args.output_dir) / "training_info.json").write_text(json.dumps(vae_info, indent=2) + "\n")
        print(f"saved the VAE to {args.output_dir}/vae", flush=True)
        return

    # phase 2: text encoder + UNet, jointly; keep ~1.5 min for saving and the sample grid
    if not args.init_from:
        text_encoder = make_text_encoder(tokenizer, args.text_hidden, args.text_layers, max_length).to(device)
        latent_size = 64 // 2 ** (len(vae.config.block_out_channels) - 1)
        unet = make_unet(args.unet_channels, args.text_hidden, latent_size, vae.config.latent_channels,
                         args.attention_levels, args.heads, args.unet_layers).to(device)
    if args.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    trained_unet = torch.compile(unet) if args.compile else unet

    def evaluate() -> dict:
        return retrieval_of(make_pipeline(vae, text_encoder, tokenizer, unet))

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="v_prediction")
    seconds = args.max_minutes * 60 - (time.time() - started) - 90
    unet_steps = train_unet(trained_unet, text_encoder, ids, empty_ids, mean, std, scaling, scheduler, args, device,
                            seconds, log, evaluate)

    info = {
        "command": "python scripts/pretrain_base.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "command_args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "machine": machine_description(args),
        "vae_minutes": round(vae_minutes, 2), "unet_steps": unet_steps, "batch_size": args.batch_size,
        "vae_heldout_psnr_db": {"before": None if psnr_before is None else round(psnr_before, 2), "after": round(psnr_after, 2)},
        "total_minutes": round((time.time() - started) / 60, 2), "images": len(records),
        "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in
                       [("vae", vae), ("text_encoder", text_encoder), ("unet", unet)]},
        "continued_from": lineage,
        "vae_from": vae_lineage,  # how the VAE given by --vae_from was made
        "ablation": "BENCHMARKS.md, section 'The embedded base'",
    }
    out_dir = Path(args.output_dir)
    save_pipeline(out_dir, vae.cpu(), text_encoder.eval().cpu(), tokenizer, unet.eval().cpu(), tok_dir, info)
    shutil.rmtree(tok_dir, ignore_errors=True)
    print(f"saved {out_dir} after {info['total_minutes']:.1f} min: {json.dumps(info['parameters'])}", flush=True)
    log.write(phase="final", step=unet_steps, **retrieval_of(make_pipeline(vae, text_encoder, tokenizer, unet)))
    sample_grid(out_dir, [p for p in SAMPLE_PROMPTS if p in set(captions)], Path(args.sample_grid), "cpu", args.seed)
    print(f"sample grid -> {args.sample_grid}", flush=True)


if __name__ == "__main__":
    main()
