"""Checkpoints: tuner weights only, atomic, never unpickled; bad ones fail and change nothing."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CASES, hidden

import restuning
from restuning import CheckpointError, ResTuningConfig, ResTuningModel
from restuning.checkpoint import CONFIG_NAME, WEIGHTS_NAME


def _saved(tmp_path, case_name="bert", config=None):
    case = CASES[case_name]
    tuned = restuning.get_restuning_model(case.model(), config or ResTuningConfig())
    with torch.no_grad():
        for p in tuned.tuners.parameters():
            p.add_(0.01)
    tuned.save_pretrained(tmp_path)
    return case, tuned


def _assert_untouched(model):
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_checkpoint_holds_tuner_weights_only(tmp_path):
    _, tuned = _saved(tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    assert all(k.startswith("tuners.") for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == tuned.get_nb_trainable_parameters()[0]
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["config"]["mha"]["name"] == "res_adapter"
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temporary left


def test_minilm_sized_checkpoint_is_a_few_hundred_kb(tmp_path):
    from restuning.assets import minilm

    model, _ = minilm()
    restuning.get_restuning_model(model).save_pretrained(tmp_path)
    size = (tmp_path / WEIGHTS_NAME).stat().st_size
    assert 100_000 < size < 1_000_000, size


def test_truncated_weights_fail_cleanly(tmp_path):
    case, _ = _saved(tmp_path)
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    fresh = case.model()
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        ResTuningModel.from_pretrained(fresh, tmp_path)
    _assert_untouched(fresh)


def test_damaged_config_fails_cleanly(tmp_path):
    case, _ = _saved(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    fresh = case.model()
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ResTuningModel.from_pretrained(fresh, tmp_path)
    _assert_untouched(fresh)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        ResTuningModel.from_pretrained(CASES["bert"].model(), tmp_path)


def test_backbone_of_another_shape_fails_cleanly(tmp_path):
    _saved(tmp_path, "bert")
    from transformers import BertConfig, BertModel

    other = BertModel(BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                 vocab_size=101))
    with pytest.raises(CheckpointError, match="another backbone.*hidden_size: saved 32, this backbone 48"):
        ResTuningModel.from_pretrained(other, tmp_path)
    _assert_untouched(other)


def test_tensor_shape_mismatch_fails_cleanly(tmp_path):
    case, _ = _saved(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["config"]["dim"] = 7  # the config now disagrees with the stored tensors
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    fresh = case.model()
    with pytest.raises(CheckpointError, match="tensor shapes do not fit"):
        ResTuningModel.from_pretrained(fresh, tmp_path)
    _assert_untouched(fresh)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    case, tuned = _saved(tmp_path)
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    restored = ResTuningModel.from_pretrained(case.model(), tmp_path)
    torch.testing.assert_close(hidden(restored(**case.inputs())), hidden(tuned(**case.inputs())), atol=0, rtol=0)


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    case, tuned = _saved(tmp_path)
    before = (tmp_path / WEIGHTS_NAME).read_bytes()
    import restuning.checkpoint as ckpt

    def broken(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        tuned.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_modules_to_save_are_trained_saved_and_restored(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    def build():
        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                        intermediate_size=48, vocab_size=101, num_labels=3)).eval()

    model = build()
    original_head = model.classifier.weight.clone()
    tuned = restuning.get_restuning_model(model, ResTuningConfig(modules_to_save=["classifier"]))
    assert tuned.classifier.weight.requires_grad and not tuned.bert.pooler.dense.weight.requires_grad
    with torch.no_grad():
        tuned.classifier.weight.add_(1.0)
    inputs = CASES["bert"].inputs()
    expected = tuned(**inputs).logits
    tuned.save_pretrained(tmp_path)
    restored = ResTuningModel.from_pretrained(build(), tmp_path)
    torch.testing.assert_close(restored(**inputs).logits, expected, atol=0, rtol=0)
    assert torch.equal(tuned.unload().classifier.weight, original_head)
