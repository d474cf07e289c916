"""Nothing of the user's is deleted, overwritten or misrecorded; garbage is never trained on; bad input
gets one `error:` line.

Each test names the defect it guards against; every one of them failed on the code before the fix (the issue's
reproductions, on tiny models).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_train_script import (
    ACCELERATE,
    ENV,
    ROOT,
    SCRIPT,
    build_tiny_pipeline,
    error_lines,
    losses,
    run_in_process,
    summary,
    tiny_args,
    write_imagefolder,
)
from tiny_models import perturb_adapter, tiny_pipeline, tiny_sdxl_pipeline, unet_inputs

from reslora_diffusers import ResLoRAConfig, apply_reslora, save_adapter
from reslora_diffusers.data.caption_folder import load_local_folder
from reslora_diffusers.data.dataset import DatasetError, Example, ImageTransform, load_imagefolder
from reslora_diffusers.formats import load_kohya_lora, lora_delta
from reslora_diffusers.merge.cli import main as merge_main
from reslora_diffusers.merge.cli import parse_args as merge_parse_args


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    return {"model": build_tiny_pipeline(root / "model"), "data": write_imagefolder(root / "data", 8)}


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error(code, err) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# -- the merge CLI never destroys what it reads ------------------------------------------------------------------
@pytest.fixture(scope="module")
def merge_inputs(tmp_path_factory):
    """A base folder and an `ms` adapter folder laid out as a training run leaves it (plus a checkpoint and metrics)."""
    root = tmp_path_factory.mktemp("merge")
    pipe = tiny_pipeline()
    pipe.save_pretrained(root / "base")
    adapter = apply_reslora(pipe.unet, ResLoRAConfig(res_type="ms", rank=4, lora_alpha=4), pipe.text_encoder)
    perturb_adapter(adapter, std=0.05)
    pipe.unet.train(), pipe.text_encoder.train()
    pipe.text_encoder(pipe.tokenizer(["fish"], padding="max_length", return_tensors="pt").input_ids)
    pipe.unet(**unet_inputs(size=16))  # both record input norms, as training does
    run = root / "run"
    save_adapter(adapter, run)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    (run / "checkpoint-1").mkdir()
    (run / "checkpoint-1" / "optimizer.bin").write_bytes(b"state")
    return {"base": root / "base", "run": run, "root": root}


def merge(inputs, formats, output, *extra):
    argv = ["--base", str(inputs["base"]), "--adapter", str(inputs["run"]), "--format", *formats, "--output", str(output),
            "--num_inference_steps", "2", "--calibration_prompts", "fish", "cat", "--skip_images", "--threads", "1", *extra]
    return merge_main(argv)


@pytest.mark.parametrize("case", ["diffusers-lora into the run", "kohya over the native adapter", "diffusers over the base",
                                  "diffusers around the run", "report into the adapter"])
def test_merge_refuses_outputs_that_would_replace_its_inputs(merge_inputs, capsys, case):
    """Before: `--format diffusers-lora --output run/ --overwrite` left only that one file (checkpoints, native adapter
    and metrics gone); the native adapter and the base folder could be overwritten the same way."""
    run, base = merge_inputs["run"], merge_inputs["base"]
    formats, output, extra = {
        "diffusers-lora into the run": (["diffusers-lora"], run, []),
        "kohya over the native adapter": (["kohya"], run / "reslora_adapter.safetensors", []),
        "diffusers over the base": (["diffusers"], base, []),
        "diffusers around the run": (["diffusers"], run.parent, []),
        "report into the adapter": (["kohya"], merge_inputs["root"] / "k.safetensors", ["--report", str(run / "r.merge_report.json")]),
    }[case]
    before_run, before_base = listing(run), listing(base)
    with pytest.raises(SystemExit) as exit_info:
        merge(merge_inputs, formats, output, "--overwrite", *extra)
    message = one_error(exit_info.value.code, capsys.readouterr().err)
    assert "--adapter" in message or "--base" in message
    assert listing(run) == before_run and listing(base) == before_base


def test_merge_report_that_is_a_folder_is_refused_before_any_output(merge_inputs, tmp_path, capsys):
    """Before: the output was written, then writing the report into a folder failed with a traceback."""
    output = tmp_path / "k.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        merge(merge_inputs, ["kohya"], output, "--report", str(tmp_path))
    assert "is a folder" in one_error(exit_info.value.code, capsys.readouterr().err)
    assert not output.exists()


def test_diffusers_lora_export_replaces_only_its_own_file(merge_inputs, tmp_path):
    """Before: the folder was swapped for a new one holding only pytorch_lora_weights.safetensors."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"old")
    assert merge(merge_inputs, ["diffusers-lora"], folder, "--overwrite", "--merge_method", "input") == 0
    assert (folder / "notes.txt").read_text() == "keep me"
    assert load_file(folder / "pytorch_lora_weights.safetensors")


