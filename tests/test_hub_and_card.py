"""save_pretrained's model card, and from_pretrained by Hugging Face Hub id (offline, from a cache folder the
test lays out as huggingface_hub does: models--org--name/refs/main and snapshots/<revision>/)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import CASES, hidden

import restuning
from restuning import CheckpointError, ResTuningConfig, ResTuningModel, TunerSpec
from restuning.card import CARD_NAME
from restuning.checkpoint import CONFIG_NAME, WEIGHTS_NAME


def _trained(seed: int = 0):
    case = CASES["bert"]
    backbone = case.model()
    backbone.config._name_or_path = "org/tiny-bert"
    tuned = restuning.get_restuning_model(backbone, ResTuningConfig(mha=TunerSpec("res_prefix", dim=3), ffn="lora"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in tuned.tuners.parameters():
            p.normal_(0, 0.1)
    return case, tuned, hidden(tuned(**case.inputs())).detach()


def test_save_pretrained_writes_a_model_card(tmp_path):
    _, tuned, _ = _trained()
    tuned.save_pretrained(tmp_path, metrics={"eval_accuracy": 0.8125, "step": 40})
    card = (tmp_path / CARD_NAME).read_text()
    trainable = sum(p.numel() for p in tuned.tuners.parameters())
    total = sum(p.numel() for p in tuned.parameters())
    assert card.startswith("---\nlibrary_name: restuning\nbase_model: org/tiny-bert\n")
    assert "- res_prefix\n" in card and "- lora\n" in card
    assert "**Method:** Res-Tuning; mha: res_prefix (dim 3); ffn: lora (dim 10)" in card
    assert f"**Trainable parameters:** {trainable:,d} of {total:,d} ({100 * trainable / total:.4f}%)" in card
    assert "| eval_accuracy | 0.8125 |" in card and "| step | 40 |" in card
    config = json.loads(card.split("```json\n", 1)[1].split("```", 1)[0])
    assert config == json.loads((tmp_path / CONFIG_NAME).read_text())["config"]
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["base_model"] == "org/tiny-bert"
    tuned.save_pretrained(tmp_path / "plain")  # no metrics, a model built in code: said so, not invented
    plain = restuning.get_restuning_model(CASES["vit"].model(), ResTuningConfig())
    plain.save_pretrained(tmp_path / "vit")
    assert "## Metrics" not in (tmp_path / "plain" / CARD_NAME).read_text()
    vit_card = (tmp_path / "vit" / CARD_NAME).read_text()
    assert "base_model:" not in vit_card and "ViTModel (built in code; no Hub id)" in vit_card
    assert "**Modules saved in full:** none" in vit_card


def _hub_cache(root, repo: str, checkpoint, revision: str = "0123456789abcdef0123456789abcdef01234567"):
    """A huggingface_hub cache holding `checkpoint`'s files as repository `repo` at its main branch."""
    folder = root / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME):
        if (checkpoint / name).exists():
            shutil.copy(checkpoint / name, snapshot / name)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_from_pretrained_resolves_a_hub_id_offline(tmp_path, offline_hub, monkeypatch):
    case, tuned, expected = _trained()
    tuned.save_pretrained(tmp_path / "ckpt")
    snapshot = _hub_cache(offline_hub, "org/tiny-bert-restuning", tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    restored = ResTuningModel.from_pretrained(case.model(), "org/tiny-bert-restuning")
    torch.testing.assert_close(hidden(restored(**case.inputs())), expected, atol=0, rtol=0)
    by_revision = ResTuningModel.from_pretrained(case.model(), "org/tiny-bert-restuning", revision=snapshot.name)
    torch.testing.assert_close(hidden(by_revision(**case.inputs())), expected, atol=0, rtol=0)
    other = restuning.get_restuning_model(case.model(), ResTuningConfig(ffn=None))
    other.load_adapter("org/tiny-bert-restuning", "hub")
    other.set_adapter("hub")
    torch.testing.assert_close(hidden(other(**case.inputs())), expected, atol=0, rtol=0)


def test_a_hub_id_that_cannot_be_resolved_is_a_clear_error(tmp_path, offline_hub, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"org/missing: no such folder, and the Hub repository 'org/missing' "
                                              r"\(revision main\) cannot provide restuning_config.json"):
        ResTuningModel.from_pretrained(CASES["bert"].model(), "org/missing")
    _, tuned, _ = _trained()
    tuned.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / WEIGHTS_NAME).unlink()
    _hub_cache(offline_hub, "org/no-weights", tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"'org/no-weights' \(revision main\) cannot provide"):
        ResTuningModel.from_pretrained(CASES["bert"].model(), "org/no-weights")
    with pytest.raises(CheckpointError, match=r"\./not/a/folder: no such folder \(and not a Hub repository id"):
        ResTuningModel.from_pretrained(CASES["bert"].model(), "./not/a/folder")
