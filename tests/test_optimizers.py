"""`--optimizer`: Adafactor, Prodigy and schedule-free AdamW train, resume bit for bit (with LoRA+ groups and gradient
accumulation) and export; a missing optional package or an impossible combination is one `error:` line."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file
from test_train_script import (
    assert_same_adapter,
    build_tiny_pipeline,
    losses,
    run_in_process,
    summary,
    tiny_args,
    train_in_process,
    write_imagefolder,
)

from reslora_diffusers.training.optimizers import evaluation_weights, optimizer_name


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("optimizers")
    return {"model": build_tiny_pipeline(root / "model"), "data": write_imagefolder(root / "data", 8)}


@pytest.mark.parametrize("name", ["adafactor", "prodigy", "schedulefree_adamw"])
def test_each_optimizer_trains_resumes_bit_identically_and_exports(tiny, tmp_path, capsys, name):
    """4 steps straight == 2 steps, stop, resume, 2 more (LoRA+ groups, accumulation of 2). The straight run also draws validation images after every
    step: for schedule-free that switches to the averaged weights and back, which must not change the run."""
    flags = ["--optimizer", name, "--gradient_accumulation_steps", "2", "--train_batch_size", "2",
             "--checkpointing_steps", "2", "--merge_method", "input", "--res_type", "bs"]
    if name != "prodigy":  # Prodigy refuses per-group learning rates (tested below)
        flags += ["--lora_plus_ratio", "4"]
    if name != "schedulefree_adamw":
        flags += ["--lr_scheduler", "constant_with_warmup"]  # a schedule that does not depend on --max_train_steps
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    validation = ["--num_validation_images", "1", "--validation_steps", "1", "--validation_inference_steps", "2"]
    train_in_process(capsys, tiny_args(tiny, straight, *flags, *validation, "--max_train_steps", "4"))
    train_in_process(capsys, tiny_args(tiny, resumed, *flags, "--max_train_steps", "2"))
    train_in_process(capsys, tiny_args(tiny, resumed, *flags, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"))

    assert summary(resumed)["steps_this_run"] == 2
    assert_same_adapter(load_file(straight / "reslora_adapter.safetensors"), load_file(resumed / "reslora_adapter.safetensors"))
    assert losses(resumed) == losses(straight)
    assert len(set(losses(straight))) == 4  # it trained
    assert (straight / "validation" / "step-000002.png").is_file()
    for output in ("pytorch_lora_weights.safetensors", "kohya/resumed.safetensors", "training_summary.json"):
        assert (resumed / output).is_file(), output
    # The checkpoint holds the training point; the export is the evaluation point (schedule-free: its average).
    trained = load_file(resumed / "checkpoint-4" / "reslora_adapter.safetensors")
    exported = load_file(resumed / "reslora_adapter.safetensors")
    same = all(torch.equal(trained[k], exported[k]) for k in exported if k in trained)
    assert same == (name != "schedulefree_adamw")


def test_schedule_free_exports_its_averaged_weights_and_validation_restores_the_training_ones():
    """Schedule-free trains at y and evaluates at x: the export takes x; a validation in between restores y bit for
    bit (its own train() after eval() is a lerp each way, which does not round-trip exactly)."""
    schedulefree = pytest.importorskip("schedulefree")
    torch.manual_seed(0)
    weights = torch.nn.Parameter(torch.randn(64, 64))
    optimizer = schedulefree.AdamWScheduleFree([weights], lr=0.05, warmup_steps=0)
    optimizer.train()
    for _ in range(5):
        weights.grad = torch.randn_like(weights)
        optimizer.step()
    training = weights.detach().clone()
    with evaluation_weights(optimizer, [weights]):
        averaged = weights.detach().clone()
    assert not torch.equal(averaged, training)
    assert torch.equal(weights, training) and optimizer.param_groups[0]["train_mode"]
    optimizer.eval()
    optimizer.train()
    assert not torch.equal(weights, training)  # what the plain round trip would have left


def test_kohya_spellings_name_the_same_optimizers():
    assert [optimizer_name(n) for n in ("AdamW", "AdamW8bit", "Adafactor", "Prodigy", "AdamWScheduleFree")] == [
        "adamw", "adamw8bit", "adafactor", "prodigy", "schedulefree_adamw"]


@pytest.mark.parametrize("flags, message", [
    (["--optimizer", "lion"], "unknown optimizer 'lion'"),
    (["--optimizer", "schedulefree_adamw", "--lr_scheduler", "cosine"], "needs no learning-rate schedule"),
    (["--use_8bit_adam", "--optimizer", "prodigy"], "--use_8bit_adam means --optimizer adamw8bit"),
    (["--optimizer", "prodigy", "--lora_plus_ratio", "16"], "LoRA+ (--lora_plus_ratio) cannot be applied"),
])
def test_impossible_optimizer_settings_are_one_line(tiny, tmp_path, capsys, flags, message):
    code, _, err = run_in_process(tiny_args(tiny, tmp_path / "out", *flags), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, package", [("prodigy", "prodigyopt"), ("schedulefree_adamw", "schedulefree"),
                                           ("adamw8bit", "bitsandbytes")])
def test_a_missing_optimizer_package_is_one_line_naming_it(tiny, tmp_path, capsys, monkeypatch, name, package):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if it were not installed
    code, _, err = run_in_process(tiny_args(tiny, tmp_path / "out", "--optimizer", name), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and lines == [f"error: --optimizer {name} needs the {package} package (pip install {package})"], lines
    assert not (tmp_path / "out").exists()


def test_the_learning_rate_default_follows_the_optimizer(tiny, tmp_path, capsys):
    script_args = tiny_args(tiny, tmp_path / "out", "--optimizer", "prodigy")
    from test_train_script import _load_script

    args = _load_script().parse_args(script_args)
    assert args.learning_rate == 1.0 and args.lr_scheduler == "cosine"
    assert args.resolved_config["learning_rate"] == 1.0 and args.optimizer_settings["optimizer"] == "prodigy"
    args = _load_script().parse_args(tiny_args(tiny, tmp_path / "out", "--optimizer", "AdamWScheduleFree"))
    assert args.optimizer == "schedulefree_adamw" and args.lr_scheduler == "constant" and args.learning_rate == 1e-3
