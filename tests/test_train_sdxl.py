"""`train_text_to_image.py` on an SDXL base (detected from the model, no flag): both text encoders trained,
pooled embeddings and size / crop ids, fp16 with the VAE kept in fp32, checkpoints, resume, validation and
the exports loaded by `StableDiffusionXLPipeline`."""

import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file
from test_train_script import adapter, check, run, summary, write_imagefolder
from tiny_models import tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_sdxl")
    tiny_sdxl_pipeline().save_pretrained(root / "model")  # what scripts/make_tiny_sdxl.py writes
    return {"model": root / "model", "data": write_imagefolder(root / "data", 6)}


def sdxl_args(tiny_sdxl, output_dir, *extra):
    return [
        "--pretrained_model_name_or_path", str(tiny_sdxl["model"]), "--train_data_dir", str(tiny_sdxl["data"]),
        "--output_dir", str(output_dir), "--resolution", "32", "--train_batch_size", "2", "--rank", "4",
        "--res_type", "bs", "--train_text_encoder", "--report_to", "none", "--lr_warmup_steps", "0",
        "--checkpointing_steps", "1", *extra,
    ]


def test_sdxl_training_run_resume_and_exports(tiny_sdxl, tmp_path):
    out = tmp_path / "run"
    # A constant schedule may train on for longer after a resume (a cosine one's length is part of its state).
    result = check(run(sdxl_args(tiny_sdxl, out, "--max_train_steps", "2", "--mixed_precision", "fp16", "--lr_scheduler", "constant",
                                 "--num_validation_images", "1", "--validation_inference_steps", "2")))
    assert "SDXL: the VAE runs in fp32" in result.stdout + result.stderr
    config = json.loads((out / "reslora_config.json").read_text())
    assert config["base_family"] == "sdxl" and set(config["chains"]) == {"unet", "text_encoder", "text_encoder_2"}
    trained = adapter(out)
    for component in ("unet.", "text_encoder.", "text_encoder_2."):
        assert any(k.startswith(component) and k.endswith("lora_B") and v.abs().max() > 0 for k, v in trained.items())
    assert all(torch.isfinite(v).all() for v in trained.values())
    assert sorted(p.name for p in (out / "validation").glob("step-*.png")) == ["step-000000.png", "step-000002.png"]

    result = check(run(sdxl_args(tiny_sdxl, out, "--max_train_steps", "3", "--num_validation_images", "0", "--lr_scheduler", "constant",
                                 "--resume_from_checkpoint", "latest")))
    assert "Resuming from checkpoint" in result.stdout and summary(out)["steps_this_run"] == 1

    (kohya_file,) = (out / "kohya").glob("*.safetensors")
    names = {key.split(".")[0] for key in load_file(kohya_file)}
    assert {name.split("_")[1] for name in names} == {"unet", "te1", "te2"}
    assert any(name.startswith("lora_unet_input_blocks_") for name in names)
    with safe_open(str(kohya_file), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    for lora in (out, kohya_file):  # both exports load into plain diffusers' SDXL pipeline
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl["model"], local_files_only=True)
        before = pipe.text_encoder_2.text_model.encoder.layers[0].self_attn.q_proj.weight.clone()
        pipe.load_lora_weights(str(lora))
        pipe.fuse_lora()
        after = pipe.text_encoder_2.text_model.encoder.layers[0].self_attn.q_proj.weight
        assert not torch.equal(before, after)


def test_sdxl_buckets_with_cached_latents_repeat_an_uncached_run(tiny_sdxl, tmp_path):
    """Aspect-ratio buckets on SDXL: each image's size / crop ids come with its bucket, from pixels or from the latent
    cache alike (same losses); the text-embedding cache cannot hold SDXL's pooled embeddings and is refused."""
    from test_datasets import losses, write_kohya_folder

    data = write_kohya_folder(tmp_path / "kohya")
    flags = ["--train_data_dir", str(data), "--enable_bucket", "--resolution", "64", "--center_crop", "--res_type", "none",
             "--max_train_steps", "3", "--num_validation_images", "0", "--checkpointing_steps", "10"]
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    result = check(run(sdxl_args(tiny_sdxl, plain, *flags)))
    assert "aspect-ratio buckets" in result.stdout
    check(run(sdxl_args(tiny_sdxl, cached, *flags, "--cache_latents")))
    assert len(set(losses(plain))) == 3
    torch.testing.assert_close(torch.tensor(losses(cached)), torch.tensor(losses(plain)), rtol=1e-4, atol=0)
    # Masks and regularisation images on SDXL: the joined batch carries both images' size / crop ids.
    reg = write_kohya_folder(tmp_path / "reg")
    check(run(sdxl_args(tiny_sdxl, tmp_path / "masked", *flags, "--cache_latents", "--masked_loss", "--alpha_mask",
                        "--reg_data_dir", str(reg), "--prior_loss_weight", "0.5")))
    records = [json.loads(line) for line in (tmp_path / "masked" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["loss"] == pytest.approx(r["loss_instance"] + 0.5 * r["loss_prior"], rel=1e-5) for r in records)
    frozen_encoders = [a for a in sdxl_args(tiny_sdxl, tmp_path / "refused", *flags, "--cache_text_embeddings") if a != "--train_text_encoder"]
    refused = run(frozen_encoders)
    assert refused.returncode == 2 and "error: --cache_text_embeddings is for SD 1.x / 2.x bases" in refused.stderr
