"""Caption-file folders (kohya layout, `N_name` repeats), caption randomness, aspect-ratio buckets,
cached latents / text embeddings and config files, on their own and through `train_text_to_image.py`."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from PIL import Image
from safetensors.torch import load_file, save_file
from test_train_script import ACCELERATE, _load_script, build_tiny_pipeline, check, run, run_in_process

from reslora_diffusers.data.buckets import BucketBatchSampler, BucketLayout, bucket_sizes
from reslora_diffusers.data.caption_folder import load_local_folder
from reslora_diffusers.data.dataset import CaptionOptions, DatasetError, ImageCaptionDataset, ImageTransform


# -- a kohya-style example folder -----------------------------------------------------------------------------------
def _image(path: Path, width: int, height: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def write_kohya_folder(root: Path) -> Path:
    """Two concepts with repeats, two aspect ratios (+ one tall image), .txt and .caption files, a sub-folder:

        3_cat/a.png  a.txt        64×64, used 3 times per epoch
        3_cat/b.png  b.txt        64×64
        1_wide/c.png c.caption    96×32 (3:1)
        1_wide/sub/d.png d.txt    100×30 (nearest bucket 96×32)
        1_wide/e.png e.txt        two lines: two captions, one drawn per use
        f.png f.txt               32×96, in the root: used once
    """
    files = {
        "3_cat/a": ((64, 64), "cat, sitting, red"), "3_cat/b": ((64, 64), "cat, sleeping, blue"),
        "1_wide/c": ((96, 32), "wide, banner"), "1_wide/sub/d": ((100, 30), "wide, stripe"),
        "1_wide/e": ((96, 32), "wide, flag\nwide, ribbon"), "f": ((32, 96), "tall, tower"),
    }
    for seed, (stem, (size, caption)) in enumerate(files.items()):
        _image(root / f"{stem}.png", *size, seed)
        (root / f"{stem}{'.caption' if stem.endswith('/c') else '.txt'}").write_text(caption + "\n")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    return {"model": build_tiny_pipeline(root / "model"), "data": write_kohya_folder(root / "kohya")}


def kohya_args(tiny, output_dir: Path, *extra) -> list[str]:
    """The tiny model (VAE factor 4, so 32-px bucket steps) on the kohya folder, in 64² buckets, batches of 2."""
    return [
        "--pretrained_model_name_or_path", str(tiny["model"]), "--train_data_dir", str(tiny["data"]),
        "--output_dir", str(output_dir), "--resolution", "64", "--enable_bucket", "--train_batch_size", "2",
        "--rank", "4", "--report_to", "none", "--num_validation_images", "0", "--lr_warmup_steps", "1", *extra,
    ]


def losses(directory: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (directory / "metrics.jsonl").read_text().splitlines()]


# -- caption files --------------------------------------------------------------------------------------------------
def test_caption_folder_reads_repeats_captions_and_sub_folders(tmp_path):
    examples = load_local_folder(write_kohya_folder(tmp_path / "data"))
    found = {e.image.relative_to(tmp_path / "data").as_posix(): (e.captions, e.repeats) for e in examples}
    assert found == {
        "3_cat/a.png": (("cat, sitting, red",), 3), "3_cat/b.png": (("cat, sleeping, blue",), 3),
        "1_wide/c.png": (("wide, banner",), 1), "1_wide/sub/d.png": (("wide, stripe",), 1),
        "1_wide/e.png": (("wide, flag", "wide, ribbon"), 1), "f.png": (("tall, tower",), 1),
    }
    dataset = ImageCaptionDataset(examples, ImageTransform(32, True, False), seed=0)
    assert len(dataset) == 10


def test_missing_caption_is_an_error_unless_the_folder_name_is_asked_for(tmp_path):
    data = write_kohya_folder(tmp_path / "data")
    (data / "3_cat" / "a.txt").unlink()
    with pytest.raises(DatasetError, match=r"a\.png has no caption: write a\.txt beside it, or pass --missing_caption folder_name"):
        load_local_folder(data)
    examples = load_local_folder(data, missing_caption="folder_name")
    assert next(e for e in examples if e.image.name == "a.png").captions == ("cat",)


def test_metadata_and_caption_files_must_agree(tmp_path):
    data = write_kohya_folder(tmp_path / "data")
    images = sorted(data.rglob("*.png"))
    rows = [{"file_name": p.relative_to(data).as_posix(), "text": "same for all"} for p in images]
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DatasetError, match="differ between the metadata file .* pass --caption_source metadata or files"):
        load_local_folder(data)
    assert {e.captions for e in load_local_folder(data, caption_source="metadata")} == {("same for all",)}
    assert len({e.captions for e in load_local_folder(data, caption_source="files")}) == 6
    # Agreeing sources are fine, and the folders' repeats still apply.
    by_path = {e.image: e for e in load_local_folder(data, caption_source="files")}
    rows = [{"file_name": p.relative_to(data).as_posix(), "text": list(by_path[p].captions)} for p in images]
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sum(e.repeats for e in load_local_folder(data)) == 10


def test_caption_shuffle_keeps_the_first_tags_and_dropout_empties(tmp_path):
    shuffle = CaptionOptions(shuffle=True, keep_tokens=1)
    caption = "sks, a, b, c, d, e"
    results = {shuffle(caption, torch.Generator().manual_seed(seed)) for seed in range(40)}
    assert len(results) > 10 and all(r.startswith("sks, ") and sorted(r.split(", ")) == sorted(caption.split(", ")) for r in results)
    dropout = CaptionOptions(dropout_rate=0.5)
    dropped = [dropout(caption, torch.Generator().manual_seed(seed)) == "" for seed in range(200)]
    assert 60 < sum(dropped) < 140


# -- buckets --------------------------------------------------------------------------------------------------------
def test_bucket_sizes_fit_the_budget_and_the_step():
    sizes = bucket_sizes(512, 256, 1024, 64)
    assert (512, 512) in sizes and (768, 320) in sizes and (320, 768) in sizes
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) and max(w, h) <= 1024 for w, h in sizes)
    layout = BucketLayout.assign([(1000, 1000), (1920, 1080), (600, 1500)], 512, 256, 1024, 64)
    assert layout.assigned == [(512, 512), (640, 384), (320, 768)]
    # Only the rounding of the sides is cropped away: 16:9 in 64-px steps is 5:3 at best, 1 - (5/3) / (16/9) = 6.25 %.
    np.testing.assert_allclose(layout.crops, [0.0, 1 - (5 / 3) / (16 / 9), 1 - (600 / 1500) / (320 / 768)])


def test_batches_never_mix_shapes_and_processes_get_the_same_shape():
    targets = [(64, 64)] * 7 + [(96, 32)] * 5 + [(32, 96)] * 1
    sampler = BucketBatchSampler(targets, batch_size=2, seed=3, num_processes=2)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) and all(len(b) == 2 for b in batches)
        assert all(len({targets[i] for i in batch}) == 1 for batch in batches)
        assert set().union(*batches) == set(range(len(targets)))  # every image every epoch
        # accelerate deals the batches out to the processes: at each step both train on one shape.
        shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=rank)) for rank in (0, 1)]
        assert len(shards[0]) == len(shards[1]) == len(batches) // 2
        assert all(targets[a[0]] == targets[b[0]] for a, b in zip(*shards))
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) != first
    sampler.set_epoch(1)
    assert list(sampler) == first  # the order depends only on (seed, epoch): a resumed run sees the same


def test_items_carry_sdxl_size_and_crop_for_their_bucket():
    """SDXL's conditioning of a bucketed example: original (h, w), the crop's (top, left) in the resized image
    (measured in the flipped image when flipped) and the bucket's (h, w), not the square resolution."""
    from reslora_diffusers.data.dataset import Example

    example = Example(Image.new("RGB", (100, 30)), ("wide",))  # resized to 107×32 for a 96×32 bucket: 11 spare columns
    for flip, left in ((False, 5), (True, 6)):
        dataset = ImageCaptionDataset([example], ImageTransform(64, center_crop=True, random_flip=flip), targets=[(96, 32)])
        if flip:  # random_flip flips with probability 1/2: find a seed that flips
            dataset.seed = next(s for s in range(50) if _flips(dataset, s))
        item = dataset[0]
        assert item["pixel_values"].shape == (3, 32, 96)
        assert (item["original_size"], item["crop_top_left"], item["target_size"]) == ((30, 100), (0, left), (32, 96))


