"""Res-Tuning-Bypass on a Stable Diffusion UNet (diffusers.UNet2DConditionModel), a tiny one built in code.

The bypass reads mid_block and the up blocks without autograd; its last state enters the UNet's own
output head through a zero-initialised projection, so step 0 predicts the frozen UNet's noise.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from conftest import train_steps  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from test_unet import tiny_unet  # noqa: E402

import restuning  # noqa: E402
from restuning import BypassConfig, CheckpointError, ConfigError, MultiTaskBypass, ResTuningBypassModel  # noqa: E402
from restuning.diffusion import UNetBypassModel, UNetMultiTaskBypass  # noqa: E402
from restuning.memory import SavedTensorMeter  # noqa: E402

TOL = 1e-5


def inputs(batch: int = 2, seed: int = 1) -> dict:
    """Latents (B, 4, 8, 8), one timestep per sample, text states (B, 5, 32)."""
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, 4, 8, 8, generator=g), timestep=torch.randint(0, 1000, (batch,), generator=g),
                encoder_hidden_states=torch.randn(batch, 5, 32, generator=g))


def bypass(config: BypassConfig | None = None) -> UNetBypassModel:
    return restuning.get_restuning_model(tiny_unet(), config or BypassConfig())


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Open the zero-initialised branches (tuners, Z) with seeded noise, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def train(model: UNetBypassModel, steps: int = 4, lr: float = 1e-2) -> list[float]:
    """AdamW on the noise-prediction MSE against a fixed random target; returns the losses."""
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    return train_steps(model, inputs(), target, torch.nn.functional.mse_loss, steps=steps, lr=lr)


# --- structure and step 0 -----------------------------------------------------------------------
def test_taps_are_mid_block_then_decoder_in_forward_order():
    model = bypass()
    assert isinstance(model, UNetBypassModel)
    assert model.plan.points == ("mid_block", "up_blocks.0", "up_blocks.1")
    assert model.plan.widths == (64, 64, 64, 32)  # x_0 = mid input; block_out_channels (32, 64) reversed
    features = model.features(**inputs())
    assert [tuple(f.shape) for f in features] == [(2, 64, 4, 4), (2, 64, 4, 4), (2, 64, 8, 8), (2, 32, 8, 8)]
    # Vertical steps carry b from 4x4 to 8x8 and project 64 -> 32 channels; Z is zero.
    assert model.bypass.vertical[2].project is not None and model.bypass.vertical[0].project is None
    assert not model.task.out.weight.any() and not model.task.out.bias.any()


@pytest.mark.parametrize("config", [BypassConfig(), BypassConfig(layers=[0]), BypassConfig.variant("none"),
                                    BypassConfig(horizontal="lora", vertical="ssf", dim=4)])
def test_step0_noise_prediction_equals_frozen_unet(config):
    reference = tiny_unet()(**inputs()).sample
    model = bypass(config)
    out = model(**inputs())
    assert out.shape == reference.shape == (2, 4, 8, 8)
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)


def test_unet_without_a_middle_block_taps_the_decoder_only():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8, sample_size=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), mid_block_type=None,
    ).eval()
    reference = unet(**inputs()).sample
    model = restuning.get_restuning_model(unet, BypassConfig())
    assert model.plan.points == ("up_blocks.0", "up_blocks.1") and model.plan.widths == (64, 64, 32)
    torch.testing.assert_close(model(**inputs()), reference, atol=1e-6, rtol=0)


def test_backbone_runs_once_without_autograd_and_head_with_it():
    model = bypass()
    calls = []
    unet = model.base_model
    for name in ("conv_in", "mid_block", "up_blocks.1", "conv_out"):
        unet.get_submodule(name).register_forward_pre_hook(
            lambda m, a, name=name: calls.append((name, torch.is_grad_enabled())))
    model.train()
    model(**inputs()).square().mean().backward()
    assert calls == [("conv_in", False), ("mid_block", False), ("up_blocks.1", False), ("conv_out", True)]


def test_features_argument_skips_the_unet():
    model = bypass()
    perturb(model, 0)
    features = model.features(**inputs())
    torch.testing.assert_close(model(features=features), model(**inputs()), atol=0, rtol=0)


# --- isolation, memory, training ------------------------------------------------------------------
def test_training_never_touches_the_unet():
    model = bypass()
    unet = model.base_model
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    losses = train(model, steps=5)
    assert losses[-1] < losses[0], losses
    assert all(p.grad is None for p in unet.parameters())
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    trainable = dict(model.named_parameters())
    trainable = {n: p for n, p in trainable.items() if p.requires_grad}
    assert trainable and all(n.startswith("task.") for n in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())


def _saved(model: UNetBypassModel, precomputed: bool) -> int:
    batch = inputs()
    features = model.features(**batch) if precomputed else None
    with SavedTensorMeter(model.parameters()) as meter:
        # forward_live: the task as a live forward runs it (recomputing as configured), so the two measurements
        # differ only by what the UNet itself adds.
        out = model.forward_live(features) if precomputed else model(**batch)
        loss = out.square().mean()
    loss.backward()
    return meter.bytes


def test_the_unet_adds_nothing_to_the_autograd_graph():
    model = bypass()
    perturb(model, 0)
    model.train()
    full, bypass_only = _saved(model, precomputed=False), _saved(model, precomputed=True)
    assert full > 0 and full == bypass_only, (full, bypass_only)
    # Contrast: with autograd through a trainable UNet the same measurement grows, so this test can fail.
    model.base_model.requires_grad_(True)
    model.taps.grad = True
    with_grad = _saved(model, precomputed=False)
    assert with_grad > 2 * full, (with_grad, full)


# --- multi-task -----------------------------------------------------------------------------------
def _singles() -> dict[str, UNetBypassModel]:
    singles = {"a": bypass(), "b": bypass(BypassConfig(horizontal="lora", layers=[0, 2], dim=4))}
    for i, model in enumerate(singles.values()):
        perturb(model, i + 1)
        model.eval()
    return singles


def test_multitask_equals_each_task_alone():
    singles = _singles()
    multi = UNetMultiTaskBypass(tiny_unet(), singles).eval()
    forwards = []
    multi.base_model.conv_in.register_forward_hook(lambda *a: forwards.append(1))
    batch = inputs(batch=4, seed=7)
    ids = ["a", "b", "b", "a"]
    with torch.no_grad():
        routed = multi(**batch, task_ids=ids)
        every = multi(**batch)
    assert len(forwards) == 2  # one UNet forward per call, whatever the number of tasks (its per-sample
    # timesteps are 1-d, so `backbone_tokens` leaves the call whole)
    assert isinstance(routed, torch.Tensor) and routed.shape == (4, 4, 8, 8)
    for name, model in singles.items():
        rows = torch.tensor([i for i, t in enumerate(ids) if t == name])
        own = {k: v[rows] for k, v in batch.items()}
        with torch.no_grad():
            alone = model(**own)
        torch.testing.assert_close(routed[rows], alone, atol=TOL, rtol=0)
        torch.testing.assert_close(every[name][rows], alone, atol=TOL, rtol=0)
    assert (routed[0] - every["b"][0]).abs().max() > 1e-3  # the tasks really differ
    torch.testing.assert_close(multi(**batch, task_ids=[0, 1, 1, 0]), routed, atol=0, rtol=0)


def test_save_load_roundtrip(tmp_path):
    model = bypass()
    train(model, steps=2)
    model.save_pretrained(tmp_path / "single")
    restored = UNetBypassModel.from_pretrained(tiny_unet(), tmp_path / "single")
    assert not any(p.requires_grad for p in restored.task.parameters())
    with torch.no_grad():
        torch.testing.assert_close(restored(**inputs()), model(**inputs()), atol=1e-6, rtol=0)
    # A task saved alone loads into the multi-task model, and a task saved from there loads alone.
    multi = UNetMultiTaskBypass(tiny_unet(), {"saved": tmp_path / "single", "fresh": BypassConfig(dim=4)})
    multi.save_task("saved", tmp_path / "again")
    again = UNetBypassModel.from_pretrained(tiny_unet(), tmp_path / "again")
    with torch.no_grad():
        torch.testing.assert_close(multi(**inputs(), task_ids=["saved", "saved"]), again(**inputs()), atol=TOL, rtol=0)


def test_checkpoint_checks_the_backbone(tmp_path):
    bypass().save_pretrained(tmp_path)
    wider = UNet2DConditionModel(
        block_out_channels=(32, 48), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8, sample_size=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    with pytest.raises(CheckpointError, match="block_out_channels"):
        UNetBypassModel.from_pretrained(wider, tmp_path)
    with pytest.raises(CheckpointError, match="not restuning_bypass"):
        ResTuningBypassModel.from_pretrained(tiny_unet(), tmp_path)


# --- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("config", "message"), [
    (BypassConfig(num_classes=3), "num_classes"),
    (BypassConfig(pooling="mean"), "does not pool"),
    (BypassConfig(taps=["up_blocks.0"]), "use layers"),
    (BypassConfig(layers=[3]), r"out of range.*mid_block"),
    (BypassConfig(family="vit"), "family"),
])
def test_clear_errors_for_bad_configs(config, message):
    with pytest.raises(ConfigError, match=message):
        restuning.get_restuning_model(tiny_unet(), config)


def test_clear_errors_for_wrong_models():
    from conftest import CASES

    with pytest.raises(ConfigError, match="needs a diffusers UNet2DConditionModel"):
        UNetBypassModel(CASES["vit"].model(), BypassConfig())
    with pytest.raises(ConfigError, match="taps"):  # a UNet task on an encoder's multi-task model
        MultiTaskBypass(CASES["vit"].model(), {"unet": bypass()})
    # The encoder bypass would tap a UNet's blocks out of order: it points to the UNet bypass instead.
    with pytest.raises(ConfigError, match="UNet has its own bypass"):
        ResTuningBypassModel(tiny_unet(), BypassConfig())
    with pytest.raises(ConfigError, match="UNet has its own bypass"):
        MultiTaskBypass(tiny_unet())
