"""Conv (LoCon) adapters on the UNet's ResNet convolutions: forward, remove, merges, exports and the field's loaders.

Every test here fails on the code before conv adapters (no `conv_rank`, LoRAFactors refused 4-D tensors, and the
kohya / diffusers names of ResNet convs were refused).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from test_formats import load_pipeline
from test_train_script import (
    build_tiny_pipeline,
    error_lines,
    run_in_process,
    tiny_args,
    train_in_process,
    write_imagefolder,
)
from tiny_models import (
    CROSS_DIM,
    MAX_TOKENS,
    perturb_adapter,
    tiny_sdxl_unet,
    tiny_text_encoder,
    tiny_unet,
    unet_inputs,
)

from reslora_diffusers import ResLoRAConfig, apply_reslora, load_adapter, save_adapter
from reslora_diffusers.adapters.projections import ConvProjection
from reslora_diffusers.formats import (
    LoRAFactors,
    kohya_name,
    kohya_name_to_key,
    load_kohya_lora,
    lora_delta,
    save_diffusers_lora,
    save_kohya_lora,
    save_single_file_checkpoint,
)
from reslora_diffusers.merge import (
    baked_weights,
    merge_adapter,
    merge_into_base,
    relative_error,
)
from reslora_diffusers.merge.bake import truncate_rank

CONV = ResLoRAConfig(res_type="none", rank=2, conv_rank=3, conv_alpha=6.0)


def run_unet(unet, inputs=None):
    with torch.no_grad():
        return unet(**(inputs or unet_inputs())).sample


def conv_blocks(adapter):
    return {name: block for name, block in adapter.blocks.items() if isinstance(block.projection, ConvProjection)}


@pytest.mark.parametrize("res_type", ["none", "is", "bs", "ms"])
def test_a_conv_adapter_changes_the_output_and_remove_restores_the_base_bit_for_bit(res_type):
    unet = tiny_unet()
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    base = run_unet(unet)
    adapter = apply_reslora(unet, ResLoRAConfig(res_type=res_type, conv_rank=4, unet_targets=()))
    convs = conv_blocks(adapter)
    assert len(convs) == len(adapter.blocks) == 16  # conv1 + conv2 of 8 ResNet blocks
    block = convs["unet.down_blocks.0.resnets.0.conv1"]
    assert block.lora_A.shape == (4, 16 * 3 * 3) and block.lora_B.shape == (16, 4)  # [r, in·kh·kw], [out, r]
    assert torch.equal(run_unet(unet), base)  # B = 0 at the start: the base output
    perturb_adapter(adapter)
    assert relative_error(run_unet(unet), base) > 1e-2
    adapter.remove()
    assert torch.equal(run_unet(unet), base)
    assert unet.state_dict().keys() == state.keys()
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in state.items())
    assert not any("reslora" in name for name, _ in unet.named_modules())


def test_a_conv_branch_is_locon_the_conv_of_its_weight_change():
    """The branch equals conv2d(x, ΔW) with ΔW = s · B A reshaped to the conv weight (what a merge bakes in)."""
    unet = tiny_unet()
    adapter = apply_reslora(unet, CONV)
    perturb_adapter(adapter)
    name = "unet.down_blocks.1.resnets.0.conv1"
    block, conv = adapter.blocks[name], adapter.base_layers[name]
    x = torch.randn(2, conv.in_channels, 4, 4)
    delta = lora_delta(block.merged_lora_factors())
    assert delta.shape == conv.weight.shape
    with torch.no_grad():
        expected = F.conv2d(x, delta, stride=conv.stride, padding=conv.padding)
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-6)
    assert block.scaling == 2.0  # conv_alpha / conv_rank, apart from the attention blocks' alpha / rank
    assert adapter.blocks["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"].scaling == 4.0  # lora_alpha 8 / rank 2


@pytest.mark.parametrize("res_type", ["none", "bs", "delta"])
def test_none_bs_and_delta_lora_over_conv_chains_merge_exactly(res_type):
    unet = tiny_unet()
    delta = {"delta_lora_ratio": 0.5, "delta_lora_start": 0} if res_type == "delta" else {}
    res_type = "none" if delta else res_type
    adapter = apply_reslora(unet, ResLoRAConfig(res_type=res_type, rank=2, conv_rank=3, unet_targets=(), **delta))
    perturb_adapter(adapter, std=0.2)
    if delta:
        adapter.step(1)  # K = 0: the frozen conv weights move by λ·s·ΔBA of this step (never written)
        perturb_adapter(adapter, std=0.2, seed=4)
    if res_type == "bs":
        linked = [b for b in conv_blocks(adapter).values() if b.previous]
        assert len(linked) >= 4 and max(len(b.previous) for b in linked) >= 3
    unmerged = run_unet(unet)
    result = merge_adapter(adapter)
    assert result.method == "exact"
    with baked_weights(adapter, result.factors):
        merged = run_unet(unet)
    assert relative_error(merged, run_unet(tiny_unet())) > 1e-2
    assert relative_error(merged, unmerged) < 1e-5
    # a bs block's merged rank is its chain's: (m+1)·r (Delta-LoRA's 2r), as a 4-D LoCon
    longest = max(conv_blocks(adapter).values(), key=lambda b: len(b.previous))
    f = result.factors[longest.name]
    rank = 6 if delta else 3 * (1 + len(longest.previous))
    assert f.down.shape[0] == rank and f.down.ndim == 4 and f.up.shape[2:] == (1, 1)


@pytest.mark.parametrize("res_type", ["is", "ms"])
def test_is_and_ms_over_conv_chains_report_their_merge_error(res_type):
    unet = tiny_unet()
    adapter = apply_reslora(unet, ResLoRAConfig(res_type=res_type, rank=2, conv_rank=3, unet_targets=()))
    perturb_adapter(adapter, std=0.05)
    assert any(b.has_shortcut for b in adapter.blocks.values())
    inputs = unet_inputs()
    unmerged = run_unet(unet, inputs)
    result = merge_adapter(adapter, "calibrated", calibration=lambda: run_unet(unet, inputs))
    before, after = result.report["layer_relative_error_lstsq_joint"], result.report["layer_relative_error_calibrated"]
    assert 0 < after < before  # an estimate, reported; the fitted merge is closer on its own calibration tokens
    with baked_weights(adapter, result.factors):
        merged = run_unet(unet, inputs)
    assert 0 < relative_error(merged, unmerged) < 0.5


def test_gradient_checkpointing_and_a_16_bit_base_with_conv_adapters():
    results = []
    for checkpointing in (False, True):
        unet = tiny_unet()
        adapter = apply_reslora(unet, ResLoRAConfig(res_type="ms", rank=2, conv_rank=3))
        perturb_adapter(adapter)
        unet.train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet(**unet_inputs()).sample.square().mean().backward()
        results.append([p.grad.clone() for p in adapter.trainable_parameters()])
    assert all(g.abs().sum() > 0 for g in results[0])
    for grad, ckpt in zip(*results):
        torch.testing.assert_close(ckpt, grad, rtol=1e-5, atol=1e-7)
    unet = tiny_unet(dtype=torch.bfloat16)
    adapter = apply_reslora(unet, ResLoRAConfig(res_type="bs", conv_rank=3))
    assert all(p.dtype == torch.float32 for p in adapter.trainable_parameters())
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in unet_inputs().items()}
    out = unet(**inputs).sample
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(block.lora_B.grad.abs().sum() > 0 for block in conv_blocks(adapter).values())


def test_conv_adapters_save_and_load_onto_a_fresh_base(tmp_path):
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    adapter = apply_reslora(unet, ResLoRAConfig(res_type="is", conv_rank=2, conv_targets=("conv1", "conv2", "conv")), text_encoder)
    assert any(name.endswith("downsamplers.0.conv") for name in adapter.blocks)
    assert any(name.endswith("upsamplers.0.conv") for name in adapter.blocks)
    perturb_adapter(adapter)
    expected = run_unet(unet)
    save_adapter(adapter, tmp_path)
    loaded = load_adapter(tiny_unet(), tmp_path, text_encoder=tiny_text_encoder())
    assert loaded.config.conv_rank == 2 and conv_blocks(loaded).keys() == conv_blocks(adapter).keys()
    torch.testing.assert_close(run_unet(loaded.unet), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"conv_rank": -1}, "conv_rank must be"),
        ({"conv_alpha": 4.0}, "set conv_rank"),
        ({"conv_rank": 2, "conv_alpha": 0.0}, "conv_alpha must be"),
        ({"conv_rank": 2, "conv_alpha": float("inf")}, "conv_alpha must be > 0 and finite"),
        ({"lora_alpha": float("inf")}, "lora_alpha must be > 0 and finite"),
        ({"conv_rank": 2, "conv_targets": ("time_emb_proj",)}, "conv_targets must be among"),
    ],
)
def test_conv_config_is_validated(bad, match):
    with pytest.raises(ValueError, match=match):
        ResLoRAConfig(**bad)


# -- exports, held against the field's loaders --------------------------------------------------------------------
def probe(unet):
    generator = torch.Generator().manual_seed(11)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    hidden = torch.randn(2, MAX_TOKENS, CROSS_DIM, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 700]), hidden).sample


@pytest.fixture(scope="module")
def merged_bs(pipeline_dir):
    """A bs adapter on attention (rank 2) and convs (rank 3, its own alpha), merged: factors, merged and base outputs."""
    pipe = load_pipeline(pipeline_dir)
    adapter = apply_reslora(pipe.unet, ResLoRAConfig(res_type="bs", rank=2, lora_alpha=4.0, conv_rank=3, conv_alpha=1.5))
    perturb_adapter(adapter, std=0.2)
    factors = merge_adapter(adapter).factors
    with baked_weights(adapter, factors):
        expected = probe(pipe.unet)
    adapter.remove()
    base = probe(pipe.unet)
    assert relative_error(expected, base) > 1e-2
    return factors, expected, base


def test_kohya_locon_keys_and_shapes(merged_bs, tmp_path):
    factors = merged_bs[0]
    path = save_kohya_lora(factors, tmp_path / "locon.safetensors", {})
    state = load_file(str(path))
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert state[f"{name}.lora_down.weight"].shape[1:] == (16, 3, 3)  # [r, in, 3, 3]
    assert state[f"{name}.lora_up.weight"].shape == (16, 3, 1, 1)  # [out, r, 1, 1]
    assert state[f"{name}.alpha"].ndim == 0
    assert "lora_unet_mid_block_resnets_1_conv2.lora_up.weight" in state
    loaded = load_kohya_lora(path)
    assert loaded.keys() == factors.keys()
    for key, f in factors.items():
        torch.testing.assert_close(lora_delta(loaded[key]), lora_delta(f), rtol=1e-5, atol=1e-7)


def apply_like_comfyui(unet, path):
    """ComfyUI / A1111 for a LoCon module: W += alpha / rank · (up.flatten(1) @ down.flatten(1)).reshape(W.shape),
    the module found by kohya's naming rule ("lora_unet_" + diffusers module path, "." -> "_")."""
    layers = {("lora_unet." + n).replace(".", "_"): m for n, m in unet.named_modules()}
    state = load_file(str(path))
    with torch.no_grad():
        for name in {key.split(".")[0] for key in state if key.startswith("lora_unet_")}:
            down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
            weight = layers[name].weight
            weight += (state[f"{name}.alpha"].item() / down.shape[0] * (up.flatten(1) @ down.flatten(1))).reshape(weight.shape)