def _flips(dataset: ImageCaptionDataset, seed: int) -> bool:
    dataset.seed = seed
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 0, 0]).generate_state(1)[0]))
    return dataset.transform.draw((100, 30), (96, 32), generator).flip


def test_empty_bucket_set_is_an_error():
    with pytest.raises(DatasetError, match="no aspect-ratio bucket fits"):
        BucketLayout.assign([(64, 64)], 64, 128, 256, 32)


# -- config files ---------------------------------------------------------------------------------------------------
def test_toml_config_with_a_command_line_override(tmp_path):
    config = tmp_path / "train.toml"
    config.write_text(
        'rank = 16\nlearning_rate = 1e-4\nvalidation_prompt = ["a cat", "a dog"]\n'
        "[data]\nenable_bucket = true\nmax_bucket_reso = 1024\nresolution = 512\ncaption_dropout_rate = 0.1\n"
    )
    args = _load_script().parse_args(["--config", str(config), "--rank", "4", "--res_type", "bs"])
    assert (args.rank, args.learning_rate, args.validation_prompt) == (4, 1e-4, ["a cat", "a dog"])
    assert (args.enable_bucket, args.max_bucket_reso, args.resolution, args.caption_dropout_rate) == (True, 1024, 512, 0.1)
    assert args.res_type == "bs" and args.lora_alpha == 4.0 and args.train_batch_size == 8  # default untouched
    assert args.resolved_config["rank"] == 4 and args.resolved_config["enable_bucket"] is True
    assert "hub_token" not in args.resolved_config and "config" not in args.resolved_config
    # The saved form reads back to the same settings.
    saved = tmp_path / "resolved_config.json"
    saved.write_text(json.dumps(args.resolved_config))
    again = _load_script().parse_args(["--config", str(saved)])
    assert again.resolved_config == args.resolved_config
    yaml_config = tmp_path / "train.yaml"
    yaml_config.write_text("rank: 12\nshuffle_caption: true\nkeep_tokens: 1\n")
    args = _load_script().parse_args(["--config", str(yaml_config)])
    assert (args.rank, args.shuffle_caption, args.keep_tokens) == (12, True, 1)


