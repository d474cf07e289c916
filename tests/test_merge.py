"""The merge step, library level: exact merges, α estimators, baking, re-compression."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from tiny_models import perturb_adapter, tiny_text_encoder, tiny_unet, token_ids, unet_inputs

from reslora_diffusers import ResLoRAConfig, apply_reslora
from reslora_diffusers.formats import LoRAFactors, lora_delta
from reslora_diffusers.merge import (
    baked_weights,
    collect_shortcut_statistics,
    input_based_alphas,
    merge_adapter,
    merge_into_base,
    relative_error,
    truncate_rank,
    weight_based_alphas,
)


def trained_adapter(config, steps=2):
    """An adapter with perturbed factors whose input-norm windows saw a few training-mode batches."""
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    adapter = apply_reslora(unet, config, text_encoder)
    perturb_adapter(adapter, std=0.05)
    unet.train(), text_encoder.train()
    for seed in range(steps):  # norms are recorded in training mode with autograd on, as in a training step
        run_pipeline_like(unet, text_encoder, seed)
    unet.eval(), text_encoder.eval()
    return adapter


def run_pipeline_like(unet, text_encoder, seed):
    """Text encoder then UNet, as a pipeline runs them."""
    inputs = unet_inputs(seed=seed)
    inputs["encoder_hidden_states"] = text_encoder(token_ids(seed=seed)).last_hidden_state
    return unet(**inputs).sample


def outputs(adapter, seed=9):
    with torch.no_grad():
        return run_pipeline_like(adapter.unet, adapter.text_encoder, seed), adapter.text_encoder(token_ids(seed=seed)).last_hidden_state


EXACT = [
    ResLoRAConfig(res_type="none", rank=4, lora_alpha=8),
    ResLoRAConfig(res_type="bs", rank=4, lora_alpha=8, pre_num=0),
    ResLoRAConfig(res_type="bs", rank=4, lora_alpha=8, pre_num=1),
    ResLoRAConfig(res_type="bs", rank=4, lora_alpha=8, pre_num=-1),
    ResLoRAConfig(res_type="is", rank=4, pre_num=0),
]


@pytest.mark.parametrize("config", EXACT, ids=lambda c: f"{c.res_type}-pre{c.pre_num}")
def test_exact_merges_equal_the_unmerged_model(config):
    adapter = trained_adapter(config)
    unet_out, text_out = outputs(adapter)
    result = merge_adapter(adapter, "input")
    assert result.method == "exact"
    with baked_weights(adapter, result.factors):
        merged_unet, merged_text = outputs(adapter)
    assert relative_error(merged_unet, unet_out) <= 1e-5 and relative_error(merged_text, text_out) <= 1e-5
    # The branch really mattered: without it the output is far off.
    for block in adapter.blocks.values():
        block.active = False
    assert relative_error(outputs(adapter)[0], unet_out) > 1e-3
    for block in adapter.blocks.values():
        block.active = True
    # bs keeps its effective scale at rank (m+1)·r.
    for name, block in adapter.blocks.items():
        factors = result.factors[name]
        assert factors.rank == config.rank * (1 + len(block.previous) if config.res_type == "bs" else 1)
        assert factors.scale == pytest.approx(config.scaling)


def test_delta_lora_merges_exactly_as_a_rank_2r_lora():
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    config = ResLoRAConfig(res_type="none", rank=4, delta_lora_ratio=0.5, delta_lora_start=1)
    adapter = apply_reslora(unet, config, text_encoder)
    original = {name: layer.weight.detach().clone() for name, layer in adapter.base_layers.items()}
    optimizer = torch.optim.SGD(adapter.trainable_parameters(), lr=0.5)
    for step in range(1, 5):
        run_pipeline_like(unet, text_encoder, step).square().mean().backward()
        optimizer.step(), optimizer.zero_grad()
        adapter.step(step)
    unet_out, text_out = outputs(adapter)
    result = merge_adapter(adapter)
    assert all(f.rank == 8 for f in result.factors.values())
    # Delta-LoRA never writes W: the factors are relative to the base W_0 as it still is.
    assert all(torch.equal(adapter.base_layers[name].weight, weight) for name, weight in original.items())
    assert adapter.delta_lora.started
    with baked_weights(adapter, result.factors):
        merged_unet, merged_text = outputs(adapter)
    assert relative_error(merged_unet, unet_out) <= 1e-5 and relative_error(merged_text, text_out) <= 1e-5
    with torch.no_grad():
        for name, layer in adapter.base_layers.items():
            layer.weight.copy_(original[name] + lora_delta(result.factors[name]))
    for block in adapter.blocks.values():
        block.active = False
    assert relative_error(outputs(adapter)[0], unet_out) <= 1e-5


@pytest.mark.parametrize("res_type,pre_num", [("is", -1), ("ms", -1), ("ms", 1)])
def test_approximate_merges_and_lstsq_minimises_its_objective(res_type, pre_num):
    adapter = trained_adapter(ResLoRAConfig(res_type=res_type, pre_num=pre_num, rank=4))
    unet_out, _ = outputs(adapter)

    def calibration():
        for seed in range(3):
            run_pipeline_like(adapter.unet, adapter.text_encoder, seed)

    stats = collect_shortcut_statistics(adapter, calibration)
    objectives, errors = {}, {}
    for method in ("input", "weight", "lstsq"):
        result = merge_adapter(adapter, method, calibration)
        assert result.method == method and set(result.alphas) == set(input_based_alphas(adapter))
        objectives[method] = stats.objective(result.alphas)
        with baked_weights(adapter, result.factors):
            errors[method] = relative_error(outputs(adapter)[0], unet_out)
    for name in objectives["lstsq"]:
        assert objectives["lstsq"][name] <= min(objectives["input"][name], objectives["weight"][name]) * (1 + 1e-6) + 1e-9
    assert all(0 < e < 1 for e in errors.values()), errors
    # The approximation is not exact: the shortcut cannot be merged without error.
    assert min(errors.values()) > 1e-6


def test_weight_based_alphas_follow_the_paper_formula():
    adapter = trained_adapter(ResLoRAConfig(res_type="is", rank=4))
    alphas = weight_based_alphas(adapter)
    chain = next(c for c in adapter.chains["text_encoder"] if c[0].endswith("q_proj"))
    assert alphas[chain[1]] == [1.0]  # n-2 does not exist
    merged = {}
    for position, name in enumerate(chain):
        layer = adapter.base_layers[name].weight.detach()
        block = adapter.blocks[name]
        alpha = alphas.get(name, [0.0])[0] if block.previous else 0.0
        merged[name] = (layer + block.scaling * (1 + alpha) * block.lora_B @ block.lora_A).norm().item()
        if position >= 2:
            expected = merged[chain[position - 2]] / merged[chain[position - 1]]
            assert alphas[name][0] == pytest.approx(expected, rel=1e-5)


def test_input_based_merge_needs_recorded_norms():
    unet = tiny_unet()
    adapter = apply_reslora(unet, ResLoRAConfig(res_type="is", rank=4))
    with pytest.raises(ValueError, match="input norms"):
        merge_adapter(adapter, "input")
    with pytest.raises(ValueError, match="calibration"):
        merge_adapter(adapter, "lstsq")


def test_merge_into_base_leaves_nothing_behind():
    config = ResLoRAConfig(res_type="ms", rank=4)
    adapter = trained_adapter(config)
    unet, text_encoder = adapter.unet, adapter.text_encoder
    result = merge_adapter(adapter, "input")
    with baked_weights(adapter, result.factors):
        expected = outputs(adapter)
    merge_into_base(adapter, result.factors)
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in tiny_unet().parameters())
    assert sum(p.numel() for p in text_encoder.parameters()) == sum(p.numel() for p in tiny_text_encoder().parameters())
    assert not unet._forward_pre_hooks and not unet._forward_hooks
    with torch.no_grad():
        got = run_pipeline_like(unet, text_encoder, 9), text_encoder(token_ids(seed=9)).last_hidden_state
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])


def test_truncated_svd_is_the_best_low_rank_approximation():
    generator = torch.Generator().manual_seed(0)
    factors = LoRAFactors(down=torch.randn(12, 40, generator=generator), up=torch.randn(24, 12, generator=generator), alpha=6.0)
    truncated, energy = truncate_rank(factors, 5)
    full = lora_delta(factors).double()
    singular = torch.linalg.svdvals(full)
    assert truncated.rank == 5
    assert energy == pytest.approx(float(singular[:5].square().sum() / singular.square().sum()), rel=1e-6)
    error = (lora_delta(truncated).double() - full).norm()
    assert error == pytest.approx(float(singular[5:].square().sum().sqrt()), rel=1e-4)
    same, kept = truncate_rank(factors, 12)
    assert same is factors and kept == 1.0


@pytest.mark.parametrize("res_type", ["is", "ms"])
def test_cross_attention_keys_and_values_merge_with_alpha_exactly_one(res_type):
    """Every cross-attention to_k / to_v reads the same text embedding: x_{n-1} = x_n, so α = 1 is exact."""
    adapter = trained_adapter(ResLoRAConfig(res_type=res_type, rank=4, cross_attention_shortcuts=True))

    def calibration():
        run_pipeline_like(adapter.unet, adapter.text_encoder, 0)

    cross = [n for n, b in adapter.blocks.items() if b.previous and (".attn2.to_k" in n or ".attn2.to_v" in n)]
    assert cross
    for method in ("input", "weight", "lstsq"):
        alphas = merge_adapter(adapter, method, calibration).alphas
        assert all(alphas[name] == [1.0] * len(adapter.blocks[name].previous) for name in cross), method
        assert any(a != 1.0 for name, values in alphas.items() if name not in cross for a in values)  # others estimated
