"""Merge-aware training: shortcut annealing, calibrated / joint-lstsq merges, cross-attention links, LoRA+."""

import math

import pytest
import torch
from test_merge import outputs, run_pipeline_like, trained_adapter
from tiny_models import tiny_text_encoder, tiny_unet

from reslora_diffusers import ResLoRAConfig, apply_reslora, load_adapter, save_adapter
from reslora_diffusers.adapters.annealing import shortcut_anneal_factor
from reslora_diffusers.merge import (
    baked_weights,
    is_exact,
    merge_adapter,
    relative_error,
)
from reslora_diffusers.merge.calibration import (
    alpha_merged_down,
    collect_layer_statistics,
    relative_layer_error,
)
from reslora_diffusers.training.lora_plus import lora_plus_param_groups


def calibration_run(adapter, seeds=range(3)):
    def calibration():
        for seed in seeds:
            run_pipeline_like(adapter.unet, adapter.text_encoder, seed)

    return calibration


def test_anneal_schedule_is_one_then_a_half_cosine_to_exactly_zero():
    values = [shortcut_anneal_factor(step, 100, 0.3) for step in range(1, 101)]
    assert values[:70] == [1.0] * 70
    assert values[-1] == 0.0 and shortcut_anneal_factor(150, 100, 0.3) == 0.0
    assert all(a >= b for a, b in zip(values, values[1:])) and 0 < values[84] < 1
    assert values[84] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 30)))
    assert shortcut_anneal_factor(100, 100, 0.0) == 1.0  # fraction 0: off
    with pytest.raises(ValueError, match="fraction"):
        shortcut_anneal_factor(1, 10, 1.5)


@pytest.mark.parametrize("res_type,pre_num", [("is", -1), ("ms", -1), ("bs", -1)])
def test_annealed_to_zero_training_ends_with_an_exact_merge(res_type, pre_num):
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    adapter = apply_reslora(unet, ResLoRAConfig(res_type=res_type, pre_num=pre_num, rank=4), text_encoder)
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-2)
    total = 6
    unet.train(), text_encoder.train()
    for step in range(1, total + 1):
        adapter.set_shortcut_scale(shortcut_anneal_factor(step, total, 0.5))
        run_pipeline_like(unet, text_encoder, step).square().mean().backward()
        optimizer.step(), optimizer.zero_grad()
    unet.eval(), text_encoder.eval()
    assert adapter.shortcut_scale == 0.0 and is_exact(adapter)
    unet_out, text_out = outputs(adapter)
    result = merge_adapter(adapter, "input")
    assert result.method == "exact" and all(f.rank == 4 for f in result.factors.values())
    with baked_weights(adapter, result.factors):
        merged_unet, merged_text = outputs(adapter)
    assert relative_error(merged_unet, unet_out) <= 1e-5 and relative_error(merged_text, text_out) <= 1e-5
    # Mid-annealing the shortcuts are still there: the same factors at γ = 0.5 give another model.
    adapter.set_shortcut_scale(0.5)
    assert not is_exact(adapter) or res_type == "bs"
    assert relative_error(outputs(adapter)[0], unet_out) > 1e-4


@pytest.mark.parametrize("res_type", ["is", "ms", "bs"])
def test_the_shortcut_scale_multiplies_the_shortcut_terms_and_is_saved(tmp_path, res_type):
    adapter = trained_adapter(ResLoRAConfig(res_type=res_type, rank=4))
    adapter.set_shortcut_scale(0.25)
    seen = {}
    hooks = [
        b.register_forward_hook(lambda m, args, out, n=n: seen.__setitem__(n, (args[0].detach(), out.detach())))
        for n, b in adapter.blocks.items()
    ]
    outputs(adapter)
    for hook in hooks:
        hook.remove()
    checked = 0
    for name, block in adapter.blocks.items():
        x, out = seen[name]
        earlier = [seen[b.name][0] for b in block.previous]
        own = x @ block.lora_A.T @ block.lora_B.T
        if res_type == "is":
            shortcut = sum(e @ block.lora_A.T for e in earlier) @ block.lora_B.T if earlier else 0
        elif res_type == "ms":
            shortcut = sum(e @ b.lora_A.T for e, b in zip(earlier, block.previous)) @ block.lora_B.T if earlier else 0
        else:
            shortcut = sum(x @ b.lora_A.T @ b.lora_B.T for b in block.previous) if block.previous else 0
        torch.testing.assert_close(out, block.scaling * (own + 0.25 * shortcut), atol=1e-6, rtol=1e-5)
        checked += bool(block.previous)
    assert checked > 0
    save_adapter(adapter, tmp_path / "a")
    reloaded = load_adapter(tiny_unet(), tmp_path / "a", tiny_text_encoder())
    assert reloaded.shortcut_scale == 0.25
    with pytest.raises(ValueError, match="shortcut scale"):
        adapter.set_shortcut_scale(1.5)


