"""Export formats: diffusers / kohya LoRA files loaded by plain diffusers, kohya names, single-file LDM checkpoints."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import copy

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import (
    CROSS_DIM,
    MAX_TOKENS,
    perturb_adapter,
    sd15_shaped_unet,
    tiny_pipeline,
    tiny_text_encoder,
    tiny_vae,
    token_ids,
)

from reslora_diffusers import ResLoRAConfig, apply_reslora, formats
from reslora_diffusers.formats import (
    LoRAFactors,
    kohya_base_model_version,
    kohya_name,
    kohya_name_to_key,
    ldm_path_to_unet,
    load_kohya_lora,
    lora_delta,
    save_diffusers_lora,
    save_kohya_lora,
    save_single_file_checkpoint,
    single_file_state_dict,
    unet_path_to_ldm,
)
from reslora_diffusers.merge import baked_weights, merge_adapter, relative_error

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def load_pipeline(directory) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(directory, local_files_only=True)


def make_factors(pipe, alphas, seed: int = 5) -> dict[str, LoRAFactors]:
    """Random, non-zero factors for every attention projection; ranks cycle 2, 3, 4 and alpha != rank."""
    generator = torch.Generator().manual_seed(seed)
    linears = [
        (f"unet.{name}", module)
        for name, module in pipe.unet.named_modules()
        if isinstance(module, torch.nn.Linear) and name.endswith(UNET_TARGETS)
    ] + [
        (f"text_encoder.{name}", module)
        for name, module in pipe.text_encoder.named_modules()
        if isinstance(module, torch.nn.Linear) and name.endswith(TEXT_TARGETS)
    ]
    factors = {}
    for i, (key, module) in enumerate(linears):
        rank = 2 + i % 3
        factors[key] = LoRAFactors(
            down=torch.randn(rank, module.in_features, generator=generator) * 0.2,
            up=torch.randn(module.out_features, rank, generator=generator) * 0.2,
            alpha=alphas[i % len(alphas)],
        )
    return factors


UNIFORM_ALPHA = (6.0,)
MIXED_ALPHAS = (1.0, 6.0, 16.0, 3.0)


def probe(pipe):
    """UNet and text-encoder outputs on fixed inputs."""
    generator = torch.Generator().manual_seed(11)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    hidden = torch.randn(2, MAX_TOKENS, CROSS_DIM, generator=generator)
    with torch.no_grad():
        unet_out = pipe.unet(sample, torch.tensor([10, 700]), hidden).sample
        text_out = pipe.text_encoder(token_ids(length=MAX_TOKENS)).last_hidden_state
    return unet_out, text_out


def merged_reference(pipe, factors):
    """The base pipeline with W += (alpha / rank) · up @ down written out here, independently of the formats package."""
    merged = copy.deepcopy(pipe)
    with torch.no_grad():
        for key, f in factors.items():
            component, path = key.split(".", 1)
            layer = getattr(merged, component).get_submodule(path)
            layer.weight += (f.alpha / f.down.shape[0]) * f.up @ f.down
    return merged


def assert_outputs_close(actual, expected, base):
    for got, want, before in zip(actual, expected, base):
        assert (want - before).abs().max() > 0.05, "the LoRA must visibly change the output"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)  # observed: ~2e-6 on outputs of ~2


@pytest.fixture(scope="module")
def cases(pipeline_dir):
    """(factors, reference outputs, base outputs) for one alpha per file and for mixed alphas."""
    pipe = load_pipeline(pipeline_dir)
    base = probe(pipe)
    out = {}
    for name, alphas in (("uniform", UNIFORM_ALPHA), ("mixed", MIXED_ALPHAS)):
        factors = make_factors(pipe, alphas)
        out[name] = (factors, probe(merged_reference(pipe, factors)), base)
    return out


def test_lora_delta_is_alpha_over_rank_times_up_down():
    f = LoRAFactors(down=torch.randn(3, 5), up=torch.randn(4, 3), alpha=12.0)
    torch.testing.assert_close(lora_delta(f), 4.0 * f.up @ f.down)
    half = LoRAFactors(down=f.down.half(), up=f.up.half(), alpha=12.0)
    assert lora_delta(half).dtype == torch.float32


@pytest.mark.parametrize("alphas", ["uniform", "mixed"])
def test_diffusers_lora_loads_with_correct_strength(pipeline_dir, cases, tmp_path, alphas):
    factors, expected, base = cases[alphas]
    path = save_diffusers_lora(factors, tmp_path, metadata={"reslora_res_type": "bs"})
    assert path == tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["reslora_res_type"] == "bs"
    pipe = load_pipeline(pipeline_dir)
    pipe.load_lora_weights(tmp_path)
    assert_outputs_close(probe(pipe), expected, base)


def apply_like_comfyui(pipe, path):
    """What kohya / A1111 / ComfyUI do with the file: names from kohya's create_modules on a transformers-4
    CLIPTextModel (paths start with ``text_model.``), and W += (alpha / lora_down.shape[0]) · up @ down."""
    layers = {
        ("lora_unet." + name).replace(".", "_"): m
        for name, m in pipe.unet.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    layers.update(
        {
            ("lora_te.text_model." + name).replace(".", "_"): m
            for name, m in pipe.text_encoder.named_modules()
            if isinstance(m, torch.nn.Linear)
        }
    )
    state = load_file(str(path))
    with torch.no_grad():
        for name in {key.split(".")[0] for key in state}:
            down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
            layers[name].weight += state[f"{name}.alpha"].item() / down.shape[0] * up @ down


@pytest.mark.parametrize("alphas", ["uniform", "mixed"])
def test_kohya_lora_has_comfyui_strength(pipeline_dir, cases, tmp_path, alphas):
    factors, expected, base = cases[alphas]
    path = save_kohya_lora(factors, tmp_path / "lora.safetensors", {})
    pipe = load_pipeline(pipeline_dir)
    apply_like_comfyui(pipe, path)
    assert_outputs_close(probe(pipe), expected, base)
    state = load_file(str(path))
    (alpha,) = {state[kohya_name(key) + ".alpha"].item() for key in factors}  # one alpha for every module
    for key, f in factors.items():  # ... and each module's own scale folded into its lora_up
        name = kohya_name(key)
        written = LoRAFactors(state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"], alpha)
        torch.testing.assert_close(lora_delta(written), lora_delta(f), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("alphas", ["uniform", "mixed"])
def test_kohya_lora_loads_in_diffusers_at_every_modules_strength(pipeline_dir, cases, tmp_path, alphas):
    factors, expected, base = cases[alphas]
    path = save_kohya_lora(factors, tmp_path / "lora.safetensors", {"reslora_res_type": "bs"})
    pipe = load_pipeline(pipeline_dir)
    pipe.load_lora_weights(str(path))
    assert_outputs_close(probe(pipe), expected, base)


def test_bs_kohya_export_loaded_by_diffusers_reproduces_the_merged_model(pipeline_dir, tmp_path):
    """A bs merge's rank grows along each chain, so its modules have different alphas."""
    pipe = load_pipeline(pipeline_dir)
    config = ResLoRAConfig(res_type="bs", rank=2, lora_alpha=4.0)
    adapter = apply_reslora(pipe.unet, config, text_encoder=pipe.text_encoder)
    perturb_adapter(adapter, std=0.3)
    factors = merge_adapter(adapter).factors
    assert len({f.alpha for f in factors.values()}) > 1
    with baked_weights(adapter, factors):
        expected = probe(pipe)
    adapter.remove()
    base = probe(pipe)
    path = save_kohya_lora(factors, tmp_path / "bs.safetensors", {})
    loaded = load_pipeline(pipeline_dir)
    loaded.load_lora_weights(str(path))
    for got, want, before in zip(probe(loaded), expected, base):
        assert relative_error(want, before) > 1e-2, "the adapter must visibly change the output"
        assert relative_error(got, want) <= 1e-4


