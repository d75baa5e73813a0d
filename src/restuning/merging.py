"""Folding an adapter into the backbone's weights (`merge_and_unload`): exact for the tuners that say how
they fold (`ResTuner.folds`: LoRA on a linear op; SSF and BitFit after one), refused for the others."""

from __future__ import annotations

from torch import nn

from .adapters import Adapter
from .errors import ConfigError
from .precision import is_quantized

FOLDABLE = ("lora on a linear layer (target_modules naming the layer), ssf and bitfit on an op that ends in a "
            "linear layer")


def fold_problems(adapter: Adapter, model: nn.Module) -> list[str]:
    """Why each tuner of `adapter` that cannot fold into `model` cannot, as `name (op): reason`."""
    problems = []
    for key, tuner in adapter.tuners.items():
        site = adapter.sites[key]
        exit_ = model.get_submodule(site.exit)
        where = f"{tuner.name} ({site.kind} at {site.exit})"
        if tuner.folds is None:
            problems.append(f"{where}: not a linear change of a weight")
        elif not isinstance(exit_, nn.Linear) or site.layout != "tokens":
            problems.append(f"{where}: the op ends in a {type(exit_).__name__}, not a torch.nn.Linear")
        elif tuner.folds == "input" and site.entry != site.exit:
            problems.append(f"{where}: reads the input of {site.entry}, not of the linear layer {site.exit}")
        elif is_quantized(exit_.weight):
            problems.append(f"{where}: {site.exit}'s weight is int8 (backbone_dtype int8), which cannot take an "
                            "exact float change; fold into a float32 or bfloat16 copy of the backbone")
    return problems


def check_foldable(adapter: Adapter, model: nn.Module, name: str) -> None:
    """Raise ConfigError naming every tuner of adapter `name` that cannot fold, and what can."""
    problems = fold_problems(adapter, model)
    if problems:
        raise ConfigError(f"merge_and_unload: adapter {name!r} cannot fold into the backbone: {'; '.join(problems)}. "
                          f"Tuners that fold exactly: {FOLDABLE}. unload() removes the tuners without merging")


def fold(adapter: Adapter, model: nn.Module) -> None:
    """Fold every tuner of `adapter` (checked with `check_foldable`, and detached) into `model` in place."""
    for key, tuner in adapter.tuners.items():
        tuner.fold_into(model.get_submodule(adapter.sites[key].exit))
