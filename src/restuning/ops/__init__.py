"""Locating the frozen ops (MHA, FFN, block) that tuners run in parallel to."""

from .discovery import AttentionSite, BlockStack, OpMatchError, OpSite, block_stacks, describe, find_ops, widths
from .maps import FAMILIES, FamilyMap, family_for_model, token_layout
from .matching import name_matches

__all__ = [
    "AttentionSite", "BlockStack", "FAMILIES", "FamilyMap", "OpMatchError", "OpSite", "block_stacks", "describe",
    "family_for_model", "find_ops", "name_matches", "token_layout", "widths",
]
