"""Masked loss (`--masked_loss` with `--mask_data_dir` or `--alpha_mask`) and regularisation images (`--reg_data_dir`,
`--prior_loss_weight`) in the training script, on the tiny pipeline of test_train_script."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from test_train_script import (
    adapter,
    assert_same_adapter,
    build_tiny_pipeline,
    error_lines,
    run_in_process,
    tiny_args,
    train_in_process,
    write_imagefolder,
)

from reslora_diffusers.data.dataset import CaptionOptions, Example, ImageCaptionDataset, ImageTransform
from reslora_diffusers.data.masks import attach_masks
from reslora_diffusers.training.validation_loss import diffusion_loss

STEPS = ["--max_train_steps", "6", "--checkpointing_steps", "100", "--seed", "3"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_masks")
    return {"model": build_tiny_pipeline(root / "model"), "data": write_imagefolder(root / "data", 8),
            "reg": write_imagefolder(root / "reg", 5, seed=9), "root": root}


def write_masks(folder: Path, data: Path, fill) -> Path:
    """One greyscale mask per image of `data` (40×48 like them), its pixels from `fill(height, width)`."""
    folder.mkdir()
    for image in sorted(data.glob("*.png")):
        Image.fromarray(fill(40, 48).astype(np.uint8), "L").save(folder / image.name)
    return folder


def left_half(height, width):
    mask = np.zeros((height, width))
    mask[:, : width // 2] = 255
    return mask


# -- masked loss ----------------------------------------------------------------------------------------------------
def test_pixels_outside_the_mask_receive_no_gradient(tmp_path):
    """The mask travels with its image (crop, flip) and the loss gives no gradient to latent cells it blanks out."""
    image = np.full((64, 64, 4), 200, dtype=np.uint8)
    image[..., 3] = 255
    image[:, 32:, 3] = 0  # right half transparent
    Image.fromarray(image, "RGBA").save(tmp_path / "a.png")
    examples = attach_masks([Example(tmp_path / "a.png", ("a",))], tmp_path, None, alpha_mask=True)
    item = ImageCaptionDataset(examples, ImageTransform(64, center_crop=True, random_flip=False))[0]
    assert item["mask"].shape == (1, 64, 64)
    assert item["mask"][0, :, :32].min() == 1 and item["mask"][0, :, 32:].max() == 0

    prediction = torch.randn(1, 4, 8, 8, requires_grad=True)
    loss = diffusion_loss(DDPMScheduler(), prediction, torch.randn(1, 4, 8, 8), torch.tensor([10]), None,
                          mask=item["mask"][None])
    loss.backward()
    assert prediction.grad[..., 4:].abs().max() == 0, "latent cells outside the mask got a gradient"
    assert prediction.grad[..., :4].abs().min() > 0


def test_a_black_mask_trains_nothing_and_cached_masks_repeat_uncached_ones(tiny, tmp_path, capsys):
    black = write_masks(tmp_path / "black", tiny["data"], lambda h, w: np.zeros((h, w)))
    train_in_process(capsys, tiny_args(tiny, tmp_path / "black_run", *STEPS, "--masked_loss", "--mask_data_dir", str(black)))
    up = {k: v for k, v in adapter(tmp_path / "black_run").items() if k.endswith(".lora_B")}
    assert up and all(v.abs().max() == 0 for v in up.values()), "an all-black mask still moved the adapter"

    # A left-half mask with random flips: the cache keeps each flip's mask beside its latent.
    half = write_masks(tmp_path / "half", tiny["data"], left_half)
    common = [*STEPS, "--masked_loss", "--mask_data_dir", str(half), "--random_flip", "--center_crop"]
    train_in_process(capsys, tiny_args(tiny, tmp_path / "uncached", *common))
    train_in_process(capsys, tiny_args(tiny, tmp_path / "cached", *common, "--cache_latents"))
    train_in_process(capsys, tiny_args(tiny, tmp_path / "unmasked", *STEPS, "--random_flip", "--center_crop"))
    assert_same_adapter(adapter(tmp_path / "uncached"), adapter(tmp_path / "cached"))
    masked, plain = adapter(tmp_path / "uncached"), adapter(tmp_path / "unmasked")
    assert max(float((masked[k] - plain[k]).abs().max()) for k in masked) > 1e-4, "the mask changed nothing"
    card = (tmp_path / "cached" / "README.md").read_text()
    assert "masked loss" in card


def test_alpha_masks_train_the_embedded_kind_of_data(tiny, tmp_path, capsys):
    """Transparent PNGs (as the emoji data are): --alpha_mask trains, and differs from ignoring the alpha."""
    data = tmp_path / "rgba"
    data.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        pixels = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
        pixels[..., 3] = 0
        pixels[8:24, 8:24, 3] = 255  # an opaque square on a transparent background
        Image.fromarray(pixels, "RGBA").save(data / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"thing {i}"})
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    on_rgba = {**tiny, "data": data}
    train_in_process(capsys, tiny_args(on_rgba, tmp_path / "alpha", *STEPS, "--masked_loss", "--alpha_mask"))
    train_in_process(capsys, tiny_args(on_rgba, tmp_path / "plain", *STEPS))
    a, b = adapter(tmp_path / "alpha"), adapter(tmp_path / "plain")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-4


# -- regularisation images ------------------------------------------------------------------------------------------
def test_prior_loss_weight_zero_trains_as_without_regularisation(tiny, tmp_path, capsys):
    train_in_process(capsys, tiny_args(tiny, tmp_path / "none", *STEPS))
    train_in_process(capsys, tiny_args(tiny, tmp_path / "zero", *STEPS, "--reg_data_dir", str(tiny["reg"]), "--prior_loss_weight", "0"))
    train_in_process(capsys, tiny_args(tiny, tmp_path / "one", *STEPS, "--reg_data_dir", str(tiny["reg"])))
    # The same batches, noise and timesteps for the training images; only the batch the UNet sees is longer. The
    # weights are the same; the input-norm statistics (for the `input` merge estimator) also count the reg images.
    weights = lambda folder: {k: v for k, v in adapter(folder).items() if "input_norm" not in k}  # noqa: E731
    assert_same_adapter(weights(tmp_path / "none"), weights(tmp_path / "zero"))
    none, one = adapter(tmp_path / "none"), adapter(tmp_path / "one")
    assert max(float((none[k] - one[k]).abs().max()) for k in none) > 1e-4, "the regularisation images changed nothing"
    records = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert all({"loss_instance", "loss_prior"} <= set(r) for r in records)
    for record in records:  # the logged loss is the instance loss plus the weighted prior loss
        assert record["loss"] == pytest.approx(record["loss_instance"] + record["loss_prior"], rel=1e-5)
    card = (tmp_path / "one" / "README.md").read_text()
    assert "regularisation images" in card


def test_a_resumed_run_with_regularisation_images_repeats_a_straight_one(tiny, tmp_path, capsys):
    """Stopped after 3 steps (mid-epoch, mid-pass through the 5 regularisation images) and resumed: the same run."""
    flags = ["--reg_data_dir", str(tiny["reg"]), "--prior_loss_weight", "0.5", "--seed", "3",
             "--lr_scheduler", "constant_with_warmup", "--checkpointing_steps", "3"]
    train_in_process(capsys, tiny_args(tiny, tmp_path / "straight", *flags, "--max_train_steps", "6"))
    train_in_process(capsys, tiny_args(tiny, tmp_path / "resumed", *flags, "--max_train_steps", "3"))
    train_in_process(capsys, tiny_args(tiny, tmp_path / "resumed", *flags, "--max_train_steps", "6", "--resume_from_checkpoint", "latest"))
    assert_same_adapter(adapter(tmp_path / "straight"), adapter(tmp_path / "resumed"))


# -- bad input: one line each -------------------------------------------------------------------------------------------
def _one_line_error(capsys, argv, expected):
    code, _, err = run_in_process(argv, capsys)
    assert code != 0
    lines = error_lines(err)
    assert len(lines) == 1 and expected in lines[0], err[-3000:]
    assert "Traceback" not in err


def test_bad_masks_and_regularisation_folders_fail_in_one_line(tiny, tmp_path, capsys):
    missing = write_masks(tmp_path / "missing", tiny["data"], left_half)
    (missing / "3.png").unlink()
    _one_line_error(capsys, tiny_args(tiny, tmp_path / "a", *STEPS, "--masked_loss", "--mask_data_dir", str(missing)),
                    "has no mask for")
    wrong = write_masks(tmp_path / "wrong", tiny["data"], left_half)
    Image.new("L", (10, 10)).save(wrong / "2.png")
    _one_line_error(capsys, tiny_args(tiny, tmp_path / "b", *STEPS, "--masked_loss", "--mask_data_dir", str(wrong)),
                    "a mask must have its image's size")
    truncated = write_masks(tmp_path / "truncated", tiny["data"], left_half)
    whole = (truncated / "4.png").read_bytes()
    (truncated / "4.png").write_bytes(whole[: len(whole) // 2])  # the header (and size) intact, the pixels cut
    _one_line_error(capsys, tiny_args(tiny, tmp_path / "t", *STEPS, "--masked_loss", "--mask_data_dir", str(truncated)),
                    "cannot be read")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(capsys, tiny_args(tiny, tmp_path / "c", *STEPS, "--reg_data_dir", str(empty)), "--reg_data_dir")
    _one_line_error(capsys, tiny_args(tiny, tmp_path / "d", *STEPS, "--masked_loss"), "--mask_data_dir DIR or --alpha_mask")
    _one_line_error(capsys, tiny_args(tiny, tmp_path / "e", *STEPS, "--alpha_mask"), "pass --masked_loss too")
    _one_line_error(capsys, tiny_args(tiny, tmp_path / "f", *STEPS, "--prior_loss_weight", "0.5"), "pass --reg_data_dir too")
    shutil.rmtree(tmp_path / "missing")


def test_regularisation_images_under_two_process_data_parallel(tiny, tmp_path):
    """Each process joins its own regularisation images (its offset in their order); the replicas stay identical,
    with the text encoder trained on the joined batch too."""
    from test_train_script import ACCELERATE, check, run, summary

    out = tmp_path / "ddp"
    launcher = ACCELERATE + ["--multi_gpu", "--num_processes", "2", "--mixed_precision", "no"]
    check(run(tiny_args(tiny, out, "--max_train_steps", "3", "--checkpointing_steps", "10", "--train_batch_size", "2",
                        "--train_text_encoder", "--reg_data_dir", str(tiny["reg"]), "--masked_loss", "--alpha_mask"),
              launcher=launcher, env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}))
    facts = summary(out)
    assert facts["num_processes"] == 2 and facts["global_step"] == 3 and facts["replica_max_difference"] == 0.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["loss_prior"] > 0 for r in records)


def test_each_process_draws_its_own_regularisation_images_and_every_one_is_used_per_pass(tiny):
    from reslora_diffusers.data.caption_folder import load_local_folder
    from reslora_diffusers.data.regularisation import RegularisationImages

    examples = load_local_folder(tiny["reg"])  # 5 images
    transform = ImageTransform(32, center_crop=True, random_flip=False)
    picks = []
    for rank in (0, 1):
        reg = RegularisationImages(examples, transform, CaptionOptions(), seed=3, collate=lambda items: items,
                                   process_index=rank, num_processes=2)
        # The image's number (its caption may be "emoji N" or "picture N")
        picks.append([item["caption"].split()[-1] for number in range(5)
                      for item in reg.for_batch(number, {"input_ids": [0], "image_size": (32, 32)}, "cpu")[0]])
    # Batch k of rank r takes position 2k + r: ranks interleave through one order, a pass of 5 at a time.
    order = [caption for pair in zip(*picks) for caption in pair]
    captions = sorted(example.captions[0].split()[-1] for example in examples)
    assert sorted(order[:5]) == captions and sorted(order[5:10]) == captions
    assert picks[0] != picks[1]
