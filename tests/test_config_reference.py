"""The configuration reference (`restuning config`, docs/configuration.md) and the own-data examples."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import tiny_vit_folder

from restuning import ConfigError, config_reference
from restuning.cli import main
from restuning.config import ConfigBase, option
from restuning.config_reference import documented_classes, fields_without_help, reference
from restuning.diffusion.train_config import DiffusionTrainConfig
from restuning.methods import METHODS
from restuning.train.config import TrainConfig, load_config
from restuning.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
REGENERATE = "restuning config --format markdown > docs/configuration.md"


def _flat(text: str) -> str:
    return " ".join(text.split())


def _dotted(cls: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every leaf key of a config dataclass, nested configs dotted (worked out here, apart from the module)."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_dotted(hints[f.name], f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = f
    return out


def test_docs_page_is_the_generated_reference():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == reference("markdown"), f"docs/configuration.md is out of date with the code: run `{REGENERATE}`"


def test_every_config_field_has_a_meaning():
    names = {c.__name__ for c in documented_classes()}
    assert {"TrainConfig", "DataConfig", "OptimConfig", "MethodConfig", "DiffusionTrainConfig", "DiffusionDataConfig",
            "DiffusionOptimConfig", "TunerSpec", "ResTuningConfig", "BypassConfig", "LSTConfig", "SideTuningConfig",
            "VPTShallowConfig"} <= names
    assert fields_without_help() == [], "give these fields an option(help=...)"


def test_a_field_without_a_meaning_is_reported(monkeypatch):
    @dataclass
    class Bare(ConfigBase):
        said: int = option(1, ge=0, help="has a meaning")
        unsaid: int = 2

    monkeypatch.setattr(config_reference, "RUN_CONFIGS", (("Bare", Bare, "nothing"),))
    from restuning.tuners import ResAdapter

    monkeypatch.setattr(ResAdapter, "option_help", {"dim": "bottleneck width"})
    missing = fields_without_help()
    assert "Bare.unsaid" in missing and "Bare.said" not in missing
    assert "res_adapter.options.act" in missing and "res_adapter.dim" not in missing


@pytest.mark.parametrize("cls", [TrainConfig, DiffusionTrainConfig])
def test_every_run_config_key_is_listed_with_its_type_default_and_meaning(cls):
    text = reference("text").split(f"({cls.__name__}; ", 1)[1].split("\n\n", 1)[0]  # its section
    lines = text.splitlines()
    for key, f in _dotted(cls).items():
        head = [line for line in lines if line.startswith(f"  {key}: ")]
        assert len(head) == 1, f"{key} is not listed once"
        assert _flat(f.metadata["help"]) in _flat(text)
        if "ge" in f.metadata:
            assert f"(>= {f.metadata['ge']})" in head[0]
    # quoted, as YAML reads a bare no as false
    assert '  optim.mixed_precision: str = "no"  (one of "no", "bf16", "fp16")' in lines
    if cls is TrainConfig:
        assert '  data.name: str = "mnist"  (one of "mnist", "digits", "tweets", "image_folder", "text_table", "hf")' \
            in lines
        assert "  optim.lr: float = 0.001  (> 0)" in lines
        assert '  data.eval_sets: list[str] = []  (each one of "mnist", "digits", "tweets")' in lines


def test_every_method_and_its_options_are_listed():
    text = reference("text")
    for name, method in METHODS.items():
        assert f"\n  {name}: " in text
        if method.options is not None and method.parse is None:
            for f in dataclasses.fields(method.options):
                if f.name != "num_classes":  # set from the data; method.config refuses it
                    assert f"    method.config.{f.name}: " in text
    assert "method.config.num_classes" not in text
    assert ('    method.config.pooling: str = "auto"  (one of "auto", "cls", "mean", "avg", "last", "attention")'
            in text)
    # the tuners' own options come from their signatures and option_choices
    assert '    options.mode: str = "gated"  (one of "gated", "exact")' in text
    assert '    options.act: str = "gelu"  (one of "gelu", "relu", "silu", "identity")' in text


def test_cli_config_prints_the_reference_and_one_method(capsys):
    assert main(["config"]) == 0
    assert capsys.readouterr().out == reference("text")
    assert main(["config", "--method", "bypass", "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    assert "### `bypass`" in out and "`method.config.recompute`" in out
    assert "### `restuning`" not in out and "## Classification run config" not in out
    assert main(["config", "--method", "bypas"]) == 2
    assert "--method: expected one of" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--format"):
        reference("html")


# --- the own-data examples ---------------------------------------------------------------------
def _texts(root: Path) -> None:
    (root / "data").mkdir(exist_ok=True)
    rows = [f"what a {w} day,pos" for w in ("good", "great", "lovely", "fine", "nice", "sunny")]
    rows += [f"what a {w} day,neg" for w in ("bad", "awful", "grim", "sad", "rainy", "dull")]
    (root / "data" / "texts.csv").write_text("text,label\n" + "\n".join(rows) + "\n")


def _images(root: Path) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for name in ("cat", "dog"):
        (root / "data" / "images" / name).mkdir(parents=True)
        for i in range(6):
            pixels = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / "data" / "images" / name / f"{i}.png")


def test_the_text_table_example_needs_its_file_then_loads_and_trains(tmp_path, monkeypatch):
    example = ROOT / "examples" / "own_texts_restuning.yaml"
    monkeypatch.chdir(tmp_path)  # the example's paths are relative to where restuning runs
    with pytest.raises(ConfigError, match="data.path: 'data/texts.csv' does not exist"):
        load_config(example)
    _texts(tmp_path)
    config = load_config(example)  # as written: every key and the table's columns checked
    assert config.data.name == "text_table" and config.method.name == "restuning"
    quick = load_config(example, {"optim.epochs": 1, "optim.warmup_epochs": 0, "optim.batch_size": 4,
                                  "output_dir": str(tmp_path / "run")})
    trainer = Trainer(quick, progress=False)
    assert trainer.data.train.classes == ["neg", "pos"] and len(trainer.data.test) == 6
    assert 0.0 <= trainer.run()["test_accuracy"] <= 1.0
    assert (tmp_path / "run" / "final").is_dir()


def test_the_image_folder_example_needs_its_folder_then_loads_and_trains(tmp_path, monkeypatch):
    example = ROOT / "examples" / "own_images_bypass.yaml"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="data.path: 'data/images' does not exist"):
        load_config(example)
    _images(tmp_path)
    config = load_config(example)
    assert config.data.name == "image_folder" and config.method.name == "bypass"
    quick = load_config(example, {"backbone": str(tiny_vit_folder(tmp_path)), "data.image_size": 16,
                                  "optim.epochs": 1, "optim.warmup_epochs": 0, "optim.batch_size": 4,
                                  "output_dir": str(tmp_path / "run")})  # a tiny ViT for the shipped DINOv2
    trainer = Trainer(quick, progress=False)
    assert trainer.data.train.classes == ["cat", "dog"] and len(trainer.data.train) == 6
    assert 0.0 <= trainer.run()["test_accuracy"] <= 1.0
    assert (tmp_path / "run" / "final").is_dir()
