"""Measure and picture the embedded default: what the base draws, and how far the demo adapters move it.

    python scripts/evaluate_embedded_default.py                 # needs data/emoji (build_emoji_dataset.py)

Writes ``docs/embedded_default_base.png`` (24 named train-split prompts × 2 seeds beside the true Noto
image), ``docs/demo_adapters.png`` (held-out prompts: base | LoRA | ResLoRA | true Twemoji) and
``docs/embedded_default_report.json`` with the figures the README and the issue tracker quote:
- the base's nearest-Noto retrieval (48 train prompts, 8 DPM-Solver++ steps, guidance 3, seed 0: the
  measure ``tests/test_embedded_default.py`` asserts) and VAE reconstruction PSNR on held-out Noto images;
- for each demo adapter on 48 held-out prompts (20 steps, guidance 3, seed 0): the Twemoji probability of
  the benchmarks' style classifier and the mean absolute pixel change from the base image (0-255); and the
  classifier's probability on the true Twemoji images of those prompts, as they are and through the VAE
  (the ceiling of the measure).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    from reslora_diffusers.cli import OneLineErrorParser

    p = OneLineErrorParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="assets/tiny-emoji-sd", help="base pipeline folder")
    p.add_argument("--adapters", default="assets/demo-adapters", help="folder with lora/ and reslora/ native adapters")
    p.add_argument("--noto_dir", default="data/emoji/noto", help="Noto imagefolder (style classifier, truth column)")
    p.add_argument("--twemoji_dir", default="data/emoji/twemoji", help="Twemoji imagefolder (style classifier, truth column)")
    p.add_argument("--out_dir", default="docs", help="where the PNGs and the JSON report go")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    args = p.parse_args(argv)
    for path in (args.base, args.noto_dir, args.twemoji_dir):
        if not (REPO / path).is_dir():
            p.error(f"not a folder: {path} (the emoji data comes from scripts/build_emoji_dataset.py)")
    return args


def labelled_grid(rows: list[list], labels: list[str], headers: list[str], cell: int = 64, groups: int = 1):
    """Rows of PIL images (one column per header), with a caption under each row, packed `groups` side by side."""
    from PIL import Image, ImageDraw

    label_h, gap = 12, 8
    per_group = (len(rows) + groups - 1) // groups
    group_w = cell * len(headers) + gap
    grid = Image.new("RGB", (group_w * groups, 12 + per_group * (cell + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for g in range(groups):
        for c, header in enumerate(headers):
            draw.text((g * group_w + c * cell + 2, 0), header, fill="black")
    for i, (images, label) in enumerate(zip(rows, labels)):
        g, r = divmod(i, per_group)
        y = 12 + r * (cell + label_h)
        for c, im in enumerate(images):
            grid.paste(im.resize((cell, cell)), (g * group_w + c * cell, y))
        draw.text((g * group_w + 2, y + cell), label[: (cell * len(headers)) // 6], fill="black")
    return grid


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from benchmarks.convergence import load_images, train_style_classifier
    from reslora_diffusers import load_adapter
    from reslora_diffusers.atomic import atomic_write, atomic_write_text
    from reslora_diffusers.examples.emoji_data import load_split
    from reslora_diffusers.examples.emoji_eval import load_reference, reconstruction_psnr, retrieval_ranks, summarize_ranks

    torch.set_num_threads(args.threads)
    out_dir = REPO / args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    pipe = StableDiffusionPipeline.from_pretrained(REPO / args.base)
    pipe.set_progress_bar_config(disable=True)
    reference = load_reference()
    report: dict = {"base": args.base}

    def draw(prompts, steps, seed):
        return pipe(prompts, num_inference_steps=steps, guidance_scale=3.0, height=64, width=64,
                    generator=torch.Generator().manual_seed(seed)).images

    # 1. the base: the tested retrieval measure, then the picture
    train_prompts = reference.prompts("train", 48)
    report["base_retrieval"] = summarize_ranks(retrieval_ranks(draw(train_prompts, 8, 0), train_prompts, reference))
    print(f"base retrieval: {report['base_retrieval']}", flush=True)
    noto = {r["text"]: r for r in load_split(REPO / args.noto_dir, split=None)}
    named = train_prompts[:24]
    seeds = [draw(named, 20, seed) for seed in (0, 1)]
    truth = [Image.open(noto[p]["path"]).convert("RGB") for p in named]
    rows = [[truth[i], seeds[0][i], seeds[1][i]] for i in range(len(named))]
    grid = labelled_grid(rows, named, ["Noto", "seed 0", "seed 1"], groups=4)
    atomic_write(out_dir / "embedded_default_base.png", lambda tmp: grid.save(tmp, format="PNG"))

    # 2. the VAE on held-out Noto images
    heldout_noto = load_images(load_split(REPO / args.noto_dir, "heldout"), 64)
    report["vae_heldout_psnr_db"] = round(reconstruction_psnr(pipe.vae, torch.from_numpy(heldout_noto).permute(0, 3, 1, 2)), 2)
    print(f"VAE held-out PSNR {report['vae_heldout_psnr_db']} dB", flush=True)

    # 3. the demo adapters on held-out prompts
    adapters = REPO / args.adapters
    if (adapters / "lora").is_dir() and (adapters / "reslora").is_dir():
        classifier = train_style_classifier(load_images(load_split(REPO / args.noto_dir, "train"), 64),
                                            load_images(load_split(REPO / args.twemoji_dir, "train"), 64))
        heldout = reference.prompts("heldout", 48)
        base_images = draw(heldout, 20, 0)
        as_array = lambda images: np.stack([np.asarray(im, dtype=np.uint8) for im in images])  # noqa: E731
        results, columns = {"base": {"p_twemoji": float(classifier.twemoji_probability(as_array(base_images)).mean())}}, {}
        for name in ("lora", "reslora"):
            adapter = load_adapter(pipe.unet, adapters / name, text_encoder=pipe.text_encoder)
            images = draw(heldout, 20, 0)
            adapter.remove()
            delta = np.abs(as_array(images).astype(np.float32) - as_array(base_images).astype(np.float32)).mean()
            results[name] = {"p_twemoji": float(classifier.twemoji_probability(as_array(images)).mean()),
                             "mean_abs_change_from_base": float(delta)}
            columns[name] = images
            print(f"{name}: {results[name]}", flush=True)
        # The measure's ceiling: the true Twemoji images of the same prompts, as they are and through the VAE.
        twemoji = {r["text"]: r for r in load_split(REPO / args.twemoji_dir, split=None)}
        true_images = load_images([twemoji[p] for p in heldout], 64)
        with torch.no_grad():
            x = torch.from_numpy(true_images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            decoded = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        through_vae = ((decoded + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        results["twemoji_true"] = {"p_twemoji": float(classifier.twemoji_probability(true_images).mean())}
        results["twemoji_through_vae"] = {"p_twemoji": float(classifier.twemoji_probability(through_vae).mean())}
        print(f"true Twemoji: {results['twemoji_true']}, through the VAE: {results['twemoji_through_vae']}", flush=True)
        report["demo_adapters_heldout"] = results
        shown = heldout[:16]
        rows = [[base_images[i], columns["lora"][i], columns["reslora"][i], Image.open(twemoji[p]["path"]).convert("RGB")]
                for i, p in enumerate(shown)]
        grid = labelled_grid(rows, shown, ["base", "LoRA", "ResLoRA", "Twemoji"], groups=4)
        atomic_write(out_dir / "demo_adapters.png", lambda tmp: grid.save(tmp, format="PNG"))
    report["seconds"] = round(time.time() - started, 1)
    atomic_write_text(out_dir / "embedded_default_report.json", json.dumps(report, indent=2) + "\n")
    print(f"wrote {out_dir}/embedded_default_base.png, demo_adapters.png, embedded_default_report.json", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
