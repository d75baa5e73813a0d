"""Module-name matching with PEFT's rules."""

from __future__ import annotations

import re


def name_matches(name: str, target: str | list[str]) -> bool:
    """A string target is a `re.fullmatch` pattern; a list matches exact names or a `.suffix`."""
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)
