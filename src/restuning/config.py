"""Configuration dataclasses: which Res-Tuner sits on which op of which layers.

A config is plain data (JSON/YAML friendly). `ResTuningConfig()` with no arguments is the paper's
best Dual setting (Table 2b): a Res-Adapter of hidden size 10 in parallel to every MHA and every FFN.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

OP_KINDS = ("mha", "ffn", "block", "xattn")



class DictConfig:
    """JSON/YAML round trip of a config dataclass; unknown keys are an error naming the known ones."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        name = cls.__name__
        if not isinstance(data, dict):
            raise ConfigError(f"expected a mapping for {name}, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown {name} key(s) {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(**data)


@dataclass
class TunerSpec:
    """One tuner choice for one op kind.

    Args:
        name: registry name of the tuner (`res_adapter`, `res_prefix`, `res_prompt`, `lora`,
            `bitfit`, `ssf`).
        dim: its size: adapter hidden size, number of prefix/prompt tokens, LoRA rank. `None`
            takes the config-wide `dim`.
        layers: indices of the blocks to tune; `None` takes the config-wide `layers`.
        options: tuner-specific keyword arguments (e.g. `{"mode": "exact"}` for Res-Prefix).
    """

    name: str = "res_adapter"
    dim: int | None = None
    layers: list[int] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def coerce(cls, value: TunerSpec | str | dict | None, key: str) -> TunerSpec | None:
        if value is None or isinstance(value, TunerSpec):
            return value
        if isinstance(value, str):
            return cls(name=value)
        if isinstance(value, dict):
            unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ConfigError(
                    f"{key}: unknown key(s) {sorted(unknown)}; expected some of name, dim, layers, options"
                )
            return cls(**value)
        raise ConfigError(
            f"{key}: expected a tuner name, a mapping or null, got {type(value).__name__} {value!r}"
        )


@dataclass
class ResTuningConfig(DictConfig):
    """Res-Tuning: tuners run in parallel to frozen ops, `x' = OP(x) + ResTuner(x)`.

    Args:
        mha / ffn / block: the tuner on each op kind, or `None` for none. A string is a tuner name.
        xattn: the tuner on each cross-attention (queries from the tokens, keys and values from another
            sequence: the text encoder states of a Stable Diffusion UNet), or `None` (default).
        dim: default tuner size (paper: 10).
        layers: default block indices to tune (`None`: all). Paper Tables 14-15 tune subsets.
        target_modules: overrides where an op kind is found, by module name with PEFT's matching
            rules (a string is a `re.fullmatch` pattern; a list matches exact names or `.suffix`).
            Keys other than mha/ffn/block define custom op kinds, which need a tuner in `custom`.
        custom: tuners for custom op kinds, e.g. `{"qv": "lora"}` with
            `target_modules={"qv": r".*\\.(q_proj|v_proj)"}`.
        modules_to_save: names (PEFT matching rules) of extra modules trained and saved in full,
            such as a classification head.
        family: force an op map (`vit`, `dinov2`, `bert`, `clip`, `convnext`, `resnet`, `efficientnet`,
            `unet`, `unet_full`) instead of detecting it; `structural` forces the structural search.
            A diffusers UNet is detected as `unet` (middle block and decoder, as in the paper);
            `unet_full` adds its encoder (down blocks).
    """

    mha: TunerSpec | str | None = "res_adapter"
    ffn: TunerSpec | str | None = "res_adapter"
    block: TunerSpec | str | None = None
    dim: int = 10
    layers: list[int] | None = None
    target_modules: dict[str, str | list[str]] = field(default_factory=dict)
    custom: dict[str, TunerSpec | str] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    family: str | None = None
    xattn: TunerSpec | str | None = None

    def __post_init__(self) -> None:
        for kind in OP_KINDS:
            setattr(self, kind, TunerSpec.coerce(getattr(self, kind), kind))
        if not isinstance(self.custom, dict):
            raise ConfigError(f"custom: expected a mapping of op kind to tuner, got {self.custom!r}")
        self.custom = {k: TunerSpec.coerce(v, f"custom.{k}") for k, v in self.custom.items()}
        if not isinstance(self.dim, int) or isinstance(self.dim, bool) or self.dim < 1:
            raise ConfigError(f"dim: expected a positive integer, got {self.dim!r}")
        _check_layers(self.layers, "layers")
        for kind, spec in self.specs().items():
            if spec.dim is not None and (not isinstance(spec.dim, int) or spec.dim < 1):
                raise ConfigError(f"{kind}.dim: expected a positive integer, got {spec.dim!r}")
            _check_layers(spec.layers, f"{kind}.layers")
        if not isinstance(self.target_modules, dict):
            raise ConfigError(f"target_modules: expected a mapping of op kind to names, got {self.target_modules!r}")
        for kind, names in self.target_modules.items():
            if not isinstance(names, (str, list)) or (isinstance(names, list) and not all(
                isinstance(n, str) for n in names
            )):
                raise ConfigError(f"target_modules.{kind}: expected a regex string or a list of names")
            if kind not in OP_KINDS and kind not in self.custom:
                raise ConfigError(
                    f"target_modules.{kind}: a custom op kind needs a tuner in custom[{kind!r}]"
                )
        for kind in self.custom:
            if kind in OP_KINDS:
                raise ConfigError(f"custom.{kind}: {kind} is a built-in op kind; set `{kind}=` instead")
            if kind not in self.target_modules:
                raise ConfigError(f"custom.{kind}: needs target_modules[{kind!r}] naming its modules")
        if not isinstance(self.modules_to_save, list):
            raise ConfigError(f"modules_to_save: expected a list of module names, got {self.modules_to_save!r}")

    def specs(self) -> dict[str, TunerSpec]:
        """Op kind -> tuner spec, for every kind that has a tuner."""
        built = {k: getattr(self, k) for k in OP_KINDS if getattr(self, k) is not None}
        return {**built, **self.custom}



def _check_layers(layers: Any, key: str) -> None:
    if layers is None:
        return
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ConfigError(f"{key}: expected a list of block indices or null, got {layers!r}")
