"""Checkpoints: tuner weights only, atomic, never unpickled; bad ones fail and change nothing."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CASES, hidden

import restuning
from restuning import CheckpointError, ResTuningConfig, ResTuningModel
from restuning.card import CARD_NAME
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
    assert sorted(p.name for p in tmp_path.iterdir()) == [CARD_NAME, CONFIG_NAME, WEIGHTS_NAME]  # no temporary left


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
    assert sorted(p.name for p in tmp_path.iterdir()) == [CARD_NAME, CONFIG_NAME, WEIGHTS_NAME]


def test_modules_to_save_are_trained_saved_and_restored(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    def build():
        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                        intermediate_size=48, vocab_size=101, num_labels=3)).eval()

    model = build()
    original_head = model.classifier.weight.clone()
    tuned = restuning.get_restuning_model(model, ResTuningConfig(modules_to_save=["classifier"]))
    head = tuned.saved_module("classifier")  # the trained copy that stands in for the backbone's own
    assert head.weight.requires_grad and not tuned.bert.pooler.dense.weight.requires_grad
    assert not model.classifier.weight.requires_grad
    with torch.no_grad():
        head.weight.add_(1.0)
    inputs = CASES["bert"].inputs()
    expected = tuned(**inputs).logits
    tuned.save_pretrained(tmp_path)
    restored = ResTuningModel.from_pretrained(build(), tmp_path)
    torch.testing.assert_close(restored(**inputs).logits, expected, atol=0, rtol=0)
    assert torch.equal(model.classifier.weight, original_head)  # the backbone's own head is untouched ...
    base = tuned.unload()
    # ... and unload keeps the trained one
    torch.testing.assert_close(base.classifier.weight, original_head + 1.0, atol=0, rtol=0)
    torch.testing.assert_close(base(**inputs).logits, expected, atol=0, rtol=0)  # (the tuners are zero at init)


# --- atomic folder writes (final/, converted assets) ---------------------------------------------------
class _Killed(BaseException):
    pass


def _kill_from(monkeypatch, n: int) -> None:
    """The n-th file operation from now on, and every later one, raise `_Killed`, as after a kill."""
    import os
    import shutil

    count = [0]

    def deadly(real):
        def op(*args, **kwargs):
            count[0] += 1
            if count[0] >= n:
                raise _Killed
            return real(*args, **kwargs)
        return op

    for owner, name in [(os, "replace"), (os, "mkdir"), (os, "unlink"), (os, "rmdir"), (os, "fsync"),
                        (shutil, "rmtree")]:
        monkeypatch.setattr(owner, name, deadly(getattr(owner, name)))


def _fill(text: str):
    def write(folder):
        (folder / "sub").mkdir()
        (folder / "a.txt").write_text(text)
        (folder / "sub" / "b.txt").write_text(text)
    return write


def test_atomic_write_dir_killed_at_any_step_keeps_a_whole_folder_and_never_wedges(tmp_path, monkeypatch):
    from restuning.checkpoint import atomic_write_dir, clean_temporaries, recover_dir

    n = 0
    while True:
        n += 1
        target = tmp_path / str(n) / "final"
        atomic_write_dir(target, _fill("old"))
        with monkeypatch.context() as m:
            _kill_from(m, n)
            try:
                atomic_write_dir(target, _fill("new"))
                done = True
            except _Killed:
                done = False
        recover_dir(target)  # what a reader that must not miss the folder does first
        text = (target / "a.txt").read_text()
        assert text in ("old", "new") and (target / "sub" / "b.txt").read_text() == text, n
        atomic_write_dir(target, _fill("newer"))  # a kill at any point never blocks a later write
        clean_temporaries(target)
        assert sorted(p.name for p in target.parent.iterdir()) == ["final"], n
        assert (target / "a.txt").read_text() == "newer"
        if done:
            break
    assert n > 5


def test_a_leftover_old_folder_neither_blocks_a_write_nor_hides_the_folder(tmp_path):
    from restuning.checkpoint import atomic_write_dir

    target = tmp_path / "final"
    atomic_write_dir(target, _fill("v1"))
    (tmp_path / ".final.old").mkdir()
    (tmp_path / ".final.old" / "x").write_text("stale")  # a kill after the swap, before the old one went
    atomic_write_dir(target, _fill("v2"))  # was: OSError Directory not empty, at every later write
    assert (target / "a.txt").read_text() == "v2" and not (tmp_path / ".final.old").exists()
    target.rename(tmp_path / ".final.old")  # a kill between the two renames: only the old one is there
    atomic_write_dir(target, _fill("v3"))
    assert (target / "a.txt").read_text() == "v3" and sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_atomic_writes_follow_the_umask(tmp_path):
    import os
    import stat

    from safetensors.torch import save_file

    from restuning.checkpoint import atomic_write, atomic_write_dir

    previous = os.umask(0o022)
    try:
        atomic_write_dir(tmp_path / "final", lambda d: save_file({"a": torch.zeros(1)}, str(d / "w.safetensors")))
        atomic_write(tmp_path / "f.safetensors", lambda p: save_file({"a": torch.zeros(1)}, str(p)))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "final").stat().st_mode) == 0o755  # was 0o700, as mkdtemp makes it
    assert stat.S_IMODE((tmp_path / "final" / "w.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "f.safetensors").stat().st_mode) == 0o644
