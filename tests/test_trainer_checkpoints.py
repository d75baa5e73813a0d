"""transformers.Trainer with ResTuningCallback: checkpoints hold the adapters only, resume restores them, and
each checkpoint folder opens with ResTuningModel.from_pretrained."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import restuning
from restuning import ConfigError, ResTuningConfig, ResTuningModel
from restuning.card import CARD_NAME
from restuning.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from restuning.hf_trainer import ResTuningCallback, keep_adapters_only


def _backbone() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                    intermediate_size=48, vocab_size=1001, num_labels=2,
                                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _data() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 101, (16, 8), generator=g)
    labels = (ids[:, 0] > 50).long()
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y} for i, y in zip(ids, labels)]


def _trainer(tuned, out, max_steps: int) -> Trainer:
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=max_steps,
                             learning_rate=1e-2, save_strategy="steps", save_steps=2, report_to=[], use_cpu=True,
                             logging_steps=1, seed=0, data_seed=0, lr_scheduler_type="constant")
    return Trainer(model=tuned, args=args, train_dataset=_data(), callbacks=[ResTuningCallback()])


def _tuned() -> ResTuningModel:
    return restuning.get_restuning_model(_backbone(), ResTuningConfig(task_type="SEQ_CLS"))


def test_trainer_checkpoints_hold_the_adapters_only_and_resume(tmp_path):
    whole = _tuned()
    _trainer(whole, tmp_path / "whole", max_steps=4).train()
    final = {k: v.clone() for k, v in whole.tuner_state_dict().items()}

    first = _tuned()
    frozen = {k: v.clone() for k, v in first.base_model.state_dict().items()}
    _trainer(first, tmp_path / "run", max_steps=2).train()
    folder = tmp_path / "run" / "checkpoint-2"
    saved = load_file(str(folder / "model.safetensors"))  # the Trainer's own file, for its resume
    assert saved and all(k.startswith("adapters.default.") for k in saved)
    assert sum(v.numel() for v in saved.values()) == first.get_nb_trainable_parameters()[0]
    backbone_bytes = sum(v.numel() * v.element_size() for v in frozen.values())
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert max(sizes.values()) < backbone_bytes / 4, f"{sizes}: a file as large as the backbone ({backbone_bytes})"
    assert {CONFIG_NAME, WEIGHTS_NAME, CARD_NAME} <= {p.name for p in folder.iterdir()}
    card = (folder / CARD_NAME).read_text()
    assert "| train_loss |" in card and "| step | 2 |" in card and "**Modules saved in full:** classifier" in card

    resumed = _tuned()  # fresh tuner weights, overwritten by the resume
    assert any(not torch.equal(v, resumed.tuner_state_dict()[k]) for k, v in final.items())
    _trainer(resumed, tmp_path / "run", max_steps=4).train(resume_from_checkpoint=str(folder))
    for key, value in resumed.tuner_state_dict().items():
        torch.testing.assert_close(value, final[key], atol=1e-6, rtol=0, msg=f"{key} after resume")
    assert all(torch.equal(v, frozen[k]) for k, v in resumed.base_model.state_dict().items())

    inputs = {k: torch.stack([d[k] for d in _data()[:4]]) for k in ("input_ids", "attention_mask")}
    reloaded = ResTuningModel.from_pretrained(_backbone(), tmp_path / "run" / "checkpoint-4")
    resumed.eval()
    torch.testing.assert_close(reloaded(**inputs).logits, resumed(**inputs).logits, atol=0, rtol=0)


def test_the_adapter_only_state_dict_round_trips_strictly():
    tuned = _tuned()
    keep_adapters_only(tuned)
    state = tuned.state_dict()
    assert state and all(k.startswith("adapters.") for k in state)
    with torch.no_grad():
        for p in tuned.active.parameters():
            p.add_(1.0)
    tuned.load_state_dict(state)  # strict: the frozen backbone is not reported missing
    with pytest.raises(RuntimeError, match="Missing key"):  # a missing adapter entry still is
        tuned.load_state_dict({k: v for k, v in state.items() if "classifier" not in k})
    with pytest.raises(ConfigError, match="expected the Trainer's model to be a ResTuningModel, got BertFor"):
        keep_adapters_only(_backbone())