def test_kohya_metadata(cases, tmp_path):
    uniform, mixed = cases["uniform"][0], cases["mixed"][0]
    user = {"reslora_res_type": "bs", "reslora_pre_num": "-1"}
    path = save_kohya_lora(uniform, tmp_path / "my_lora.safetensors", user)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "Dynamic"  # ranks 2, 3, 4
    assert meta["ss_network_alpha"] == "6.0"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_output_name"] == "my_lora"
    assert meta["reslora_res_type"] == "bs" and meta["reslora_pre_num"] == "-1"
    same_rank = {k: LoRAFactors(f.down[:2], f.up[:, :2], f.alpha) for k, f in mixed.items()}
    path = save_kohya_lora(same_rank, tmp_path / "b.safetensors", {"ss_output_name": "named"})
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    alpha = load_file(str(path))[kohya_name(next(iter(mixed))) + ".alpha"].item()
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_output_name"]) == ("2", str(alpha), "named")


def test_kohya_base_model_version_follows_the_base(cases, tmp_path):
    """SD-2's text encoder is OpenCLIP ViT-H (gelu); its exports must not be labelled sd_v1."""
    factors = cases["uniform"][0]
    unet_config = dict(tiny_pipeline().unet.config)
    sd1_text, sd2_text = {"hidden_act": "quick_gelu"}, {"hidden_act": "gelu"}
    assert kohya_base_model_version(unet_config, sd1_text) == "sd_v1"
    assert kohya_base_model_version(unet_config, sd2_text) == "sd_v2"
    assert kohya_base_model_version({**unet_config, "cross_attention_dim": 1024}) == "sd_v2"
    path = save_kohya_lora(factors, tmp_path / "sd2.safetensors", {}, unet_config=unet_config, text_encoder_config=sd2_text)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sd_v2", "True")


