"""PEFT-style common tester: one set of checks over every (backbone family x tuner x op) pair: the encoders of
CASES and the further families of FAMILY_CASES (Llama/Mistral/Qwen2 with GQA and RoPE, GPT-2, DeBERTa-v2, Swin,
CLIPModel with both towers)."""

from __future__ import annotations

import pytest
import torch
from conftest import CASES, FAMILY_CASES

import restuning
from restuning import ResTuningConfig, ResTuningModel, TunerSpec

TUNER_NAMES = ["res_adapter", "res_prefix", "res_prompt", "lora", "bitfit", "ssf", "res_token_mixer"]
OPS = ["mha", "ffn", "block"]
MODELS = {**CASES, **FAMILY_CASES}
MATRIX = [(m, t, o) for m in sorted(MODELS) for t in TUNER_NAMES for o in OPS]


def _config(tuner: str, op: str) -> ResTuningConfig:
    return ResTuningConfig(**{"mha": None, "ffn": None, op: TunerSpec(tuner, dim=4)})


def _tuned(model_name: str, tuner: str, op: str):
    case = MODELS[model_name]
    base = case.model()
    reference = case.read(base(**case.inputs())).detach()
    return case, base, reference, restuning.get_restuning_model(base, _config(tuner, op))


def _train_step(tuned, case, lr: float = 0.1) -> None:
    tuned.train()
    opt = torch.optim.SGD([p for p in tuned.parameters() if p.requires_grad], lr=lr)
    for _ in range(2):  # two steps: zero-initialised branches (gates, LoRA B) open after the first
        out = case.read(tuned(**case.inputs()))
        loss = (out * torch.linspace(-1, 1, out.shape[-1])).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    tuned.eval()


@pytest.mark.parametrize("model_name,tuner,op", MATRIX)
def test_init_equals_backbone(model_name, tuner, op):
    case, _, reference, tuned = _tuned(model_name, tuner, op)
    out = case.read(tuned(**case.inputs()))
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_name,tuner,op", MATRIX)
def test_only_tuners_train_and_backbone_is_untouched(model_name, tuner, op):
    case, base, reference, tuned = _tuned(model_name, tuner, op)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    trainable = [n for n, p in tuned.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("adapters.default.tuners.") for n in trainable)
    _train_step(tuned, case)
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), f"backbone tensor {k} changed"
    assert all(p.grad is None for p in base.parameters())
    out = case.read(tuned(**case.inputs()))
    assert (out - reference).abs().max() > 1e-4, "training did not change the output"


@pytest.mark.parametrize("model_name,tuner,op", MATRIX)
def test_save_load_roundtrip(model_name, tuner, op, tmp_path):
    case, _, _, tuned = _tuned(model_name, tuner, op)
    _train_step(tuned, case)
    expected = case.read(tuned(**case.inputs())).detach()
    tuned.save_pretrained(tmp_path)
    restored = ResTuningModel.from_pretrained(case.model(), tmp_path)
    torch.testing.assert_close(case.read(restored(**case.inputs())), expected, atol=0, rtol=0)


@pytest.mark.parametrize("model_name,tuner,op", MATRIX)
def test_unload_gives_pristine_backbone(model_name, tuner, op):
    case, base, reference, tuned = _tuned(model_name, tuner, op)
    _train_step(tuned, case)
    model = tuned.unload()
    assert model is base
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(case.read(model(**case.inputs())), reference, atol=0, rtol=0)
    assert all(p.requires_grad for p in model.parameters())
