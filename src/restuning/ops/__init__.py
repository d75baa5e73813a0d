"""Locating the frozen ops (MHA, FFN, block) that tuners run in parallel to."""

from .discovery import AttentionSite, OpMatchError, OpSite, describe, find_ops
from .maps import FAMILIES, FamilyMap
from .matching import name_matches

__all__ = ["AttentionSite", "FAMILIES", "FamilyMap", "OpMatchError", "OpSite", "describe", "find_ops", "name_matches"]
