"""The validation loss (--validation_split / --validation_data_dir): the same held-out batches for every method with
one seed, equal to the training-time loss after an exact merge, no change to the training, exact under 2-process
data parallelism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_script import (
    ACCELERATE,
    assert_same_adapter,
    build_tiny_pipeline,
    check,
    run,
    run_in_process,
    summary,
    tiny_args,
    train_in_process,
    write_imagefolder,
)

from reslora_diffusers import load_adapter
from reslora_diffusers.data.caption_folder import load_local_folder
from reslora_diffusers.data.loader import split_held_out
from reslora_diffusers.merge import merge_adapter
from reslora_diffusers.training.validation_loss import (
    ValidationLoss,
    spread_timesteps,
    trained_and_merged_losses,
)

FLAGS = ["--lr_scheduler", "constant", "--train_batch_size", "2", "--checkpointing_steps", "2", "--validation_loss_steps", "1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    return {"model": build_tiny_pipeline(root / "model"), "data": write_imagefolder(root / "data", 8),
            "held_out": write_imagefolder(root / "held_out", 3, seed=1)}


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def validation(folder: Path) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["validation_loss"], r["validation_loss_merged"]) for r in records(folder) if "validation_loss" in r}


def test_every_method_sees_the_same_batches_and_an_exact_merge_keeps_the_loss(tiny, tmp_path, capsys):
    """Step 0 is the base model's loss: identical for LoRA and ResLoRA runs with one seed. LoRA merges exactly (its
    merged loss is its training-time one); `is` merged by input norms differs by the merge gap, and its logged merged
    loss is the loss of the exported diffusers LoRA as diffusers' own loader applies it: the model users deploy."""
    runs = {}
    for method in ("none", "is"):
        out = tmp_path / method
        train_in_process(capsys, tiny_args(tiny, out, *FLAGS, "--res_type", method, "--merge_method", "input", "--max_train_steps", "3",
                                "--validation_split", "0.25", "--learning_rate", "5e-2"))
        runs[method] = validation(out)
    assert sorted(runs["none"]) == [0, 1, 2, 3]
    assert runs["none"][0] == runs["is"][0]  # same held-out images, noise, timesteps and captions, same base
    for step in (1, 2, 3):
        trained, merged = runs["none"][step]
        assert trained != runs["none"][0][0] and merged == trained  # it moves with training; an exact merge
    assert summary(tmp_path / "none")["validation_loss"] == runs["none"][3][0]
    assert max(abs(t - m) for t, m in (runs["is"][s] for s in (1, 2, 3))) > 0  # the merge gap of is
    card = (tmp_path / "is" / "README.md").read_text()
    assert "validation loss (training-time / merged)" in card

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny["model"], safety_checker=None)
    pipe.load_lora_weights(str(tmp_path / "is"), weight_name="pytorch_lora_weights.safetensors")
    examples = load_local_folder(str(tiny["data"]), "image", "text", "auto", "error")
    deployed = evaluate_on(pipe, tiny["model"], split_held_out(examples, 0.25, seed=0)[1], timesteps=2)  # the default
    np.testing.assert_allclose(deployed, runs["is"][3][1], rtol=1e-6)


def evaluate_on(pipe, model: Path, held_out, timesteps: int) -> float:
    """The validation loss of `pipe` as the run computes it (batches of 2, seed 0, no Min-SNR)."""
    from diffusers import DDPMScheduler

    vae = pipe.vae
    validation = ValidationLoss(
        held_out, resolution=32, interpolation="lanczos", encode=lambda pixels: vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor,
        noise_scheduler=DDPMScheduler.from_pretrained(model, subfolder="scheduler"), seed=0, timesteps_per_image=timesteps,
        batch_size=2, snr_gamma=None)
    with torch.no_grad():
        return validation.evaluate(predict_with(pipe), device="cpu", dtype=torch.float32)


def predict_with(pipe):
    def predict(noisy, timesteps, captions):
        ids = pipe.tokenizer(captions, max_length=pipe.tokenizer.model_max_length, padding="max_length", truncation=True,
                             return_tensors="pt").input_ids
        return pipe.unet(noisy, timesteps, pipe.text_encoder(ids, return_dict=False)[0], return_dict=False)[0]

    return predict