def test_kohya_locon_export_applied_as_comfyui_does_reproduces_the_merged_model(pipeline_dir, merged_bs, tmp_path):
    factors, expected, _ = merged_bs
    path = save_kohya_lora(factors, tmp_path / "locon.safetensors", {})
    pipe = load_pipeline(pipeline_dir)
    apply_like_comfyui(pipe.unet, path)
    assert relative_error(probe(pipe.unet), expected) <= 1e-4


def test_kohya_locon_export_loaded_by_lycoris_reproduces_the_merged_model(pipeline_dir, merged_bs, tmp_path):
    pytest.importorskip("lycoris")
    from lycoris.wrapper import LycorisNetwork, create_lycoris_from_weights

    factors, expected, base = merged_bs
    path = save_kohya_lora(factors, tmp_path / "locon.safetensors", {})
    pipe = load_pipeline(pipeline_dir)
    saved_prefix = LycorisNetwork.LORA_PREFIX
    LycorisNetwork.LORA_PREFIX = "lora_unet"  # kohya's UNet names are "lora_unet_" + the diffusers module path
    try:
        network, _ = create_lycoris_from_weights(1.0, str(path), pipe.unet)
    finally:
        LycorisNetwork.LORA_PREFIX = saved_prefix
    convs = [m for m in network.loras if m.lora_name.startswith("lora_unet_") and "resnets" in m.lora_name]
    assert len(convs) == sum("resnets" in key for key in factors)  # LyCORIS found every LoCon module
    network.merge_to(1.0)
    got = probe(pipe.unet)
    assert relative_error(got, base) > 1e-2
    assert relative_error(got, expected) <= 1e-4