def test_load_kohya_lora_round_trip(cases, tmp_path):
    factors = cases["mixed"][0]
    half = {k: LoRAFactors(f.down.half(), f.up.half(), f.alpha) for k, f in factors.items()}
    loaded = load_kohya_lora(save_kohya_lora(half, tmp_path / "lora.safetensors", {}))
    assert loaded.keys() == half.keys()
    for key, f in half.items():
        assert loaded[key].down.dtype == loaded[key].up.dtype == torch.float16
        torch.testing.assert_close(loaded[key].down, f.down, rtol=0, atol=0)
        assert relative_error(lora_delta(loaded[key]), lora_delta(f)) < 1e-3  # the fp16 lora_up was rescaled
    # the transformers-4 spelling of a text-encoder key names the same module
    key = "text_encoder.encoder.layers.1.self_attn.out_proj"
    legacy = {"text_encoder.text_model." + key.removeprefix("text_encoder."): factors[key]}
    assert list(load_kohya_lora(save_kohya_lora(legacy, tmp_path / "te.safetensors", {}))) == [key]


def test_kohya_file_without_alpha_means_alpha_equals_rank(tmp_path):
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file(
        {f"{name}.lora_down.weight": torch.ones(3, 8), f"{name}.lora_up.weight": torch.ones(4, 3)},
        str(tmp_path / "old.safetensors"),
    )
    (key, f), = load_kohya_lora(tmp_path / "old.safetensors").items()
    assert key == "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k" and f.alpha == 3.0


def test_kohya_names_of_sd15_shaped_unet_and_text_encoder():
    unet, text_encoder = sd15_shaped_unet(), tiny_text_encoder()
    keys = [f"unet.{n}" for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(UNET_TARGETS)]
    keys += [f"text_encoder.{n}" for n, m in text_encoder.named_modules() if n.endswith(TEXT_TARGETS)]
    names = {kohya_name(k) for k in keys}
    for expected in (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn2_to_v",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_k",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te_text_model_encoder_layers_3_self_attn_out_proj",
    ):
        assert expected in names
    assert not any("up_blocks_0_attentions" in n or "down_blocks_3_attentions" in n for n in names)
    assert len(names) == len(keys) == 16 * 8 + 4 * 4
    assert [kohya_name_to_key(kohya_name(k)) for k in keys] == keys
    assert kohya_name("text_encoder.text_model.encoder.layers.0.mlp.fc1") == (
        "lora_te_text_model_encoder_layers_0_mlp_fc1"
    )
    assert kohya_name_to_key("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj") == (
        "unet.up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"
    )


