"""SDXL end to end on a tiny SDXL-shaped pipeline: adapters on the UNet and both text encoders, native
save / load, and every export loaded back by plain diffusers."""

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_models import MAX_TOKENS, perturb_adapter, sdxl_unet_inputs, tiny_pipeline, tiny_sdxl_pipeline, token_ids

from reslora_diffusers import AdapterMismatchError, ResLoRAConfig, apply_reslora, load_adapter, save_adapter
from reslora_diffusers.adapters.config import CONV_TARGETS
from reslora_diffusers.formats import (
    kohya_name,
    load_kohya_lora,
    save_diffusers_lora,
    save_kohya_lora,
    save_single_file_checkpoint,
    single_file_state_dict,
)
from reslora_diffusers.merge import baked_weights, merge_adapter, merge_into_base, relative_error

VARIANTS = {
    "none": ResLoRAConfig(res_type="none", rank=2),
    "is": ResLoRAConfig(res_type="is", rank=2),
    "bs": ResLoRAConfig(res_type="bs", rank=2),
    "ms": ResLoRAConfig(res_type="ms", rank=2),
    "delta": ResLoRAConfig(res_type="none", rank=2, delta_lora_ratio=0.5, delta_lora_start=0),
    # LoCon on every conv target (ResNet 3×3 and 1×1, down- / upsamplers): SDXL names them in LDM naming
    "conv_bs": ResLoRAConfig(res_type="bs", rank=2, conv_rank=2, conv_targets=CONV_TARGETS),
    "conv_ms": ResLoRAConfig(res_type="ms", rank=2, conv_rank=3, conv_alpha=1.5),
}


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_sdxl")
    tiny_sdxl_pipeline().save_pretrained(directory)
    return directory


def load_sdxl(directory) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(directory, local_files_only=True)


def outputs(pipe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """UNet, text_encoder and text_encoder_2 outputs on fixed inputs."""
    ids = token_ids(length=MAX_TOKENS)
    with torch.no_grad():
        return (
            pipe.unet(**sdxl_unet_inputs()).sample,
            pipe.text_encoder(ids).last_hidden_state,
            pipe.text_encoder_2(ids).last_hidden_state,
        )


def adapted(pipe, variant: str):
    """An adapter on all three components, moved off its initial values (and for Delta-LoRA, one step)."""
    adapter = apply_reslora(pipe.unet, VARIANTS[variant], text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2)
    perturb_adapter(adapter, std=0.1)  # larger moves make this tiny UNet chaotic: fp32 rounding then shows
    if variant == "delta":
        adapter.step(1)  # K = 0: the frozen weights move by λ·s·ΔBA of this step
    return adapter


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_adapts_unet_and_both_text_encoders(variant):
    pipe = tiny_sdxl_pipeline()
    base = outputs(pipe)
    adapter = adapted(pipe, variant)
    assert {name.split(".")[0] for name in adapter.blocks} == {"unet", "text_encoder", "text_encoder_2"}
    assert set(adapter.chains) == {"unet", "text_encoder", "text_encoder_2"}  # chains per component
    # SDXL's mid / down attentions hold 2 transformer blocks each, so chains are longer than the block count
    assert max(len(chain) for chain in adapter.chains["unet"]) >= 8
    for component_chains in adapter.chains.values():
        for chain in component_chains:
            assert len({chain[0].split(".")[0]} | {name.split(".")[0] for name in chain}) == 1
    for got, before in zip(outputs(pipe), base):
        assert relative_error(got, before) > 1e-2
    # gradients reach the blocks of every component through the added-condition UNet call and both encoders
    ids = token_ids(length=MAX_TOKENS)
    inputs = sdxl_unet_inputs()
    loss = pipe.unet(**inputs).sample.square().mean()
    loss = loss + pipe.text_encoder(ids).last_hidden_state.square().mean()
    loss = loss + pipe.text_encoder_2(ids).text_embeds.square().mean()
    loss.backward()
    for component in ("unet", "text_encoder", "text_encoder_2"):
        grads = [b.lora_A.grad for _, b in adapter.named_blocks(component)]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), component
    adapter.remove()
    for got, before in zip(outputs(pipe), base):
        if variant != "delta":  # Delta-LoRA's weight move stays (documented)
            torch.testing.assert_close(got, before, rtol=0, atol=0)


