"""Res-Tuning-Bypass: the backbone runs once without autograd; gated bypass networks read its layers."""

from .cache import CachedFeatures, FeatureCache
from .config import BypassConfig
from .model import FrozenBackbone, ResTuningBypassModel
from .multitask import MultiTaskBypass
from .network import BypassNetwork, BypassTask, Residual, VerticalStep
from .taps import FeatureTaps, TapPlan, plan_taps

__all__ = [
    "BypassConfig", "BypassNetwork", "BypassTask", "CachedFeatures", "FeatureCache", "FeatureTaps", "FrozenBackbone",
    "MultiTaskBypass", "Residual", "ResTuningBypassModel", "TapPlan", "VerticalStep", "plan_taps",
]
