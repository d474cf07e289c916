"""The benchmark scripts run end to end (tiny settings, subprocesses): they print their tables and write valid JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from reslora_diffusers.examples.emoji_data import split_of, write_metadata

ROOT = Path(__file__).resolve().parents[1]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
COLOURS = ["red", "blue", "green", "pink", "black", "white", "gold", "grey"]
THINGS = ["cat", "dog", "fish", "star", "moon", "tree", "car", "cake"]


def run_script(*args, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_speed_tiny_prints_table_and_writes_json(tmp_path):
    out = tmp_path / "speed.json"
    methods = "floor,peft,lora,is,bs_m1,delta"
    result = run_script(
        "benchmarks/speed.py", "--size", "tiny", "--device", "cpu", "--methods", methods, "--batch", "2",
        "--repeats", "2", "--steps", "1", "--warmup", "0", "--infer_repeats", "1", "--threads", "1", "--json", out,
    )  # fmt: skip
    assert "| method" in result.stdout and "LoRA (ours)" in result.stdout and "## Targets" in result.stdout
    data = json.loads(out.read_text())
    training = data["training"]
    assert list(training) == methods.split(",")
    for key, row in training.items():
        assert len(row["step_s_all"]) == 2 and row["step_s_median"] > 0
        assert row["saved_bytes"] > 0
    assert training["floor"]["trainable_parameters"] == 0 and training["floor"]["added_vs_floor_bytes"] == 0
    # Same targets, same rank: our LoRA and PEFT's train the same number of parameters and save the same activations (fp32).
    assert training["lora"]["trainable_parameters"] == training["peft"]["trainable_parameters"] > 0
    assert training["lora"]["saved_bytes"] == training["peft"]["saved_bytes"]
    assert training["lora"]["x_lora"] == 1.0
    merged = data["inference"]["bs_m1"]["merged"]
    assert merged["same_architecture_as_base"] and merged["merge_method"] == "exact"
    assert "merged" not in data["inference"]["peft"]
    assert any(t["target"].startswith("our LoRA step") for t in data["targets"])


# Two of the four family × precision pairs (each takes about a minute on one core): every method in each, both
# families and both precisions covered; SDXL in bf16 is what BENCHMARKS.md's table counts.
@pytest.mark.parametrize("family, precision", [("sd", "fp32"), ("sdxl", "bf16")])
def test_fake_tensor_accounting_counts_the_bytes_a_real_forward_saves(family, precision):
    # speed.py --fake_tensors counts SDXL-size memory in seconds (BENCHMARKS.md cross-checks its SDXL
    # table with it): it must count exactly what a real run counts, per method.
    from types import SimpleNamespace

    from benchmarks.common import AdapterSettings, parse_methods
    from benchmarks.speed import account_memory, make_inputs
    from tests.tiny_models import tiny_sdxl_unet, tiny_unet

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    unet = (tiny_sdxl_unet() if family == "sdxl" else tiny_unet()).to(dtype)
    args = SimpleNamespace(batch=2, latent_size=16, text_length=12, seed=0, precision=precision, fake_tensors=False)
    device = torch.device("cpu")
    inputs = make_inputs(unet, args, device, dtype)
    settings = AdapterSettings(rank=4, lora_alpha=4.0)
    outputs = []  # what the UNet returned: a real tensor, or a fake one when nothing was computed
    unet.register_forward_hook(lambda module, args_, output: outputs.append(type(output.sample).__name__))
    for m in parse_methods("floor,peft,lora,is,bs,bs_m1,ms,delta"):
        outputs.clear()
        real = account_memory(m, unet, inputs, settings, args, device)
        fake = account_memory(m, unet, inputs, settings, SimpleNamespace(**{**vars(args), "fake_tensors": True}), device)
        assert outputs[-2:] == ["Tensor", "FakeTensor"], (m.key, outputs)
        assert real["saved_bytes"] > 0
        assert fake == real, m.key


def tiny_pipeline(directory: Path) -> None:
    """A v-prediction SD pipeline in miniature (32 px images, 16×16 latents) whose tokenizer knows letters."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in LETTERS:
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=8)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
    )  # fmt: skip
    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction", steps_offset=1)
    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(directory)  # fmt: skip


def emoji_folders(root: Path) -> tuple[Path, Path]:
    """Noto-like (shaded) and Twemoji-like (flat) discs, one per caption, in both splits."""
    captions = [f"{c} {t}" for c in COLOURS for t in THINGS]
    assert sum(split_of(c) == "heldout" for c in captions) >= 2
    yy, xx = np.mgrid[:32, :32]
    disc = (yy - 15.5) ** 2 + (xx - 15.5) ** 2 < 13**2
    folders = []
    for style in ("noto", "twemoji"):
        folder = root / style
        folder.mkdir()
        records = []
        for i, caption in enumerate(captions):
            colour = np.array([(37 * i) % 256, (91 * i) % 256, (53 * i) % 256], dtype=np.float64)
            shade = 1.0 if style == "twemoji" else (0.5 + yy / 64)[..., None]
            image = np.where(disc[..., None], colour * shade, 255.0).clip(0, 255).astype(np.uint8)
            Image.fromarray(image).save(folder / f"{i:03d}.png")
            records.append({"file_name": f"{i:03d}.png", "text": caption, "split": split_of(caption)})
        write_metadata(records, folder / "metadata.jsonl")
        folders.append(folder)
    return folders[0], folders[1]


