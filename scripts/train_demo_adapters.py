"""Train the two demo adapters the app ships with: a plain LoRA and a ResLoRA, same data, steps, seed and rank.

The exact command that made ``assets/demo-adapters`` (after ``scripts/pretrain_base.py`` made the base):

    python scripts/train_demo_adapters.py

For each adapter it runs ``train_text_to_image.py`` on the embedded base and the Twemoji sample, then
``python -m reslora_diffusers.merge`` for the merge-fidelity report. Of everything a run writes, only what the
app reads is kept (a few hundred kB per adapter):

    assets/demo-adapters/<lora|reslora>/
        reslora_adapter.safetensors, reslora_config.json   the native adapter (load_adapter)
        metrics.jsonl, training_summary.json               the loss curve and how the run went
        training_args.json                                 the flags it was trained with
        diffusers-lora.merge_report.json                   merged vs unmerged fidelity, each way of merging
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from reslora_diffusers.atomic import swap_in_folder  # noqa: E402

KEEP = ("reslora_adapter.safetensors", "reslora_config.json", "metrics.jsonl", "training_summary.json")
REPORT_NAME = "diffusers-lora.merge_report.json"
README = """# Demo adapters

`lora/` (plain LoRA, `res_type=none`) and `reslora/` (ResLoRA, `res_type={res_type}`) were trained by
`scripts/train_demo_adapters.py` with the same data, steps, seed, rank and learning rate, on the embedded base
`assets/tiny-emoji-sd`; `python app/app.py` shows them side by side. Each folder's `training_args.json` has the
exact `train_text_to_image.py` flags, and `{report}` the merge fidelity (`python -m reslora_diffusers.merge`).

Training data: `assets/twemoji-sample`, Twemoji graphics, Copyright Twitter, Inc. / X Corp. and other
contributors, CC-BY 4.0; see `assets/twemoji-sample/ATTRIBUTION.md`.
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the LoRA and ResLoRA demo adapters shipped in assets/demo-adapters.")
    parser.add_argument("--base", default="assets/tiny-emoji-sd", help="Base pipeline folder both adapters are trained on.")
    parser.add_argument("--train_data_dir", default="assets/twemoji-sample", help="Imagefolder (images + metadata.jsonl) to train on.")
    parser.add_argument("--output_dir", default="assets/demo-adapters", help="Where lora/ and reslora/ are written.")
    parser.add_argument("--res_type", default="is", choices=("is", "bs", "ms"), help="The ResLoRA adapter's shortcut.")
    parser.add_argument("--max_train_steps", type=int, default=2000, help="Optimizer steps of each run.")
    parser.add_argument("--train_batch_size", type=int, default=8, help="Batch size of each run.")
    parser.add_argument("--learning_rate", type=float, default=3e-3, help="Learning rate of each run.")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of both adapters (alpha = rank).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of both runs (data order, noise, adapter init) and of the report.")
    parser.add_argument("--merge_method", default="input", choices=("input", "weight", "lstsq"), help="The α estimate the report marks as chosen.")
    args = parser.parse_args(argv)
    for path, what in ((args.base, "base model"), (args.train_data_dir, "training data")):
        if not (REPO / path).is_dir():
            parser.error(f"{what} not found: {path}")
    if args.max_train_steps <= 0 or args.train_batch_size <= 0 or args.rank <= 0:
        parser.error("--max_train_steps, --train_batch_size and --rank must be > 0")
    return args


def training_flags(args: argparse.Namespace, res_type: str, output_dir: Path) -> dict[str, object]:
    """The `train_text_to_image.py` flags of one run: everything but the method is the same for both."""
    return {
        "pretrained_model_name_or_path": args.base,
        "train_data_dir": args.train_data_dir,
        "res_type": res_type,
        "rank": args.rank,
        "lora_alpha": args.rank,
        "max_train_steps": args.max_train_steps,
        "train_batch_size": args.train_batch_size,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "merge_method": args.merge_method,
        "num_validation_images": 0,  # the app is where the adapters are compared
        "checkpointing_steps": args.max_train_steps,
        "report_to": "none",
        "output_dir": str(output_dir),
    }


def run(command: list[str]) -> None:
    print("+ " + " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    output_dir = REPO / args.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    # Beside the output, so the finished folders are moved in with a rename (same file system).
    with tempfile.TemporaryDirectory(prefix=".demo-adapters-", dir=output_dir.parent) as work:
        work = Path(work)
        for name, res_type in (("lora", "none"), ("reslora", args.res_type)):
            start = time.time()
            # Train
            flags = training_flags(args, res_type, work / name)
            run([sys.executable, "train_text_to_image.py"] + [f"--{key}={value}" for key, value in flags.items()])
            # Measure how well it merges
            staged = work / f"{name}.keep"
            staged.mkdir()
            run([
                sys.executable, "-m", "reslora_diffusers.merge", "--base", args.base, "--adapter", str(work / name),
                "--format", "diffusers-lora", "--output", str(work / f"{name}-export"), "--merge_method", args.merge_method,
                "--seed", str(args.seed), "--report", str(staged / REPORT_NAME),
            ])
            # Keep what the app reads, then swap it in
            for file in KEEP:
                shutil.copy2(work / name / file, staged / file)
            flags["output_dir"] = f"{args.output_dir}/{name}"
            (staged / "training_args.json").write_text(json.dumps(flags, indent=2) + "\n")
            destination = swap_in_folder(staged, output_dir / name)
            size = sum(f.stat().st_size for f in destination.iterdir())
            print(f"{name}: {destination} ({size / 1024:.0f} kB) in {time.time() - start:.0f} s", flush=True)
    (output_dir / "README.md").write_text(README.format(res_type=args.res_type, report=REPORT_NAME))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