def test_ldm_names_of_sd15_shaped_unet_match_diffusers_converter():
    unet = sd15_shaped_unet()
    state = unet.state_dict()
    ldm = {unet_path_to_ldm(k, unet.config): v for k, v in state.items()}
    for name in (
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "input_blocks.8.1.transformer_blocks.0.attn2.to_k.weight",
        "input_blocks.9.0.op.weight",
        "input_blocks.11.0.out_layers.3.weight",
        "middle_block.1.transformer_blocks.0.attn2.to_out.0.weight",
        "middle_block.2.emb_layers.1.weight",
        "output_blocks.2.1.conv.weight",  # UpBlock2D: the upsampler follows the resnet directly
        "output_blocks.5.2.conv.weight",  # after an attention it sits in slot 2
        "output_blocks.11.1.transformer_blocks.0.attn1.to_v.weight",
        "output_blocks.11.0.skip_connection.weight",
        "time_embed.0.weight",
        "out.2.bias",
    ):
        assert name in ldm, name
    back = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in ldm.items()}, unet.config)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert all(ldm_path_to_unet(unet_path_to_ldm(k, unet.config), unet.config) == k for k in state)
    assert unet_path_to_ldm("mid_block.attentions.0.transformer_blocks.0.attn1.to_q", unet.config) == (
        "middle_block.1.transformer_blocks.0.attn1.to_q"
    )


def small_unet(down_types, layers_per_block):
    torch.manual_seed(0)
    up_types = [t.replace("Down", "Up") for t in reversed(down_types)]
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 16, 16, 16)[: len(down_types)],
        layers_per_block=layers_per_block,
        down_block_types=tuple(down_types),
        up_block_types=tuple(up_types),
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=4,
        norm_num_groups=4,
    )


