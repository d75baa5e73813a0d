"""Training integrations and dtypes: transformers.Trainer unchanged, bfloat16, torch.compile."""

from __future__ import annotations

import torch
from conftest import CASES, hidden

import restuning
from restuning import ResTuningConfig


def test_trainer_trains_a_tuned_bert(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=48, vocab_size=101, num_labels=2))
    frozen = {k: v.clone() for k, v in model.bert.state_dict().items()}
    tuned = restuning.get_restuning_model(model, ResTuningConfig(modules_to_save=["classifier"]))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 101, (32, 8), generator=g)
    labels = (ids[:, 0] > 50).long()
    data = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y} for i, y in zip(ids, labels)]
    before = [p.detach().clone() for p in tuned.tuners.parameters()]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=2,
                             learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True, logging_steps=1)
    result = Trainer(model=tuned, args=args, train_dataset=data).train()
    assert result.global_step == 8 and result.training_loss > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, tuned.tuners.parameters()))
    assert all(torch.equal(v, frozen[k]) for k, v in model.bert.state_dict().items())


def test_bfloat16_runs_and_matches_at_init():
    case = CASES["vit"]
    model = case.model().to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) for k, v in case.inputs().items()}
    reference = hidden(model(**inputs))
    tuned = restuning.get_restuning_model(model, ResTuningConfig(mha="res_prefix", ffn="res_adapter"))
    # Beside a low-precision backbone the tuners are float32 (QLoRA-style); they hand the backbone its own dtype.
    assert all(p.dtype == torch.float32 for p in tuned.tuners.parameters())
    out = hidden(tuned(**inputs))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference, atol=0, rtol=0)
    hidden(tuned(**inputs)).float().sum().backward()
    assert all(p.grad is not None for p in tuned.tuners.parameters() if p.requires_grad)


def test_torch_compile_matches_eager():
    case = CASES["bert"]
    tuned = restuning.get_restuning_model(case.model(), ResTuningConfig(mha="res_prefix", ffn="res_adapter"))
    with torch.no_grad():
        for p in tuned.tuners.parameters():
            p.add_(0.05)
        eager = hidden(tuned(**case.inputs()))
        compiled = torch.compile(tuned)
        torch.testing.assert_close(hidden(compiled(**case.inputs())), eager, atol=1e-5, rtol=1e-5)
