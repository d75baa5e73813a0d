"""Configuration: one typed reader for every config dataclass, and the Res-Tuning config itself.

Every config of the library (`ResTuningConfig`, `BypassConfig`, the baselines' configs, both run configs)
is a `ConfigBase` dataclass. Constructing one, directly or with `from_dict` (JSON/YAML), checks every
field against its type hint (nested configs are built from mappings; an int is taken for a float), refuses
NaN and infinite numbers, and applies the bounds a field declares with `option(...)`: `gt`/`ge` (a
number above / at least) and `choices`. Unknown keys are an error naming the known ones. Checks that
involve several fields live in the class's `validate`.

A config is plain data. `ResTuningConfig()` with no arguments is the paper's best Dual setting (Table 2b):
a Res-Adapter of hidden size 10 in parallel to every MHA and every FFN.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

OP_KINDS = ("mha", "ffn", "block", "xattn")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def option(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, gt: float | None = None,
           ge: float | None = None, choices: tuple | None = None, help: str | None = None) -> Any:
    """A dataclass field with bounds the typed reader enforces: `gt` (above), `ge` (at least), `choices`.
    Bounds apply to numbers and to each item of a list; `None` always passes where the hint allows it.
    `help` is the field's meaning, as `restuning config` and docs/configuration.md print it (with the type,
    default and bounds, which come from the field itself)."""
    meta = {k: v for k, v in (("gt", gt), ("ge", ge), ("choices", choices), ("help", help)) if v is not None}
    return field(default=default, default_factory=default_factory, metadata=meta)


class ConfigBase:
    """A config dataclass checked on construction; `to_dict` / `from_dict` round-trip it through JSON/YAML."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = check_value(hints[f.name], getattr(self, f.name), f.name)
            _check_bounds(f, value)
            setattr(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Checks across fields; raise ConfigError naming the key."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = ""):
        """Build from a mapping, checking every key and value (key names in errors start with `where.`)."""
        return from_dict(cls, data, where)

    @classmethod
    def check_keys(cls, data: Any, where: str = "") -> None:
        """Check the keys and value types of a partial mapping (e.g. options merged over a preset later)."""
        prefix = f"{where}." if where else ""
        _known_keys(cls, data, where)
        hints = _hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in data.items():
            _check_bounds(fields[key], check_value(hints[key], value, f"{prefix}{key}"), f"{prefix}{key}")


def from_dict(cls: type, data: Any, where: str = ""):
    """Build config dataclass `cls` from a mapping, checking every key and every value."""
    _known_keys(cls, data, where)
    prefix = f"{where}." if where else ""
    try:
        return cls(**data)
    except ConfigError as err:
        text = str(err)
        if not where or text.startswith(prefix):
            raise
        first = text.split(":", 1)[0].split(".", 1)[0].split("[", 1)[0]
        known = {f.name for f in dataclasses.fields(cls)}
        raise ConfigError(f"{prefix}{text}" if first in known else f"{where}: {text}") from None


def _known_keys(cls: type, data: Any, where: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__} {data!r:.80}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known), key=str)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; expected some of {sorted(known)}")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def check_value(hint: Any, value: Any, key: str) -> Any:
    """`value` checked against type `hint` (and converted: a mapping into a nested config, an int into a
    float); a ConfigError naming `key` otherwise."""
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return from_dict(hint, value, key)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for arg in options:
            try:
                return check_value(arg, value, key)
            except ConfigError as err:
                errors.append(str(err))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        if isinstance(value, dict):  # a mapping can only have meant the nested config: say what is wrong in it
            nested = [e for a, e in zip(options, errors) if dataclasses.is_dataclass(a)]
            if nested:
                raise ConfigError(nested[0])
        raise ConfigError(f"{key}: expected {_name(hint)}, got {type(value).__name__} {value!r:.80}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r:.80}")
        return [check_value(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r:.80}")
        if not args:
            return value
        return {check_value(args[0], k, f"{key} key"): check_value(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r:.80}")
        return tuple(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 (PyYAML) reads `1e-3`, without a dot, as a string
    if not isinstance(value, hint) or (hint in (int, float) and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {_name(hint)}, got {type(value).__name__} {value!r:.80}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return value


def _check_bounds(f: dataclasses.Field, value: Any, key: str | None = None) -> None:
    key = key or f.name
    meta = f.metadata
    if not meta or value is None:
        return
    for v in value if isinstance(value, list) else [value]:
        if "choices" in meta and v not in meta["choices"]:
            raise ConfigError(f"{key}: expected one of {list(meta['choices'])}, got {v!r}")
        if "gt" in meta and not v > meta["gt"]:
            raise ConfigError(f"{key}: expected a number above {meta['gt']}, got {v!r}")
        if "ge" in meta and not v >= meta["ge"]:
            what = "a positive integer" if meta["ge"] == 1 and isinstance(v, int) else f"at least {meta['ge']}"
            raise ConfigError(f"{key}: expected {what}, got {v!r}")


def _name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _name(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def read_yaml(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A YAML config file as a mapping; `overrides` (dotted keys, e.g. {"optim.epochs": 2}) win."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: {p} is not a mapping")
        node[last] = value
    return data


@dataclass
class TunerSpec(ConfigBase):
    """One tuner choice for one op kind (a tuner name alone is read as `TunerSpec(name)`)."""

    name: str = option("res_adapter", help="registry name of the tuner (listed under Tuners)")
    dim: int | None = option(None, ge=1, help="its size: adapter hidden size, number of prefix/prompt tokens, LoRA "
                             "rank; null takes the config-wide `dim`")
    layers: list[int] | None = option(None, ge=0, help="indices of the blocks to tune; null takes the config-wide "
                                      "`layers`")
    options: dict[str, Any] = option(default_factory=dict, help="the tuner's own options, e.g. `{mode: exact}` for "
                                     "res_prefix (listed under Tuners)")

    def validate(self) -> None:
        from .tuners import check_spec  # the registry of tuners sits above this module

        check_spec(self)

    @classmethod
    def coerce(cls, value: TunerSpec | str | dict | None, key: str) -> TunerSpec | None:
        """A spec from a tuner name, a mapping of its fields, a spec, or None."""
        if value is None or isinstance(value, TunerSpec):
            return value
        if isinstance(value, str):
            return cls.from_dict({"name": value}, key)
        if isinstance(value, dict):
            return cls.from_dict(value, key)
        raise ConfigError(f"{key}: expected a tuner name, a mapping or null, got {type(value).__name__} {value!r}")


def check_family(family: str | None, key: str = "family") -> None:
    """`family` names a registered op map, `structural`, or is None."""
    from .ops import FAMILIES

    if family is not None and family != "structural" and family not in FAMILIES:
        raise ConfigError(f"{key}: unknown family {family!r}; expected one of {sorted(FAMILIES)}, 'structural' or null")


@dataclass
class ResTuningConfig(ConfigBase):
    """Res-Tuning: tuners run in parallel to frozen ops, `x' = OP(x) + ResTuner(x)`. Each field's meaning is its
    `help` (`restuning config --method restuning` prints them all, as does docs/configuration.md)."""

    mha: TunerSpec | str | None = option("res_adapter", help="the tuner on every multi-head attention: a tuner name, "
                                         "a TunerSpec mapping, or null for none")
    ffn: TunerSpec | str | None = option("res_adapter", help="the tuner on every feed-forward network (as `mha`)")
    block: TunerSpec | str | None = option(None, help="the tuner on every whole block (as `mha`)")
    dim: int = option(10, ge=1, help="default tuner size: adapter hidden size, prefix/prompt tokens, LoRA rank "
                      "(paper: 10)")
    layers: list[int] | None = option(None, ge=0, help="default block indices to tune; null: all (paper Tables 14-15 "
                                      "tune subsets)")
    target_modules: dict[str, str | list[str]] = option(
        default_factory=dict, help="op kind -> module names, overriding where it is found, with PEFT's matching rules "
        "(a string is a `re.fullmatch` pattern; a list matches exact names or `.suffix`); keys other than "
        "mha/ffn/block/xattn define custom op kinds, which need a tuner in `custom`")
    custom: dict[str, TunerSpec | str] = option(
        default_factory=dict, help="tuners for custom op kinds, e.g. `{qv: lora}` with "
        "`target_modules: {qv: '.*\\.(q_proj|v_proj)'}`")
    modules_to_save: list[str] = option(default_factory=list, help="names (PEFT matching rules) of extra modules "
                                        "trained and saved in full, such as a classification head")
    family: str | None = option(None, help="force an op map (a registered family, listed under Families) instead of "
                                "detecting it; `structural` forces the structural search; a diffusers UNet is detected "
                                "as `unet` (middle block and decoder, as in the paper), `unet_full` adds its encoder")
    xattn: TunerSpec | str | None = option(None, help="the tuner on every cross-attention (queries from the tokens, "
                                           "keys and values from another sequence: the text encoder states of a "
                                           "Stable Diffusion UNet), as `mha`")
    task_type: str | None = option(None, help="PEFT's task name (`SEQ_CLS`, `TOKEN_CLS`, `IMAGE_CLS`, `QUESTION_ANS`, "
                                   "`CAUSAL_LM`, `SEQ_2_SEQ_LM`, `FEATURE_EXTRACTION`) or null: the task's usual "
                                   "head (`classifier`/`score`, `qa_outputs`; none for language models and features, "
                                   "as in PEFT) joins `modules_to_save` (restuning.tasks)")

    def validate(self) -> None:
        from .tasks import TASK_TYPES  # beside the model code that reads it

        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ConfigError(f"task_type: expected one of {list(TASK_TYPES)} or null, got {self.task_type!r}")
        for kind in OP_KINDS:
            setattr(self, kind, TunerSpec.coerce(getattr(self, kind), kind))
        self.custom = {k: TunerSpec.coerce(v, f"custom.{k}") for k, v in self.custom.items()}
        check_family(self.family)
        for kind in self.target_modules:
            if kind not in OP_KINDS and kind not in self.custom:
                raise ConfigError(f"target_modules.{kind}: a custom op kind needs a tuner in custom[{kind!r}]")
        for kind in self.custom:
            if kind in OP_KINDS:
                raise ConfigError(f"custom.{kind}: {kind} is a built-in op kind; set `{kind}=` instead")
            if kind not in self.target_modules:
                raise ConfigError(f"custom.{kind}: needs target_modules[{kind!r}] naming its modules")

    def specs(self) -> dict[str, TunerSpec]:
        """Op kind -> tuner spec, for every kind that has a tuner."""
        built = {k: getattr(self, k) for k in OP_KINDS if getattr(self, k) is not None}
        return {**built, **self.custom}
