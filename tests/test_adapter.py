"""The adapter core: shortcut math against the SPEC formulas, chains, checkpointing, dtypes, save/load."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, XFormersAttnProcessor
from peft import LoraConfig
from tiny_models import (
    perturb_adapter,
    sd15_shaped_unet,
    tiny_text_encoder,
    tiny_unet,
    token_ids,
    unet_inputs,
)

from reslora_diffusers import AdapterMismatchError, ResLoRAConfig, apply_reslora, load_adapter, save_adapter
from reslora_diffusers.adapters import variants
from reslora_diffusers.adapters.processor import ResLoRAAttnProcessor
from reslora_diffusers.formats import lora_delta
from reslora_diffusers.merge import baked_weights, merge_adapter, relative_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import SavedTensorBytes  # noqa: E402  (the benchmarks' memory accounting)

RES_TYPES = ["none", "is", "bs", "ms"]
VARIANTS = [(r, p) for r in RES_TYPES for p in (0, 1, -1)]


def run_unet(unet, inputs=None):
    return unet(**(inputs or unet_inputs())).sample


def run_text_encoder(text_encoder, ids=None):
    return text_encoder(ids if ids is not None else token_ids()).last_hidden_state


@pytest.mark.parametrize("res_type", RES_TYPES)
def test_zero_init_keeps_base_output_and_perturbing_changes_it(res_type):
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    base_unet, base_text = run_unet(unet).detach(), run_text_encoder(text_encoder).detach()
    adapter = apply_reslora(unet, ResLoRAConfig(res_type=res_type, rank=4), text_encoder=text_encoder)
    assert len(list(adapter.named_blocks("unet"))) == 56 and len(list(adapter.named_blocks("text_encoder"))) == 16
    torch.testing.assert_close(run_unet(unet), base_unet, rtol=0, atol=0)
    torch.testing.assert_close(run_text_encoder(text_encoder), base_text, rtol=0, atol=0)
    perturb_adapter(adapter)
    assert (run_unet(unet) - base_unet).abs().max() > 1e-3
    assert (run_text_encoder(text_encoder) - base_text).abs().max() > 1e-3


def test_plain_lora_equals_peft_lora():
    config = ResLoRAConfig(res_type="none", rank=4, lora_alpha=8)
    ours = tiny_unet()
    adapter = apply_reslora(ours, config)
    perturb_adapter(adapter)
    theirs = tiny_unet()
    theirs.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(config.unet_targets), init_lora_weights=False))
    modules = dict(theirs.named_modules())
    with torch.no_grad():
        for name, block in adapter.blocks.items():
            layer = modules[name.removeprefix("unet.")]
            layer.lora_A["default"].weight.copy_(block.lora_A)
            layer.lora_B["default"].weight.copy_(block.lora_B)
    inputs = unet_inputs()
    difference = (run_unet(ours, inputs) - run_unet(theirs, inputs)).abs().max()
    assert difference <= 1e-5
    assert (run_unet(theirs, inputs) - run_unet(tiny_unet(), inputs)).abs().max() > 1e-3  # the LoRA did something


def install_reference(adapter):
    """Removes the adapter and re-implements SPEC §2 literally with forward hooks on the frozen layers.

    Uses the adapter's own parameters, so autograd gradients of both implementations can be compared.
    """
    config = adapter.config
    factors = {name: (block.lora_A, block.lora_B) for name, block in adapter.blocks.items()}
    layers, chains = dict(adapter.base_layers), adapter.chains
    adapter.remove()
    position = {name: (chain, n) for chains_ in chains.values() for chain in chains_ for n, name in enumerate(chain)}
    seen = {}

    def reference(name, x):
        chain, n = position[name]
        m = n if config.pre_num == -1 else min(config.pre_num, n)
        A, B = factors[name]
        if config.res_type == "none" or m == 0:
            return x @ A.T @ B.T
        if config.res_type == "is":
            return (x + seen[chain[n - 1]]) @ A.T @ B.T
        if config.res_type == "bs":
            return sum(x @ factors[chain[n - k]][0].T @ factors[chain[n - k]][1].T for k in range(m + 1))
        return sum(seen[chain[n - k]] @ factors[chain[n - k]][0].T for k in range(m + 1)) @ B.T

    def make_hook(name):
        def hook(_module, args, output):
            seen[name] = args[0]
            return output + config.scaling * reference(name, args[0])

        return hook

    for name, layer in layers.items():
        layer.register_forward_hook(make_hook(name))
    return [p for pair in factors.values() for p in pair]


@pytest.mark.parametrize("res_type,pre_num", VARIANTS)
def test_forward_and_gradients_equal_reference_formulas(res_type, pre_num):
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    adapter = apply_reslora(unet, ResLoRAConfig(res_type=res_type, pre_num=pre_num, rank=4), text_encoder)
    perturb_adapter(adapter)
    params = adapter.trainable_parameters()

    def loss_and_grads():
        embedding = run_text_encoder(text_encoder)
        inputs = unet_inputs()
        inputs["encoder_hidden_states"] = embedding
        loss = run_unet(unet, inputs).square().mean()
        return loss, torch.autograd.grad(loss, params)

    loss, grads = loss_and_grads()
    assert install_reference(adapter) == params
    ref_loss, ref_grads = loss_and_grads()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("pre_num", [1, -1])
def test_bs_dense_and_low_rank_evaluation_orders_agree(pre_num, monkeypatch):
    """`bs` applies either B*(A*x) or the dense ΔW = B*A* (whichever is cheaper): same loss and gradients."""
    results = []
    for dense in (False, True):
        monkeypatch.setattr(variants, "bs_dense_is_cheaper", lambda *_, dense=dense: dense)
        unet = tiny_unet()
        adapter = apply_reslora(unet, ResLoRAConfig(res_type="bs", pre_num=pre_num, rank=4))
        perturb_adapter(adapter)
        loss = run_unet(unet).square().mean()
        results.append((loss, torch.autograd.grad(loss, adapter.trainable_parameters())))
    (loss, grads), (dense_loss, dense_grads) = results
    torch.testing.assert_close(dense_loss, loss, rtol=1e-5, atol=1e-7)
    for grad, dense_grad in zip(grads, dense_grads):
        torch.testing.assert_close(dense_grad, grad, rtol=1e-4, atol=1e-7)


def test_bs_chooses_the_dense_update_only_for_long_chains():
    tokens = 4 * 4096  # SD-1.5's first level (320 wide), batch 4, 512 px
    assert not variants.bs_dense_is_cheaper(tokens, 320, 320, 16)  # plain LoRA-sized
    assert not variants.bs_dense_is_cheaper(tokens, 320, 320, 2 * 32)  # pre_num 1
    assert variants.bs_dense_is_cheaper(tokens, 320, 320, 10 * 32)  # all 10 blocks: rank 320 = the width
    # Few tokens (a text encoder's 77): building ΔW costs more than it saves.
    assert not variants.bs_dense_is_cheaper(77, 320, 320, 6 * 32)


@pytest.mark.parametrize("method", ["none", "bs", "delta"])
def test_a_blocks_exact_weight_change_is_what_its_forward_adds(method):
    """`exact_factors`, which every merge and export reads, against the block's own forward (Delta-LoRA's move
    since step K included): one source of truth for "the weight change" of a block without a shortcut."""
    delta = {"delta_lora_ratio": 0.5, "delta_lora_start": 0} if method == "delta" else {}
    adapter = apply_reslora(tiny_unet(), ResLoRAConfig(res_type="none" if method == "delta" else method, pre_num=-1, rank=4, **delta))
    perturb_adapter(adapter)  # after the step-K snapshot: B A differs from B_K A_K
    linked = 0
    for block in adapter.blocks.values():
        x = torch.randn(2, 3, block.in_features, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(block(x), x @ lora_delta(block.merged_lora_factors()).T, rtol=1e-5, atol=1e-6)
        linked += bool(block.previous)
    assert linked > 0 if method == "bs" else linked == 0


def saved_activation_bytes(model, inputs) -> int:
    """Bytes autograd keeps for backward in one forward: the accounting `benchmarks/speed.py` reports."""
    with SavedTensorBytes(exclude=[model]).recording() as saved:
        loss = run_unet(model, inputs).square().mean()
    loss.backward()
    return saved.total


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("pre_num", [1, -1])
def test_bs_keeps_nothing_per_token_beyond_what_lora_keeps(pre_num, dense, monkeypatch):
    """A `bs` block's rank-(m+1)·r product is recomputed in backward or applied as a dense ΔW, never stored:
    with either evaluation order, what `bs` keeps beyond LoRA does not grow with the number of tokens."""
    monkeypatch.setattr(variants, "bs_dense_is_cheaper", lambda *_: dense)
    extra = []
    for batch in (2, 8):
        saved = {}
        for res_type in ("none", "bs"):
            unet = tiny_unet()
            apply_reslora(unet, ResLoRAConfig(res_type=res_type, pre_num=pre_num, rank=4))
            saved[res_type] = saved_activation_bytes(unet, unet_inputs(batch=batch))
        extra.append(saved["bs"] - saved["none"])
    assert extra[1] <= extra[0], extra


def count_block_calls(adapter):
    calls = []
    for block in adapter.blocks.values():
        block.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def training_pass(res_type, enable_checkpointing=None):
    """(adapter, loss, block calls) of one text encoder + UNet forward in training mode, checkpointed if asked."""
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    adapter = apply_reslora(unet, ResLoRAConfig(res_type=res_type, pre_num=-1, rank=4), text_encoder)
    perturb_adapter(adapter)
    unet.train(), text_encoder.train()
    if enable_checkpointing is not None:
        enable_checkpointing(unet, text_encoder)
    calls = count_block_calls(adapter)
    inputs = unet_inputs()
    inputs["encoder_hidden_states"] = run_text_encoder(text_encoder)
    return adapter, run_unet(unet, inputs).square().mean(), calls


def non_reentrant(unet, text_encoder):
    unet.enable_gradient_checkpointing()
    text_encoder.activation_checkpointing_enable()


def reentrant(unet, text_encoder):
    checkpoint = lambda module, *args: torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=True)
    unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)
    text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})


@pytest.mark.parametrize("res_type", RES_TYPES)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(res_type):
    results = []
    for checkpointing in (None, non_reentrant):
        adapter, loss, calls = training_pass(res_type, checkpointing)
        loss.backward()
        # With checkpointing, blocks run again during backward: proof that the recompute really happened.
        assert (len(calls) > len(adapter.blocks)) == (checkpointing is not None)
        # The shortcut inputs kept for the recompute are released once backward is over.
        assert all(block.cached is None for block in adapter.blocks.values())
        results.append((loss.detach(), [p.grad.clone() for p in adapter.trainable_parameters()]))
    (loss, grads), (ckpt_loss, ckpt_grads) = results
    torch.testing.assert_close(loss, ckpt_loss, rtol=1e-6, atol=1e-7)
    for grad, ckpt_grad in zip(grads, ckpt_grads):
        torch.testing.assert_close(grad, ckpt_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("res_type", RES_TYPES)
def test_reentrant_checkpointing_gives_the_reference_gradients_or_a_clear_error(res_type):
    """`is` / `ms` shortcuts read an earlier block's input across checkpoint segments, which reentrant
    checkpointing runs without autograd: refused at the first backward. `none` / `bs` are exact."""
    adapter, loss, _ = training_pass(res_type)
    loss.backward()
    grads = [p.grad.clone() for p in adapter.trainable_parameters()]
    adapter, loss, calls = training_pass(res_type, reentrant)
    if res_type in ("is", "ms"):
        with pytest.raises(RuntimeError, match=r"reentrant checkpointing \(use_reentrant=True\) cannot give"):
            loss.backward()
        return
    loss.backward()
    assert len(calls) > len(adapter.blocks)  # the reentrant recompute really happened
    for grad, parameter in zip(grads, adapter.trainable_parameters()):
        torch.testing.assert_close(parameter.grad, grad, rtol=1e-5, atol=1e-7)


def test_chains_follow_execution_order_and_shapes_on_an_sd15_shaped_unet():
    for res_type in ("is", "ms", "bs"):
        unet, text_encoder = sd15_shaped_unet(), tiny_text_encoder()
        adapter = apply_reslora(unet, ResLoRAConfig(res_type=res_type, rank=2), text_encoder)
        order = list(adapter.layers)  # probe (execution) order
        stage = lambda name: next(i for i, s in enumerate(("down_blocks", "mid_block", "up_blocks")) if s in name)
        assert [stage(n) for n in order if n.startswith("unet.")] == sorted(stage(n) for n in order if n.startswith("unet."))
        for chain in adapter.chains["unet"]:
            assert [order.index(n) for n in chain] == sorted(order.index(n) for n in chain)
            shapes = {(adapter.layers[n].in_features, adapter.layers[n].out_features) for n in chain}
            assert len(shapes) == 1
            if res_type in ("is", "ms"):
                assert len({adapter.layers[n].input_shape for n in chain}) == 1
        # SD-1.5's trap: the 3rd down level and the mid block share weight shapes, not token counts.
        q_chain = next(c for c in adapter.chains["unet"] if "unet.down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q" in c)
        has_mid = any("mid_block" in n for n in q_chain)
        assert has_mid == (res_type == "bs")
        assert any("up_blocks.1" in n for n in q_chain)
        # Cross-attention keys all read the text embedding; the mid block's are linked only by weight shape.
        mid_block = adapter.blocks["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"]
        assert bool(mid_block.previous) == (res_type == "bs")
        # Text encoder: one chain per projection, layer i-1 -> i.
        for target in ("q_proj", "k_proj", "v_proj", "out_proj"):
            chain = next(c for c in adapter.chains["text_encoder"] if c[0].endswith(target))
            assert chain == [f"text_encoder.encoder.layers.{i}.self_attn.{target}" for i in range(4)]
            assert adapter.blocks[chain[2]].previous[0] is adapter.blocks[chain[1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("res_type", ["none", "is", "ms"])
def test_low_precision_bases_train_with_fp32_adapters(dtype, res_type):
    unet = tiny_unet(dtype=dtype)
    adapter = apply_reslora(unet, ResLoRAConfig(res_type=res_type, rank=4))
    assert all(p.dtype == torch.float32 and p.requires_grad for p in adapter.trainable_parameters())
    assert not any(p.requires_grad for n, p in unet.named_parameters() if "processor" not in n)
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-2)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in unet_inputs().items()}
    losses = []
    for _ in range(3):
        loss = run_unet(unet, inputs).float().square().mean()
        loss.backward()
        optimizer.step(), optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in adapter.trainable_parameters())


@pytest.mark.parametrize("res_type", RES_TYPES)
def test_save_then_load_on_a_fresh_model_reproduces_outputs(tmp_path, res_type):
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    adapter = apply_reslora(unet, ResLoRAConfig(res_type=res_type, rank=4, pre_num=1), text_encoder)
    perturb_adapter(adapter)
    unet.train()
    run_unet(unet)  # fills the input-norm windows
    unet.eval()
    expected_unet, expected_text = run_unet(unet), run_text_encoder(text_encoder)
    save_adapter(adapter, tmp_path)
    metadata = json.loads((tmp_path / "reslora_config.json").read_text())
    assert metadata["chains"] == adapter.chains and metadata["config"]["res_type"] == res_type
    unet_means = {k: v for k, v in metadata["input_norm_means"].items() if k.startswith("unet.")}
    for name, mean in unet_means.items():  # recorded only where the input-based merge reads them
        assert (mean is not None) == adapter.blocks[name].records_input_norm
    assert any(v is not None for v in unet_means.values()) == (res_type in ("is", "ms"))

    fresh_unet, fresh_text = tiny_unet(), tiny_text_encoder()
    loaded = load_adapter(fresh_unet, tmp_path, text_encoder=fresh_text)
    torch.testing.assert_close(run_unet(fresh_unet), expected_unet, rtol=0, atol=0)
    torch.testing.assert_close(run_text_encoder(fresh_text), expected_text, rtol=0, atol=0)
    assert loaded.input_norm_means() == adapter.input_norm_means()


def test_a_mismatched_base_is_refused_clearly(tmp_path):
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    save_adapter(apply_reslora(unet, ResLoRAConfig(res_type="is"), text_encoder), tmp_path)
    with pytest.raises(AdapterMismatchError, match="chains do not fit"):
        load_adapter(sd15_shaped_unet(), tmp_path, text_encoder=tiny_text_encoder())
    with pytest.raises(AdapterMismatchError, match="pass a text encoder"):
        load_adapter(tiny_unet(), tmp_path)
    with pytest.raises(AdapterMismatchError, match="chains do not fit"):
        load_adapter(tiny_unet(), tmp_path, text_encoder=tiny_text_encoder(layers=3))
    # Same layout, other widths: the chains match by name but the tensors cannot.
    (tmp_path / "reslora_adapter.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_adapter(tiny_unet(), tmp_path, text_encoder=tiny_text_encoder())


def test_a_refused_load_leaves_the_model_untouched(tmp_path):
    save_adapter(apply_reslora(tiny_unet(), ResLoRAConfig(res_type="bs")), tmp_path)
    other = sd15_shaped_unet()
    with pytest.raises(AdapterMismatchError):
        load_adapter(other, tmp_path)
    assert not any(isinstance(p, ResLoRAAttnProcessor) for p in other.attn_processors.values())
    assert all(p.requires_grad for p in other.parameters())


def test_remove_restores_the_base_model():
    unet = tiny_unet()
    base = run_unet(unet).detach()
    adapter = apply_reslora(unet, ResLoRAConfig(res_type="ms"))
    perturb_adapter(adapter)
    adapter.remove()
    torch.testing.assert_close(run_unet(unet), base, rtol=0, atol=0)
    assert not any(isinstance(p, ResLoRAAttnProcessor) for p in unet.attn_processors.values())


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"res_type": "xs"}, "res_type"),
        ({"rank": 0}, "rank"),
        ({"pre_num": -2}, "pre_num"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"delta_lora_ratio": 0.5, "res_type": "is"}, "plain LoRA"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
    ],
)
def test_config_validates_and_round_trips(bad, match):
    with pytest.raises(ValueError, match=match):
        ResLoRAConfig(**bad)
    config = ResLoRAConfig(res_type="ms", pre_num=2, rank=16, lora_alpha=32, unet_targets=["to_q", "to_v"])
    assert ResLoRAConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown"):
        ResLoRAConfig.from_dict({"res_typ": "is"})


def test_delta_lora_adapter_reloads_onto_a_fresh_base(tmp_path):
    unet = tiny_unet()
    adapter = apply_reslora(unet, ResLoRAConfig(res_type="none", rank=4, delta_lora_ratio=2.0, delta_lora_start=1))
    optimizer = torch.optim.SGD(adapter.trainable_parameters(), lr=0.5)
    for step in range(1, 5):
        run_unet(unet).square().mean().backward()
        optimizer.step(), optimizer.zero_grad()
        adapter.step(step)
    expected = run_unet(unet)
    save_adapter(adapter, tmp_path)
    fresh = tiny_unet()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(run_unet(fresh), expected, rtol=1e-5, atol=1e-5)


def test_scale_zero_runs_the_base_exactly_and_scales_combine_per_component():
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    inputs = unet_inputs()
    base_unet, base_text = run_unet(unet, inputs).detach(), run_text_encoder(text_encoder).detach()
    adapter = apply_reslora(unet, ResLoRAConfig(res_type="is", rank=4), text_encoder)
    perturb_adapter(adapter)
    with torch.no_grad():
        full_unet, full_text = run_unet(unet, inputs), run_text_encoder(text_encoder)
        assert adapter.scale == 1.0
        with adapter.disabled():
            assert adapter.scale == 0.0
            assert torch.equal(run_unet(unet, inputs), base_unet) and torch.equal(run_text_encoder(text_encoder), base_text)
        assert adapter.scale == 1.0 and torch.equal(run_unet(unet, inputs), full_unet)
        # diffusers' LoRA strength knob reaches the ResLoRA processors.
        assert torch.equal(unet(**inputs, cross_attention_kwargs={"scale": 0.0}).sample, base_unet)
        adapter.set_scale(0.0, "unet")
        assert adapter.scale == {"unet": 0.0, "text_encoder": 1.0}
        assert torch.equal(run_unet(unet, inputs), base_unet)
        assert torch.equal(run_text_encoder(text_encoder), full_text)
    with pytest.raises(ValueError, match="no 'vae' blocks"):
        adapter.set_scale(0.5, "vae")
    with pytest.raises(ValueError, match="finite"):
        adapter.set_scale(float("nan"))


@pytest.mark.parametrize("res_type", ["none", "bs"])
def test_scale_half_gives_the_midpoint_of_base_and_adapted_weights(res_type):
    """For `none` / `bs` the branch is an exact ΔW: at scale 0.5 every layer is W + ΔW/2."""
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    adapter = apply_reslora(unet, ResLoRAConfig(res_type=res_type, rank=4, pre_num=-1), text_encoder)
    perturb_adapter(adapter)
    halves = {name: dataclasses.replace(f, alpha=f.alpha / 2) for name, f in merge_adapter(adapter).factors.items()}
    inputs = unet_inputs()
    with torch.no_grad():
        full = run_unet(unet, inputs)
        with baked_weights(adapter, halves):
            expected_unet, expected_text = run_unet(unet, inputs), run_text_encoder(text_encoder)
        via_call = unet(**inputs, cross_attention_kwargs={"scale": 0.5}).sample
        adapter.set_scale(0.5)
        got_unet, got_text = run_unet(unet, inputs), run_text_encoder(text_encoder)
        # The call's scale multiplies the adapter's: 0.5 · 2 = 1.
        doubled = unet(**inputs, cross_attention_kwargs={"scale": 2.0}).sample
    torch.testing.assert_close(got_unet, expected_unet, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_text, expected_text, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(via_call, got_unet, rtol=0, atol=0)
    torch.testing.assert_close(doubled, full, rtol=1e-6, atol=1e-6)
    assert (got_unet - full).abs().max() > 1e-3


SWAPS = {
    "set_attention_slice": (lambda unet: unet.set_attention_slice("auto"), "set_attention_slice"),
    "fuse_qkv_projections": (lambda unet: unet.fuse_qkv_projections(), "fuse_qkv_projections"),
    "set_attn_processor": (lambda unet: unet.set_attn_processor(AttnProcessor2_0()), "set_attn_processor"),
    # What enable_xformers_memory_efficient_attention() installs when xformers is there (it is not, in CI).
    "xformers": (
        lambda unet: [m.set_processor(XFormersAttnProcessor()) for m in unet.modules() if isinstance(m, Attention)],
        "enable_xformers_memory_efficient_attention",
    ),
}


@pytest.mark.parametrize("swap", SWAPS)
def test_a_unet_whose_processors_were_swapped_refuses_to_run_without_the_adapter(swap):
    unet = tiny_unet()
    adapter = apply_reslora(unet, ResLoRAConfig(res_type="is", rank=4))
    perturb_adapter(adapter)
    inputs = unet_inputs()
    with torch.no_grad():
        adapted = run_unet(unet, inputs)
        call, named = SWAPS[swap]
        call(unet)
        with pytest.raises(RuntimeError, match=f"processors were replaced .*{named}.*adapter.remove()"):
            run_unet(unet, inputs)
        blocks = dict(adapter.blocks)
        adapter.remove()  # the documented way out: the base runs again, and the adapter can be applied again
        again = apply_reslora(unet, ResLoRAConfig(res_type="is", rank=4))
        for name, block in again.blocks.items():
            block.lora_A.copy_(blocks[name].lora_A), block.lora_B.copy_(blocks[name].lora_B)
        torch.testing.assert_close(run_unet(unet, inputs), adapted, rtol=0, atol=0)


def test_a_second_adapter_on_the_same_models_is_refused_and_the_first_keeps_working():
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    adapter = apply_reslora(unet, ResLoRAConfig(res_type="is", rank=4), text_encoder)
    perturb_adapter(adapter)
    with torch.no_grad():
        expected = run_unet(unet), run_text_encoder(text_encoder)
    for second in ((unet, None), (tiny_unet(), text_encoder)):
        with pytest.raises(RuntimeError, match=r"already carries a ResLoRA adapter: call \.remove\(\)"):
            apply_reslora(second[0], ResLoRAConfig(res_type="bs", rank=2), text_encoder=second[1])
    with torch.no_grad():
        torch.testing.assert_close(run_unet(unet), expected[0], rtol=0, atol=0)
        torch.testing.assert_close(run_text_encoder(text_encoder), expected[1], rtol=0, atol=0)
    adapter.remove()
    apply_reslora(unet, ResLoRAConfig(res_type="bs", rank=2), text_encoder)  # allowed once the first is removed


def test_remove_restores_requires_grad_as_it_found_it():
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    text_encoder.requires_grad_(False)
    unet.conv_in.requires_grad_(False)
    before = {n: p.requires_grad for model in (unet, text_encoder) for n, p in model.named_parameters()}
    adapter = apply_reslora(unet, ResLoRAConfig(res_type="ms", rank=4), text_encoder)
    assert not any(p.requires_grad for n, p in unet.named_parameters() if "processor" not in n)
    adapter.remove()
    assert {n: p.requires_grad for model in (unet, text_encoder) for n, p in model.named_parameters()} == before
    assert any(before.values()) and not all(before.values())


def train_delta_lora(unet, config, steps, inputs, call_step=True, inplace_reference=False):
    """Trains with AdamW; returns (losses, adapter). `inplace_reference` runs plain LoRA and moves the frozen
    W in place after every step past K by λ·s·(B'A' − BA): the paper's Delta-LoRA, literally."""
    adapter = apply_reslora(unet, dataclasses.replace(config, delta_lora_ratio=0.0) if inplace_reference else config)
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=2e-2)
    last, losses = None, []
    for step in range(1, steps + 1):
        loss = run_unet(unet, inputs).float().square().mean()
        loss.backward()
        optimizer.step(), optimizer.zero_grad()
        losses.append(loss.item())
        if call_step:
            adapter.step(step)
        if inplace_reference and step >= config.delta_lora_start:
            with torch.no_grad():
                for name, block in adapter.blocks.items():
                    if last is not None:
                        change = block.scaling * (block.lora_B @ block.lora_A - last[name])
                        adapter.base_layers[name].weight.add_(config.delta_lora_ratio * change)
            last = {name: (block.lora_B @ block.lora_A).detach().clone() for name, block in adapter.blocks.items()}
    return losses, adapter