def _unet_deltas(factors) -> dict[str, torch.Tensor]:
    return {name: lora_delta(f) for name, f in factors.items() if name.startswith("unet.")}


def test_calibrated_merge_is_deterministic_and_one_call_writes_every_format_from_one_merge(merge_inputs, tmp_path):
    """Before: two calls gave calibrated merges of the same `ms` adapter that differed (α by up to 7.4e-3), and one
    call could write one format only. Now the same adapter and flags give the same bytes, and the formats of one call
    hold the same merge."""
    first, second = tmp_path / "a" / "k.safetensors", tmp_path / "b" / "k.safetensors"
    for output in (first, second):  # two processes, as two calls of the command are
        command = [sys.executable, "-m", "reslora_diffusers.merge", "--base", str(merge_inputs["base"]), "--adapter",
                   str(merge_inputs["run"]), "--format", "kohya", "--output", str(output), "--merge_method", "calibrated",
                   "--num_inference_steps", "2", "--calibration_prompts", "fish", "cat", "--skip_images", "--threads", "1"]
        result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    assert first.read_bytes() == second.read_bytes()

    both = tmp_path / "both"
    assert merge(merge_inputs, ["kohya", "diffusers-lora"], both, "--merge_method", "calibrated") == 0
    assert load_file(both / "kohya_lora.safetensors").keys() == load_file(first).keys()
    report = json.loads((both / "both.merge_report.json").read_text())
    assert set(report["outputs"]) == {"kohya", "diffusers-lora"}
    diffusers = load_file(both / "pytorch_lora_weights.safetensors")
    kohya = load_kohya_lora(both / "kohya_lora.safetensors")
    for key, down in diffusers.items():
        if key.startswith("unet.") and key.endswith("lora_A.weight"):
            up = diffusers[key.replace("lora_A", "lora_B")]
            module = key[len("unet."):-len(".lora_A.weight")]
            torch.testing.assert_close(up.float() @ down.float(), lora_delta(kohya[f"unet.{module}"]), rtol=1e-6, atol=1e-8)


def test_merge_cli_defaults_to_the_training_scripts_merge(merge_inputs, tmp_path):
    """Before: `reslora-merge` defaulted to --merge_method input, the training script to calibrated."""
    args = merge_parse_args(["--base", str(merge_inputs["base"]), "--adapter", str(merge_inputs["run"]), "--format", "kohya",
                             "--output", str(tmp_path / "x.safetensors")])
    assert args.merge_method == "calibrated"


# -- a training run owns exactly what it wrote -------------------------------------------------------------------
def train(tiny, out: Path, capsys, *extra) -> tuple[int, str, str]:
    return run_in_process(tiny_args(tiny, out, "--max_train_steps", "2", "--checkpointing_steps", "1", *extra), capsys)


def test_a_run_refuses_a_folder_whose_files_it_would_replace(tiny, tmp_path, capsys):
    """Before: `--output_dir .` replaced the user's README.md with the model card and overwrote their metrics.jsonl."""
    out = tmp_path / "project"
    out.mkdir()
    (out / "README.md").write_text("my project")
    (out / "metrics.jsonl").write_text("mine\n")
    (out / "train.py").write_text("print('hi')")
    before = listing(out)
    for extra in ([], ["--overwrite_output_dir"]):
        message = one_error(*train(tiny, out, capsys, *extra)[::2])
        assert "README.md" in message and "metrics.jsonl" in message and "no training run" in message
        assert listing(out) == before


