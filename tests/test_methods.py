"""The method registry and the one save format: every method is a registry entry, every run's `final/` opens
with the library's `from_pretrained`, and `eval`/`predict` answer from it alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CASES, tiny_vit_folder
from torch import nn

from restuning import CheckpointError, ConfigError, DataError, ResTuningBypassModel, ResTuningConfig, ResTuningModel
from restuning.data import LabelledData, mnist5k
from restuning.methods import METHODS, LastLayerClassifier, Method, load_model, register_method
from restuning.train.backbones import load_backbone
from restuning.train.config import TrainConfig, from_dict
from restuning.train.evaluate import evaluate_run
from restuning.train.predict import predict
from restuning.train.trainer import Trainer


def _run(root: Path, method: str, name: str | None = None, **extra) -> Path:
    config = from_dict(TrainConfig, {
        "backbone": str(tiny_vit_folder(root)), "method": {"name": method, "config": extra.pop("options", {})},
        "data": {"name": "mnist", "train_size": 64, "test_size": 48, "image_size": 16, **extra.pop("data", {})},
        "optim": {"epochs": 1, "batch_size": 16, "lr": 0.01, "warmup_epochs": 0.0},
        "output_dir": str(root / (name or method)), **extra})
    Trainer(config, progress=False).run()
    return Path(config.output_dir)


def test_a_restuning_run_opens_with_res_tuning_model_from_pretrained(tmp_path):
    run = _run(tmp_path, "restuning")
    backbone = load_backbone(str(tiny_vit_folder(tmp_path))).model
    tuned = ResTuningModel.from_pretrained(backbone, run / "final")
    rebuilt = load_model(load_backbone(str(tiny_vit_folder(tmp_path))).model, run / "final")
    assert isinstance(rebuilt, LastLayerClassifier)
    for key, value in tuned.tuner_state_dict().items():
        assert torch.equal(value, rebuilt.runner.tuner_state_dict()[key])
    pixels = CASES["vit"].inputs()
    torch.testing.assert_close(tuned(**pixels).last_hidden_state, rebuilt.runner(**pixels).last_hidden_state)


def test_a_preset_run_is_a_restuning_checkpoint(tmp_path):
    run = _run(tmp_path, "lora")
    tuned = ResTuningModel.from_pretrained(load_backbone(str(tiny_vit_folder(tmp_path))).model, run / "final")
    assert {t.name for t in tuned.tuners.values()} == {"lora"}


def test_a_bypass_run_opens_with_its_from_pretrained(tmp_path):
    run = _run(tmp_path, "bypass")
    model = ResTuningBypassModel.from_pretrained(load_backbone(str(tiny_vit_folder(tmp_path))).model, run / "final")
    assert model.bypass_config.num_classes == 10


def test_a_checkpoint_for_another_backbone_is_a_clear_checkpoint_error(tmp_path):
    run = _run(tmp_path, "lst")
    wider = CASES["vit"].build("eager", 3)  # one block more: the side network's ladders do not fit
    with pytest.raises(CheckpointError, match="another backbone.*num_hidden_layers: saved 2, this backbone 3"):
        load_model(wider, run / "final")


def test_eval_works_after_the_training_data_is_gone_and_checks_classes(tmp_path):
    rows = [{"text": f"good {i}" if i % 2 else f"bad {i}", "label": "pos" if i % 2 else "neg"} for i in range(40)]
    table = tmp_path / "train.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    bert = CASES["bert"].model()
    bert.save_pretrained(tmp_path / "tiny-bert")
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad"] + [str(i) for i in
                                                                                            range(94)]))
    BertTokenizerFast(str(vocab)).save_pretrained(tmp_path / "tiny-bert")
    config = from_dict(TrainConfig, {
        "backbone": str(tmp_path / "tiny-bert"), "method": {"name": "restuning"},
        "data": {"name": "text_table", "path": str(table), "test_size": 10, "max_length": 8},
        "optim": {"epochs": 1, "batch_size": 8, "lr": 0.01, "warmup_epochs": 0.0},
        "output_dir": str(tmp_path / "run")})
    result = Trainer(config, progress=False).run()
    run = Path(config.output_dir)
    assert evaluate_run(run)["test_accuracy"] == result["test_accuracy"]
    table.unlink()  # the training data moves away: eval on other data still works
    assert 0.0 <= evaluate_run(run, str(other))["other_accuracy"] <= 1.0
    with pytest.raises(DataError, match="does not exist|no such"):
        evaluate_run(run)
    with pytest.raises(DataError, match=r"classes \['0', '1'.*are not the run's.*\['neg', 'pos'\]"):
        evaluate_run(run, "mnist")
    with pytest.raises(ConfigError, match=r"not a shipped set \(\['digits', 'mnist', 'tweets'\]"):
        evaluate_run(run, "cifar")


def test_predict_answers_runs_of_every_kind_in_batches(tmp_path, monkeypatch):
    runs = [_run(tmp_path, "bypass", "bypass-a"), _run(tmp_path, "bypass", "bypass-b", seed=1),
            _run(tmp_path, "restuning"), _run(tmp_path, "linear")]
    images = mnist5k().inputs[:7]
    from restuning.train import backbones

    sizes = []
    encode = backbones.Backbone.encode
    monkeypatch.setattr(backbones.Backbone, "encode", lambda self, data, *a: sizes.append(len(data)) or encode(
        self, data, *a))
    answers = predict(runs, images=images, image_size=16, batch_size=3)
    assert set(sizes) == {3, 1}  # streamed: never more than a batch encoded at once
    for run in runs:  # each run alone, on all inputs at once, gives the same classes
        backbone = load_backbone(str(tiny_vit_folder(tmp_path)))
        model = load_model(backbone.model, run / "final")
        data = LabelledData(images, torch.zeros(7, dtype=torch.long), ["?"])
        with torch.no_grad():
            expected = model(**encode(backbone, data, 16, 32)).argmax(-1).tolist()
        assert answers[str(run)] == [str(i) for i in expected]


def test_predict_refuses_empty_input(tmp_path):
    run = _run(tmp_path, "linear")
    with pytest.raises(ConfigError, match="no inputs"):
        predict([run], texts=[])


def test_a_new_method_is_one_registration(tmp_path):
    """A method registered by a user trains, saves and evaluates through the trainer without other changes."""

    class MeanPool(nn.Module):  # a linear head on the mean of the frozen backbone's last hidden state
        def __init__(self, backbone: nn.Module, num_classes: int):
            super().__init__()
            self.backbone = backbone.requires_grad_(False)
            self.head = nn.Linear(backbone.config.hidden_size, num_classes)

        def forward(self, **inputs):
            with torch.no_grad():
                hidden = self.backbone(**inputs).last_hidden_state
            return self.head(hidden.mean(1))

    register_method(Method("mean_pool", lambda backbone, options, k: MeanPool(backbone, k)))
    try:
        run = _run(tmp_path, "mean_pool")
        result = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        assert evaluate_run(run)["test_accuracy"] == result["test_accuracy"]
        with pytest.raises(ConfigError, match="mean_pool takes no options"):
            _run(tmp_path, "mean_pool", "other", options={"dim": 3})
    finally:
        METHODS.pop("mean_pool")


def test_from_pretrained_refuses_a_model_that_already_carries_tuners(tmp_path):
    backbone = CASES["vit"].model()
    tuned = ResTuningModel(backbone, ResTuningConfig())
    tuned.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="already carries Res-Tuning tuners; call unload"):
        ResTuningModel.from_pretrained(backbone, tmp_path / "ckpt")  # would attach a second set
    with pytest.raises(CheckpointError, match="already carries"):
        ResTuningModel.from_pretrained(tuned, tmp_path / "ckpt")
    restored = ResTuningModel.from_pretrained(tuned.unload(), tmp_path / "ckpt")
    assert len(restored.tuners) == len(tuned.tuners)
