"""The configuration reference (`restuning config`, docs/configuration.md), generated from the config dataclasses.

Every key of the two run configs (`TrainConfig`, `DiffusionTrainConfig`, nested configs as dotted keys), every
registered method's options, `TunerSpec` and each tuner's own options, with its type, default, bounds and
meaning. Types, defaults and bounds come from the fields (`option(gt=, ge=, choices=)`), meanings from their
`option(help=...)`; tuner options from the tuner's signature and `option_choices`. Nothing is written by hand,
so the reference cannot drift from the code; `fields_without_help` lists what lacks a meaning.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import textwrap
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .config import ConfigBase, TunerSpec
from .diffusion.train_config import DiffusionTrainConfig
from .errors import ConfigError
from .methods import METHODS, Method
from .ops import FAMILIES
from .serve.config import ServeConfig
from .train.config import TrainConfig
from .tuners import TUNERS

FORMATS = ("text", "markdown")
RUN_CONFIGS: tuple[tuple[str, type[ConfigBase], str], ...] = (
    ("Classification run config", TrainConfig, "restuning train --config FILE.yaml"),
    ("Diffusion run config", DiffusionTrainConfig, "restuning diffusion-train --config FILE.yaml"),
    ("Service config", ServeConfig, "restuning serve --config FILE.yaml (or the same keys as flags)"),
)
# Set by the run from its data, refused in `method.config` (`Method.read_options`).
FROM_THE_DATA = ("num_classes",)


@dataclass(frozen=True)
class Key:
    """One documented key: its dotted name, type, default, bounds and meaning."""

    name: str
    type: str
    default: str
    bounds: str
    help: str


def keys(cls: type[ConfigBase], prefix: str = "", skip: tuple[str, ...] = ()) -> Iterator[Key]:
    """The keys of config dataclass `cls` in field order; a nested config's keys follow as `field.key`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from keys(hint, f"{prefix}{f.name}.")
            continue
        each = typing.get_origin(hint) is list or list in [typing.get_origin(a) for a in typing.get_args(hint)]
        yield Key(f"{prefix}{f.name}", type_name(hint), _default(f), _bounds(f.metadata, each),
                  f.metadata.get("help", ""))


def fields_without_help() -> list[str]:
    """`Class.field` of every documented config field without an `option(help=...)`, and `tuner.option` of every
    tuner option (and `dim`) without an entry in its `option_help`."""
    fields = [f"{cls.__name__}.{f.name}" for cls in documented_classes() for f in dataclasses.fields(cls)
              if not f.metadata.get("help")]
    return fields + [f"{name}.{k.name}" for name in sorted(TUNERS) for k in _tuner_keys(name) if not k.help]


def documented_classes() -> list[type[ConfigBase]]:
    """The run configs, their nested configs, `TunerSpec` and every method's options dataclass."""
    seen: list[type] = []

    def walk(cls: type) -> None:
        if cls in seen:
            return
        seen.append(cls)
        for hint in typing.get_type_hints(cls).values():
            for inner in _dataclasses_in(hint):
                walk(inner)

    for _, cls, _ in RUN_CONFIGS:
        walk(cls)
    walk(TunerSpec)
    for method in METHODS.values():
        if method.options is not None:
            walk(method.options)
    return seen


def _dataclasses_in(hint: Any) -> list[type]:
    if dataclasses.is_dataclass(hint):
        return [hint]
    return [c for a in typing.get_args(hint) for c in _dataclasses_in(a)]


def type_name(hint: Any) -> str:
    """A type hint as the reference writes it: `int`, `list[int]`, `TunerSpec | str | null`, `any`."""
    if hint is type(None):
        return "null"
    if hint is Any:
        return "any"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin in (list, dict, tuple):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]" if args else origin.__name__
    return getattr(hint, "__name__", str(hint))


