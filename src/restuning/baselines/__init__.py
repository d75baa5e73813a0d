"""The methods the paper compares against, in our trainer (paper Table 3c, Table 4, Table 7).

Where Table 7 says a method is a Res-Tuner on some op, it is a `ResTuningConfig` preset (`presets`).
The rest are small modules of their own: BitFit on the backbone's own biases, VPT-shallow, Side-Tuning,
LST, DTL and DTL+, and PEFT's LoRA as an outside reference.
"""

from .bitfit import bias_only
from .dtl import DisentangledTransfer, DTLConfig
from .lst import LadderSideTuning, LSTConfig
from .peft_lora import peft_lora
from .presets import PRESETS, attention_projections, preset_config
from .side_tuning import SideTuning, SideTuningConfig
from .vpt_shallow import VPTShallow

__all__ = [
    "DTLConfig", "DisentangledTransfer", "LSTConfig", "LadderSideTuning", "PRESETS", "SideTuning", "SideTuningConfig",
    "VPTShallow",
    "attention_projections", "bias_only", "peft_lora", "preset_config",
]