DELTA = ResLoRAConfig(res_type="none", rank=4, lora_alpha=8, delta_lora_ratio=2.0, delta_lora_start=2)


@pytest.mark.parametrize("call_step", [True, False], ids=["with_step", "step_forgotten"])
def test_delta_lora_equals_the_in_place_weight_move(call_step):
    """Same losses, factors and outputs over 6 steps as moving W in place; forgetting `adapter.step()` changes nothing."""
    inputs = unet_inputs()
    ref_losses, reference = train_delta_lora(tiny_unet(), DELTA, 6, inputs, inplace_reference=True)
    losses, adapter = train_delta_lora(tiny_unet(), DELTA, 6, inputs, call_step=call_step)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-7)
    for name, block in adapter.blocks.items():
        torch.testing.assert_close(block.lora_A, reference.blocks[name].lora_A, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(block.lora_B, reference.blocks[name].lora_B, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert relative_error(run_unet(adapter.unet, inputs), run_unet(reference.unet, inputs)) < 1e-4
    # Delta-LoRA really differs from plain LoRA here.
    lora_losses, _ = train_delta_lora(tiny_unet(), dataclasses.replace(DELTA, delta_lora_ratio=0.0), 6, inputs)
    assert abs(lora_losses[-1] - losses[-1]) > 1e-3 * abs(losses[-1])


def test_delta_lora_on_a_bf16_base_matches_fp32_exports_exactly_and_never_writes_the_base():
    """Delta-LoRA's per-step moves of W are below a bf16 weight's resolution; the model must keep them all."""
    steps, inputs = 16, unet_inputs()
    config = dataclasses.replace(DELTA, delta_lora_start=2, delta_lora_ratio=4.0)
    unet = tiny_unet()
    adapter = apply_reslora(unet, config)
    initial = {name: (b.lora_A.detach().clone(), b.lora_B.detach().clone()) for name, b in adapter.blocks.items()}
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=3e-4)
    history = []
    for step in range(1, steps + 1):
        run_unet(unet, inputs).square().mean().backward()
        optimizer.step(), optimizer.zero_grad()
        adapter.step(step)
        history.append({name: (b.lora_A.detach().clone(), b.lora_B.detach().clone()) for name, b in adapter.blocks.items()})
    # The same factor trajectory on a bf16 base (written as an optimizer would), with adapter.step after each step.
    bf16_unet = tiny_unet(dtype=torch.bfloat16)
    base = {name: tensor.clone() for name, tensor in bf16_unet.state_dict().items()}
    bf16_adapter = apply_reslora(bf16_unet, config)
    for step, factors in enumerate([initial, *history]):
        with torch.no_grad():
            for name, (down, up) in factors.items():
                bf16_adapter.blocks[name].lora_A.copy_(down), bf16_adapter.blocks[name].lora_B.copy_(up)
        if step:
            bf16_adapter.step(step)
    bf16_inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    plain_lora = tiny_unet()  # the final factors without Delta-LoRA's move of W
    with torch.no_grad():
        for name, block in adapter.blocks.items():
            plain_lora.get_submodule(name.removeprefix("unet.")).weight.add_(block.scaling * block.lora_B @ block.lora_A)
        expected, trained = run_unet(unet, inputs), run_unet(bf16_unet, bf16_inputs).float()
        # What bf16 rounding alone does to the base's output (1.3 %); moving W in place in bf16 gave 1.8 %.
        rounding = relative_error(run_unet(tiny_unet(dtype=torch.bfloat16), bf16_inputs).float(), run_unet(tiny_unet(), inputs))
        assert relative_error(run_unet(plain_lora, inputs), expected) > 0.1  # the move matters (26 %)
        assert relative_error(trained, expected) < 1.15 * rounding
    # The rank-2r export on the untouched W_0 reproduces the trained model.
    result = merge_adapter(bf16_adapter)
    assert all(f.rank == 2 * config.rank for f in result.factors.values())
    exported = tiny_unet()
    with torch.no_grad():
        for name, factors in result.factors.items():
            exported.get_submodule(name.removeprefix("unet.")).weight.add_(lora_delta(factors))
        assert relative_error(run_unet(exported, inputs), expected) < 1e-5
        assert relative_error(run_unet(exported, inputs), trained) < 1.15 * rounding
    bf16_adapter.remove()
    assert all(torch.equal(tensor, base[name]) for name, tensor in bf16_unet.state_dict().items())