def _value(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return json.dumps(value)  # JSON is YAML: `null`, `true`, and strings quoted (YAML would read a bare no as false)


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return _value(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return _value(f.default_factory())
    return "required"


def _bounds(meta: typing.Mapping[str, Any], each: bool = False) -> str:
    """`meta`'s bounds in words; `each`: they apply to each item of a list."""
    parts = []
    if "choices" in meta:
        parts.append("one of " + ", ".join(_value(c) for c in meta["choices"]))
    if "gt" in meta:
        parts.append(f"> {meta['gt']}")
    if "ge" in meta:
        parts.append(f">= {meta['ge']}")
    return ("each " if each and parts else "") + "; ".join(parts)


def _tuner_keys(name: str) -> list[Key]:
    """What `TunerSpec.dim` means to tuner `name`, then its options (the keys of `TunerSpec.options`)."""
    cls = TUNERS[name]
    hints = typing.get_type_hints(cls.__init__)
    out = [Key("dim", "int", "the config's dim", ">= 1", cls.option_help.get("dim", ""))]
    for param in list(inspect.signature(cls.__init__).parameters.values()):
        if param.name in ("self", "ctx", "dim"):
            continue
        default = "required" if param.default is inspect.Parameter.empty else _value(param.default)
        choices = cls.option_choices.get(param.name)
        out.append(Key(f"options.{param.name}", type_name(hints.get(param.name, Any)), default,
                       "one of " + ", ".join(_value(c) for c in choices) if choices else "",
                       cls.option_help.get(param.name, "")))
    return out


def _tuner_doc(name: str) -> str:
    """The first paragraph of the tuner's module docstring (what it computes)."""
    module = inspect.getmodule(TUNERS[name])
    return " ".join((inspect.getdoc(module) or _doc(TUNERS[name])).split("\n\n", 1)[0].split())


def _doc(obj: Any) -> str:
    return " ".join((inspect.getdoc(obj) or "").split())


def _method_lines(method: Method) -> tuple[str, list[str], list[Key]]:
    """A method's summary, its facts (runs, capabilities, defaults, what `method.config` takes) and its option keys."""
    facts = [f"runs: {', '.join(method.tasks)}"]
    can = [text for flag, text in ((method.reads_frozen_backbone, "never back-propagates into the backbone (feature "
                                    "cache, one backbone forward for many runs)"),
                                   (method.multi_task, "multi-task: its runs on one backbone answer from one forward"),
                                   (method.trains_backbone, "trains the backbone's own parameters"),
                                   (method.low_precision, "backbone_dtype: float32, bfloat16 or int8")) if flag]
    facts += can
    for task, values in method.defaults.items():
        facts.append(f"defaults for {task} runs: {_value(values)}")
    option_keys: list[Key] = []
    if method.options is not None and method.parse is None:
        option_keys = list(keys(method.options, "method.config.", skip=FROM_THE_DATA))
        skipped = [f.name for f in dataclasses.fields(method.options) if f.name in FROM_THE_DATA]
        if skipped:
            facts.append(f"{', '.join(skipped)}: set from the data's classes (not a key of method.config)")
    elif method.parse is not None:
        facts.append("method.config: as the summary says (read by the method's own parser)")
    else:
        facts.append("method.config: takes no options (leave it empty)")
    return method.summary, facts, option_keys


# --- text ----------------------------------------------------------------------------------------
def _wrap(text: str, indent: str, more: str) -> list[str]:
    return textwrap.wrap(text, 110, initial_indent=indent, subsequent_indent=more, break_on_hyphens=False,
                         break_long_words=False)


def _text_keys(rows: list[Key], indent: str = "  ") -> list[str]:
    out = []
    for k in rows:
        head = f"{indent}{k.name}: {k.type} = {k.default}" + (f"  ({k.bounds})" if k.bounds else "")
        out.append(head)
        if k.help:
            out += _wrap(k.help, indent + "    ", indent + "    ")
    return out


def _text(method: str | None) -> str:
    lines: list[str] = []
    if method is None:
        for title, cls, usage in RUN_CONFIGS:
            lines += [f"{title} ({cls.__name__}; {usage})", *_text_keys(list(keys(cls))), ""]
    lines.append("Methods (method.name, and the keys of its method.config)")
    for name in [method] if method else sorted(METHODS):
        summary, facts, option_keys = _method_lines(METHODS[name])
        lines += _wrap(f"{name}: {summary}", "  ", "      ")
        lines += [f"      {fact}" for fact in facts]
        lines += _text_keys(option_keys, "    ")
    lines += ["", "Tuner spec (TunerSpec: a tuner name alone, or a mapping of these keys)",
              *_text_keys(list(keys(TunerSpec))), "",
              "Tuners (TunerSpec.name: what its dim means, and the keys of TunerSpec.options)"]
    for name in sorted(TUNERS):
        lines += _wrap(f"{name}: {_tuner_doc(name)}", "  ", "      ")
        lines += _text_keys(_tuner_keys(name), "    ")
    lines += ["", f"Families (family): {', '.join(sorted(FAMILIES))}, or \"structural\""]
    return "\n".join(lines) + "\n"


# --- markdown ------------------------------------------------------------------------------------
def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(rows: list[Key]) -> list[str]:
    if not rows:
        return []
    head = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    return head + [f"| `{k.name}` | `{_cell(k.type)}` | `{_cell(k.default)}` | {_cell(k.bounds)} | {_cell(k.help)} |"
                   for k in rows] + [""]


def _markdown(method: str | None) -> str:
    lines = ["# Configuration reference", "",
             "Generated from the config dataclasses by `restuning config --format markdown > docs/configuration.md`"
             " (types, defaults and bounds from the fields, meanings from their `option(help=...)`); "
             "`tests/test_config_reference.py` checks that this page is the command's output. "
             "Plain `restuning config` prints the same as text; `restuning config --method NAME` one method.",
             "", "Nested keys are written dotted: `optim.lr` is `lr` under `optim:` in the YAML file. "
             "Defaults are JSON (which YAML reads as written).", ""]
    if method is None:
        for title, cls, usage in RUN_CONFIGS:
            lines += [f"## {title}", "", f"`{cls.__name__}`, read by `{usage}`.", "",
                      *_md_table(list(keys(cls)))]
    lines += ["## Methods", "", "`method.name` names one of these; `method.config` holds its options.", ""]
    for name in [method] if method else sorted(METHODS):
        summary, facts, option_keys = _method_lines(METHODS[name])
        lines += [f"### `{name}`", "", summary, "", *[f"- {fact}" for fact in facts], "", *_md_table(option_keys)]
    lines += ["## Tuner spec", "", "`mha`, `ffn`, `block`, `xattn`, `custom` values and the bypass's `horizontal` "
              "and `vertical` take a tuner name alone, or a mapping of these keys (`TunerSpec`).", "",
              *_md_table(list(keys(TunerSpec))),
              "## Tuners", "", "`TunerSpec.name` names one of these; `dim` is what `TunerSpec.dim` (or the config's "
              "`dim`) means to it, and `options.*` are the keys of `TunerSpec.options` (from its signature).", ""]
    for name in sorted(TUNERS):
        lines += [f"### `{name}`", "", _tuner_doc(name), "", *_md_table(_tuner_keys(name))]
    lines += ["## Families", "", "`family` forces one of these op maps: "
              + ", ".join(f"`{f}`" for f in sorted(FAMILIES)) + ", or `structural` (the structural search).", ""]
    return "\n".join(lines)


def reference(fmt: str = "text", method: str | None = None) -> str:
    """The reference as `text` or `markdown`: everything, or (with `method`) that method and the tuners."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: expected one of {list(FORMATS)}, got {fmt!r}")
    if method is not None and method not in METHODS:
        raise ConfigError(f"--method: expected one of {sorted(METHODS)}, got {method!r}")
    return _markdown(method) if fmt == "markdown" else _text(method)


__all__ = ["documented_classes", "fields_without_help", "FORMATS", "Key", "keys", "reference", "type_name"]
