"""`restuning eval`: a finished run's top-1 accuracy on its own test split or on other labelled data."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import LabelledData
from ..data.shipped import SHIPPED
from ..data.sources import image_folder, text_table
from ..errors import ConfigError, DataError
from .finished import FinishedRun, open_run
from .trainer import accuracy, load_data


def evaluate_run(run: str | Path, data: str | None = None) -> dict[str, float]:
    """Accuracy of the run's final model on its own test split (the same seed splits it as in training), or
    on `data`: a shipped set's name, a CSV/JSONL table of texts or a folder of images per class. The data's
    classes must be the run's (or some of them)."""
    finished = open_run(run)
    backbone = finished.backbone()
    model = finished.model(backbone)
    config = finished.config
    if data is None:
        if config.data.path is not None and not Path(config.data.path).exists():
            raise DataError(f"{run}: the run's data {config.data.path!r} does not exist (moved or deleted); "
                            "evaluate on other data with --data FILE")
        split = load_data(config, backbone)
        sets = {"test": split.test, **split.extra}
    else:
        sets = {Path(data).stem if data not in SHIPPED else data: _labelled(data, finished)}
    results = {}
    for name, labelled in sets.items():
        labels = _run_labels(labelled, finished, name)
        inputs = backbone.encode(labelled, config.data.image_size, config.data.max_length)
        results[f"{name}_accuracy"] = accuracy(model, inputs, labels, config.optim.batch_size)
    return results


def _labelled(data: str, run: FinishedRun) -> LabelledData:
    if data in SHIPPED:
        return SHIPPED[data]()
    path = Path(data)
    if path.is_dir():
        return image_folder(path, run.config.data.image_size)
    if path.is_file():
        return text_table(path, run.config.data.text_column, run.config.data.label_column)
    raise ConfigError(f"--data {data!r}: not a shipped set ({sorted(SHIPPED)}), a file or a folder")


def _run_labels(data: LabelledData, run: FinishedRun, name: str) -> torch.Tensor:
    """`data`'s labels as indices into the run's classes; DataError when it holds classes the run never saw."""
    foreign = [c for c in data.classes if c not in run.classes]
    if foreign:
        raise DataError(f"{name}: classes {foreign} are not the run's; the run {run.path} knows {run.classes}")
    index = torch.tensor([run.classes.index(c) for c in data.classes])
    return index[data.labels]