def test_locon_exports_load_in_diffusers(pipeline_dir, merged_bs, tmp_path):
    """diffusers' loader reads kohya LoCon (its converter maps resnets / samplers) and PEFT conv LoRA."""
    factors, expected, _ = merged_bs
    kohya = save_kohya_lora(factors, tmp_path / "locon.safetensors", {})
    peft_dir = tmp_path / "peft"
    save_diffusers_lora(factors, peft_dir)
    for source in (str(kohya), peft_dir):
        pipe = load_pipeline(pipeline_dir)
        pipe.load_lora_weights(source)
        assert relative_error(probe(pipe.unet), expected) <= 1e-4, source


def test_single_file_export_of_a_merged_conv_adapter_is_exact(pipeline_dir, tmp_path):
    pipe = load_pipeline(pipeline_dir)
    adapter = apply_reslora(pipe.unet, ResLoRAConfig(res_type="bs", conv_rank=3, unet_targets=()))
    perturb_adapter(adapter, std=0.2)
    merge_into_base(adapter, merge_adapter(adapter).factors)
    path = save_single_file_checkpoint(pipe, tmp_path / "merged.safetensors")
    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(pipeline_dir), local_files_only=True)
    ours, theirs = pipe.unet.state_dict(), loaded.unet.state_dict()
    assert not torch.equal(ours["down_blocks.0.resnets.0.conv1.weight"], load_pipeline(pipeline_dir).unet.state_dict()["down_blocks.0.resnets.0.conv1.weight"])
    for key in ours:
        torch.testing.assert_close(theirs[key], ours[key], rtol=0, atol=0)