def test_overwrite_removes_what_the_run_wrote_and_nothing_else(tiny, tmp_path, capsys):
    """Before: --overwrite_output_dir on a folder that never held a run deleted the user's logs/, validation/, kohya/;
    now it is refused there, and over a real run it removes that run's files only."""
    users = tmp_path / "users"
    for name in ("logs", "validation", "kohya"):
        (users / name).mkdir(parents=True)
        (users / name / "mine.txt").write_text(name)
    before = listing(users)
    one_error(*train(tiny, users, capsys, "--overwrite_output_dir")[::2])
    assert listing(users) == before

    out = tmp_path / "run"
    code, _, err = train(tiny, out, capsys)
    assert code == 0, err
    (out / "notes.txt").write_text("keep")
    (out / "checkpoint-1" / "mine.txt").write_text("inside the run's own checkpoint")
    code, _, err = run_in_process(tiny_args(tiny, out, "--max_train_steps", "1", "--overwrite_output_dir"), capsys)
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"] and summary(out)["global_step"] == 1
    assert not (out / "checkpoint-1" / "mine.txt").exists()  # the old run's checkpoint went as a whole
    from reslora_diffusers.training.run_folder import MANIFEST_NAME

    owned = json.loads((out / MANIFEST_NAME).read_text())["owned"]
    assert "notes.txt" not in owned and "README.md" in owned and "checkpoint-*" in owned


@pytest.mark.parametrize("inside", ["data", "base"])
def test_output_inside_the_data_or_the_base_is_refused(tiny, tmp_path, capsys, inside):
    """Before: --output_dir equal to the data folder put validation PNGs into the data set, and equal to the base
    folder replaced its README."""
    folder = tiny["data"] if inside == "data" else tiny["model"]
    before = listing(folder)
    for out in (folder, folder / "sub"):
        message = one_error(*train(tiny, out, capsys)[::2])
        assert ("the training data" if inside == "data" else "the base model") in message
    assert listing(folder) == before


def test_a_second_live_run_in_the_same_folder_is_refused(tiny, tmp_path, capsys):
    """Before: two runs started into one folder at the same time both exited 0, and the first one's summary listed
    files that then held the second run."""
    from reslora_diffusers.training.run_folder import RunLock, release_run_locks

    out = tmp_path / "busy"
    out.mkdir()
    lock = RunLock(out)
    assert lock.acquire() is None  # what a live run holds
    try:
        code, _, err = train(tiny, out, capsys)
    finally:
        lock.release()
    assert code == 2 and "another training run" in error_lines(err)[0]
    assert not (out / "reslora_adapter.safetensors").exists()
    code, _, err = train(tiny, out, capsys)
    assert code == 0, err
    release_run_locks()


# -- a resume records what happened ------------------------------------------------------------------------------
@pytest.fixture()
def stopped_run(tiny, tmp_path, capsys):
    """2 of 4 cosine steps, checkpointed: a run stopped in the middle."""
    out = tmp_path / "stopped"
    code, _, err = run_in_process(tiny_args(tiny, out, "--max_train_steps", "2", "--checkpointing_steps", "1"), capsys)
    assert code == 0, err
    return out


@pytest.mark.parametrize("change, message", [
    (["--learning_rate", "2e-3"], "learning_rate: 0.001 → 0.002"),
    (["--lr_scheduler", "linear"], "lr_scheduler: 'cosine' → 'linear'"),
    (["--lr_warmup_steps", "5"], "lr_warmup_steps: 2 → 5"),
    (["--adam_weight_decay", "0.1"], "adam_weight_decay: 0.01 → 0.1"),
    (["--max_train_steps", "4"], "max_train_steps: 2 → 4"),
])
def test_a_resume_with_other_schedule_settings_is_refused(tiny, stopped_run, capsys, change, message):
    """Before: a resume with a new --learning_rate kept the old one (the scheduler restores it) while the model card
    and resolved_config.json said the new one; a cosine schedule's length is part of its state too."""
    before = listing(stopped_run)
    code, _, err = run_in_process(tiny_args(tiny, stopped_run, "--max_train_steps", "2", "--resume_from_checkpoint", "latest", *change), capsys)
    assert message in one_error(code, err)
    assert listing(stopped_run) == before


