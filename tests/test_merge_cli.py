"""`python -m reslora_diffusers.merge` end to end: every format loads in plain diffusers and reproduces the merge."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from tiny_models import perturb_adapter, tiny_pipeline, unet_inputs

from reslora_diffusers import ResLoRAConfig, apply_reslora, save_adapter
from reslora_diffusers.merge import image_psnr
from reslora_diffusers.merge.cli import main

PROMPTS = ["a b c", "hello"]
STEPS = "4"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("base")
    tiny_pipeline().save_pretrained(directory)
    return directory


def plain_pipeline(path, **kwargs):
    """Loading side: plain diffusers, no project code."""
    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe):
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPTS, num_inference_steps=int(STEPS), generator=generator, output_type="np").images


def train_adapter(base_dir, directory, config):
    """A saved adapter with moved factors and recorded input norms, as training leaves it."""
    pipe = plain_pipeline(base_dir)
    adapter = apply_reslora(pipe.unet, config, pipe.text_encoder)
    perturb_adapter(adapter, std=0.05)
    pipe.unet.train(), pipe.text_encoder.train()
    ids = pipe.tokenizer(PROMPTS, padding="max_length", return_tensors="pt").input_ids
    inputs = unet_inputs(size=16)
    inputs["encoder_hidden_states"] = pipe.text_encoder(ids).last_hidden_state
    pipe.unet(**inputs)
    save_adapter(adapter, directory)
    return directory


def merge(base_dir, adapter_dir, fmt, output, *extra):
    argv = ["--base", str(base_dir), "--adapter", str(adapter_dir), "--format", fmt, "--output", str(output)]
    argv += ["--num_inference_steps", STEPS, "--calibration_prompts", *PROMPTS, *extra]
    return main(argv)


@pytest.fixture(scope="module")
def is_adapter(base_dir, tmp_path_factory):
    return train_adapter(base_dir, tmp_path_factory.mktemp("is_adapter"), ResLoRAConfig(res_type="is", rank=4, lora_alpha=8))


@pytest.fixture(scope="module")
def merged_dir(base_dir, is_adapter, tmp_path_factory):
    output = tmp_path_factory.mktemp("out") / "merged"
    assert merge(base_dir, is_adapter, "diffusers", output, "--merge_method", "lstsq") == 0
    return output


def test_full_merge_has_the_base_cost_and_a_fidelity_report(base_dir, merged_dir):
    merged, base = plain_pipeline(merged_dir), plain_pipeline(base_dir)
    assert all(isinstance(p, AttnProcessor2_0) for p in merged.unet.attn_processors.values())
    for name in ("unet", "text_encoder", "vae"):
        assert sum(p.numel() for p in getattr(merged, name).parameters()) == sum(p.numel() for p in getattr(base, name).parameters())
    assert set(merged.unet.state_dict()) == set(base.unet.state_dict())
    assert image_psnr(images(merged)[0] * 255, images(base)[0] * 255) < 60  # the adapter changed the images
    report = json.loads((merged_dir.parent / "merged.merge_report.json").read_text())
    assert report["chosen"] == "lstsq" and set(report["methods"]) == {"input", "weight", "lstsq", "lstsq_joint", "calibrated"}
    for entry in report["methods"].values():
        assert 0 < entry["unet_relative_error"] < 1 and entry["alpha"]["count"] > 0 and "image_psnr_db" in entry
    objective = {m: e["calibration_objective"] for m, e in report["methods"].items() if m != "calibrated"}
    assert objective["lstsq"] <= min(objective["input"], objective["weight"]) * (1 + 1e-9)


@pytest.mark.parametrize("fmt", ["diffusers-lora", "kohya"])
def test_lora_files_load_in_plain_diffusers_and_reproduce_the_merged_images(base_dir, is_adapter, merged_dir, tmp_path, fmt):
    output = tmp_path / ("lora" if fmt == "diffusers-lora" else "lora.safetensors")
    assert merge(base_dir, is_adapter, fmt, output, "--merge_method", "lstsq") == 0
    pipe = plain_pipeline(base_dir)
    pipe.load_lora_weights(str(output))
    got, expected = images(pipe), images(plain_pipeline(merged_dir))
    assert np.abs(got - expected).max() < 2e-3


def test_single_file_checkpoint_reproduces_the_merged_images(base_dir, is_adapter, merged_dir, tmp_path):
    output = tmp_path / "model.safetensors"
    assert merge(base_dir, is_adapter, "single-file", output, "--merge_method", "lstsq") == 0
    pipe = StableDiffusionPipeline.from_single_file(str(output), config=str(base_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert np.abs(images(pipe) - images(plain_pipeline(merged_dir))).max() < 2e-3


def test_exact_bs_merge_through_the_command_line(base_dir, tmp_path):
    adapter_dir = train_adapter(base_dir, tmp_path / "bs", ResLoRAConfig(res_type="bs", rank=2, pre_num=-1))
    assert merge(base_dir, adapter_dir, "diffusers-lora", tmp_path / "lora", "--skip_images") == 0
    report = json.loads((tmp_path / "lora.merge_report.json").read_text())
    assert list(report["methods"]) == ["exact"] and report["methods"]["exact"]["unet_relative_error"] < 1e-5
    pipe = plain_pipeline(base_dir)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    assert report["methods"]["exact"]["text_encoder_relative_error"] < 1e-5


def test_export_rank_recompresses_and_reports_energy(base_dir, is_adapter, tmp_path, capsys):
    assert merge(base_dir, is_adapter, "kohya", tmp_path / "r2.safetensors", "--export_rank", "2", "--skip_images") == 0
    report = json.loads((tmp_path / "r2.safetensors.merge_report.json").read_text())
    assert 0 < report["export_rank"]["energy_kept_min"] <= report["export_rank"]["energy_kept_mean"] < 1
    assert "energy kept" in capsys.readouterr().out


def run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "reslora_diffusers.merge", *map(str, argv)], capture_output=True, text=True)


def assert_one_line_error(result, match):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], result.stderr


def test_bad_input_gives_one_clear_line_and_writes_nothing(base_dir, is_adapter, tmp_path):
    other_base = tmp_path / "other"
    pipe = tiny_pipeline()
    pipe.text_encoder.encoder.layers = pipe.text_encoder.encoder.layers[:1]
    pipe.text_encoder.config.num_hidden_layers = 1
    pipe.save_pretrained(other_base)
    out = tmp_path / "out.safetensors"
    assert_one_line_error(run_cli("--base", other_base, "--adapter", is_adapter, "--format", "kohya", "--output", out), "chains do not fit")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in ("reslora_config.json", "reslora_adapter.safetensors"):
        (corrupt / name).write_bytes((is_adapter / name).read_bytes())
    (corrupt / "reslora_adapter.safetensors").write_bytes(b"\x80\x04pickle")
    assert_one_line_error(run_cli("--base", base_dir, "--adapter", corrupt, "--format", "kohya", "--output", out), "is a pickled PyTorch file")
    assert_one_line_error(run_cli("--base", base_dir, "--adapter", is_adapter, "--format", "ckpt", "--output", out), "invalid choice")
    assert_one_line_error(run_cli("--base", tmp_path / "missing", "--adapter", is_adapter, "--format", "kohya", "--output", out), "not found")
    assert not out.exists() and not list(tmp_path.glob("*.merge_report.json"))
    out.write_bytes(b"keep me")
    assert_one_line_error(run_cli("--base", base_dir, "--adapter", is_adapter, "--format", "kohya", "--output", out), "--overwrite")
    assert out.read_bytes() == b"keep me"


def test_threads_flag_sets_torch_threads_and_has_a_sane_default(base_dir, is_adapter, tmp_path, monkeypatch):
    """--threads N runs the merge with N torch threads; the default leaves half the cores free (at most 4)."""
    from reslora_diffusers.cli import default_threads
    from reslora_diffusers.merge import cli as merge_cli

    seen = []
    monkeypatch.setattr(merge_cli, "run", lambda args: seen.append((args.threads, torch.get_num_threads())))
    before = torch.get_num_threads()
    try:
        for threads in ("3", None):
            extra = ["--threads", threads] if threads else []
            assert merge(base_dir, is_adapter, "kohya", tmp_path / "t.safetensors", *extra) == 0
    finally:
        torch.set_num_threads(before)
    assert seen[0] == (3, 3)
    assert seen[1][0] == seen[1][1] == default_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert default_threads() == 4
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert default_threads() == 2


def test_export_rank_above_the_merged_rank_reports_the_rank_written(base_dir, is_adapter, tmp_path, capsys):
    output = tmp_path / "big.safetensors"
    assert merge(base_dir, is_adapter, "kohya", output, "--export_rank", "100000", "--skip_images") == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "big.safetensors.merge_report.json").read_text())["export_rank"]
    assert report["requested"] == 100000 and report["rank"] == report["merged_rank"] == 4
    assert "re-compressed to rank 100000" not in out and "written at rank 4, unchanged" in out
    assert "[" in out and "merging and measuring: lstsq (3/5)" in out  # progress lines for the phases
    from safetensors.torch import load_file

    ranks = {v.shape[0] for k, v in load_file(output).items() if k.endswith("lora_down.weight")}
    assert ranks == {4}


def test_a_config_edited_to_another_res_type_is_named_as_such(tmp_path):
    """Chains saved for `is` (split by input shape) do not fit a config edited to `bs`: the message says so,
    instead of blaming a different base model."""
    from reslora_diffusers.adapters.io import _check_chains_match_config

    layer = {"target": "to_q", "in_features": 16, "out_features": 16}
    metadata = {
        "layers": {"unet.a.to_q": {**layer, "input_shape": [64, 16]}, "unet.b.to_q": {**layer, "input_shape": [16, 16]}},
        "chains": {"unet": [["unet.a.to_q"], ["unet.b.to_q"]]},
    }
    _check_chains_match_config(metadata, ResLoRAConfig(res_type="is"), tmp_path / "reslora_config.json")
    with pytest.raises(ValueError, match="chains were not built for its res_type 'bs' \\(was the config edited\\?\\)"):
        _check_chains_match_config(metadata, ResLoRAConfig(res_type="bs"), tmp_path / "reslora_config.json")


def test_conv_adapters_through_the_command_line(base_dir, tmp_path):
    """An `ms` adapter with LoCon blocks on the ResNet convs: the report gives their merge error, and the kohya file
    (4-D lora_down), the diffusers LoRA and the single file all reproduce the merged pipeline's images."""
    config = ResLoRAConfig(res_type="ms", rank=2, conv_rank=2, conv_alpha=4.0)
    adapter_dir = train_adapter(base_dir, tmp_path / "ms_conv", config)
    output = tmp_path / "out"
    argv = ["--base", str(base_dir), "--adapter", str(adapter_dir), "--output", str(output), "--merge_method", "calibrated",
            "--format", "kohya", "diffusers-lora", "single-file", "diffusers", "--num_inference_steps", STEPS,
            "--calibration_prompts", *PROMPTS]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((output / "out.merge_report.json").read_text())
    assert 0 < report["methods"]["calibrated"]["unet_relative_error"] < 1
    from safetensors.torch import load_file

    kohya = load_file(str(output / "kohya_lora.safetensors"))
    assert kohya["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].ndim == 4
    expected = images(plain_pipeline(output / "merged_diffusers"))
    assert image_psnr(expected[0] * 255, images(plain_pipeline(base_dir))[0] * 255) < 60
    for lora in (output / "kohya_lora.safetensors", output):
        pipe = plain_pipeline(base_dir)
        pipe.load_lora_weights(str(lora))
        assert np.abs(images(pipe) - expected).max() < 2e-3, lora
    single = StableDiffusionPipeline.from_single_file(str(output / "merged_model.safetensors"), config=str(base_dir), local_files_only=True)
    single.set_progress_bar_config(disable=True)
    assert np.abs(images(single) - expected).max() < 2e-3
