"""The model card a checkpoint folder carries (README.md): what a reader of the Hub page needs to know, made
from the checkpoint's own config, so it cannot disagree with it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write

CARD_NAME = "README.md"


def model_card(*, adapter: str, config: dict[str, Any], base_model: str | None, backbone: str, trainable: int,
               total: int, saved: list[str] | None = None, metrics: dict[str, Any] | None = None) -> str:
    """README.md text for one saved adapter.

    Args:
        adapter: the adapter's name. config: its `ResTuningConfig.to_dict()`.
        base_model: the backbone's Hub id or path, or None when it was built in code. backbone: its class.
        trainable / total: parameters in the checkpoint / in the tuned model (backbone included).
        saved: the backbone modules saved in full (the task head and `modules_to_save`).
        metrics: name -> value, shown when known.
    """
    ops = [f"{kind}: {_spec(config[kind], config['dim'])}" for kind in ("mha", "ffn", "block", "xattn")
           if config.get(kind)]
    ops += [f"{kind} (custom: {config['target_modules'][kind]!r}): {_spec(spec, config['dim'])}"
            for kind, spec in config.get("custom", {}).items()]
    tuners = sorted({(config[k] or {}).get("name") for k in ("mha", "ffn", "block", "xattn") if config.get(k)}
                    | {s["name"] for s in config.get("custom", {}).values()})
    front = ["---", "library_name: restuning"]
    if base_model:
        front.append(f"base_model: {base_model}")
    front += ["tags:", "- restuning", "- res-tuning", *(f"- {t}" for t in tuners), "---", ""]
    share = 100 * trainable / total if total else 0.0
    lines = [
        f"# Res-Tuning adapter `{adapter}` for {base_model or backbone}", "",
        "Res-Tuning (NeurIPS 2023): Res-Tuners run in parallel to the frozen ops of the backbone, "
        "`x' = OP(x) + ResTuner(x)`; this checkpoint holds the tuners (and any modules saved in full) only.", "",
        "- **Method:** Res-Tuning; " + ("; ".join(ops) if ops else "no tuners"),
        f"- **Base model:** {base_model or f'{backbone} (built in code; no Hub id)'} ({backbone})",
        f"- **Task type:** {config.get('task_type') or 'none'}",
        f"- **Modules saved in full:** {', '.join(saved or []) or 'none'}",
        f"- **Trainable parameters:** {trainable:,d} of {total:,d} ({share:.4f}%)", "",
    ]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_value(v)} |" for k, v in metrics.items()] + [""]
    lines += ["## Config", "", "```json", json.dumps(config, indent=2, sort_keys=True), "```", "",
              "## Use", "", "```python", "from restuning import ResTuningModel", "",
              f"model = ResTuningModel.from_pretrained(backbone, {'<this folder or Hub id>'!r})", "```", ""]
    return "\n".join(front + lines)


def write_card(directory: Path, text: str) -> None:
    """Write README.md into `directory` atomically."""
    atomic_write(directory / CARD_NAME, lambda p: p.write_text(text))


def _spec(spec: dict[str, Any] | str, dim: int) -> str:
    if isinstance(spec, str):
        return f"{spec} (dim {dim})"
    extra = f", layers {spec['layers']}" if spec.get("layers") is not None else ""
    options = f", {spec['options']}" if spec.get("options") else ""
    return f"{spec['name']} (dim {spec['dim'] if spec.get('dim') is not None else dim}{extra}{options})"


def _value(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)
