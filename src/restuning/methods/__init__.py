"""Every training method, one registry entry each (`registry.METHODS`), and the one checkpoint format of a
trained method (`save_model` / `load_model`).

The entries: `restuning` and its Res-Tuner presets (`restuning.py`), `bypass` (`bypass.py`), `linear` and
`full` (`reference.py`); the baselines register themselves in their own modules (`restuning.baselines`).
"""

from typing import Any

from torch import nn

from .. import baselines  # noqa: F401  (registration)
from . import bypass, reference, restuning  # noqa: F401  (registration)
from .classifier import LastLayerClassifier, load_model, save_model, trainable_state
from .registry import METHODS, Method, get_method, method_for_checkpoint, names, register_method


def build_classifier(method: str, backbone: nn.Module, num_classes: int, options: dict[str, Any]) -> nn.Module:
    """The trainable classifier of registered `method` on `backbone`, its options read from a mapping."""
    entry = get_method(method, "classification")
    return entry.build(backbone, entry.read_options(options, num_classes), num_classes)


__all__ = [
    "build_classifier", "get_method", "LastLayerClassifier", "load_model", "Method", "method_for_checkpoint",
    "METHODS", "names", "register_method", "save_model", "trainable_state",
]
