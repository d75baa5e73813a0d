"""Stable Diffusion UNets: Res-Tuning-Bypass for the UNet, and generative training and sampling.

Importing the package registers the UNet family (`family.py`, no diffusers needed); the rest loads on
first use, so `import restuning` stays light.
"""

from __future__ import annotations

import importlib

from . import family  # noqa: F401  (registration)

_EXPORTS = {
    "bypass": ("UNetBypassModel", "UNetBypassTask", "UNetMultiTaskBypass", "plan_unet_taps"),
    "data": ("CaptionedImages", "caption_folder", "caption_jsonl", "mnist_captions", "subject_prompt"),
    "generate": ("generate", "load_for_generation", "load_multitask"),
    "metrics": ("FIDUnavailable", "fd_dinov2", "fid", "frechet_distance", "frechet_distance_from_stats"),
    "pipeline": ("SDComponents", "load_sd", "tiny_pipeline"),
    "train": ("load_run", "train_diffusion"),
    "train_config": ("DiffusionTrainConfig", "load_diffusion_config"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_WHERE)
