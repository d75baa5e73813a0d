"""Res-Tuning-Bypass: the backbone runs once without autograd; gated bypass networks read its layers."""

from ..model import register_tuned_model
from .cache import CachedFeatures, FeatureCache
from .compiled import CompiledTask
from .config import BypassConfig
from .model import BYPASS_MODELS, FrozenBackbone, ResTuningBypassModel, bypass_model_class, register_bypass_model
from .multitask import MultiTaskBypass
from .network import BypassNetwork, BypassTask, Residual, VerticalStep
from .shards import ShardedFeatures
from .taps import FeatureTaps, TapPlan, plan_taps


def _build(model, config: BypassConfig) -> ResTuningBypassModel:
    return bypass_model_class(model)(model, config)


register_tuned_model(BypassConfig, _build)

__all__ = [
    "bypass_model_class", "BYPASS_MODELS", "BypassConfig", "BypassNetwork", "BypassTask", "CachedFeatures",
    "CompiledTask", "FeatureCache", "FeatureTaps", "FrozenBackbone", "MultiTaskBypass", "plan_taps",
    "register_bypass_model", "Residual", "ResTuningBypassModel", "ShardedFeatures", "TapPlan", "VerticalStep",
]
