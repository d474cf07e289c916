"""The embedded default base model (assets/tiny-emoji-sd) and the emoji data set script."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import worker_threads
from PIL import Image

from reslora_diffusers.examples.emoji_data import (
    HELDOUT_FRACTION,
    clean_caption,
    is_heldout,
    load_split,
    split_of,
)
from reslora_diffusers.examples.emoji_eval import (
    load_reference,
    retrieval_ranks,
    summarize_ranks,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "assets" / "tiny-emoji-sd"
REFERENCE = ROOT / "assets" / "tiny-emoji-sd-eval" / "noto_reference.npz"
BUILD_SCRIPT = ROOT / "scripts" / "build_emoji_dataset.py"

# Nearest-neighbour check of the base model: NN_PROMPTS training-split names, NN_STEPS DPM-Solver++
# steps, guidance NN_GUIDANCE, seed 0; each image's rank among all 1911 Noto images (32 px, pixel L2).
# Measured for the committed model (factor-8 VAE, 95 + 89 CPU-minutes of UNet training; training_info.json):
# top-1 30/48, top-5 37/48, median rank 0 (chance: top-1 0.0005, top-5 0.0026, median rank ~955; the base
# before it: 13/48, 22/48, 9.5). The thresholds leave two prompts of room for last-bit differences between CPUs.
NN_PROMPTS = 48
NN_STEPS = 8
NN_GUIDANCE = 3.0
NN_MIN_TOP1 = 28
NN_MIN_TOP5 = 35
NN_MAX_MEDIAN_RANK = 1


def _build_module():
    spec = importlib.util.spec_from_file_location("build_emoji_dataset", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(worker_threads(2))
    pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_base_model_loads_offline_and_draws_64px(pipe):
    image = pipe("french fries", num_inference_steps=10, guidance_scale=3.0, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    arr = np.asarray(image, dtype=np.float32)
    assert arr.std() > 10.0, "the generated image is (nearly) constant"


def test_base_model_folder_is_standard_and_small():
    from transformers import CLIPTokenizer

    for name in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
                 "tokenizer/merges.txt", "unet/diffusion_pytorch_model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "ATTRIBUTION.md"):
        assert (MODEL_DIR / name).is_file(), name
    assert sum(f.stat().st_size for f in MODEL_DIR.rglob("*") if f.is_file()) < 40e6
    import json

    vae = json.loads((MODEL_DIR / "vae" / "config.json").read_text())
    assert len(vae["block_out_channels"]) == 4 and vae["latent_channels"] == 4  # SD's factor 8, SD-1's 4 channels
    tok = CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer")
    assert tok.tokenize("French Fries") == ["french</w>", "fries</w>"]
    ids = tok("flag: egypt").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id


def test_base_model_draws_the_prompted_emoji(pipe):
    """The prompted emoji ranks near the top among all Noto images by pixel distance to the output."""
    reference = load_reference()
    prompts = reference.prompts("train", NN_PROMPTS)
    out = pipe(prompts, num_inference_steps=NN_STEPS, guidance_scale=NN_GUIDANCE, height=64, width=64,
               generator=torch.Generator().manual_seed(0)).images
    ranks = retrieval_ranks(out, prompts, reference)
    print(summarize_ranks(ranks))
    assert (ranks == 0).sum() >= NN_MIN_TOP1
    assert (ranks < 5).sum() >= NN_MIN_TOP5
    assert np.median(ranks) <= NN_MAX_MEDIAN_RANK


def test_captions_are_clean():
    assert clean_caption("FRENCH FRIES") == "french fries"
    assert clean_caption("Egypt Flag") == "flag: egypt"
    assert clean_caption("Côte d\u2019Ivoire Flag") == "flag: cote d'ivoire"
    assert clean_caption("  KEYCAP:  * ") == "keycap: *"


def test_split_is_fixed():
    # Pinned values: changing the split rule would silently change every benchmark's held-out set.
    assert [is_heldout(n) for n in ("french fries", "fish", "flag: egypt", "red apple", "grinning face")] == [
        False, True, False, False, False]
    assert split_of("fish") == "heldout" and split_of("french fries") == "train"
    texts = list(np.load(REFERENCE)["texts"])
    share = np.mean([is_heldout(t) for t in texts])
    assert abs(share - HELDOUT_FRACTION) < 0.02
    assert [is_heldout(t) for t in texts] == [is_heldout(t) for t in texts]


def test_sample_set_is_train_split_only():
    records = load_split(ROOT / "assets" / "twemoji-sample", split=None)
    assert 200 <= len(records) <= 400
    assert all(r["split"] == "train" for r in records)
    assert all(Path(r["path"]).is_file() for r in records)
    assert (ROOT / "assets" / "twemoji-sample" / "ATTRIBUTION.md").is_file()


def test_metadata_writer_is_deterministic(tmp_path):
    build = _build_module()
    captions = {"1f35f.png": "french fries", "1f41f.png": "fish", "1f1ea-1f1ec.png": "flag: egypt"}
    rng = np.random.default_rng(0)
    images = {k: Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for k in captions}
    outputs = []
    for run in range(2):
        out = tmp_path / f"run{run}"
        build.write_imagefolder(out, images, build.records_for(dict(reversed(captions.items()) if run else captions.items())), desc="t")
        outputs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outputs[0] == outputs[1]
    assert set(outputs[0]) == {"metadata.jsonl", *captions}
    assert [r["text"] for r in load_split(tmp_path / "run0", split="heldout")] == ["fish"]


def _run_build(tmp_path, env):
    return subprocess.run([sys.executable, str(BUILD_SCRIPT), "--cache_dir", str(tmp_path / "cache"),
                           "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)


def test_build_script_fails_clearly_without_npm(tmp_path):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    res = _run_build(tmp_path, {**os.environ, "PATH": str(empty_bin)})
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "npm" in res.stderr
    assert not (tmp_path / "out").exists()


def test_build_script_fails_clearly_when_offline(tmp_path):
    if subprocess.run(["which", "npm"], capture_output=True).returncode != 0:
        pytest.skip("npm not installed")
    env = {**os.environ, "npm_config_registry": "http://127.0.0.1:9/", "npm_config_cache": str(tmp_path / "npm"),
           "npm_config_fetch_retries": "0"}
    res = _run_build(tmp_path, env)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "npm pack" in res.stderr