@pytest.mark.parametrize(
    "down_types, layers_per_block",
    [
        (("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), 1),
        (("CrossAttnDownBlock2D", "DownBlock2D"), 2),
        (("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), 1),
        (("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"), 1),
    ],
)
def test_ldm_names_follow_the_config(down_types, layers_per_block):
    unet = small_unet(down_types, layers_per_block)
    state = unet.state_dict()
    ldm = {"model.diffusion_model." + unet_path_to_ldm(k, unet.config): v for k, v in state.items()}
    back = convert_ldm_unet_checkpoint(ldm, unet.config)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert all(ldm_path_to_unet(unet_path_to_ldm(k, unet.config), unet.config) == k for k in state)


def test_single_file_names_of_sd15_shaped_model_match_diffusers_converters():
    vae = tiny_vae(num_blocks=4)
    sd = single_file_state_dict({"unet": sd15_shaped_unet(), "vae": vae, "text_encoder": tiny_text_encoder()})
    for name in (
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.output_blocks.8.1.transformer_blocks.0.attn1.to_out.0.bias",
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
        "first_stage_model.encoder.down.0.block.0.conv1.weight",
        "first_stage_model.encoder.down.2.downsample.conv.weight",
        "first_stage_model.decoder.up.3.block.2.conv2.weight",
        "first_stage_model.decoder.mid.block_2.norm1.bias",
        "first_stage_model.post_quant_conv.weight",
    ):
        assert name in sd, name
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    position_ids = sd["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    assert position_ids.dtype == torch.int64 and position_ids.tolist() == [list(range(MAX_TOKENS))]
    vae_state = vae.state_dict()
    # diffusers numbers decoder blocks in execution order, LDM by resolution level (0 = full size)
    ldm_first_up = sd["first_stage_model.decoder.up.3.block.0.conv1.weight"]
    assert torch.equal(ldm_first_up, vae_state["decoder.up_blocks.0.resnets.0.conv1.weight"])
    back = convert_ldm_vae_checkpoint(sd, vae.config)
    assert back.keys() == vae_state.keys()
    for key, value in vae_state.items():
        torch.testing.assert_close(back[key], value, rtol=0, atol=0)


def test_single_file_checkpoint_loads_with_from_single_file(pipeline_dir, tmp_path):
    pipe = load_pipeline(pipeline_dir)
    path = save_single_file_checkpoint(pipe, tmp_path / "merged.safetensors")
    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(pipeline_dir), local_files_only=True)
    for component in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, component).state_dict(), getattr(loaded, component).state_dict()
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(theirs[key], ours[key], rtol=0, atol=0)

    def generate(p):
        generator = torch.Generator().manual_seed(0)
        return p("a cat", num_inference_steps=1, generator=generator, output_type="pt").images

    torch.testing.assert_close(generate(loaded), generate(pipe), rtol=0, atol=0)

    half = save_single_file_checkpoint(pipe, tmp_path / "merged_fp16.safetensors", half=True)
    assert 0.5 < half.stat().st_size / path.stat().st_size < 0.55  # the json header does not shrink
    with safe_open(str(half), "pt") as f:
        assert f.get_tensor("model.diffusion_model.input_blocks.0.0.weight").dtype == torch.float16


def test_writes_are_atomic(cases, tmp_path, monkeypatch):
    factors = cases["uniform"][0]
    path = save_kohya_lora(factors, tmp_path / "lora.safetensors", {})
    before = path.read_bytes()

    def fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(formats.safetensors_files, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_kohya_lora(factors, path, {})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]


def good_factors(rank=2, features=32, alpha=4.0):
    return LoRAFactors(down=torch.randn(rank, features), up=torch.randn(features, rank), alpha=alpha)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: LoRAFactors(torch.randn(2, 8), torch.randn(8, 3), 1.0), "rank mismatch"),
        (lambda: LoRAFactors(torch.randn(2, 8, 1, 1), torch.randn(8, 2), 1.0), "holds an nn.Linear"),
        (lambda: LoRAFactors(torch.randn(2, 8), torch.randn(8, 2), 0.0), "alpha must be"),
        (lambda: LoRAFactors(torch.randn(2, 8), torch.randn(8, 2), float("nan")), "alpha must be"),
        (lambda: LoRAFactors(torch.ones(2, 8, dtype=torch.long), torch.ones(8, 2, dtype=torch.long), 1.0), "floating"),
    ],
)
def test_bad_factors_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "key, message",
    [
        ("vae.encoder.mid_block.attentions.0.to_q", "must look like"),
        ("unet", "must look like"),
        ("unet.conv_in", "not a supported layer"),
        ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.1", "not a supported layer"),
        ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A", "not a supported layer"),
        ("text_encoder.encoder.layers.0.self_attn", "not a supported layer"),
    ],
)
def test_bad_keys_raise(tmp_path, key, message):
    with pytest.raises(ValueError, match=message):
        save_kohya_lora({key: good_factors()}, tmp_path / "x.safetensors", {})
    with pytest.raises(ValueError, match=message):
        save_diffusers_lora({key: good_factors()}, tmp_path)
    assert not any(tmp_path.iterdir())