# -- through the training script ------------------------------------------------------------------------------------
def test_kohya_folder_with_repeats_and_two_aspect_ratios_trains(tiny, tmp_path):
    """Settings from a TOML file, one overridden on the command line; the histogram counts images and repeats."""
    config = tmp_path / "train.toml"
    config.write_text("max_train_steps = 99\nshuffle_caption = true\nkeep_tokens = 1\ncaption_dropout_rate = 0.2\n")
    out = tmp_path / "out"
    result = check(run(kohya_args(tiny, out, "--config", str(config), "--max_train_steps", "4", "--random_flip")))
    assert "aspect-ratio buckets: 3 of 5 in use" in result.stdout
    for line in ("64×64: 2, 6", "96×32: 3, 3", "32×96: 1, 1"):
        assert line in result.stdout
    assert "Num examples = 10" in result.stderr
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["global_step"] == 4 and all(np.isfinite(losses(out)))
    resolved = json.loads((out / "resolved_config.json").read_text())
    assert resolved["max_train_steps"] == 4 and resolved["shuffle_caption"] is True and resolved["enable_bucket"] is True
    assert '"caption_dropout_rate": 0.2' in (out / "README.md").read_text()


def test_cached_run_and_resumed_cached_run_repeat_an_uncached_run(tiny, tmp_path):
    """Same seed, no flips: caching the VAE posterior and the text embeddings changes nothing but the cost, and a
    bucketed run stopped after 3 steps and resumed (across an epoch end) gives the same losses as a straight one.
    Bucketed caching crops each bucket's rounding at the centre by itself (as kohya does): no --center_crop needed."""
    # No shortcut annealing: its schedule follows --max_train_steps, which the stopped run changes on resuming.
    flags = ["--lr_scheduler", "constant", "--checkpointing_steps", "3", "--shortcut_anneal_fraction", "0"]
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    check(run(kohya_args(tiny, plain, *flags, "--center_crop", "--max_train_steps", "7")))
    caching = ["--cache_latents", "--cache_text_embeddings"]
    first = check(run(kohya_args(tiny, cached, *flags, *caching, "--max_train_steps", "3")))
    assert "bucket rounding is cropped at the centre" in first.stderr
    assert json.loads((cached / "resolved_config.json").read_text())["center_crop"] is True
    assert "latent cache: 6 entries, 6 encoded (in memory)" in first.stderr
    assert "text embedding cache: 7 entries, 7 encoded (in memory)" in first.stderr
    check(run(kohya_args(tiny, cached, *flags, *caching, "--max_train_steps", "7", "--resume_from_checkpoint", "latest")))
    assert len(set(losses(plain))) == 7  # a real curve
    np.testing.assert_allclose(losses(cached), losses(plain), rtol=1e-4)


def _with_other_vae(model: Path, folder: Path) -> Path:
    """A copy of the model whose VAE weights differ slightly."""
    shutil.copytree(model, folder)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors = {k: v * 1.01 if k.startswith("encoder.conv_in") else v for k, v in tensors.items()}
    save_file(tensors, weights)
    return folder


