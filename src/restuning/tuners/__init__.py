"""Res-Tuners: one small module each, registered by name. A new tuner is one module and one entry."""

from . import adapter, bitfit, lora, prefix, prompt, ssf, token_mixer  # noqa: F401  (registration)
from .adapter import ResAdapter
from .base import TUNERS, AttentionTuner, FrozenAttention, OpContext, ResTuner, build_tuner, check_spec, register_tuner
from .bitfit import BitFit
from .lora import LoRA
from .prefix import ResPrefix
from .prompt import ResPrompt
from .ssf import SSF
from .token_mixer import ResTokenMixer

__all__ = [
    "AttentionTuner", "BitFit", "build_tuner", "check_spec", "FrozenAttention", "LoRA", "OpContext", "register_tuner",
    "ResAdapter", "ResPrefix", "ResPrompt", "ResTokenMixer", "ResTuner", "SSF", "TUNERS",
]
