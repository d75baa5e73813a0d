"""BitFit: fine-tune only the backbone's own bias terms (Zaken et al., 2022).

The Res-Tuner `bitfit` (a zero-initialised vector added to an op's output) is the same update on an op
that has a bias; this baseline trains the biases themselves, everywhere the backbone has them.
"""

from __future__ import annotations

from torch import nn

from ..config import ConfigError


def bias_only(model: nn.Module) -> list[str]:
    """Make every parameter of `model` named `*.bias` trainable and freeze the rest; return their names."""
    names = []
    for name, p in model.named_parameters():
        trains = name == "bias" or name.endswith(".bias")
        p.requires_grad_(trains)
        if trains:
            names.append(name)
    if not names:
        raise ConfigError("bitfit: this backbone has no bias parameters to train")
    return names
