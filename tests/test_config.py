"""Configs: the paper's default, Single/Dual/Tri combinations, and errors that name the key."""

from __future__ import annotations

import pytest
from conftest import CASES

import restuning
from restuning import ConfigError, ResTuningConfig, TunerSpec


def test_default_is_dual_res_adapter_of_width_10(case):
    cfg = ResTuningConfig()
    assert cfg.specs().keys() == {"mha", "ffn"}
    assert all(s.name == "res_adapter" for s in cfg.specs().values()) and cfg.dim == 10
    tuned = restuning.get_restuning_model(case.model())
    assert {s.kind for s in tuned.sites.values()} == {"mha", "ffn"}
    assert all(t.down.out_features == 10 for t in tuned.tuners.values())


@pytest.mark.parametrize("combo", [
    dict(mha="res_prompt", ffn=None),                                   # Single
    dict(mha="res_prefix", ffn="res_adapter"),                          # Dual (MAM-like)
    dict(mha="res_adapter", ffn="res_adapter", block="res_prompt"),     # Tri
])
def test_single_dual_tri(combo):
    model = CASES["vit"].model()
    tuned = restuning.get_restuning_model(model, ResTuningConfig(**combo))
    kinds = sorted({s.kind for s in tuned.sites.values()})
    assert kinds == sorted(k for k, v in combo.items() if v)


def test_roundtrip_through_dict():
    cfg = ResTuningConfig(mha=TunerSpec("res_prefix", 4, [0], {"mode": "exact"}), block="ssf", layers=[0, 1])
    assert ResTuningConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kwargs,message", [
    (dict(dim=0), "dim: expected a positive integer"),
    (dict(mha=3), "mha: expected TunerSpec or str or null, got int"),
    (dict(mha={"name": "res_adapter", "width": 3}), r"mha.width: unknown key"),
    (dict(family=3), "family: expected str, got int 3"),
    (dict(family="vitt"), "family: unknown family 'vitt'"),
    (dict(mha={"name": "res_adapter", "dim": "ten"}), "mha.dim: expected int, got str 'ten'"),
    (dict(mha={"name": "res_prefix", "options": {"modee": "exact"}}), r"mha: tuner 'res_prefix' has no option"),
    (dict(layers=[0, -1]), "layers: expected at least 0, got -1"),
    (dict(layers="all"), "layers: expected a list"),
    (dict(target_modules={"qv": "q"}), r"custom op kind needs a tuner in custom\['qv'\]"),
    (dict(custom={"qv": "lora"}), r"needs target_modules\['qv'\]"),
])
def test_bad_config_names_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ResTuningConfig(**kwargs)


def test_unknown_config_key():
    with pytest.raises(ConfigError, match=r"tuner: unknown key; expected some of \['block', 'custom'"):
        ResTuningConfig.from_dict({"tuner": "lora"})


def test_unknown_tuner_and_option():
    model = CASES["vit"].model()
    with pytest.raises(ConfigError, match="unknown tuner 'houlsby'.*registered tuners"):
        restuning.get_restuning_model(model, ResTuningConfig(mha="houlsby"))
    with pytest.raises(ConfigError, match=r"has no option\(s\) \['rank'\]; accepted"):
        restuning.get_restuning_model(model, ResTuningConfig(mha=TunerSpec("lora", options={"rank": 2})))
    assert not any(m._forward_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_a_new_tuner_is_one_module_and_one_entry():
    import torch
    from torch import nn

    from restuning.tuners import TUNERS, ResTuner, register_tuner

    @register_tuner("test_scale")
    class Scale(ResTuner):
        def __init__(self, ctx, dim):
            super().__init__()
            self.alpha = nn.Parameter(torch.zeros(()))

        def forward(self, x, y):
            return self.alpha * y

    try:
        tuned = restuning.get_restuning_model(CASES["bert"].model(), ResTuningConfig(mha="test_scale", ffn=None))
        assert tuned.get_nb_trainable_parameters()[0] == 2
    finally:
        TUNERS.pop("test_scale")