def test_sdxl_conv_names_are_ldm_names_and_round_trip():
    config = tiny_sdxl_unet().config
    key = "unet.down_blocks.0.resnets.0.conv1"
    assert kohya_name(key, config) == "lora_unet_input_blocks_1_0_in_layers_2"  # ComfyUI: "lora_unet_" + LDM key
    for path in ("down_blocks.1.resnets.0.conv_shortcut", "up_blocks.0.resnets.2.conv2", "mid_block.resnets.1.conv1",
                 "down_blocks.0.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv"):  # fmt: skip
        assert kohya_name_to_key(kohya_name(f"unet.{path}", config), config) == f"unet.{path}"
    assert kohya_name("unet.down_blocks.0.downsamplers.0.conv", config) == "lora_unet_input_blocks_3_0_op"
    assert kohya_name("unet.down_blocks.0.resnets.0.conv1") == "lora_unet_down_blocks_0_resnets_0_conv1"  # SD-1


def test_factor_shapes_must_fit_the_layer_kind(tmp_path):
    conv_key, linear_key = "unet.down_blocks.0.resnets.0.conv1", "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    flat = LoRAFactors(down=torch.randn(2, 36), up=torch.randn(16, 2), alpha=2.0)
    locon = LoRAFactors(down=torch.randn(2, 4, 3, 3), up=torch.randn(16, 2, 1, 1), alpha=2.0)
    with pytest.raises(ValueError, match="needs LoCon factors"):
        save_kohya_lora({conv_key: flat}, tmp_path / "a.safetensors", {})
    with pytest.raises(ValueError, match="needs 2-D Linear factors"):
        save_diffusers_lora({linear_key: locon}, tmp_path)
    with pytest.raises(ValueError, match="LoCon factors"):
        LoRAFactors(down=torch.randn(2, 4, 3, 3), up=torch.randn(16, 2, 3, 3), alpha=2.0)
    assert not any(tmp_path.iterdir())


