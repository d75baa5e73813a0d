"""restuning: unbound, composable, memory-efficient tuners for frozen foundation models (Res-Tuning)."""

from . import diffusion  # noqa: F401  (registers the UNet family; light)
from .bypass import BypassConfig, FeatureCache, MultiTaskBypass, ResTuningBypassModel
from .config import ResTuningConfig, TunerSpec
from .errors import CheckpointError, ConfigError, DataError, OpMatchError, RestuningError, RunError, TrainingError
from .model import ResTuningModel, get_restuning_model, plan_tuning
from .ops import OpSite, find_ops
from .precision import BACKBONE_DTYPES, set_backbone_dtype
from .tuners import TUNERS, ResTuner, register_tuner

__version__ = "0.1.0"

__all__ = [
    "BACKBONE_DTYPES", "BypassConfig", "CheckpointError", "ConfigError", "DataError", "FeatureCache", "MultiTaskBypass",
    "OpMatchError", "OpSite", "ResTuner", "ResTuningBypassModel", "ResTuningConfig", "ResTuningModel", "RestuningError",
    "RunError", "TUNERS", "TrainingError", "TunerSpec", "find_ops", "get_restuning_model", "plan_tuning",
    "register_tuner", "set_backbone_dtype",
]
