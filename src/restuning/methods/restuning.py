"""Res-Tuning (tuners in parallel to frozen ops) and the baselines that are Res-Tuner presets (paper Table 7:
adapter, prefix, vpt_deep, lora, ssf, adaptformer, mam).

A run's checkpoint is the `ResTuningModel` checkpoint (so `ResTuningModel.from_pretrained` opens it), with
the classifier's head under `head.*` beside the tuners.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import checkpoint
from ..baselines.presets import PRESETS, preset_config
from ..config import ResTuningConfig
from ..model import ResTuningModel
from .classifier import LastLayerClassifier, load_state
from .registry import Method, register_method

HEAD = "head."


def _with_head(tuned: ResTuningModel, backbone: nn.Module, num_classes: int | None) -> nn.Module:
    return tuned if num_classes is None else LastLayerClassifier(tuned, backbone, num_classes, frozen=False)


def build(backbone: nn.Module, options: ResTuningConfig, num_classes: int | None) -> nn.Module:
    return _with_head(ResTuningModel(backbone, options), backbone, num_classes)


def save(model: nn.Module, directory: Path, meta: dict[str, Any]) -> None:
    tuned = model.runner if isinstance(model, LastLayerClassifier) else model
    tensors = dict(tuned.tuner_state_dict())
    if isinstance(model, LastLayerClassifier):
        tensors.update({f"{HEAD}{k}": v for k, v in model.head.state_dict().items()})
    checkpoint.save(directory, tensors, {**meta, **tuned._checkpoint_config()})


def load(method: Method, backbone: nn.Module, directory: Path, meta: dict[str, Any],
         tensors: dict[str, torch.Tensor]) -> nn.Module:
    tuned = ResTuningModel.from_pretrained(backbone, directory, is_trainable=True)
    model = _with_head(tuned, backbone, meta.get("num_classes"))
    if isinstance(model, LastLayerClassifier):
        load_state(model.head, {k[len(HEAD):]: v for k, v in tensors.items() if k.startswith(HEAD)}, directory)
    return model


def _preset(name: str) -> Method:
    """A preset's options are `ResTuningConfig` fields merged over it; the model is built on the backbone, where
    the preset may need it (LoRA's targets come from the op map)."""
    def parse(config: dict[str, Any], num_classes: int | None) -> dict[str, Any]:
        ResTuningConfig.check_keys(config, "method.config")
        return config

    def build_preset(backbone: nn.Module, options: dict[str, Any], num_classes: int | None) -> nn.Module:
        return build(backbone, preset_config(name, backbone, options), num_classes)

    # Saved as a plain `restuning` checkpoint of the resolved config, so it loads as one.
    summary = f"Res-Tuner preset {json.dumps(PRESETS[name])}; method.config: `restuning` options merged over it"
    return Method(name, build_preset, parse=parse, low_precision=True, save=save, load=load, summary=summary)


register_method(Method("restuning", build, options=ResTuningConfig, tasks=("classification", "diffusion"),
                       low_precision=True, save=save, load=load,
                       summary="Res-Tuners in parallel to frozen ops (ResTuningConfig)"))
for _name in PRESETS:
    register_method(_preset(_name))