def test_native_save_load_round_trip_and_family_checks(tmp_path):
    pipe = tiny_sdxl_pipeline()
    adapter = adapted(pipe, "ms")
    expected = outputs(pipe)
    save_adapter(adapter, tmp_path / "xl")

    fresh = tiny_sdxl_pipeline()
    loaded = load_adapter(fresh.unet, tmp_path / "xl", text_encoder=fresh.text_encoder, text_encoder_2=fresh.text_encoder_2)
    assert loaded.chains == adapter.chains
    for got, want in zip(outputs(fresh), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)

    fresh = tiny_sdxl_pipeline()
    with pytest.raises(AdapterMismatchError, match="text_encoder_2"):
        load_adapter(fresh.unet, tmp_path / "xl", text_encoder=fresh.text_encoder)

    sd1 = tiny_pipeline()
    with pytest.raises(AdapterMismatchError, match="trained on SDXL, but the UNet given is Stable Diffusion 1.x / 2.x"):
        load_adapter(sd1.unet, tmp_path / "xl", text_encoder=sd1.text_encoder)
    sd1_adapter = apply_reslora(sd1.unet, ResLoRAConfig(res_type="bs", rank=2), text_encoder=sd1.text_encoder)
    save_adapter(sd1_adapter, tmp_path / "sd1")
    fresh = tiny_sdxl_pipeline()
    with pytest.raises(AdapterMismatchError, match="trained on Stable Diffusion 1.x / 2.x, but the UNet given is SDXL"):
        load_adapter(fresh.unet, tmp_path / "sd1", text_encoder=fresh.text_encoder, text_encoder_2=fresh.text_encoder_2)