def test_bad_arguments_raise(tmp_path):
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    factors = {key: good_factors()}
    with pytest.raises(ValueError, match="no LoRA factors"):
        save_diffusers_lora({}, tmp_path)
    with pytest.raises(ValueError, match="expected LoRAFactors"):
        save_diffusers_lora({key: (torch.ones(2, 32), torch.ones(32, 2))}, tmp_path)
    te = "text_encoder.encoder.layers.0.self_attn.q_proj"
    with pytest.raises(ValueError, match="same module"):
        both_spellings = {te: good_factors(), "text_encoder.text_model." + te[13:]: good_factors()}
        save_kohya_lora(both_spellings, tmp_path / "x.safetensors", {})
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_kohya_lora(factors, tmp_path / "x.pt", {})
    with pytest.raises(ValueError, match="str to str"):
        save_kohya_lora(factors, tmp_path / "x.safetensors", {"reslora_pre_num": -1})
    with pytest.raises(ValueError, match="contradicts"):
        save_kohya_lora(factors, tmp_path / "x.safetensors", {"ss_network_dim": "8"})
    with pytest.raises(ValueError, match="written by save_diffusers_lora"):
        save_diffusers_lora(factors, tmp_path, {"lora_adapter_metadata": "{}"})
    with pytest.raises(ValueError, match="base_model_version"):
        save_kohya_lora(factors, tmp_path / "x.safetensors", {}, base_model_version="sdxl_base_v1-0")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "name, message",
    [
        ("lora_te3_text_model_encoder_layers_0_self_attn_q_proj", "none of"),
        ("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q", "pass the UNet config"),
        ("lora_unet_down_blocks_0_resnets_0_time_emb_proj", "supported layer"),
        ("lora_unet_mid_block_attentions_0_proj_in", "supported layer"),
    ],
)
def test_bad_kohya_names_raise(name, message):
    with pytest.raises(ValueError, match=message):
        kohya_name_to_key(name)


def test_bad_kohya_files_raise(tmp_path):
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_down.weight": torch.ones(2, 8)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(ValueError, match="lacks lora_down.weight or lora_up.weight"):
        load_kohya_lora(tmp_path / "a.safetensors")
    save_file(
        {
            f"{name}.lora_down.weight": torch.ones(2, 8),
            f"{name}.lora_up.weight": torch.ones(8, 2),
            f"{name}.dora_scale": torch.ones(8),
        },
        str(tmp_path / "b.safetensors"),
    )
    with pytest.raises(ValueError, match="not a plain LoRA tensor"):
        load_kohya_lora(tmp_path / "b.safetensors")
    save_file(
        {f"{name}.lora_down.weight": torch.ones(2, 8, 1, 1), f"{name}.lora_up.weight": torch.ones(8, 2, 1, 1)},
        str(tmp_path / "c.safetensors"),
    )
    with pytest.raises(ValueError, match="needs 2-D Linear factors"):
        load_kohya_lora(tmp_path / "c.safetensors")


def test_ldm_conversion_rejects_what_it_cannot_map(pipeline_dir, tmp_path):
    config = dict(sd15_shaped_unet().config)
    with pytest.raises(ValueError, match="unknown child 'foo'"):
        unet_path_to_ldm("down_blocks.0.resnets.0.foo.weight", config)
    with pytest.raises(ValueError, match="not part of an SD-1.x / SDXL-shaped model"):
        unet_path_to_ldm("down_blocks.4.resnets.0.conv1.weight", config)
    with pytest.raises(ValueError, match="not part of an SD-1.x / SDXL-shaped model"):
        ldm_path_to_unet("input_blocks.12.0.in_layers.0.weight", config)
    with pytest.raises(ValueError, match="mid block"):
        unet_path_to_ldm("conv_in.weight", {**config, "mid_block_type": "UNetMidBlock2D"})
    with pytest.raises(ValueError, match="down blocks"):
        unet_path_to_ldm("conv_in.weight", {**config, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock3D")})

    pipe = load_pipeline(pipeline_dir)
    sd2_text_encoder = tiny_text_encoder()
    sd2_text_encoder.config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="OpenCLIP"):
        single_file_state_dict({"unet": pipe.unet, "vae": pipe.vae, "text_encoder": sd2_text_encoder})
    with pytest.raises(ValueError, match="missing: \\['vae'\\]"):
        save_single_file_checkpoint({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, tmp_path / "m.safetensors")
    save_diffusers_lora(make_factors(pipe, UNIFORM_ALPHA), tmp_path / "lora")
    pipe.load_lora_weights(tmp_path / "lora")
    with pytest.raises(ValueError, match="fuse and unload"):
        save_single_file_checkpoint(pipe, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