def test_stale_disk_cache_is_rebuilt_after_the_vae_changes(tiny, tmp_path):
    cache = tmp_path / "cache"
    flags = ["--center_crop", "--max_train_steps", "3", "--cache_latents", "--cache_text_embeddings", "--data_cache_dir", str(cache)]
    first = check(run(kohya_args(tiny, tmp_path / "a", *flags)))
    assert "latent cache: 6 entries, 6 encoded (0 read from" in first.stderr
    assert len(list((cache / "latents").glob("*.safetensors"))) == 6

    other = _with_other_vae(tiny["model"], tmp_path / "other-model")
    second = check(run(kohya_args(tiny, tmp_path / "b", *flags, "--pretrained_model_name_or_path", str(other))))
    assert "latent cache: 6 entries, 6 encoded (0 read from" in second.stderr  # the VAE changed: all re-encoded
    assert "text embedding cache: 7 entries, 0 encoded (7 read from" in second.stderr  # the text encoder did not
    assert len(list((cache / "latents").glob("*.safetensors"))) == 12  # the old entries are kept, never read


def test_data_parallel_buckets_with_a_disk_cache(tiny, tmp_path):
    out, cache = tmp_path / "ddp", tmp_path / "cache"
    launcher = ACCELERATE + ["--multi_gpu", "--num_processes", "2", "--mixed_precision", "no"]
    check(run(kohya_args(tiny, out, "--max_train_steps", "3", "--center_crop", "--random_flip", "--cache_latents",
                         "--data_cache_dir", str(cache)), launcher=launcher, env={"ACCELERATE_USE_CPU": "1"}))
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["global_step"] == 3 and summary["replica_max_difference"] == 0.0
    assert len(list((cache / "latents").glob("*.safetensors"))) == 12  # both flips of 6 images, written once


# -- bad input ------------------------------------------------------------------------------------------------------
def _bad(tiny, tmp_path: Path, kind: str) -> list[str]:
    data = write_kohya_folder(tmp_path / "data")
    if kind == "unreadable caption":
        (data / "3_cat" / "a.txt").write_bytes(b"\xc3\x28bad")  # not UTF-8 (and no byte-order mark)
        return ["--train_data_dir", str(data)]
    if kind == "no caption":
        (data / "f.txt").unlink()
        return ["--train_data_dir", str(data)]
    if kind == "unknown config key":
        (tmp_path / "bad.toml").write_text("rank = 4\nlearning_rat = 1e-4\n")
        return ["--config", str(tmp_path / "bad.toml")]
    if kind == "random crop with cache":
        return ["--train_data_dir", str(data), "--cache_latents", "--data_cache_dir", str(tmp_path / "cache")]
    return {"empty bucket set": ["--min_bucket_reso", "128"],
            "cache and trained text encoder": ["--cache_text_embeddings", "--train_text_encoder"]}[kind]


BAD = {
    "unreadable caption": r"cannot read caption file .*a\.txt",
    "no caption": r"f\.png has no caption: write f\.txt beside it$",
    "unknown config key": r"bad\.toml: unknown key 'learning_rat' \(did you mean 'learning_rate'\?\)",
    "empty bucket set": r"no aspect-ratio bucket fits: sides from 128 to 128",
    "random crop with cache": r"--cache_latents keeps one crop per image, but \S+\.png would be cropped at random",
    "cache and trained text encoder": r"--cache_text_embeddings needs a frozen text encoder",
}


FOUND_ONCE_THE_MODEL_IS_LOADED = ("empty bucket set", "random crop with cache")  # they need the VAE's downsampling


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input_gets_one_clear_line_and_writes_nothing(tiny, tmp_path, capsys, kind):
    out = tmp_path / "out"
    argv = kohya_args(tiny, out, *_bad(tiny, tmp_path, kind))
    if kind == "random crop with cache":  # square crops, no buckets: the wide images would be cropped at random
        argv.remove("--enable_bucket")
    if kind in FOUND_ONCE_THE_MODEL_IS_LOADED:  # the log lines before it are not errors
        code, _, err = run_in_process(argv, capsys)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert "Traceback" not in err
    else:
        with pytest.raises(SystemExit) as exit_info:
            _load_script().main(argv)
        code, errors = exit_info.value.code, capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(errors) == 1 and errors[0].startswith("error: ") and re.search(BAD[kind], errors[0]), errors
    assert not out.exists() and not (tmp_path / "cache").exists()