@pytest.mark.parametrize("res_type", ["is", "ms"])
def test_calibrated_merge_lowers_the_error_it_reports_and_the_real_one(res_type):
    adapter = trained_adapter(ResLoRAConfig(res_type=res_type, rank=4))
    unet_out, _ = outputs(adapter)
    errors, report = {}, {}
    for method in ("input", "lstsq", "lstsq_joint", "calibrated"):
        # A calibration set much larger than the fitted parameters (in × r per block), as real prompts give.
        result = merge_adapter(adapter, method, calibration_run(adapter, range(20)))
        report.update(result.report)
        with baked_weights(adapter, result.factors):
            errors[method] = relative_error(outputs(adapter)[0], unet_out)
    assert report["layer_relative_error_calibrated"] < 0.9 * report["layer_relative_error_lstsq_joint"]
    # On inputs it was not fitted on (another seed), the merged model is closer to the unmerged one too.
    assert errors["calibrated"] < min(errors["input"], errors["lstsq"], errors["lstsq_joint"]), errors
    with pytest.raises(ValueError, match="calibration"):
        merge_adapter(adapter, "calibrated")


def test_joint_lstsq_fits_ms_links_better_than_the_per_link_solve():
    adapter = trained_adapter(ResLoRAConfig(res_type="ms", rank=4))
    calibration = calibration_run(adapter)
    stats = collect_layer_statistics(adapter, calibration)
    per_link = merge_adapter(adapter, "lstsq", calibration).alphas
    joint = merge_adapter(adapter, "lstsq_joint", calibration).alphas
    assert set(joint) == set(per_link) == set(stats.blocks)
    downs = lambda alphas: {n: alpha_merged_down(b, alphas[n]) for n, b in stats.blocks.items()}
    assert any(len(b.previous) > 1 for b in stats.blocks.values())
    for name in stats.blocks:  # the joint α minimises each block's own error
        joint_error, total = stats.error(name, downs(joint)[name])
        per_link_error, _ = stats.error(name, downs(per_link)[name])
        assert joint_error <= per_link_error + 1e-6 * total
    layer_error = lambda alphas: relative_layer_error(stats.error(n, d) for n, d in downs(alphas).items())
    assert layer_error(joint) < layer_error(per_link)
    for name in stats.blocks:  # the rank-r statistics give the same error as the full ones (fp32 sums: 1e-5 of the total)
        (reduced, total), (full, _) = stats.alpha_error(name, joint[name]), stats.error(name, downs(joint)[name])
        assert abs(reduced - full) <= 1e-5 * total


@pytest.mark.parametrize("res_type", ["is", "ms", "bs"])
def test_cross_attention_key_value_blocks_can_be_left_unlinked(res_type):
    linked = apply_reslora(tiny_unet(), ResLoRAConfig(res_type=res_type, rank=4))
    unlinked = apply_reslora(tiny_unet(), ResLoRAConfig(res_type=res_type, rank=4, cross_attention_shortcuts=False))
    cross_kv = {n for n in unlinked.blocks if ".attn2.to_k" in n or ".attn2.to_v" in n}
    assert cross_kv and any(linked.blocks[n].previous for n in cross_kv)
    for name, block in unlinked.blocks.items():
        if name in cross_kv:
            assert not block.previous and not block.feeds_later_blocks
        else:
            # Links to other blocks stay (bs chains can mix self- and cross-attention layers of equal shape).
            assert [b.name for b in block.previous] == [b.name for b in linked.blocks[name].previous if b.name not in cross_kv]


def test_lora_plus_groups_give_b_ratio_times_the_learning_rate_of_a():
    adapter = apply_reslora(tiny_unet(), ResLoRAConfig(res_type="is", rank=4))
    groups = lora_plus_param_groups(adapter, lr=1e-3, ratio=16)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1.6e-2)]
    everything = {id(p) for p in adapter.trainable_parameters()}
    a_ids, b_ids = ({id(p) for p in g["params"]} for g in groups)
    assert a_ids | b_ids == everything and not a_ids & b_ids
    assert b_ids == {id(b.lora_B) for b in adapter.blocks.values()}
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    with torch.no_grad():
        for block in adapter.blocks.values():
            block.lora_B.normal_(std=0.01)
    before = {id(p): p.detach().clone() for p in adapter.trainable_parameters()}
    from tiny_models import unet_inputs

    adapter.unet(**unet_inputs()).sample.square().mean().backward()
    optimizer.step()
    # Adam's first step moves every parameter with a gradient by about its lr.
    step_a = max(float((p - before[id(p)]).abs().max()) for p in groups[0]["params"])
    step_b = max(float((p - before[id(p)]).abs().max()) for p in groups[1]["params"])
    assert step_a == pytest.approx(1e-3, rel=1e-2) and step_b == pytest.approx(1.6e-2, rel=1e-2)
    with pytest.raises(ValueError, match="ratio"):
        lora_plus_param_groups(adapter, 1e-3, 0)