def test_truncating_a_locon_keeps_its_shapes_and_best_approximation():
    generator = torch.Generator().manual_seed(0)
    f = LoRAFactors(down=torch.randn(6, 4, 3, 3, generator=generator), up=torch.randn(8, 6, 1, 1, generator=generator), alpha=3.0)
    low, energy = truncate_rank(f, 2)
    assert low.down.shape == (2, 4, 3, 3) and low.up.shape == (8, 2, 1, 1) and 0 < energy < 1
    singular = torch.linalg.svdvals(lora_delta(f).flatten(1))
    error = (lora_delta(low) - lora_delta(f)).flatten(1).norm()
    torch.testing.assert_close(error, singular[2:].square().sum().sqrt(), rtol=1e-4, atol=1e-5)


def test_a_merged_conv_adapter_in_place_is_the_unmerged_model():
    unet = tiny_unet()
    adapter = apply_reslora(unet, copy.copy(CONV))
    perturb_adapter(adapter)
    expected = run_unet(unet)
    merge_into_base(adapter, merge_adapter(adapter).factors)
    assert relative_error(run_unet(unet), expected) < 1e-5
    assert not any("reslora" in name for name, _ in unet.named_modules())


# -- the training script ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_conv")
    return {"model": build_tiny_pipeline(root / "model"), "data": write_imagefolder(root / "data", 8)}


def test_training_with_conv_rank_trains_and_exports_locon(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    steps = ["--max_train_steps", "3", "--checkpointing_steps", "100", "--seed", "3", "--learning_rate", "1e-2"]
    train_in_process(capsys, tiny_args(tiny, out, "--res_type", "bs", "--conv_rank", "2", "--conv_alpha", "4", *steps))
    native = load_file(out / "reslora_adapter.safetensors")
    conv_up = [k for k in native if ".resnets." in k and k.endswith(".lora_B")]
    assert conv_up and all(native[k].abs().sum() > 0 for k in conv_up)  # trained
    (kohya,) = (out / "kohya").glob("*.safetensors")
    state = load_file(str(kohya))
    downs = [k for k in state if "resnets" in k and k.endswith("lora_down.weight")]
    assert downs and all(state[k].ndim == 4 and state[k].shape[2:] == (3, 3) for k in downs)
    assert '"conv_dim": "Dynamic"' in __import__("safetensors").safe_open(str(kohya), "pt").metadata()["ss_network_args"]  # bs: rank grows along chains
    card = (out / "README.md").read_text()
    assert "conv_rank / conv_alpha / targets | 2 / 4 / conv1, conv2" in card
    config = __import__("json").loads((out / "reslora_config.json").read_text())["config"]
    assert (config["conv_rank"], config["conv_alpha"]) == (2, 4.0)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--conv_alpha", "4"], "error: --conv_alpha is the scale of the conv adapters: set --conv_rank > 0 too (see --help)"),
        (["--conv_rank", "-2"], "error: --conv_rank must be >= 0 (0: no conv adapters), got -2 (see --help)"),
        (["--conv_rank", "2", "--conv_alpha", "0"], "error: --conv_alpha must be > 0 and finite, got 0.0 (see --help)"),
    ],
)
def test_bad_conv_flags_are_one_line(tiny, tmp_path, capsys, flags, message):
    code, _, err = run_in_process(tiny_args(tiny, tmp_path / "run", *flags), capsys)
    assert code == 2 and error_lines(err) == [message]
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_a_checkpoint_recorded_before_conv_adapters_resumes_with_them_off():
    """Checkpoints of earlier versions record no conv_* fields: they trained without conv adapters, which is the default."""
    from reslora_diffusers.training.run_safety import settings_mismatch

    current = {"adapter": ResLoRAConfig(res_type="is").to_dict(), "seed": 0}
    old = {"adapter": {k: v for k, v in current["adapter"].items() if not k.startswith("conv_")}, "seed": 0}
    assert settings_mismatch(old, current) == []
    with_conv = {"adapter": ResLoRAConfig(res_type="is", conv_rank=4).to_dict(), "seed": 0}
    assert settings_mismatch(old, with_conv) == ["conv_rank: 0 → 4"]


