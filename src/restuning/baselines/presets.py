"""Baselines that are Res-Tuners on some op (paper Table 7), as `ResTuningConfig` presets.

A user's `method.config` is merged over the preset key by key, so `{"dim": 64}` widens AdaptFormer's
bottleneck and `{"ffn": null}` removes MAM's adapter.

- adapter: the serial (Houlsby) adapter after each FFN, in its exact parallel form (reads OP(x), eq. 6).
- prefix: prefix tuning on each MHA, in Res-Prefix's exact mode (equals concatenated K_pre, V_pre).
- vpt_deep: VPT-deep on each MHA, in Res-Prompt's exact mode (equals per-block joined prompts).
- lora: rank-8 LoRA on the query and value projections (scaling alpha/r = 1).
- ssf: scale and shift after each MHA and FFN.
- adaptformer: a parallel adapter on each FFN with the output scale 0.1 of AdaptFormer.
- mam: prefix tuning on MHA + a parallel adapter (scale 4) on FFN, as MAM-Adapter.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import ConfigError, ResTuningConfig
from ..ops import find_ops

PRESETS: dict[str, dict[str, Any]] = {
    "adapter": {"mha": None, "ffn": {"name": "res_adapter", "options": {"reads": "output"}}},
    "prefix": {"mha": {"name": "res_prefix", "options": {"mode": "exact"}}, "ffn": None},
    "vpt_deep": {"mha": {"name": "res_prompt", "options": {"mode": "exact"}}, "ffn": None},
    "lora": {"mha": None, "ffn": None, "dim": 8, "custom": {"qv": "lora"}},  # rank = dim, so {"dim": 16} sets it
    "ssf": {"mha": "ssf", "ffn": "ssf"},
    "adaptformer": {"mha": None, "ffn": {"name": "res_adapter", "options": {"scale": 0.1}}},
    "mam": {"mha": {"name": "res_prefix", "options": {"mode": "exact"}},
            "ffn": {"name": "res_adapter", "options": {"scale": 4.0}}},
}


def attention_projections(
    model: nn.Module, roles: tuple[str, ...] = ("query", "value"), family: str | None = None
) -> list[str]:
    """Full names of the MHA projections of `model` in `roles` (query, key, value), from its op map."""
    sites = find_ops(model, ResTuningConfig(ffn=None, family=family))
    names = [getattr(site.attention, role) for site in sites if site.attention is not None for role in roles]
    if not names:
        raise ConfigError("this backbone has no attention projections the op map knows (LoRA targets q and v)")
    return names


def preset_config(method: str, model: nn.Module, overrides: dict[str, Any]) -> ResTuningConfig:
    """The `ResTuningConfig` of baseline `method` on `model`, with `overrides` merged over it."""
    if method not in PRESETS:
        raise ConfigError(f"method.name: no preset {method!r}; presets are {sorted(PRESETS)}")
    config = {**PRESETS[method], **overrides}
    if method == "lora" and "target_modules" not in overrides:
        config["target_modules"] = {"qv": attention_projections(model, family=overrides.get("family"))}
    return ResTuningConfig.from_dict(config)
