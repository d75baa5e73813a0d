"""Deterministic splits for a seed: train/test, VTAB-1k style, and k-shot sampling."""

from __future__ import annotations

import torch

from ..errors import DataError

FEW_SHOTS = (1, 2, 4, 8, 16)


def _permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def split_indices(n: int, test: int | float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) indices; `test` is a count or a fraction of n."""
    count = int(round(test * n)) if isinstance(test, float) else int(test)
    if not 0 < count < n:
        raise ValueError(f"test split: expected between 1 and {n - 1} examples, got {test!r}")
    order = _permutation(n, seed)
    return order[count:].sort().values, order[:count].sort().values


def vtab_split(n: int, seed: int, train: int = 800, val: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """VTAB-1k: `train` + `val` examples drawn once for a seed (800/200 to tune, then all 1000 to train)."""
    if train + val > n:
        raise DataError(f"VTAB-1k split needs {train + val} examples, the data has {n}")
    order = _permutation(n, seed)[: train + val]
    return order[:train].sort().values, order[train:].sort().values


def few_shot(labels: torch.Tensor, shots: int, seed: int) -> torch.Tensor:
    """`shots` examples of every class, drawn with `seed` (paper's few-shot protocol: k in 1, 2, 4, 8, 16)."""
    if shots < 1:
        raise ValueError(f"shots: expected a positive number, got {shots}")
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        if len(members) < shots:
            raise DataError(f"class {c} has {len(members)} examples, fewer than {shots} shots")
        picked.append(members[torch.randperm(len(members), generator=g)[:shots]])
    return torch.cat(picked).sort().values
