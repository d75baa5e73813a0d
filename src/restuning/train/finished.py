"""A finished classification run, opened from its folder: the run config, the class names, and the trained
model rebuilt on a fresh backbone from `final/` (the method's checkpoint). Nothing of the training data is
read, so a run answers after its data has moved."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..checkpoint import recover_dir
from ..config import from_dict
from ..errors import CheckpointError
from ..methods import load_model
from .backbones import Backbone, load_backbone
from .config import TrainConfig
from .trainer import CLASSES, FINAL, RUN_CONFIG


@dataclass
class FinishedRun:
    path: Path
    config: TrainConfig
    classes: list[str]

    def backbone(self) -> Backbone:
        """A fresh copy of the run's backbone, with its input recipe, held in the run's `backbone_dtype`."""
        return load_backbone(self.config.backbone, self.config.backbone_dtype)

    def model(self, backbone: Backbone) -> nn.Module:
        """The trained model on `backbone` (which it changes: tuners attach to it), frozen, in eval mode."""
        return load_model(backbone.model, self.path / FINAL).eval()


def open_run(run: str | Path) -> FinishedRun:
    """The finished run in folder `run`; CheckpointError when it is not one."""
    run = Path(run)
    final = run / FINAL
    recover_dir(final)  # a kill mid-swap of final/ leaves it as .final.old: put it back
    for name in (RUN_CONFIG, CLASSES):
        if not (final / name).is_file():
            raise CheckpointError(f"{run}: not a finished run (no {FINAL}/{name}); train it with restuning train")
    try:
        config = from_dict(TrainConfig, json.loads((final / RUN_CONFIG).read_text()))
        classes = json.loads((final / CLASSES).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{final}: the run's saved config cannot be read ({err})") from err
    return FinishedRun(run, config, classes)
