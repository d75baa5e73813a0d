"""The training layer: config checking, data splits, augmentation, the Accelerate loop, resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CASES, tiny_vit_folder
from safetensors.torch import load_file

from restuning import CheckpointError, ConfigError, DataError, RunError, TrainingError
from restuning.bypass.config import BACKBONE_TOKENS
from restuning.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from restuning.cli import main
from restuning.data import LabelledData, few_shot, mnist5k, random_resized_crop, split_indices, text_table, vtab_split
from restuning.methods import load_model, trainable_state
from restuning.train.config import TrainConfig, from_dict, load_config
from restuning.train.evaluate import evaluate_run
from restuning.train.rundir import RunDirectory
from restuning.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


# --- configs -----------------------------------------------------------------------------------
def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,message", [
    ("optim: {epochs: 2, lerning_rate: 0.1}", r"optim.lerning_rate: unknown key; expected some of \["),
    ("optim: {epochs: two}", "optim.epochs: expected int, got str 'two'"),
    ("data: {name: image_folder}", "data.path: data.name 'image_folder' needs a path"),
    ("data: {name: text_table, path: /no/such/file.csv}", "data.path: '/no/such/file.csv' does not exist"),
    ("method: {name: houlsby}", "method.name: expected one of"),
    ("data: {eval_sets: [cifar]}", r"data.eval_sets: expected one of \['mnist', 'digits', 'tweets'\], got 'cifar'"),
    # the method's options are checked here too, before any backbone or data loads
    ("method: {name: restuning, config: {mhaa: res_adapter}}", "method.config.mhaa: unknown key"),
    ("method: {name: restuning, config: {dim: ten}}", "method.config.dim: expected int, got str 'ten'"),
    ("method: {name: bypass, config: {pooling: max}}", r"method.config.pooling: expected one of \['auto'"),
    ("method: {name: lst, config: {temperature: .nan}}", "method.config.temperature: expected a finite number"),
    ("method: {name: bypass, config: {num_classes: 3}}", "method.config.num_classes: set from the data"),
    ("method: {name: linear, config: {dim: 3}}", "linear takes no options"),
    ("optim: {lr: .inf}", "optim.lr: expected a finite number"),
    ("method: {name: peft_lora, config: {r: -3}}", "method.config.r: expected a positive integer"),
    ("method: {name: peft_lora, config: {lora_dropout: .nan}}", "method.config.lora_dropout: expected a finite"),
    ("method: {name: restuning, config: {mha: {name: res_adapter, options: {act: bogus}}}}",
     r"method.config.mha.options.act: tuner 'res_adapter' takes one of \['gelu'"),
    ("method: {name: restuning, config: {mha: {name: res_adapter, options: {scale: .nan}}}}",
     "method.config.mha.options.scale: expected a finite number"),
    ("method: {name: prefix, config: {mha: {name: res_prefix, options: {mode: nonsense}}}}",
     r"mha.options.mode: tuner 'res_prefix' takes one of \['gated', 'exact'\]"),
    ("optim: {max_grad_norm: 0}", "optim.max_grad_norm: expected a number above 0"),
    ("optim: {lr: 0}", "optim.lr: expected a number above 0"),
    ("optim: {weight_decay: -0.1}", "optim.weight_decay: expected at least 0"),
    ("optim: {mixed_precision: fp8}", r"optim.mixed_precision: expected one of \['no', 'bf16', 'fp16'\]"),
    ("seed: [1]", "seed: expected int, got list"),
    ("eval_every: -1", "eval_every: expected at least 0"),
    ("log_every: 0", "log_every: expected a positive integer"),
    ("unit: batch", r"unit: expected one of \['epoch', 'step'\]"),
    ("checkpoint_every: -1", "checkpoint_every: expected at least 0"),
])
def test_bad_configs_stop_before_any_work(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text))


def test_an_unknown_tuner_is_a_clear_error_when_the_config_loads(tmp_path):
    with pytest.raises(ConfigError, match="method.config.mha: unknown tuner 'no_such_tuner'"):
        from_dict(TrainConfig, {"backbone": str(tiny_vit_folder(tmp_path)), "method": {"name": "restuning",
                  "config": {"mha": "no_such_tuner"}}, "data": {"name": "mnist", "image_size": 16}})


def test_yaml_numbers_without_a_dot_are_floats_where_a_float_is_expected(tmp_path):
    config = load_config(_write(tmp_path, "optim: {lr: 1e-3, max_grad_norm: 1}"))  # PyYAML reads 1e-3 as text
    assert config.optim.lr == 0.001 and config.optim.max_grad_norm == 1.0


def test_overrides_and_examples_load():
    paths = [p for p in sorted((ROOT / "examples").glob("*.yaml")) if not p.name.startswith(("diffusion_", "own_"))]
    assert len(paths) >= 4  # the diffusion examples are loaded in test_diffusion.py, own_* (own data: files that
    # the test lays out) in test_config_reference.py
    for path in paths:
        config = load_config(path, {"optim.epochs": 1})
        assert config.optim.epochs == 1 and config.optim.weight_decay == 0.05


# --- data --------------------------------------------------------------------------------------
def test_splits_are_deterministic_for_a_seed_and_differ_across_seeds():
    labels = mnist5k().labels
    a, b, c = few_shot(labels, 4, seed=0), few_shot(labels, 4, seed=0), few_shot(labels, 4, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.bincount(labels[a]).tolist() == [4] * 10
    train, val = vtab_split(5000, seed=3)
    assert len(train) == 800 and len(val) == 200 and not set(train.tolist()) & set(val.tolist())
    tr, te = split_indices(100, 0.2, seed=0)
    assert len(te) == 20 and sorted(tr.tolist() + te.tolist()) == list(range(100))


def test_text_tables_from_csv_and_jsonl(tmp_path):
    (tmp_path / "a.csv").write_text("text,label\ngood,pos\nbad,neg\nfine,pos\n")
    (tmp_path / "a.jsonl").write_text('{"text": "good", "y": 1}\n{"text": "bad", "y": 0}\n')
    csv_data = text_table(tmp_path / "a.csv")
    assert csv_data.classes == ["neg", "pos"] and csv_data.labels.tolist() == [1, 0, 1]
    jsonl = text_table(tmp_path / "a.jsonl", label_column="y")
    assert jsonl.inputs == ["good", "bad"] and jsonl.labels.tolist() == [1, 0]
    with pytest.raises(DataError, match="no column 'label'"):
        text_table(tmp_path / "a.jsonl")


def test_random_resized_crop_is_seeded_and_keeps_shapes():
    images = torch.rand(4, 3, 20, 24)
    a = random_resized_crop(images, 16, torch.Generator().manual_seed(0))
    b = random_resized_crop(images, 16, torch.Generator().manual_seed(0))
    c = random_resized_crop(images, 16, torch.Generator().manual_seed(1))
    assert a.shape == (4, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)


def test_labelled_data_checks_lengths():
    with pytest.raises(ValueError, match="3 inputs but 2 labels"):
        LabelledData(["a", "b", "c"], torch.tensor([0, 1]), ["x", "y"])


# --- the loop ----------------------------------------------------------------------------------
def _config(tmp_path: Path, method: str, top: dict | None = None, **optim) -> TrainConfig:
    return from_dict(TrainConfig, {
        "backbone": str(tiny_vit_folder(tmp_path)), "method": {"name": method},
        "data": {"name": "mnist", "train_size": 96, "test_size": 64, "image_size": 16},
        "optim": {"epochs": 2, "batch_size": 16, "lr": 0.01, "warmup_epochs": 0.5, **optim},
        "output_dir": str(tmp_path / f"run-{method}"), **(top or {}),
    })


def _checkpoint(out: Path) -> Path:
    """The run's current (newest) resumable checkpoint."""
    checkpoint = RunDirectory(out, main=False).latest_checkpoint()
    assert checkpoint is not None, f"no checkpoint in {out}"
    return checkpoint


