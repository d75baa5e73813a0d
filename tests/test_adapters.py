"""PEFT's habits on a ResTuningModel: named adapters, disable_adapter, mixed batches (adapter_names=),
merge_and_unload, task types, and from_pretrained on a model that already carries tuners."""

from __future__ import annotations

import pytest
import torch
from conftest import _DECODER, CASES, DEPTH, FAMILY_CASES, HEADS, WIDTH, hidden
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

import restuning
from restuning import CheckpointError, ConfigError, ResTuningConfig, ResTuningModel, TunerSpec
from restuning.tasks import task_heads


def _randomise(module: nn.Module, seed: int, std: float = 0.1) -> None:
    """Trained-looking tuner weights (zero-initialised parts included), so every branch changes the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# Every built-in tuner, on every op kind it fits, spread over three adapters.
MIXED_CONFIGS = {
    "a": ResTuningConfig(mha=TunerSpec("res_prefix", dim=3, options={"mode": "exact"}), ffn="ssf"),
    "b": ResTuningConfig(mha=TunerSpec("res_prompt", dim=3), ffn=TunerSpec("lora", dim=2), block="bitfit"),
    "c": ResTuningConfig(mha=TunerSpec("res_prefix", dim=2), ffn=TunerSpec("res_adapter", dim=4),
                         custom={"qv": TunerSpec("lora", dim=2)},
                         target_modules={"qv": r".*\.(q_proj|v_proj|query|value)"}),
}


def _multi(family: str) -> ResTuningModel:
    case = CASES[family]
    tuned = ResTuningModel(case.model(), MIXED_CONFIGS["a"], adapter_name="a")
    for name in ("b", "c"):
        tuned.add_adapter(name, MIXED_CONFIGS[name])
    for i, adapter in enumerate(tuned.adapters.values()):
        _randomise(adapter, i)
    return tuned


def _batch(family: str, n: int = 5) -> dict:
    g = torch.Generator().manual_seed(3)
    if family in ("bert", "clip_text"):
        ids = torch.randint(0, 101, (n, 7), generator=g)
        mask = torch.ones(n, 7, dtype=torch.long)
        mask[1, 4:] = 0
        mask[3, 2:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    return {"pixel_values": torch.randn(n, 3, 16, 16, generator=g)}


# --- named adapters --------------------------------------------------------------------------------
def test_adapters_switch_train_alone_and_delete():
    case = CASES["bert"]
    base = case.model()
    reference = hidden(base(**case.inputs())).detach()
    tuned = restuning.get_restuning_model(base, ResTuningConfig())
    _randomise(tuned.tuners, 0)
    out_default = hidden(tuned(**case.inputs())).detach()
    one_adapter_hooks = _hooks(base)
    tuned.add_adapter("lora", ResTuningConfig(mha=None, ffn=TunerSpec("lora", dim=2)))
    assert tuned.active_adapter == "default" and _hooks(base) == one_adapter_hooks  # added, not attached
    torch.testing.assert_close(hidden(tuned(**case.inputs())), out_default, atol=0, rtol=0)
    trainable = {n.split(".")[1] for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable == {"default"}

    tuned.set_adapter("lora")
    _randomise(tuned.tuners, 1)
    out_lora = hidden(tuned(**case.inputs())).detach()
    assert (out_lora - out_default).abs().max() > 1e-3 and (out_lora - reference).abs().max() > 1e-3
    assert {t.name for t in tuned.tuners.values()} == {"lora"}
    assert {n.split(".")[1] for n, p in tuned.named_parameters() if p.requires_grad} == {"lora"}
    assert _hooks(base) == sum(len(a.handles) for a in tuned._attachments)  # only the active adapter's hooks

    tuned.set_adapter("default")
    torch.testing.assert_close(hidden(tuned(**case.inputs())), out_default, atol=0, rtol=0)
    tuned.delete_adapter("default")  # the active one: the remaining adapter becomes active
    assert list(tuned.adapters) == ["lora"] and tuned.active_adapter == "lora"
    torch.testing.assert_close(hidden(tuned(**case.inputs())), out_lora, atol=0, rtol=0)

    with pytest.raises(ConfigError, match=r"no adapter named 'nope'; this model has \['lora'\]"):
        tuned.set_adapter("nope")
    with pytest.raises(ConfigError, match="an adapter named 'lora' already exists"):
        tuned.add_adapter("lora", ResTuningConfig())
    with pytest.raises(ConfigError, match="only adapter; call unload"):
        tuned.delete_adapter("lora")
    with pytest.raises(ConfigError, match="without '.' or '/'"):
        tuned.add_adapter("a.b", ResTuningConfig())


def test_disable_adapter_is_the_backbone_and_restores_on_exit():
    model = _seq_cls()
    inputs = CASES["bert"].inputs()
    reference = model(**inputs).logits.detach()
    tuned = restuning.get_restuning_model(model, ResTuningConfig(task_type="SEQ_CLS"))
    _randomise(tuned.active, 0)
    tuned_out = tuned(**inputs).logits.detach()
    assert (tuned_out - reference).abs().max() > 1e-3
    with tuned.disable_adapter():
        torch.testing.assert_close(tuned(**inputs).logits, reference, atol=0, rtol=0)  # the backbone's own head too
        assert _hooks(model) == 0
    torch.testing.assert_close(tuned(**inputs).logits, tuned_out, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="inside"), tuned.disable_adapter():
        raise RuntimeError("inside")
    torch.testing.assert_close(tuned(**inputs).logits, tuned_out, atol=0, rtol=0)  # restored after an error too


# --- mixed batches ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "vit", "clip_text"])
def test_mixed_batch_runs_each_sample_through_its_own_adapter(family):
    tuned = _multi(family)
    batch = _batch(family)
    names = ["b", "a", "__base__", "c", "a"]
    alone = {}
    for name in ("a", "b", "c"):
        tuned.set_adapter(name)
        alone[name] = hidden(tuned(**batch)).detach()
    with tuned.disable_adapter():
        alone["__base__"] = hidden(tuned(**batch)).detach()
    assert min((alone[x] - alone[y]).abs().max() for x in alone for y in alone if x < y) > 1e-3  # all differ
    hooks = _hooks(tuned.base_model)
    mixed = hidden(tuned(**batch, adapter_names=names))
    for i, name in enumerate(names):  # equal to float rounding (DESIGN: 1e-5 in float32): a sub-batch's kernels
        torch.testing.assert_close(mixed[i], alone[name][i], atol=1e-5, rtol=0)
    assert _hooks(tuned.base_model) == hooks  # the mixed call left the active adapter as it was
    torch.testing.assert_close(hidden(tuned(**batch)), alone["c"], atol=0, rtol=0)


def test_mixed_batch_routes_the_task_heads_and_trains_each_adapter():
    tuned = restuning.get_restuning_model(_seq_cls(), ResTuningConfig(task_type="SEQ_CLS"))
    tuned.add_adapter("other", ResTuningConfig(mha=None, ffn="ssf", task_type="SEQ_CLS"))
    for i, adapter in enumerate(tuned.adapters.values()):
        _randomise(adapter, i)
    batch = _batch("bert", 4)
    names = ["other", "default", "default", "other"]
    alone = {}
    for name in ("default", "other"):
        tuned.set_adapter(name)
        alone[name] = tuned(**batch).logits.detach()
    mixed = tuned(**batch, adapter_names=names)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed.logits[i], alone[name][i], atol=1e-5, rtol=0)
    tuned.set_adapter("default")
    for adapter in tuned.adapters.values():
        adapter.requires_grad_(True)  # train both adapters at once through one mixed batch
    nn.functional.cross_entropy(tuned(**batch, adapter_names=names).logits, torch.tensor([0, 1, 0, 1])).backward()
    for adapter in tuned.adapters.values():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.saved.parameters())
    assert all(p.grad is None for p in tuned.base_model.parameters())


def test_mixed_batch_errors_name_what_is_wrong():
    from restuning.tuners import TUNERS, ResTuner, register_tuner

    tuned = _multi("bert")
    with pytest.raises(ConfigError, match=r"adapter_names: 3 names, but .* sees a batch of 5; expected one name per"):
        tuned(**_batch("bert"), adapter_names=["a", "b", "c"])
    with pytest.raises(ConfigError, match=r"no adapter named \['z'\]; this model has \['a', 'b', 'c'\]"):
        tuned(**_batch("bert"), adapter_names=["a", "z", "a", "a", "a"])

    @register_tuner("test_batch_mean")
    class BatchMean(ResTuner):  # mixes the samples of a batch: cannot serve a mixed one
        mixed_batch = False

        def __init__(self, ctx, dim):
            super().__init__()
            self.scale = nn.Parameter(torch.zeros(()))

        def forward(self, x, y):
            return self.scale * y.mean(0, keepdim=True).expand_as(y)

    try:
        tuned.add_adapter("mean", ResTuningConfig(mha=None, ffn="test_batch_mean"))
        with pytest.raises(ConfigError, match=r"adapter 'mean' has tuners that cannot serve a mixed batch: "
                                              r"test_batch_mean \(ffn at encoder\.layer\.0\.output\.dense\)"):
            tuned(**_batch("bert"), adapter_names=["a", "mean", "a", "a", "a"])
    finally:
        TUNERS.pop("test_batch_mean")


# The further families (main's discovery): GQA and RoPE (Llama, Qwen2), GPT-2's fused c_attn, DeBERTa-v2's
# relative attention (no exact prefix there), CLIPModel with both towers; the same three adapters as above.
def _family_configs(exact: bool) -> dict[str, ResTuningConfig]:
    mode = {"mode": "exact"} if exact else {}
    qv = {"qv": r".*\.(q_proj|v_proj|query_proj|value_proj|c_attn)"}
    return {
        "a": ResTuningConfig(mha=TunerSpec("res_prefix", dim=3, options=mode), ffn="ssf"),
        "b": ResTuningConfig(mha=TunerSpec("res_prompt", dim=3, options=mode), ffn=TunerSpec("lora", dim=2),
                             block="bitfit"),
        "c": ResTuningConfig(mha=TunerSpec("res_prefix", dim=2), ffn=TunerSpec("res_adapter", dim=4),
                             custom={"qv": TunerSpec("lora", dim=2)}, target_modules=qv),
    }


def _family_batch(family: str, n: int = 5) -> dict:
    g = torch.Generator().manual_seed(3)
    batch = {}
    if "input_ids" in FAMILY_CASES[family].inputs():
        mask = torch.ones(n, 7, dtype=torch.long)
        mask[1, 4:] = 0
        mask[3, 2:] = 0
        batch.update(input_ids=torch.randint(3, 101, (n, 7), generator=g), attention_mask=mask)
    if "pixel_values" in FAMILY_CASES[family].inputs():
        batch["pixel_values"] = torch.randn(n, 3, 16, 16, generator=g)
    return batch


def _mixed_equals_alone(tuned: ResTuningModel, batch: dict, names: list[str], read) -> None:
    alone = {}
    for name in dict.fromkeys(names):
        if name == "__base__":
            with tuned.disable_adapter():
                alone[name] = read(tuned(**batch)).detach()
        else:
            tuned.set_adapter(name)
            alone[name] = read(tuned(**batch)).detach()
    assert min((alone[x] - alone[y]).abs().max() for x in alone for y in alone if x < y) > 1e-3  # all differ
    mixed = read(tuned(**batch, adapter_names=names))
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], alone[name][i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "deberta_v2", "clip_model"])
def test_mixed_batch_on_the_further_families(family):
    case = FAMILY_CASES[family]
    configs = _family_configs(exact=family != "deberta_v2")  # DeBERTa's relative terms refuse the exact modes
    tuned = ResTuningModel(case.model(), configs["a"], adapter_name="a")
    for name in ("b", "c"):
        tuned.add_adapter(name, configs[name])
    for i, adapter in enumerate(tuned.adapters.values()):
        _randomise(adapter, i)
    _mixed_equals_alone(tuned, _family_batch(family), ["b", "a", "__base__", "c", "a"], case.read)


def test_mixed_batch_on_swin_mixes_its_ffn_and_blocks_and_refuses_its_windowed_attention():
    case = FAMILY_CASES["swin"]
    tuned = ResTuningModel(case.model(), ResTuningConfig(mha=None, ffn="ssf", block=TunerSpec("lora", dim=2)),
                           adapter_name="a")
    tuned.add_adapter("b", ResTuningConfig(mha=None, ffn=TunerSpec("res_adapter", dim=3), block="bitfit"))
    tuned.add_adapter("windows", ResTuningConfig(mha=TunerSpec("res_prefix", dim=2), ffn=None))
    for i, adapter in enumerate(tuned.adapters.values()):
        _randomise(adapter, i)
    batch = _family_batch("swin", 4)
    _mixed_equals_alone(tuned, batch, ["b", "a", "__base__", "a"], case.read)
    # the attention runs on the windows of all samples as one batch (4 samples x 4 windows): no name per row
    with pytest.raises(ConfigError, match=r"adapter_names: 4 names, but .*attention.* sees a batch of 16"):
        tuned(**batch, adapter_names=["a", "windows", "a", "a"])


def _causal_lms() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**_DECODER, num_hidden_layers=DEPTH)).eval()
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=WIDTH, n_layer=DEPTH, n_head=HEADS, vocab_size=101, n_positions=32,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                      eos_token_id=2, pad_token_id=0)).eval()
    return {"llama": llama, "gpt2": gpt2}


@pytest.mark.parametrize("decoder", ["llama", "gpt2"])
def test_mixed_batch_through_the_kv_cache_and_generate(decoder):
    """Exact Res-Prefix/Res-Prompt (cached keys, causal mask, left padding) and LoRA/SSF, two adapters in one
    batch: step by step through the cache, and in `generate`, each sample is what its adapter gives alone."""
    configs = _family_configs(exact=True)
    tuned = ResTuningModel(_causal_lms()[decoder], configs["a"], adapter_name="a")
    tuned.add_adapter("b", configs["b"])
    for i, adapter in enumerate(tuned.adapters.values()):
        _randomise(adapter, i, std=0.3)
    ids = torch.randint(3, 101, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    names, real = ["b", "a", "__base__"], mask.bool()
    greedy = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    full, generated = {}, {}
    for name in ("a", "b", "__base__"):
        if name == "__base__":
            with tuned.disable_adapter():
                full[name], generated[name] = tuned(input_ids=ids, attention_mask=mask).logits, tuned.generate(**greedy)
        else:
            tuned.set_adapter(name)
            full[name], generated[name] = tuned(input_ids=ids, attention_mask=mask).logits, tuned.generate(**greedy)
    out = tuned(input_ids=ids[:, :3], attention_mask=mask[:, :3], use_cache=True, adapter_names=names)
    steps, cache = [out.logits], out.past_key_values
    for t in range(3, ids.shape[1]):
        out = tuned(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True,
                    adapter_names=names)
        steps.append(out.logits)
        cache = out.past_key_values
    stepwise = torch.cat(steps, dim=1)
    for i, name in enumerate(names):
        assert (full[name][i] - full["a" if name != "a" else "b"][i])[real[i]].abs().max() > 1e-3
        torch.testing.assert_close(stepwise[i][real[i]], full[name][i][real[i]], atol=1e-5, rtol=0)
    mixed = tuned.generate(**greedy, adapter_names=names)
    assert torch.equal(mixed, torch.stack([generated[name][i] for i, name in enumerate(names)]))
    with pytest.raises(ConfigError, match="adapter_names: 3 names, but .* sees a batch of 6"):
        tuned.generate(**greedy, num_beams=2, adapter_names=names)
    assert not hasattr(ResTuningModel(CASES["bert"].model(), ResTuningConfig()), "generate")  # no LM, no generate


# --- merge_and_unload ------------------------------------------------------------------------------
QV = {"qv": r".*\.(q_proj|v_proj|query|value)"}
FOLDING = {
    "lora": ResTuningConfig(mha=None, ffn=None, custom={"qv": TunerSpec("lora", dim=3)}, target_modules=QV),
    "ssf": ResTuningConfig(mha=None, ffn=None, custom={"qv": TunerSpec("ssf")}, target_modules=QV),
    "bitfit": ResTuningConfig(mha=None, ffn=None, custom={"qv": TunerSpec("bitfit")}, target_modules=QV),
    "all": ResTuningConfig(mha="ssf", ffn="bitfit", custom={"qv": TunerSpec("lora", dim=3)}, target_modules=QV),
}


@pytest.mark.parametrize("family,tuner", [(f, t) for f in ("vit", "bert") for t in FOLDING
                                          if not (f == "vit" and t == "all")])  # ViT's MHA/FFN end in no linear
def test_merge_and_unload_equals_the_tuned_model(family, tuner):
    case = CASES[family]
    base = case.model()
    reference = hidden(base(**case.inputs())).detach()
    tuned = restuning.get_restuning_model(base, FOLDING[tuner])
    _randomise(tuned.tuners, 0)
    expected = hidden(tuned(**case.inputs())).detach()
    assert (expected - reference).abs().max() > 1e-3
    merged = tuned.merge_and_unload()
    assert merged is base and _hooks(merged) == 0
    assert all(p.requires_grad for p in merged.parameters())
    torch.testing.assert_close(hidden(merged(**case.inputs())), expected, atol=1e-5, rtol=0)


def test_merge_folds_into_a_linear_layer_without_bias_and_keeps_the_head():
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), nn.Linear(8, 8, bias=False), nn.Linear(8, 3))
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    config = ResTuningConfig(mha=None, ffn=None, custom={"a": "ssf", "b": "bitfit"},
                             target_modules={"a": ["0"], "b": ["2"]}, modules_to_save=["3"])
    tuned = restuning.get_restuning_model(model, config)
    _randomise(tuned.active, 0)
    expected = tuned(x).detach()
    merged = tuned.merge_and_unload()
    assert merged[0].bias is not None and merged[2].bias is not None  # folded shifts need a bias
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=0)


def test_merge_refuses_tuners_that_cannot_fold_and_changes_nothing():
    case = CASES["bert"]
    config = ResTuningConfig(mha="res_adapter", ffn=TunerSpec("lora", dim=2))
    tuned = restuning.get_restuning_model(case.model(), config)
    _randomise(tuned.tuners, 0)
    expected = hidden(tuned(**case.inputs())).detach()
    with pytest.raises(ConfigError) as err:
        tuned.merge_and_unload()
    text = str(err.value)
    assert "res_adapter (mha at encoder.layer.0.attention.output.dense): not a linear change of a weight" in text
    assert "lora (ffn at encoder.layer.1.output.dense): reads the input of encoder.layer.1.intermediate" in text
    assert "Tuners that fold exactly: lora on a linear layer" in text and "unload()" in text
    torch.testing.assert_close(hidden(tuned(**case.inputs())), expected, atol=0, rtol=0)  # still tuned
    vit = restuning.get_restuning_model(CASES["vit"].model(), ResTuningConfig(mha="ssf", ffn=None))
    with pytest.raises(ConfigError, match=r"ssf \(mha at layers\.0\.attention\): the op ends in a ViTAttention"):
        vit.merge_and_unload()


# --- task types ------------------------------------------------------------------------------------
def _seq_cls() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                        vocab_size=101, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


def _image_cls() -> ViTForImageClassification:
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                               intermediate_size=48, image_size=16, patch_size=4, num_labels=5)).eval()


@pytest.mark.parametrize("build,task,inputs", [(_seq_cls, "SEQ_CLS", "bert"), (_image_cls, "IMAGE_CLS", "vit")])
def test_task_type_trains_saves_and_keeps_the_head(build, task, inputs, tmp_path):
    inputs = CASES[inputs].inputs()
    model = build()
    original = model.classifier.weight.detach().clone()
    config = ResTuningConfig(mha=None, ffn=None, custom={"qv": "ssf"}, target_modules=QV, task_type=task)
    tuned = restuning.get_restuning_model(model, config)
    assert tuned.modules_to_save == ["classifier"]
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert "adapters.default.saved.classifier.weight" in trainable
    assert not any(n.startswith("base_model.") for n in trainable)
    _randomise(tuned.active, 0)
    expected = tuned(**inputs).logits.detach()
    tuned.save_pretrained(tmp_path)
    restored = ResTuningModel.from_pretrained(build(), tmp_path)
    assert restored.restuning_config.task_type == task
    assert "modules_to_save.classifier.weight" in restored.tuner_state_dict()
    torch.testing.assert_close(restored(**inputs).logits, expected, atol=0, rtol=0)
    merged = tuned.merge_and_unload()  # SSF folds; the trained head is kept, as PEFT's merge keeps it
    assert not torch.equal(merged.classifier.weight, original)
    torch.testing.assert_close(merged(**inputs).logits, expected, atol=1e-5, rtol=0)


def test_task_types_name_what_the_model_lacks():
    bare = CASES["bert"].model()
    assert task_heads(bare, "FEATURE_EXTRACTION") == []
    with pytest.raises(ConfigError, match=r"task_type SEQ_CLS: BertModel has no head named classifier or score; "
                                          r"its top-level modules are \['embeddings', 'encoder', 'pooler'\]"):
        restuning.get_restuning_model(bare, ResTuningConfig(task_type="SEQ_CLS"))
    with pytest.raises(ConfigError, match="task_type CAUSAL_LM: BertModel has no language-model head"):
        task_heads(bare, "CAUSAL_LM")
    with pytest.raises(ConfigError, match=r"task_type: expected one of \['SEQ_CLS'.*'IMAGE_CLS'.*got 'seq_cls'"):
        ResTuningConfig(task_type="seq_cls")


def test_causal_lm_task_trains_no_head_as_in_peft():
    from transformers import BertConfig, BertLMHeadModel

    torch.manual_seed(0)
    lm = BertLMHeadModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                    vocab_size=101, is_decoder=True))
    assert lm.get_output_embeddings() is not None and task_heads(lm, "CAUSAL_LM") == []


# --- from_pretrained on a tuned model --------------------------------------------------------------
def test_from_pretrained_unloads_first_only_when_asked_and_never_doubles(tmp_path):
    case = CASES["bert"]
    other = restuning.get_restuning_model(case.model(), ResTuningConfig(mha="res_prefix", ffn=None))
    _randomise(other.tuners, 1)
    saved = hidden(other(**case.inputs())).detach()
    other.save_pretrained(tmp_path / "b")

    backbone = case.model()
    tuned = restuning.get_restuning_model(backbone, ResTuningConfig())
    _randomise(tuned.tuners, 0)
    with pytest.raises(CheckpointError, match="already carries Res-Tuning tuners; call unload.*unload_first=True"):
        ResTuningModel.from_pretrained(backbone, tmp_path / "b")
    for source in (tuned, backbone):  # the wrapper, or the backbone it tunes
        replaced = ResTuningModel.from_pretrained(source, tmp_path / "b", unload_first=True)
        torch.testing.assert_close(hidden(replaced(**case.inputs())), saved, atol=0, rtol=0)
        assert _hooks(backbone) == sum(len(a.handles) for a in replaced._attachments)  # one set, not two
        tuned = replaced
    with pytest.raises(CheckpointError, match="nothing-here: no such folder"):  # a wrong source unloads nothing
        ResTuningModel.from_pretrained(tuned, tmp_path / "nothing-here", unload_first=True)
    torch.testing.assert_close(hidden(tuned(**case.inputs())), saved, atol=0, rtol=0)


def test_save_and_load_several_adapters(tmp_path):
    case = CASES["bert"]
    tuned = _multi("bert")
    expected = {}
    for name in tuned.adapters:
        tuned.set_adapter(name)
        expected[name] = hidden(tuned(**case.inputs())).detach()
    tuned.add_adapter("default", ResTuningConfig(ffn=None))
    _randomise(tuned.adapters["default"], 5)
    tuned.set_adapter("default")
    expected["default"] = hidden(tuned(**case.inputs())).detach()
    tuned.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["a", "b", "c"]
    restored = ResTuningModel.from_pretrained(case.model(), tmp_path)
    for name in ("a", "b", "c"):
        restored.load_adapter(tmp_path / name, name)
    assert not any(p.requires_grad for p in restored.parameters())  # loaded for inference
    for name, out in expected.items():
        restored.set_adapter(name)
        torch.testing.assert_close(hidden(restored(**case.inputs())), out, atol=0, rtol=0)
    with pytest.raises(ConfigError, match="an adapter named 'a' already exists"):
        restored.load_adapter(tmp_path / "a", "a")
    vit = restuning.get_restuning_model(CASES["vit"].model(), ResTuningConfig())
    with pytest.raises(CheckpointError, match="another backbone"):
        vit.load_adapter(tmp_path, "bert")
    assert list(vit.adapters) == ["default"]