def test_a_constant_schedule_may_train_on_for_longer(tiny, tmp_path, capsys):
    out = tmp_path / "constant"
    flags = ["--lr_scheduler", "constant", "--checkpointing_steps", "1"]
    assert run_in_process(tiny_args(tiny, out, "--max_train_steps", "1", *flags), capsys)[0] == 0
    code, _, err = run_in_process(tiny_args(tiny, out, "--max_train_steps", "2", "--resume_from_checkpoint", "latest", *flags), capsys)
    assert code == 0, err
    assert summary(out)["global_step"] == 2


def test_a_resume_on_another_process_count_is_refused(tiny, stopped_run, capsys):
    """Before: accelerate restored the scheduler at the wrong position (it steps once per process): a cosine schedule
    at step 100 of 200 jumped from 2.93e-3 to 3.8e-7. The marker records the process count; here 2 → 1."""
    marker = stopped_run / "checkpoint-2" / "reslora_checkpoint.json"
    record = json.loads(marker.read_text())
    marker.write_text(json.dumps({**record, "num_processes": 2}))
    code, _, err = run_in_process(tiny_args(tiny, stopped_run, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"), capsys)
    assert "trained on 2 process(es), this run has 1" in one_error(code, err)


def test_a_run_interrupted_before_its_exports_finishes_them_on_resume(tiny, stopped_run, capsys):
    """Before: an interrupt after the last checkpoint but before the exports could not be finished ("nothing left to
    train, outputs left as they are" with no exports)."""
    for name in ("training_summary.json", "pytorch_lora_weights.safetensors", "README.md", "reslora_adapter.safetensors"):
        (stopped_run / name).unlink()
    for kohya in (stopped_run / "kohya").glob("*"):
        kohya.unlink()
    code, out, err = run_in_process(tiny_args(tiny, stopped_run, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"), capsys)
    assert code == 0, err
    assert "writing the exports it did not finish" in out
    assert summary(stopped_run)["global_step"] == 2
    assert (stopped_run / "pytorch_lora_weights.safetensors").is_file() and list((stopped_run / "kohya").glob("*.safetensors"))
    assert len(losses(stopped_run)) == 2
    code, out, _ = run_in_process(tiny_args(tiny, stopped_run, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"), capsys)
    assert code == 0 and "Nothing left to train" in out


@pytest.mark.parametrize("damage", ["missing optimizer.bin", "truncated scheduler.bin", "missing scheduler.bin"])
def test_a_damaged_checkpoint_is_one_line(tiny, stopped_run, capsys, damage):
    """Before: a resume with optimizer.bin / scheduler.bin missing or truncated ended in a traceback."""
    what, name = damage.split(" ")
    path = stopped_run / "checkpoint-2" / name
    if what == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:40])
    code, _, err = run_in_process(tiny_args(tiny, stopped_run, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"), capsys)
    message = error_lines(err)
    assert code == 2 and len(message) == 1 and "cannot resume from" in message[0] and "Traceback" not in err, err


# -- images and text decoded as the user sees them ----------------------------------------------------------------
def decoded(path: Path) -> np.ndarray:
    """What training sees of an (8×8) image file: the pixels after the data pipeline's decode, in 0..255."""
    image = Example(path, ("x",)).open()
    transform = ImageTransform(resolution=8, center_crop=True, random_flip=False)
    augmentation = transform.draw(image.size, (8, 8), torch.Generator())
    tensor = transform.apply(image, (8, 8), augmentation)
    return ((tensor.permute(1, 2, 0).numpy() + 1) * 127.5).round()


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    """Before: a 16-bit greyscale PNG trained as pure white (Pillow's convert("RGB") clips it at 255)."""
    values = np.full((8, 8), 32896, dtype=np.uint16)  # 128 * 257: mid grey
    values[:, :4] = 0
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    pixels = decoded(path)
    assert np.all(pixels[:, 4:] == 128) and np.all(pixels[:, :4] == 0)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P with a transparent colour"])
def test_transparent_pixels_are_composited_over_white(tmp_path, mode):
    """Before: transparency was dropped, so fully transparent pixels trained as whatever colour they stored (black)."""
    path = tmp_path / "alpha.png"
    if mode == "RGBA":
        image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
        image.paste((255, 0, 0, 255), (0, 0, 4, 8))
        image.save(path)
    elif mode == "LA":
        image = Image.new("LA", (8, 8), (0, 0))
        image.paste((50, 255), (0, 0, 4, 8))
        image.save(path)
    else:
        image = Image.new("P", (8, 8), 0)
        image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        image.paste(1, (0, 0, 4, 8))
        image.save(path, transparency=0)
    pixels = decoded(path)
    assert np.all(pixels[:, 4:] == 255), "transparent pixels must be white"
    assert pixels[:, :2].min() < 255  # the opaque half keeps its colour


def test_exif_orientation_is_applied(tmp_path):
    """Before: a photo stored sideways with an EXIF orientation trained sideways (and its bucket had the wrong shape)."""
    stored = np.zeros((4, 8, 3), dtype=np.uint8)  # 8 wide, 4 high; the left half red
    stored[:, :4] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    path = tmp_path / "sideways.jpg"
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=100)
    example = Example(path, ("x",))
    assert example.size == (4, 8)
    upright = np.asarray(example.open())
    assert upright.shape == (8, 4, 3) and upright[:3, :, 0].mean() > 200 and upright[5:, :, 0].mean() < 60


def test_float_images_are_refused_not_guessed(tmp_path):
    path = tmp_path / "float.tiff"
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32), "F").save(path)
    with pytest.raises(DatasetError, match="floating-point"):
        Example(path, ("x",)).open()


def _metadata_folder(tmp_path: Path, rows: list[dict], raw: bytes | None = None) -> Path:
    folder = tmp_path / "meta"
    folder.mkdir()
    Image.new("RGB", (8, 8), "red").save(folder / "a.png")
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (folder / "metadata.jsonl").write_bytes(raw if raw is not None else text.encode())
    return folder


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_caption_and_metadata_files_with_a_byte_order_mark(tmp_path, encoding):
    """Before: a UTF-8 byte-order mark stayed in the caption as U+FEFF (and broke line 1 of metadata.jsonl); UTF-16
    files were refused."""
    row = json.dumps({"file_name": "a.png", "text": "café"}, ensure_ascii=False) + "\n"
    folder = _metadata_folder(tmp_path, [], raw=row.encode(encoding))
    assert [e.captions for e in load_imagefolder(folder)] == [("café",)]
    captions = tmp_path / "captions"
    captions.mkdir()
    Image.new("RGB", (8, 8)).save(captions / "b.png")
    (captions / "b.txt").write_bytes("crème brûlée\n".encode(encoding))
    assert [e.captions for e in load_local_folder(captions)] == [("crème brûlée",)]


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.png", "sub/../../outside.png"])
def test_metadata_may_not_name_files_outside_the_data_folder(tmp_path, name):
    """Before: metadata.jsonl entries could name absolute paths or ../ outside the data folder."""
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    folder = _metadata_folder(tmp_path, [{"file_name": "a.png", "text": "a"}, {"file_name": name, "text": "b"}])
    with pytest.raises(DatasetError, match="lies outside the data folder"):
        load_imagefolder(folder)


def test_a_huge_repeat_count_is_one_line(tmp_path):
    """Before: a `1000000000_name` folder filled the memory (MemoryError after 46 s)."""
    folder = tmp_path / "kohya" / "1000000000_dog"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "a.txt").write_text("dog")
    with pytest.raises(DatasetError, match="at most 100,000"):
        load_local_folder(tmp_path / "kohya")


# -- settings checked before any work ------------------------------------------------------------------------------
BAD_SETTINGS = {
    "seed -1": (["--seed", "-1"], "--seed must be a whole number in 0..2147483647"),
    "seed too large": (["--seed", str(2**40)], "--seed must be a whole number"),
    "beta1 of 1.5": (["--adam_beta1", "1.5"], "--adam_beta1 must be in [0, 1)"),
    "negative weight decay": (["--adam_weight_decay", "-1"], "--adam_weight_decay must be >= 0"),
    "infinite epsilon": (["--adam_epsilon", "inf"], "--adam_epsilon must be >= 0 and finite"),
    "gradient norm 0": (["--max_grad_norm", "0"], "--max_grad_norm must be > 0"),
    "resolution 60": (["--resolution", "60"], "--resolution must be a multiple of 8"),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_bad_settings_are_one_line_before_training(tiny, tmp_path, capsys, case):
    """Before: out-of-range seeds and optimizer values ended in tracebacks (or, for --max_grad_norm 0, trained
    nothing), and --resolution 60 trained and then died in the merge's pipeline call with no exports."""
    extra, message = BAD_SETTINGS[case]
    out = tmp_path / "out"
    assert message in one_error(*train(tiny, out, capsys, *extra)[::2])
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--output_dir", "--data_cache_dir"])
def test_a_folder_flag_naming_a_file_is_one_line(tiny, tmp_path, capsys, flag):
    file = tmp_path / "a-file"
    file.write_text("not a folder")
    extra = [flag, str(file)] + (["--cache_latents"] if flag == "--data_cache_dir" else [])
    out = tmp_path / "out"
    assert "is a file" in one_error(*run_in_process([*tiny_args(tiny, out), "--max_train_steps", "1", *extra], capsys)[::2])
    assert file.read_text() == "not a folder"


def test_a_cache_entry_of_the_wrong_shape_is_re_encoded(tiny, tmp_path, capsys, caplog):
    """Before: a cache entry of another shape was trained on (or crashed the step with a traceback)."""
    cache = tmp_path / "cache"
    flags = ["--cache_latents", "--data_cache_dir", str(cache), "--center_crop", "--resolution", "32"]
    code, _, err = train(tiny, tmp_path / "first", capsys, *flags)
    assert code == 0, err
    entries = sorted((cache / "latents").glob("*.safetensors"))
    save_file({"value": torch.zeros(3, 3)}, entries[0])
    code, _, err = train(tiny, tmp_path / "second", capsys, *flags)
    assert code == 0, err
    assert "re-encoding cache entry" in caplog.text
    assert load_file(entries[0])["value"].shape != (3, 3)
    np.testing.assert_allclose(losses(tmp_path / "second"), losses(tmp_path / "first"), rtol=1e-5)


# -- SDXL text encoders: only blocks that can learn ---------------------------------------------------------------
def test_sdxl_first_text_encoder_has_no_blocks_in_its_unread_last_layer():
    """Before: SDXL reads only the first encoder's penultimate state, yet its last layer got blocks: exported with
    B = 0 on one GPU, and 2-process DDP stopped at step 2 on the unused parameters."""
    pipe = tiny_sdxl_pipeline()
    adapter = apply_reslora(pipe.unet, ResLoRAConfig(rank=2, lora_alpha=2), text_encoder=pipe.text_encoder,
                            text_encoder_2=pipe.text_encoder_2)
    last = pipe.text_encoder.config.num_hidden_layers - 1
    first = [name for name in adapter.blocks if name.startswith("text_encoder.")]
    assert first and not [name for name in first if f"layers.{last}." in name]
    assert any(f"layers.{pipe.text_encoder_2.config.num_hidden_layers - 1}." in name
               for name in adapter.blocks if name.startswith("text_encoder_2."))  # the pooled output reads it
    # every remaining block gets a gradient
    length = min(pipe.text_encoder.config.max_position_embeddings, pipe.text_encoder_2.config.max_position_embeddings)
    ids = torch.randint(0, 50, (1, length), generator=torch.Generator().manual_seed(0))
    from reslora_diffusers.adapters.sdxl import encode_prompt

    hidden, pooled = encode_prompt(pipe.text_encoder, pipe.text_encoder_2, ids, ids)
    (hidden.sum() + pooled.sum()).backward()
    for name, block in adapter.blocks.items():
        if name.startswith("text_encoder"):
            grads = [g for g in (block.lora_A.grad, block.lora_B.grad) if g is not None]
            assert grads and any(float(g.abs().sum()) > 0 for g in grads), name


def test_sdxl_kohya_export_completes_open_clip_attention_layers(tmp_path):
    """Before: with text-encoder targets other than all of q/k/v/out, AUTOMATIC1111 silently skipped every OpenCLIP
    (second encoder) layer of an SDXL kohya file: it applies one only when all four projections are present."""
    from reslora_diffusers.formats import kohya_model_configs, save_kohya_lora
    from reslora_diffusers.merge import merge_adapter

    pipe = tiny_sdxl_pipeline()
    config = ResLoRAConfig(res_type="none", rank=2, lora_alpha=2, text_encoder_targets=("q_proj", "v_proj"))
    adapter = apply_reslora(pipe.unet, config, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2)
    perturb_adapter(adapter, std=0.05)
    factors = merge_adapter(adapter).factors
    path = save_kohya_lora(factors, tmp_path / "xl.safetensors", {}, **kohya_model_configs(adapter))
    keys = load_file(path)
    te2 = {k.split(".")[0] for k in keys if k.startswith("lora_te2_")}
    layers = {name.rsplit("_", 2)[0] for name in te2}
    assert layers and all(f"{layer}_{p}" in te2 for layer in layers for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    for name in te2:
        if name.endswith(("k_proj", "out_proj")):
            assert not keys[f"{name}.lora_up.weight"].any()  # added as zero: the model is unchanged
    assert not [k for k in keys if k.startswith("lora_te1_") and ("k_proj" in k or "out_proj" in k)]


def test_a_full_disk_during_a_merge_is_one_line(merge_inputs, tmp_path, capsys, monkeypatch):
    """Before: a full disk while writing ended the merge in a traceback."""
    import errno

    import reslora_diffusers.merge.cli as merge_cli

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "k.safetensors"))

    monkeypatch.setattr(merge_cli, "write_outputs", full)
    code = merge(merge_inputs, ["kohya"], tmp_path / "k.safetensors", "--merge_method", "input")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "No space left on device" in err[0], err
    assert not (tmp_path / "k.safetensors").exists()


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not path.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path} did not appear (exit {process.poll()})"


def test_an_image_breaking_on_one_data_parallel_process_stops_every_process(tiny, tmp_path):
    """Before: the process that read the broken image waited forever in the shut-down's barrier while the other
    waited in the step's all-reduce; the run never ended."""
    data = write_imagefolder(tmp_path / "data", 8)
    out = tmp_path / "ddp"
    args = tiny_args(tiny, out, "--max_train_steps", "400", "--checkpointing_steps", "2", "--train_batch_size", "1",
                     "--lr_scheduler", "constant")
    args[args.index("--train_data_dir") + 1] = str(data)
    launcher = ACCELERATE + ["--multi_gpu", "--num_processes", "2", "--mixed_precision", "no"]
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    process = subprocess.Popen(launcher + [str(SCRIPT), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(out / "checkpoint-2" / "reslora_checkpoint.json", process)
        (data / "5.png").write_bytes(b"no longer an image")  # one process draws it once per epoch (4 steps)
        _, err = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode != 0
    assert "5.png became unreadable during training" in err and "the last finite checkpoint is" in err, err[-3000:]
    assert (out / "checkpoint-2" / "reslora_checkpoint.json").is_file()


WRITE_FAILS_ON_THE_SECOND_CHECKPOINT = """
import errno, runpy, sys
from pathlib import Path
import accelerate

save_state, calls = accelerate.Accelerator.save_state, []

def full_disk(self, output_dir=None, **kwargs):
    calls.append(output_dir)
    if len(calls) == 2:  # half a checkpoint written, then the disk is full
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(output_dir) / "model.safetensors"))
    return save_state(self, output_dir, **kwargs)

accelerate.Accelerator.save_state = full_disk
sys.argv = [sys.argv[1], *sys.argv[2:]]
sys.path.insert(0, str(Path(sys.argv[0]).parent))  # the project, as when the script is run directly
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_full_disk_while_training_is_one_line_and_the_run_resumes(tiny, tmp_path):
    """A disk that fills up while a checkpoint is written: one `error:` line (no traceback), no half checkpoint,
    and --resume_from_checkpoint latest continues from the last complete one to the end."""
    wrapper = tmp_path / "full_disk.py"
    wrapper.write_text(WRITE_FAILS_ON_THE_SECOND_CHECKPOINT)
    out = tmp_path / "run"
    args = tiny_args(tiny, out, "--max_train_steps", "4", "--checkpointing_steps", "2", "--merge_method", "input")
    result = subprocess.run([sys.executable, str(wrapper), str(SCRIPT), *args], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr[-3000:]
    assert "No space left on device" in errors[0] and "--resume_from_checkpoint latest" in errors[0]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    resumed = subprocess.run([sys.executable, str(SCRIPT), *args, "--resume_from_checkpoint", "latest"], cwd=ROOT,
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert summary(out)["global_step"] == 4