@pytest.mark.parametrize("method", ["linear", "full", "restuning", "bypass", "lst", "dtl_plus", "peft_lora", "bitfit"])
def test_every_method_trains_and_writes_its_files(tmp_path, method):
    config = _config(tmp_path, method)
    result = Trainer(config, progress=False).run()
    out = Path(config.output_dir)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and 0.0 <= result["test_accuracy"] <= 1.0
    assert records[1]["train_loss"] < records[0]["train_loss"]
    assert sorted(p.name for p in (out / "final").iterdir()) == sorted(
        [CONFIG_NAME, WEIGHTS_NAME, "train_config.json", "classes.json"])  # one checkpoint format for all
    assert _checkpoint(out).name == "step-00000012"
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "a temporary folder was left behind"
    # final/ rebuilds the same classifier from a fresh backbone, without the training data
    assert evaluate_run(out)["test_accuracy"] == result["test_accuracy"]
    if method == "linear":  # a finished run started again trains no more and reports its last record
        assert Trainer(config, progress=False).run() == result
        assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_a_run_killed_mid_epoch_and_resumed_ends_like_an_uninterrupted_one(tmp_path, grad_accum, capsys):
    steps = {"unit": "step", "log_every": 3, "eval_every": 0, "checkpoint_every": 2}  # mid-epoch checkpoints
    whole = _config(tmp_path / "a", "restuning", steps, grad_accum=grad_accum)
    expected = Trainer(whole, progress=False).run()
    resumed = _config(tmp_path / "b", "restuning", steps, grad_accum=grad_accum)
    assert Trainer(resumed, progress=False).run(stop_after_batches=5) == {"stopped": True}  # killed in epoch 1
    state = torch.load(_checkpoint(Path(resumed.output_dir)) / "state.pt", weights_only=True)
    assert (state["epoch"], state["batch"]) == (0, 4)
    with open(Path(resumed.output_dir) / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "train_lo')  # a record cut short by the kill: dropped on resume
    capsys.readouterr()
    result = Trainer(resumed, progress=False).run()
    assert f"resuming {resumed.output_dir} from checkpoints/step-0000000{4 // grad_accum}: in epoch 1 after batch 4" \
        in capsys.readouterr().err
    assert result["test_accuracy"] == expected["test_accuracy"]
    assert result["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-6)
    a = load_file(str(Path(whole.output_dir) / "final" / WEIGHTS_NAME))
    b = load_file(str(Path(resumed.output_dir) / "final" / WEIGHTS_NAME))
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-6)
    logged = [json.loads(x)["step"] for x in (Path(resumed.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(3, 12 // grad_accum + 1, 3))


def test_a_damaged_checkpoint_is_refused_clearly(tmp_path):
    config = _config(tmp_path, "linear")
    assert Trainer(config, progress=False).run(stop_after_batches=7) == {"stopped": True}  # after epoch 1's
    (_checkpoint(Path(config.output_dir)) / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="checkpoint cannot be read.*remove it"):
        Trainer(config, progress=False).run()


def test_a_diverging_run_stops_keeps_its_last_good_checkpoint_and_can_go_on_with_a_lower_lr(tmp_path):
    config = _config(tmp_path, "restuning", lr=1000.0)
    out = Path(config.output_dir)
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at epoch 2, batch 2.*step-00000006, is kept"):
        Trainer(config, progress=False).run()  # was: exit 0 with every tensor of final/ NaN
    assert not (out / "final").exists() and _checkpoint(out).name == "step-00000006"
    assert all(torch.isfinite(t).all() for t in load_file(str(_checkpoint(out) / "trainable.safetensors")).values())
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x, parse_constant=lambda c: pytest.fail(c))["epoch"] for x in lines] == [1]
    config.optim.lr = 0.01
    with pytest.raises(RunError, match="optim.lr: saved 1000.0, new 0.01"):
        Trainer(config, progress=False).run()
    result = Trainer(config, progress=False, allow_changes=("optim.lr",)).run()
    assert result["epoch"] == 2 and math.isfinite(result["train_loss"])


def test_a_finished_run_given_another_backbone_is_refused_before_it_loads(tmp_path, monkeypatch):
    import restuning.train.trainer as trainer_module

    config = _config(tmp_path, "linear")
    Trainer(config, progress=False).run()
    config.backbone = str(tiny_vit_folder(tmp_path / "other"))
    monkeypatch.setattr(trainer_module, "load_backbone", lambda name: pytest.fail("loaded the backbone"))
    with pytest.raises(RunError, match=rf"differs in:\n  backbone: saved '{tiny_vit_folder(tmp_path)}', new "
                                       rf"'{config.backbone}'\n"):
        Trainer(config, progress=False).run()  # was: the old run's result


def test_an_unusable_output_dir_is_refused_before_the_backbone_loads(tmp_path, monkeypatch):
    import restuning.train.trainer as trainer_module

    config = _config(tmp_path, "linear")
    Path(config.output_dir).mkdir()
    (Path(config.output_dir) / "checkpoints").write_text("not a folder")
    monkeypatch.setattr(trainer_module, "load_backbone", lambda name: pytest.fail("loaded the backbone"))
    with pytest.raises(RunError, match="checkpoints: restuning keeps the resumable checkpoints folder here"):
        Trainer(config, progress=False)


def test_cli_train_refuses_a_changed_config_unless_allowed(tmp_path, capsys):
    import yaml

    config = _config(tmp_path, "linear")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert main(["train", "--config", str(path), "--no-progress"]) == 0
    assert main(["train", "--config", str(path), "--no-progress"]) == 0  # finished: its last record again
    assert "the run is finished" in capsys.readouterr().err
    more = ["train", "--config", str(path), "--no-progress", "--set", "optim.epochs=3"]
    assert main(more) == 2
    assert "optim.epochs: saved 2, new 3" in (err := capsys.readouterr().err) and "--allow-change optim.epochs" in err
    assert main([*more, "--allow-change", "optim.epochs"]) == 0
    assert json.loads(capsys.readouterr().out)["epoch"] == 3
    out = Path(config.output_dir)
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert json.loads((out / "run_config.json").read_text())["optim"]["epochs"] == 3


def test_bypass_training_uses_the_feature_cache_and_matches_training_without(tmp_path):
    trainer = Trainer(_config(tmp_path, "bypass"), progress=False)
    assert trainer._feature_cache() is not None
    cached = trainer.run()
    uncached = _config(tmp_path / "direct", "bypass")
    uncached.feature_cache = False  # recompute the backbone at every step instead
    direct = Trainer(uncached, progress=False)
    assert direct._feature_cache() is None
    recomputed = direct.run()
    assert cached["train_loss"] == pytest.approx(recomputed["train_loss"], rel=1e-5)
    assert cached["test_accuracy"] == recomputed["test_accuracy"]
    augmented = _config(tmp_path / "aug", "bypass")
    augmented.data.augment = True
    assert Trainer(augmented, progress=False)._feature_cache() is None  # random crops: never cached


def test_a_reinjecting_bypass_trains_on_the_live_backbone_and_is_served_beside_shared_tasks(tmp_path):
    from restuning.train.task_table import TaskTable

    config = _config(tmp_path, "bypass")
    config.method.config = {"reinject": 1}
    trainer = Trainer(config, progress=False)
    assert trainer._feature_cache() is None  # its last block runs again on the bypass state: no cache
    result = trainer.run()
    plain = _config(tmp_path, "bypass", {"output_dir": str(tmp_path / "plain")})
    Trainer(plain, progress=False).run()
    table = TaskTable(config.backbone)
    table.add("reinject", config.output_dir)
    table.add("plain", plain.output_dir)
    assert not table.tasks["reinject"].shared and table.tasks["plain"].shared
    assert evaluate_run(config.output_dir)["test_accuracy"] == result["test_accuracy"]


def test_the_task_table_chunks_its_shared_forward_as_its_first_shared_run_did(tmp_path):
    from restuning.train.finished import open_run
    from restuning.train.task_table import Query, TaskTable

    chunked = _config(tmp_path, "bypass")
    chunked.method.config = {"backbone_batch": 2, "backbone_tokens": 64}
    Trainer(chunked, progress=False).run()
    plain = _config(tmp_path, "bypass", {"output_dir": str(tmp_path / "plain")})
    Trainer(plain, progress=False).run()
    table = TaskTable(chunked.backbone)
    table.add("chunked", chunked.output_dir)
    table.add("plain", plain.output_dir)  # joins the shared forward, which keeps the first run's chunks
    assert (table.multi.backbone_batch, table.multi.backbone_tokens) == (2, 64)
    calls = []
    table.multi.base_model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    images = torch.rand(5, 3, 16, 16)
    answers = table.answer([Query(["chunked", "plain"], images)])[0]
    assert len(calls) == 3  # 2 + 2 + 1 images
    for name, path in (("chunked", chunked.output_dir), ("plain", plain.output_dir)):
        finished = open_run(path)
        with torch.no_grad():
            expected = finished.model(finished.backbone()).eval()(**table.encode(images))
        torch.testing.assert_close(answers[name], expected, atol=1e-5, rtol=0)
    second = TaskTable(plain.backbone)
    second.add("plain", plain.output_dir)
    assert (second.multi.backbone_batch, second.multi.backbone_tokens) == (None, BACKBONE_TOKENS)


def test_a_feature_cache_on_disk_trains_as_the_one_in_memory_and_is_reused(tmp_path):
    in_memory = Trainer(_config(tmp_path / "memory", "bypass"), progress=False).run()
    config = _config(tmp_path / "disk", "bypass")
    config.feature_cache_dir = str(tmp_path / "cache")
    on_disk = Trainer(config, progress=False).run()
    assert on_disk["train_loss"] == pytest.approx(in_memory["train_loss"], rel=1e-6)
    assert on_disk["test_accuracy"] == in_memory["test_accuracy"]
    stored = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert "cache.json" in stored and any(n.startswith("shard-") and n.endswith(".safetensors") for n in stored)
    again = _config(tmp_path / "again", "bypass")
    again.feature_cache_dir = config.feature_cache_dir
    trainer = Trainer(again, progress=False)
    assert trainer._feature_cache() is not None and trainer.feature_store.status == "loaded"  # the store reused


@pytest.mark.parametrize("method", ["restuning", "full", "bypass"])
def test_two_processes_end_with_identical_weights_and_one_checkpoint(tmp_path, method):
    """`torchrun --nproc_per_node 2` on CPU (gloo): both ranks hold the same weights; rank 0 writes (the bypass
    run also its feature cache on disk, which the other rank then loads)."""
    config = _config(tmp_path, method)
    if method == "bypass":
        config.feature_cache_dir = str(tmp_path / "cache")
    config_path = tmp_path / "run.json"
    config_path.write_text(json.dumps(config.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         {"restuning": "29533", "full": "29537", "bypass": "29541"}[method],
         str(Path(__file__).with_name("ddp_worker.py")), str(config_path), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) > 0
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name
    out = Path(config.output_dir)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "final", "metrics.jsonl", "run_config.json"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # written by rank 0 only
    saved = trainable_state(load_model(CASES["vit"].model(), out / "final", trainable=True))
    assert all(torch.equal(saved[n], v) for n, v in ranks[0].items())
    if method == "bypass":  # the store on disk is whole: no temporary file of a second writer left beside it
        stored = sorted(p.name for p in (tmp_path / "cache").iterdir())
        assert "cache.json" in stored and not [n for n in stored if n.endswith(".tmp")], stored
        assert any(n.startswith("shard-") for n in stored), stored


def test_image_folders_train(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for name in ("cat", "dog"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(6):
            pixels = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")
    config = _config(tmp_path, "bypass")
    config.data = from_dict(type(config.data), {"name": "image_folder", "path": str(tmp_path / "images"),
                                                 "image_size": 16, "test_size": 4})
    trainer = Trainer(config, progress=False)
    assert trainer.data.train.classes == ["cat", "dog"] and trainer.data.train.inputs.shape[1:] == (3, 16, 16)
    assert len(trainer.data.train) == 8 and len(trainer.data.test) == 4
    assert 0.0 <= trainer.run()["test_accuracy"] <= 1.0


def test_bf16_and_gradient_accumulation(tmp_path, fresh_accelerate_state):
    config = _config(tmp_path, "restuning", mixed_precision="bf16", grad_accum=2)
    result = Trainer(config, progress=False).run()
    records = [json.loads(x) for x in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in records)
    assert 0.0 <= result["test_accuracy"] <= 1.0


def test_predict_serves_several_runs_and_plot_draws_them(tmp_path):
    from restuning import ResTuningBypassModel
    from restuning.train.backbones import load_backbone
    from restuning.train.plot import plot_runs
    from restuning.train.predict import predict

    runs = []
    for seed in (0, 1):
        config = _config(tmp_path / f"s{seed}", "bypass")
        config.seed, config.backbone = seed, str(tiny_vit_folder(tmp_path))  # one backbone for both tasks
        Trainer(config, progress=False).run()
        runs.append(Path(config.output_dir))
    images = mnist5k().inputs[:6]
    answers = predict(runs, images=images, image_size=16)
    for run in runs:
        backbone = load_backbone(str(tiny_vit_folder(tmp_path)))
        alone = ResTuningBypassModel.from_pretrained(backbone.model, run / "final")
        data = LabelledData(images, torch.zeros(6, dtype=torch.long), ["?"])
        expected = alone(**backbone.encode(data, 16, 32)).argmax(-1).tolist()
        assert answers[str(run)] == [str(i) for i in expected]
    png = plot_runs(runs, tmp_path / "fig.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vtab_validation_split_holds_out_a_fifth_of_the_training_examples(tmp_path):
    from restuning.train.backbones import load_backbone
    from restuning.train.trainer import load_data

    config = _config(tmp_path, "linear")
    whole = load_data(config, load_backbone(config.backbone))
    config.data.validation = True
    tuned = load_data(config, load_backbone(config.backbone))
    assert len(tuned.train) == 77 and len(tuned.test) == 19  # 96 examples: 80% / 20%
    rows = {x.numpy().tobytes() for x in whole.train.inputs}
    both = torch.cat([tuned.train.inputs, tuned.test.inputs])
    assert len({x.numpy().tobytes() for x in both}) == 96 and all(x.numpy().tobytes() in rows for x in both)


def test_hugging_face_datasets_from_local_files(tmp_path):
    import datasets

    from restuning.data import hf_dataset

    rows = {"sentence": ["good", "bad", "fine", "awful"], "label": [1, 0, 1, 0]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    saved = hf_dataset(tmp_path / "saved", text_column="sentence")
    assert saved.inputs == rows["sentence"] and saved.labels.tolist() == rows["label"]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n"
                                                 for t, y in zip(rows["sentence"], rows["label"], strict=True)))
    from_json = hf_dataset(tmp_path / "rows.jsonl")
    assert from_json.inputs == rows["sentence"] and from_json.classes == ["0", "1"]