def test_validation_loss_changes_nothing_in_training_and_survives_a_resume(tiny, tmp_path, capsys):
    """4 steps without validation == 2 steps with it, stop, resume with it, 2 more: the same adapter bit for bit,
    the same training losses, and one validation record per step (none repeated by the resume)."""
    plain, validated = tmp_path / "plain", tmp_path / "validated"
    held_out = ["--validation_data_dir", str(tiny["held_out"]), "--res_type", "ms", "--merge_method", "input"]
    train_in_process(capsys, tiny_args(tiny, plain, *FLAGS[:-2], "--res_type", "ms", "--merge_method", "input", "--max_train_steps", "4"))
    train_in_process(capsys, tiny_args(tiny, validated, *FLAGS, *held_out, "--max_train_steps", "2"))
    train_in_process(capsys, tiny_args(tiny, validated, *FLAGS, *held_out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"))
    assert_same_adapter(torch_load(plain), torch_load(validated))
    assert [r["loss"] for r in records(plain)] == [r["loss"] for r in records(validated) if "loss" in r]
    assert [r["step"] for r in records(validated) if "validation_loss" in r] == [0, 1, 2, 3, 4]
    facts = summary(validated)
    assert 0 < facts["validation_loss_share_of_training"] < 1 and facts["validation_loss_step"] == 4


def torch_load(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "reslora_adapter.safetensors")


def test_two_process_validation_loss_equals_one_process_on_the_same_weights(tiny, tmp_path):
    out = tmp_path / "ddp"
    launcher = ACCELERATE + ["--multi_gpu", "--num_processes", "2", "--mixed_precision", "no"]
    check(run(tiny_args(tiny, out, *FLAGS, "--validation_data_dir", str(tiny["held_out"]), "--res_type", "is",
                        "--merge_method", "input", "--max_train_steps", "2", "--validation_loss_timesteps", "3",
                        "--learning_rate", "5e-2"),
              launcher=launcher, env={"ACCELERATE_USE_CPU": "1"}))
    facts = summary(out)
    assert facts["num_processes"] == 2

    from diffusers import DDPMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny["model"], safety_checker=None)
    scheduler = DDPMScheduler.from_pretrained(tiny["model"], subfolder="scheduler")
    adapter = load_adapter(pipe.unet, out, text_encoder=pipe.text_encoder)
    vae = pipe.vae
    held_out = ValidationLoss(
        load_local_folder(str(tiny["held_out"]), "image", "text", "auto", "error"), resolution=32, interpolation="lanczos",
        encode=lambda pixels: vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor, noise_scheduler=scheduler,
        seed=0, timesteps_per_image=3, batch_size=2, snr_gamma=None)
    assert held_out.size == 9 and len(held_out.batches) == 5  # an odd number of batches: the processes' shares differ

    predict = predict_with(pipe)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each process of the run computed its share
    try:
        trained, merged = trained_and_merged_losses(
            held_out, adapter, predict, merged_factors=lambda: merge_adapter(adapter, method="input").factors,
            models=[pipe.unet, pipe.text_encoder], device="cpu", dtype=torch.float32)
    finally:
        torch.set_num_threads(threads)
    # The same weights re-loaded from the files, outside the run: equal to float32 rounding (the exact sum over
    # processes is asserted below, where both shares are computed in one process).
    np.testing.assert_allclose([trained, merged], [facts["validation_loss"], facts["validation_loss_merged"]], rtol=1e-6)
    shares = []
    for rank in (0, 1):
        held_out.evaluate(predict, device="cpu", dtype=torch.float32, process_index=rank, num_processes=2,
                          reduce=lambda losses: shares.append(losses) or losses)
    with torch.no_grad():
        single = held_out.evaluate(predict, device="cpu", dtype=torch.float32)
    assert float((shares[0] + shares[1]).sum() / held_out.size) == single
    assert all(bool((share != 0).any()) for share in shares)  # each process had a share


def test_the_held_out_split_depends_on_the_seed_alone_and_spreads_timesteps(tiny):
    examples = load_local_folder(str(tiny["data"]), "image", "text", "auto", "error")
    train, held = split_held_out(examples, 0.25, seed=3)
    assert len(held) == 2 and len(train) == 6 and not {e.name for e in train} & {e.name for e in held}
    assert [e.name for e in split_held_out(examples, 0.25, seed=3)[1]] == [e.name for e in held]
    steps = [t for image in range(4) for t in spread_timesteps(image, 4, 4, 1000)]
    assert len(set(steps)) == 16 and min(steps) < 100 and max(steps) > 900


@pytest.mark.parametrize("flags, message", [
    (["--validation_loss_steps", "5"], "--validation_loss_steps needs held-out images"),
    (["--validation_split", "1.5"], "--validation_split must be a fraction between 0 and 1"),
    (["--validation_split", "0.2", "--validation_data_dir", "x"], "pass one of them"),
])
def test_bad_validation_flags_are_one_line(tiny, tmp_path, capsys, flags, message):
    code, _, err = run_in_process(tiny_args(tiny, tmp_path / "out", *flags), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
