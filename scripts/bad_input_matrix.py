#!/usr/bin/env python
"""Runs every bad-input case of the two command lines and writes the table of what each one answers.

    python scripts/bad_input_matrix.py            # prints the table and updates README.md between its markers
    python scripts/bad_input_matrix.py --check    # exits 1 if README.md's table differs from a fresh run

Each case runs in this process (the libraries are imported once), on the embedded default model and data, in a
temporary folder; a few minutes on 2 CPU cores. Temporary paths are shown as `<tmp>`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # the Hub case must not depend on this machine's network
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reslora_diffusers.cli import set_threads  # noqa: E402

MODEL = ROOT / "assets" / "tiny-emoji-sd"
DATA = ROOT / "assets" / "twemoji-sample"
START, END = "<!-- bad-input-matrix:start -->", "<!-- bad-input-matrix:end -->"
QUICK = ["--max_train_steps", "1", "--num_validation_images", "0", "--report_to", "none", "--train_batch_size", "2"]


def load_training_script():
    spec = importlib.util.spec_from_file_location("train_text_to_image", ROOT / "train_text_to_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def answer(call, argv: list[str], tmp: Path, marker: str = "") -> tuple[int, str]:
    """(exit code, the `error:` line, or else the last line printed that contains `marker`) of one command."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = call(argv) or 0
        except SystemExit as exit_info:
            code = exit_info.code
    errors = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
    printed = [line for line in out.getvalue().splitlines() if line.strip() and marker in line]
    text = errors[0] if errors else (printed[-1] if printed else "")
    return code, text.replace(str(tmp), "<tmp>").replace(str(ROOT) + "/", "")