def assert_reproduces(got_outputs, merged, base, tolerance=1e-4):
    for component, got, want, before in zip(("unet", "text_encoder", "text_encoder_2"), got_outputs, merged, base):
        assert relative_error(want, before) > 1e-2, f"{component}: the adapter must visibly change the output"
        error = relative_error(got, want)
        assert error <= tolerance, f"{component}: relative error {error:.2e}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_export_reproduces_the_merged_model(sdxl_dir, tmp_path, variant):
    pipe = load_sdxl(sdxl_dir)
    base = outputs(pipe)
    adapter = adapted(pipe, variant)
    result = merge_adapter(adapter, method="weight")  # exact for none / bs / delta; is / ms: the merged model
    with baked_weights(adapter, result.factors):
        merged = outputs(pipe)

    save_diffusers_lora(result.factors, tmp_path / "diffusers_lora")
    loaded = load_sdxl(sdxl_dir)
    loaded.load_lora_weights(tmp_path / "diffusers_lora")
    assert_reproduces(outputs(loaded), merged, base)

    kohya = save_kohya_lora(result.factors, tmp_path / "kohya.safetensors", {}, unet_config=pipe.unet.config)
    with safe_open(str(kohya), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    loaded = load_sdxl(sdxl_dir)
    loaded.load_lora_weights(str(kohya))
    assert_reproduces(outputs(loaded), merged, base)
    read_back = load_kohya_lora(kohya, unet_config=pipe.unet.config)
    assert {k.replace("text_model.", "") for k in result.factors} == set(read_back)

    merge_into_base(adapter, result.factors)
    pipe.save_pretrained(tmp_path / "merged")
    assert_reproduces(outputs(load_sdxl(tmp_path / "merged")), merged, base)

    single = save_single_file_checkpoint(pipe, tmp_path / "merged.safetensors")
    from_single = StableDiffusionXLPipeline.from_single_file(str(single), config=str(sdxl_dir), local_files_only=True)
    assert_reproduces(outputs(from_single), merged, base)


def test_single_file_has_sgm_layout_with_open_clip_second_encoder(sdxl_dir):
    pipe = load_sdxl(sdxl_dir)
    state = single_file_state_dict(pipe)
    te2 = "conditioner.embedders.1.model."
    assert f"{te2}transformer.resblocks.0.attn.in_proj_weight" in state
    assert state[f"{te2}transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 48, 48)
    assert f"{te2}text_projection" in state and f"{te2}positional_embedding" in state
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in state
    assert "model.diffusion_model.label_emb.0.0.weight" in state  # SDXL's pooled-text / size embedding
    q = pipe.text_encoder_2.text_model.encoder.layers[1].self_attn.v_proj.weight
    torch.testing.assert_close(state[f"{te2}transformer.resblocks.1.attn.in_proj_weight"][96:], q, rtol=0, atol=0)


def comfyui_lora_names(pipe) -> dict[str, str]:
    """kohya name -> diffusers module, by the rules of ComfyUI ``comfy/lora.py``: ``model_lora_keys_unet`` maps
    ``lora_unet_`` + the LDM UNet key (without ``.weight``, "." -> "_"); ``model_lora_keys_clip`` maps
    ``lora_te1_text_model_encoder_layers_{i}_{self_attn_q_proj|...}`` to clip_l and ``lora_te2_...`` to clip_g.
    The LDM key of each diffusers weight comes from diffusers' own converter, not from this project."""
    state = single_file_state_dict(pipe)
    converted = convert_ldm_unet_checkpoint(state, dict(pipe.unet.config))
    by_tensor = {id(v): k for k, v in state.items()}
    names = {}
    for diffusers_key, tensor in converted.items():
        if diffusers_key.endswith(".weight"):
            ldm_key = by_tensor[id(tensor)].removeprefix("model.diffusion_model.").removesuffix(".weight")
            names["lora_unet_" + ldm_key.replace(".", "_")] = "unet." + diffusers_key.removesuffix(".weight")
    clip_map = {"self_attn.q_proj": "self_attn_q_proj", "self_attn.k_proj": "self_attn_k_proj",
                "self_attn.v_proj": "self_attn_v_proj", "self_attn.out_proj": "self_attn_out_proj",
                "mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2"}
    for prefix, component, layers in (("lora_te1", "text_encoder", 2), ("lora_te2", "text_encoder_2", 3)):
        for i in range(layers):
            for module, lora in clip_map.items():
                names[f"{prefix}_text_model_encoder_layers_{i}_{lora}"] = f"{component}.encoder.layers.{i}.{module}"
    return names


def test_sdxl_kohya_names_follow_comfyui_rules(sdxl_dir, tmp_path):
    pipe = load_sdxl(sdxl_dir)
    adapter = adapted(pipe, "conv_bs")
    factors = merge_adapter(adapter).factors
    adapter.remove()
    expected = comfyui_lora_names(pipe)
    path = save_kohya_lora(factors, tmp_path / "xl.safetensors", {}, unet_config=pipe.unet.config)
    written = {key.split(".")[0] for key in load_file(str(path))}
    assert written == {kohya_name(key, pipe.unet.config) for key in factors}
    for name in written:
        assert name in expected, f"{name} is not a name ComfyUI maps"
    mapped = {expected[name] for name in written}
    assert mapped == {key.replace("text_model.", "") for key in factors}
    assert any(name.startswith("lora_unet_input_blocks_") for name in written)
    assert any(name.startswith("lora_unet_middle_block_1_transformer_blocks_1_") for name in written)
    for conv in ("input_blocks_1_0_in_layers_2", "input_blocks_4_0_skip_connection", "input_blocks_3_0_op",
                 "middle_block_2_out_layers_3", "output_blocks_2_2_conv"):  # fmt: skip
        assert f"lora_unet_{conv}" in written


def test_sdxl_kohya_needs_the_unet_config(sdxl_dir, tmp_path):
    pipe = load_sdxl(sdxl_dir)
    adapter = adapted(pipe, "none")
    factors = merge_adapter(adapter).factors
    with pytest.raises(ValueError, match="second text encoder needs an SDXL UNet config"):
        save_kohya_lora(factors, tmp_path / "x.safetensors", {})
    with pytest.raises(ValueError, match="needs the UNet config"):
        save_kohya_lora(factors, tmp_path / "x.safetensors", {}, base_model_version="sdxl_base_v1-0")
    assert not (tmp_path / "x.safetensors").exists()


def test_size_and_crop_conditioning_of_a_training_image():
    """SDXL's micro-conditioning: original (h, w), the crop's (top, left) in the resized image, target size."""
    from PIL import Image

    from reslora_diffusers.adapters.sdxl import SDXLConditioning
    from reslora_diffusers.data.dataset import ImageTransform

    image = Image.new("RGB", (48, 40))  # width 48, height 40 -> resized to 38 x 32, centre crop 3 px from the left
    pixels, original, crop = ImageTransform(32, center_crop=True, random_flip=False).with_geometry(image, torch.Generator())
    assert pixels.shape == (3, 32, 32) and original == (40, 48) and crop == (0, 3)
    added = SDXLConditioning.added_conditions(torch.zeros(2, 16), [original, (64, 64)], [crop, (0, 0)], 32)
    assert added["time_ids"].tolist() == [[40, 48, 0, 3, 32, 32], [64, 64, 0, 0, 32, 32]]
    assert added["text_embeds"].shape == (2, 16)
