"""`LabelledData`: a classification set held in memory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import DataError


@dataclass
class LabelledData:
    """Images (N, C, H, W) float in [0, 1], or N texts; integer labels (N,) into `classes`."""

    inputs: torch.Tensor | list[str]
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.labels):
            raise DataError(f"{len(self.inputs)} inputs but {len(self.labels)} labels")
        self.labels = torch.as_tensor(self.labels, dtype=torch.long)

    @property
    def kind(self) -> str:
        return "image" if isinstance(self.inputs, torch.Tensor) else "text"

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Sequence[int] | torch.Tensor) -> LabelledData:
        index = torch.as_tensor(index, dtype=torch.long)
        inputs = self.inputs[index] if self.kind == "image" else [self.inputs[i] for i in index.tolist()]
        return LabelledData(inputs, self.labels[index], self.classes)
