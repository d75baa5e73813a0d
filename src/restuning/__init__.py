"""restuning: unbound, composable, memory-efficient tuners for frozen foundation models (Res-Tuning)."""

from .bypass import BypassConfig, FeatureCache, MultiTaskBypass, ResTuningBypassModel
from .checkpoint import CheckpointError
from .config import ConfigError, ResTuningConfig, TunerSpec
from .model import ResTuningModel, get_restuning_model, plan_tuning
from .ops import OpMatchError, OpSite, find_ops
from .tuners import TUNERS, ResTuner, register_tuner

__version__ = "0.1.0"

__all__ = [
    "BypassConfig", "CheckpointError", "ConfigError", "FeatureCache", "MultiTaskBypass", "OpMatchError", "OpSite",
    "ResTuner", "ResTuningBypassModel", "ResTuningConfig", "ResTuningModel", "TUNERS", "TunerSpec", "find_ops",
    "get_restuning_model", "plan_tuning", "register_tuner",
]