def bad_data(tmp: Path, kind: str) -> Path:
    folder = tmp / f"data-{kind}"
    folder.mkdir()
    (folder / "a.png").write_bytes((next(DATA.glob("*.png"))).read_bytes())
    if kind == "empty":
        (folder / "metadata.jsonl").write_text("")
    elif kind == "invalid_json":
        (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "unterminated}\n')
    elif kind == "corrupt":
        (folder / "a.png").write_bytes(b"not a png")
        (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\n')
    elif kind in ("caption", "copy"):
        (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\n')
    elif kind == "outside":
        (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\n{"file_name": "../a.png", "text": "b"}\n')
    elif kind == "repeats":
        (folder / "1000000000_dog").mkdir()
        (folder / "a.png").rename(folder / "1000000000_dog" / "a.png")
        (folder / "1000000000_dog" / "a.txt").write_text("dog")
    return folder


def user_folder(tmp: Path, name: str) -> Path:
    """A folder of the user's that holds `name` (no training run wrote it)."""
    folder = tmp / f"users-{name.split('/')[0]}"
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("the user's own file")
    return folder


def empty_folder(tmp: Path, name: str) -> Path:
    (tmp / name).mkdir()
    return tmp / name


def training_cases(tmp: Path, used: Path) -> dict[str, list[str]]:
    pickled = tmp / "model.ckpt"
    pickled.write_bytes(b"\x80\x04pickle")
    new = ["--output_dir", str(tmp / "new")]
    data_copy = bad_data(tmp, "copy")
    a_file = tmp / "a-file"
    a_file.write_text("a file, not a folder")
    return {
        "base model path that does not exist": ["--pretrained_model_name_or_path", str(tmp / "nowhere"), *new],
        "base folder that is not a pipeline": ["--pretrained_model_name_or_path", str(DATA), *new],
        "pickled `.ckpt` base": ["--pretrained_model_name_or_path", str(pickled), *new],
        "Hub id without network": ["--pretrained_model_name_or_path", "some-org/some-model", *new],
        "data folder that does not exist": ["--train_data_dir", str(tmp / "no-data"), *new],
        "empty metadata.jsonl": ["--train_data_dir", str(bad_data(tmp, "empty")), *new],
        "invalid JSON in metadata.jsonl": ["--train_data_dir", str(bad_data(tmp, "invalid_json")), *new],
        "images without captions": ["--train_data_dir", str(bad_data(tmp, "no_metadata")), *new],
        "only unreadable images": ["--train_data_dir", str(bad_data(tmp, "corrupt")), *new],
        "caption column that does not exist": ["--train_data_dir", str(bad_data(tmp, "caption")), "--caption_column", "prompt", *new],
        "`--rank 0`": ["--rank", "0", *new],
        "`--res_type xs`": ["--res_type", "xs", *new],
        "`--res_type bs --pre_num 0`": ["--res_type", "bs", "--pre_num", "0", *new],
        "`--learning_rate 1e39`": ["--learning_rate", "1e39", *new],
        "Delta-LoRA with a shortcut": ["--delta_lora_ratio", "0.5", *new],
        "`--resolution 60` (not a multiple of 8)": ["--resolution", "60", *QUICK, *new],
        "`--seed -1`": ["--seed", "-1", *new],
        "`--adam_beta1 1.5`": ["--adam_beta1", "1.5", *new],
        "`--max_grad_norm 0`": ["--max_grad_norm", "0", *new],
        "`--optimizer lion`": ["--optimizer", "lion", *new],
        "`--optimizer schedulefree_adamw --lr_scheduler cosine`": ["--optimizer", "schedulefree_adamw", "--lr_scheduler", "cosine", *new],
        "`--optimizer prodigy --lora_plus_ratio 16`": ["--optimizer", "prodigy", "--lora_plus_ratio", "16", *new],
        "`--validation_loss_steps 10` without held-out images": ["--validation_loss_steps", "10", *new],
        "`--validation_split 1.5`": ["--validation_split", "1.5", *new],
        "`--masked_loss` without masks": ["--masked_loss", *new],
        "`--mask_data_dir` missing a mask": ["--masked_loss", "--mask_data_dir", str(empty_folder(tmp, "no-masks")), *new],
        "`--reg_data_dir` with no images": ["--reg_data_dir", str(empty_folder(tmp, "no-reg")), *new],
        "`--conv_alpha 4` without `--conv_rank`": ["--conv_alpha", "4", *new],
        "`--conv_rank -1`": ["--conv_rank", "-1", *new],
        "metadata naming a file outside the data folder": ["--train_data_dir", str(bad_data(tmp, "outside")), *QUICK, *new],
        "`N_name` folder repeating 10⁹ times": ["--train_data_dir", str(bad_data(tmp, "repeats")), *QUICK, *new],
        "`--output_dir` holding the user's README.md": ["--output_dir", str(user_folder(tmp, "README.md")), *QUICK],
        "`--overwrite_output_dir` over the user's own `logs/`": ["--output_dir", str(user_folder(tmp, "logs/mine.txt")),
                                                                 "--overwrite_output_dir", *QUICK],
        "`--output_dir` inside the training data": ["--train_data_dir", str(data_copy), "--output_dir", str(data_copy / "out"), *QUICK],
        "`--output_dir` that is a file": ["--output_dir", str(a_file), *QUICK],
        "`--data_cache_dir` that is a file": ["--cache_latents", "--data_cache_dir", str(a_file), *QUICK, *new],
        "`--threads 0`": ["--threads", "0", *new],
        "resume from a folder that is not a checkpoint": ["--resume_from_checkpoint", str(DATA), *new],
        "new run into another run's folder": ["--output_dir", str(used), *QUICK],
        "resume with another rank": ["--output_dir", str(used), "--resume_from_checkpoint", "latest", "--rank", "16", *QUICK],
        "resume with other data": ["--output_dir", str(used), "--resume_from_checkpoint", "latest", "--train_data_dir", str(bad_data(tmp, "other")), *QUICK],
        "resume with nothing left to train": ["--output_dir", str(used), "--resume_from_checkpoint", "latest", *QUICK],
        "resume with another `--learning_rate`": ["--output_dir", str(used), "--resume_from_checkpoint", "latest",
                                                  "--learning_rate", "2e-3", *QUICK],
        "weights that become NaN (`--learning_rate 1e6`)": ["--learning_rate", "1e6", "--lr_warmup_steps", "0", *QUICK[2:],
                                                            "--max_train_steps", "4", "--output_dir", str(tmp / "nan")],
    }


def merge_cases(tmp: Path, adapter: Path) -> dict[str, list[str]]:
    pickled = tmp / "pickled-adapter"
    pickled.mkdir()
    (pickled / "reslora_config.json").write_bytes((adapter / "reslora_config.json").read_bytes())
    (pickled / "reslora_adapter.safetensors").write_bytes(b"\x80\x04pickle renamed to .safetensors")
    edited = tmp / "edited-adapter"
    edited.mkdir()
    config = json.loads((adapter / "reslora_config.json").read_text())
    config["config"]["res_type"] = "bs"
    (edited / "reslora_config.json").write_text(json.dumps(config))
    (edited / "reslora_adapter.safetensors").write_bytes((adapter / "reslora_adapter.safetensors").read_bytes())
    existing = tmp / "existing.safetensors"
    existing.write_bytes(b"keep")
    common = ["--base", str(MODEL), "--format", "kohya", "--skip_images", "--num_inference_steps", "2"]
    out = ["--output", str(tmp / "merged.safetensors")]
    base_copy = tmp / "base-copy"  # the refusal must not be tried on the embedded model itself
    shutil.copytree(MODEL, base_copy)
    return {
        "`--format diffusers-lora --output` the adapter's own folder": [
            *common, "--adapter", str(adapter), "--format", "diffusers-lora", "--output", str(adapter), "--overwrite"],
        "`--output` the native adapter file": [*common, "--adapter", str(adapter), "--output", str(adapter / "reslora_adapter.safetensors"),
                                              "--overwrite"],
        "`--format diffusers --output` the base folder": [
            *common, "--base", str(base_copy), "--adapter", str(adapter), "--format", "diffusers", "--output", str(base_copy), "--overwrite"],
        "`--report` naming a folder": [*common, "--adapter", str(adapter), *out, "--report", str(tmp)],
        "adapter folder that does not exist": [*common, "--adapter", str(tmp / "none"), *out],
        "pickle renamed to `.safetensors`": [*common, "--adapter", str(pickled), *out],
        "config edited to another `res_type`": [*common, "--adapter", str(edited), *out],
        "`--format ckpt`": [*common, "--adapter", str(adapter), *out, "--format", "ckpt"],
        "kohya output not ending in `.safetensors`": [*common, "--adapter", str(adapter), "--output", str(tmp / "x.pt")],
        "output that exists, without `--overwrite`": [*common, "--adapter", str(adapter), "--output", str(existing)],
        "`--export_rank 0`": [*common, "--adapter", str(adapter), *out, "--export_rank", "0"],
        "`--export_rank 100000` (above the merged rank)": (
            [*common, "--adapter", str(adapter), *out, "--export_rank", "100000", "--overwrite"],
            "--export_rank",
        ),
        "`--threads 0`": [*common, "--adapter", str(adapter), *out, "--threads", "0"],
    }


def table(rows: list[tuple[str, str, int, str]]) -> str:
    lines = ["| command | case | exit | what it says |", "|---|---|---|---|"]
    for command, case, code, text in rows:
        lines.append(f"| {command} | {case} | {code} | `{text.replace('|', '/')}` |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Only compare with README.md's table.")
    args = parser.parse_args()
    set_threads(1)
    start = time.perf_counter()
    script = load_training_script()
    from reslora_diffusers.merge.cli import main as merge_main

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        used = tmp / "used"
        code, text = answer(script.main, ["--output_dir", str(used), *QUICK, "--checkpointing_steps", "1"], tmp)
        if code != 0:
            raise SystemExit(f"the reference run failed: {text}")
        for case, argv in training_cases(tmp, used).items():
            rows.append(("train_text_to_image.py", case, *answer(script.main, argv, tmp)))
            print(f"[{time.perf_counter() - start:6.1f} s] train: {case}", file=sys.stderr)
        # Last, as it damages the reference run's checkpoint (the merge cases read only its adapter).
        (used / "checkpoint-1" / "optimizer.bin").unlink()
        argv = ["--output_dir", str(used), "--resume_from_checkpoint", "latest", *QUICK]
        rows.append(("train_text_to_image.py", "resume with `optimizer.bin` missing", *answer(script.main, argv, tmp)))
        for case, argv in merge_cases(tmp, used).items():
            argv, marker = argv if isinstance(argv, tuple) else (argv, "")
            rows.append(("reslora_diffusers.merge", case, *answer(merge_main, argv, tmp, marker)))
            print(f"[{time.perf_counter() - start:6.1f} s] merge: {case}", file=sys.stderr)
    text = table(rows)
    print(text)
    readme = ROOT / "README.md"
    current = readme.read_text()
    if START not in current or END not in current:
        raise SystemExit(f"README.md lacks the markers {START} / {END}")
    head, rest = current.split(START, 1)
    _, tail = rest.split(END, 1)
    updated = f"{head}{START}\n{text}\n{END}{tail}"
    if args.check:
        return 0 if updated == current else 1
    readme.write_text(updated)
    print(f"README.md updated ({len(rows)} cases, {time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