def test_convergence_quick_judges_the_merged_model_and_writes_json(tmp_path):
    tiny_pipeline(tmp_path / "base")
    noto, twemoji = emoji_folders(tmp_path)
    methods = ["lora", "ms_m1+", "ms_m1_anneal+"]
    args = [
        "benchmarks/convergence.py", "--quick", "--base", tmp_path / "base", "--noto_dir", noto, "--twemoji_dir", twemoji,
        "--methods", ",".join(methods), "--steps", "4", "--eval_every", "2", "--batch_size", "4", "--image_prompts", "2",
        "--sample_steps", "2", "--classifier_steps", "20", "--lr_grid", "1e-2,3e-2", "--lr_extend", "0", "--seeds", "0,1",
        "--val_fraction", "0.3", "--calibration_batches", "2", "--device", "cpu", "--threads", "1", "--out_dir", tmp_path / "out",
    ]  # fmt: skip
    result = run_script(*args, timeout=600)
    assert "The merged (deployed) model" in result.stdout and "Learning rate" in result.stdout
    data = json.loads((tmp_path / "out" / "convergence_merged_quick.json").read_text())
    assert data["eval_steps"] == [0, 2, 4] and len(data["settings"]["base_unet_sha256"]) == 64
    # Every method starts from the base model (B = 0): the same held-out loss at step 0.
    assert len({round(run["heldout_loss"][0], 10) for run in data["runs"]}) == 1
    selection, summary = data["summary"]["lr_selection"], data["summary"]["methods"]
    assert set(selection) == {"lora", "ms_m1+"}  # the annealed variant takes its parent's lr
    for s in selection.values():  # chosen on the merged model's validation loss
        assert len(s["val_merged_best"]) == 2 and s["best_lr"] == float(min(s["val_merged_best"], key=s["val_merged_best"].get))
    assert list(summary) == methods and summary["ms_m1_anneal+"]["lr"] == selection["ms_m1+"]["best_lr"]
    for row in summary.values():
        assert row["seeds"] == [0, 1] and row["unmerged"]["std"] is not None and row["merged_vs_lora"]["ci95"] is not None
        assert 0 <= row["image_metrics_merged"]["p_twemoji"]["mean"] <= 1
    assert summary["lora"]["merged_vs_lora"]["mean"] == 0.0
    for run in data["runs"]:
        exact = run["method"] != "ms_m1+"
        assert set(run["merged"]) == ({"exact"} if exact else {"input", "weight", "lstsq", "lstsq_joint", "calibrated"})
        if exact:  # exact merges reproduce the unmerged model
            assert run["merged"]["exact"]["heldout"] == pytest.approx(run["heldout_loss"][-1], rel=1e-5)
        if run["method"] == "ms_m1_anneal+":
            assert run["shortcut_scale"] == [1.0, 0.0]
    assert (tmp_path / "out" / "convergence_merged_quick.png").is_file()
    assert (tmp_path / "out" / "convergence_merged_quick_samples.png").is_file()
    # --resume with another thread count refuses (CPU results depend on it).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    refused = subprocess.run([sys.executable, *map(str, args[:-4]), "--threads", "2", "--out_dir", tmp_path / "out", "--resume"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 2 and "threads" in refused.stderr.strip().splitlines()[-1]
    # Invocations split over cores combine (--combine); a resumed sweep run whose images were lost is redone, not
    # reported without image metrics (it was, before: the seed then had no image metrics at all).
    part = json.loads((tmp_path / "out" / "convergence_merged_quick.json").read_text())
    lora_lr = selection["lora"]["best_lr"]
    part["runs"] = [r for r in part["runs"] if r["method"] != "ms_m1_anneal+"]
    for run in part["runs"]:
        if run["method"] == "lora" and run["seed"] == 0 and run["lr"] == lora_lr:
            del run["image_metrics"]
    (tmp_path / "out" / "convergence_part.json").write_text(json.dumps(part))
    combined = run_script(*args[:-2], "--out_dir", tmp_path / "out", "--tag", "combined", "--combine", "part", "--no_plots", timeout=600)
    trained = [line for line in combined.stdout.splitlines() if line.startswith("[")]
    assert len(trained) == 3, combined.stdout  # ms_m1_anneal+ on 2 seeds, and lora's seed 0 again
    again = json.loads((tmp_path / "out" / "convergence_combined.json").read_text())
    for key in methods:  # the same seeds give the same runs, so the same summary
        for figure in ("unmerged", "merged_best"):
            assert again["summary"]["methods"][key][figure]["mean"] == pytest.approx(summary[key][figure]["mean"], rel=1e-6)
    redone = next(r for r in again["runs"] if r["method"] == "lora" and r["seed"] == 0 and r["lr"] == lora_lr)
    assert "image_metrics" in redone


def test_the_lr_grid_grows_past_an_edge_optimum():
    from benchmarks.convergence import lr_candidates
    from benchmarks.convergence_stats import describe, monotone

    grid = [1e-3, 2e-3, 4e-3]
    assert lr_candidates(grid, {1e-3: 0.5}, 2) == [2e-3, 4e-3]
    assert lr_candidates(grid, {1e-3: 0.5, 2e-3: 0.4, 4e-3: 0.3}, 2) == [pytest.approx(8e-3)]
    assert lr_candidates(grid, {1e-3: 0.2, 2e-3: 0.4, 4e-3: 0.3}, 2) == [pytest.approx(5e-4)]
    assert lr_candidates(grid, {1e-3: 0.5, 2e-3: 0.2, 4e-3: 0.3}, 2) == []  # optimum inside
    assert lr_candidates(grid, {5e-4: 0.1, 1e-3: 0.2, 2e-3: 0.4, 4e-3: 0.3, 8e-3: 0.5}, 2) == []  # extended twice
    assert monotone([5, 4, 4.5, 3, 3.2, 3.1, 2]) == [5, 4.25, 4.25, 3.1, 3.1, 3.1, 2]
    d = describe([1.0, 2.0, 3.0])
    assert d["std"] == 1.0 and d["ci95"] == pytest.approx(4.303 / 3**0.5)