def test_an_sd2_shaped_unet_takes_conv_adapters_and_exports_them_as_sd_v2(tmp_path):
    """SD-2.x: linear projections in the transformers, per-level head dims, 1024-wide text; the ResNets are SD-1's."""
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=1024, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    inputs = {"sample": torch.randn(2, 4, 8, 8, generator=generator), "timestep": torch.tensor([3, 500]),
              "encoder_hidden_states": torch.randn(2, 7, 1024, generator=generator)}  # fmt: skip
    base = run_unet(unet, inputs)
    adapter = apply_reslora(unet, ResLoRAConfig(res_type="bs", rank=2, conv_rank=2))
    perturb_adapter(adapter, std=0.05)  # 0.2 saturates the softmax over 1024-wide keys: fp32 rounding then shows (2e-3)
    unmerged = run_unet(unet, inputs)
    factors = merge_adapter(adapter).factors
    with baked_weights(adapter, factors):
        assert relative_error(run_unet(unet, inputs), unmerged) < 1e-5
    assert relative_error(unmerged, base) > 1e-2
    path = save_kohya_lora(factors, tmp_path / "sd2.safetensors", {}, unet_config=unet.config, text_encoder_config={"hidden_act": "gelu"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sd_v2"
    assert "lora_unet_up_blocks_1_resnets_1_conv2.lora_down.weight" in load_file(str(path))


def test_calibrated_merge_keeps_wide_conv_blocks_at_the_joint_alpha_merge(monkeypatch):
    """Σxxᵀ of a conv block is [in·9]²: 4.2 GB in float64 for SD-1.5's 2,560-channel conv1s, 28 GB for one adapter.
    Blocks wider than MAX_FITTED_FEATURES keep rank-r statistics only and get the lstsq_joint merge, reported."""
    from reslora_diffusers.merge import calibration

    monkeypatch.setattr(calibration, "MAX_FITTED_FEATURES", 200)  # the tiny UNet's 16-channel convs fit, 32-channel ones not
    unet = tiny_unet()
    adapter = apply_reslora(unet, ResLoRAConfig(res_type="ms", rank=2, conv_rank=3, unet_targets=()))
    perturb_adapter(adapter, std=0.05)
    inputs = unet_inputs()
    run = lambda: run_unet(unet, inputs)
    stats = calibration.collect_layer_statistics(adapter, run)
    wide = [name for name in stats.blocks if not stats.fits(name)]
    assert wide and len(wide) < len(stats.blocks)
    assert all("xx" not in stats.sums[name] and "xx" in stats.sums[other] for name in wide for other in set(stats.blocks) - set(wide))
    joint = merge_adapter(adapter, "lstsq_joint", calibration=run)
    calibrated = merge_adapter(adapter, "calibrated", calibration=run)
    assert calibrated.report["calibrated_blocks_merged_by_lstsq_joint"] == len(wide)
    for name in stats.blocks:
        same = torch.equal(calibrated.factors[name].down, joint.factors[name].down)
        assert same == (name in wide), name
    assert 0 < calibrated.report["layer_relative_error_calibrated"] < calibrated.report["layer_relative_error_lstsq_joint"]
