"""Generative tasks on a tiny pipeline built in code (UNet + VAE, the shipped MiniLM as text encoder):
image-caption data, text-to-image training with the epsilon loss for every method, PLMS sampling with
per-sample seeds, multi-task bypass sampling, and Frechet distances (FD-DINOv2 on real MNIST digits)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from restuning import BypassConfig, ConfigError, RunError  # noqa: E402
from restuning.cli import main  # noqa: E402
from restuning.diffusion.bypass import UNetBypassModel, UNetMultiTaskBypass  # noqa: E402
from restuning.diffusion.data import (  # noqa: E402
    DataError,
    caption_folder,
    caption_jsonl,
    mnist_captions,
    random_flip,
    square,
)
from restuning.diffusion.generate import generate, load_multitask  # noqa: E402
from restuning.diffusion.metrics import (  # noqa: E402
    DinoV2Features,
    FIDUnavailable,
    InceptionFeatures,
    fid,
    frechet_distance,
    frechet_distance_from_stats,
)
from restuning.diffusion.pipeline import tiny_pipeline  # noqa: E402
from restuning.diffusion.train import load_captioned, load_run, train_diffusion  # noqa: E402
from restuning.diffusion.train_config import DiffusionTrainConfig, load_diffusion_config  # noqa: E402
from restuning.train.config import from_dict  # noqa: E402

EXAMPLES = Path(__file__).parent.parent / "examples"
STEPS = 3  # PLMS steps in sampling tests


def run_config(tmp_path: Path, method: str, **data) -> DiffusionTrainConfig:
    return from_dict(DiffusionTrainConfig, {
        "method": {"name": method}, "output_dir": str(tmp_path / method), "log_every": 4,
        "data": {"digits": [3, 5], "per_digit": 8, "resolution": 16, **data},
        "optim": {"lr": 3e-3, "batch_size": 4, "max_steps": 12},
    })


def write_png(path: Path, height: int, width: int, value: int) -> None:
    from PIL import Image

    Image.new("RGB", (width, height), (value, 255 - value, 0)).save(path)


# --- data ------------------------------------------------------------------------------------------
def test_caption_folder_and_jsonl(tmp_path):
    for i, (h, w) in enumerate([(20, 30), (16, 16), (40, 24)]):
        write_png(tmp_path / f"im{i}.png", h, w, 40 * i)
        (tmp_path / f"im{i}.txt").write_text(f"caption {i}\n")
    data = caption_folder(tmp_path, 16)
    images, captions = data.batch([0, 1, 2])
    assert images.shape == (3, 3, 16, 16) and captions == ["caption 0", "caption 1", "caption 2"]
    assert 0 <= images.min() and images.max() <= 1
    lines = [json.dumps({"image": f"im{i}.png", "text": f"json {i}"}) for i in range(3)]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    assert caption_jsonl(tmp_path / "data.jsonl", 8).batch([2])[1] == ["json 2"]
    (tmp_path / "im1.txt").unlink()
    with pytest.raises(DataError, match=r"im1.png: no caption; expected im1.txt"):
        caption_folder(tmp_path, 16)
    (tmp_path / "bad.jsonl").write_text('{"image": "im0.png"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: expected"):
        caption_jsonl(tmp_path / "bad.jsonl", 16)


def test_center_crop_and_flip():
    image = torch.zeros(1, 8, 16)
    image[:, :, 4:12] = 1  # the centre 8 columns are white
    assert torch.equal(square(image, 8), torch.ones(3, 8, 8))
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float).view(2, 3, 4, 4)
    flipped = random_flip(images, torch.Generator().manual_seed(0), p=1.0)
    assert torch.equal(flipped, images.flip(-1))
    assert torch.equal(random_flip(images, torch.Generator().manual_seed(0), p=0.0), images)


def test_mnist_captions_and_subject_mode(tmp_path):
    data = mnist_captions(16, digits=[3, 5], per_digit=2)
    assert sorted(data.captions) == ["a photo of the digit 3"] * 2 + ["a photo of the digit 5"] * 2
    image, _ = data[0]
    assert image.shape == (3, 16, 16)
    config = run_config(tmp_path, "bypass", mode="subject", digits=[7])
    subject = load_captioned(config)
    assert len(subject) == 8 and set(subject.captions) == {"a photo of sks digit"}


def test_prior_preservation_adds_class_images_with_the_class_prompt(tmp_path):
    """Subject mode with `class_path`: each batch is the subject's images then as many class images prompted
    "a photo of digit", and the loss is MSE(subject) + prior_loss_weight x MSE(class) (DreamBooth)."""
    from restuning.diffusion.train import DiffusionTrainer, diffusion_loss

    class_dir = tmp_path / "class"
    class_dir.mkdir()
    for i in range(3):
        write_png(class_dir / f"{i}.png", 20, 20, 60 * i)
    config = run_config(tmp_path, "bypass", mode="subject", digits=[7], class_path=str(class_dir),
                        prior_loss_weight=0.5)
    trainer = DiffusionTrainer(config, progress=False, components=tiny_pipeline(0))
    seen = {}

    def spy(sample, timesteps, text):  # the denoiser's inputs; predicts zero noise
        seen.update(sample=sample, text=text)
        return torch.zeros_like(sample)

    loss = trainer.batch_loss(spy, torch.tensor([0, 1, 2, 3]), epoch=0, batch=0)
    comps = trainer.components
    assert seen["sample"].shape[0] == 8
    # The same batch of prompts encoded at once (a batch of another size may round differently).
    expected = comps.encode_prompts(["a photo of sks digit"] * 4 + ["a photo of digit"] * 4)
    assert torch.equal(seen["text"], expected) and not torch.allclose(expected[0], expected[4])
    # With a zero prediction each half's MSE is its noise's mean square: the weights must show in the sum.
    noise = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    latents, timesteps = torch.zeros_like(noise), torch.zeros(8, dtype=torch.long)
    weighted = diffusion_loss(spy, comps.noise_scheduler, latents, seen["text"], noise, timesteps, 0.5)
    assert weighted.item() == pytest.approx(noise[:4].square().mean().item() + 0.5 * noise[4:].square().mean().item())
    assert torch.isfinite(loss)
    result = trainer.run()  # and it trains
    assert torch.isfinite(torch.tensor(result["train_loss"]))
    with pytest.raises(ConfigError, match="class_path: class images"):
        run_config(tmp_path, "bypass", class_path=str(class_dir))  # caption mode
    missing = run_config(tmp_path / "other", "bypass", mode="subject", digits=[7], class_path=str(tmp_path / "none"))
    with pytest.raises(DataError, match="no such folder"):
        DiffusionTrainer(missing, progress=False, components=tiny_pipeline(0))


def test_config_errors(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: {name: restuning}\ndata: {resolution: 16}\n")
    assert load_diffusion_config(path, {"optim.max_steps": 3}).optim.max_steps == 3
    with pytest.raises(ConfigError, match="optim.lrate: unknown key"):
        load_diffusion_config(path, {"optim.lrate": 1.0})
    with pytest.raises(ConfigError, match="method.name: expected one of"):
        load_diffusion_config(path, {"method.name": "dreambooth"})
    with pytest.raises(ConfigError, match="exactly one digit"):
        load_diffusion_config(path, {"data.mode": "subject", "data.digits": [1, 2]})
    with pytest.raises(ConfigError, match="data.path: data.source 'folder' needs a path"):
        load_diffusion_config(path, {"data.source": "folder"})
    with pytest.raises(ConfigError, match="optim.batch_size: expected int"):
        load_diffusion_config(path, {"optim.batch_size": "8"})
    assert DiffusionTrainConfig().optim.lr == 1e-4 and DiffusionTrainConfig().optim.batch_size == 8  # Table 11


# --- training --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["restuning", "bypass", "peft_lora", "full"])
def test_training_lowers_the_loss_and_saves_loadable_weights(tmp_path, method):
    components = tiny_pipeline(0)
    frozen = {n: p.clone() for part in (components.vae, components.text_encoder) for n, p in part.state_dict().items()}
    unet_before = {n: p.clone() for n, p in components.unet.state_dict().items()}
    config = run_config(tmp_path, method)
    result = train_diffusion(config, progress=False, components=components)
    # The same fixed batch (images, noise, timesteps) before and after 12 steps.
    assert result["eval_loss"] < 0.97 * result["eval_loss_start"], result
    assert all(torch.equal(p, frozen[n]) for part in (components.vae, components.text_encoder)
               for n, p in part.state_dict().items())
    if method in ("restuning", "bypass"):  # the UNet's own weights never change
        assert all(torch.equal(p, unet_before[n]) for n, p in components.unet.state_dict().items())
    records = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 4, 8, 12] and "train_loss" in records[1]
    # final/ rebuilds the tuned denoiser on a fresh base model: same prediction.
    fresh, loaded, saved_config = load_run(config.output_dir)
    assert saved_config == config
    g = torch.Generator().manual_seed(0)
    sample, text = torch.randn(2, 4, 8, 8, generator=g), fresh.encode_prompts(["a", "b"])
    timestep = torch.tensor([10, 700])
    trained = tiny_pipeline(0)  # same base weights as `fresh`
    with torch.no_grad():
        got = generate_noise(loaded, sample, timestep, text)
        base = generate_noise(trained.unet, sample, timestep, text)
    assert (got - base).abs().max() > 1e-4  # the loaded weights are the trained ones, not the base
    assert result["trainable_params"] > 0


def generate_noise(model, sample, timestep, text):
    out = model(sample, timestep, text)
    return out if isinstance(out, torch.Tensor) else out.sample


def test_fixed_batch_loss_is_reproducible(tmp_path):
    from restuning.diffusion.train import fixed_batch, fixed_batch_loss

    components = tiny_pipeline(0)
    data = load_captioned(run_config(tmp_path, "full"))
    losses = [fixed_batch_loss(components.unet, components.noise_scheduler, fixed_batch(components, data, 4, 1))
              for _ in range(2)]
    assert losses[0] == losses[1] and 0.5 < losses[0] < 2


# --- sampling --------------------------------------------------------------------------------------
def test_generate_shapes_and_batch_independence(tmp_path):
    components = tiny_pipeline(0)
    prompts = ["a photo of the digit 3", "a photo of the digit 5", "a photo of the digit 7"]
    together = generate(components, prompts, seeds=[4, 5, 6], steps=STEPS, out_dir=tmp_path / "png")
    assert together.shape == (3, 3, 16, 16) and 0 <= together.min() and together.max() <= 1
    alone = generate(components, prompts[1:2], seeds=[5], steps=STEPS)
    chunked = generate(components, prompts, seeds=[4, 5, 6], steps=STEPS, batch_size=2)
    assert (together[1] - alone[0]).abs().max() < 1e-5 and (together - chunked).abs().max() < 1e-5
    assert (together[0] - together[1]).abs().max() > 1e-3  # different seeds, different images
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["0000.png", "0001.png", "0002.png",
                                                                      "prompts.jsonl"]
    unguided = generate(components, prompts[:1], seeds=[4], steps=STEPS, guidance=1.0)
    assert (unguided[0] - together[0]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="multiples of 2"):
        generate(components, prompts, steps=STEPS, height=15)


def _bypass_task(unet, seed: int) -> UNetBypassModel:
    """A bypass task with weights moved off zero, so that tasks give visibly different images."""
    model = UNetBypassModel(unet, BypassConfig())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.task.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_multitask_generation_equals_each_task_alone():
    components = tiny_pipeline(0)
    first, second = _bypass_task(components.unet, 1), _bypass_task(components.unet, 2)
    multi = UNetMultiTaskBypass(components.unet, {"first": first, "second": second})
    prompts = ["a photo of the digit 1", "a photo of the digit 2", "a photo of the digit 3"]
    mixed = generate(components, prompts, denoiser=multi, task_ids=["first", "second", "first"], seeds=[0, 1, 2],
                     steps=STEPS)
    alone_first = generate(components, [prompts[0], prompts[2]], denoiser=first, seeds=[0, 2], steps=STEPS)
    alone_second = generate(components, prompts[1:2], denoiser=second, seeds=[1], steps=STEPS)
    assert (mixed[[0, 2]] - alone_first).abs().max() < 1e-5
    assert (mixed[1] - alone_second[0]).abs().max() < 1e-5
    other = generate(components, prompts[1:2], denoiser=first, seeds=[1], steps=STEPS)
    assert (other[0] - alone_second[0]).abs().max() > 1e-3  # the routing matters


# --- the command line ------------------------------------------------------------------------------
def test_cli_subject_runs_multitask_generate_and_fd(tmp_path, capsys):
    example = str(EXAMPLES / "diffusion_mnist_bypass_subject.yaml")
    runs = []
    for digit in (3, 7):
        runs.append(str(tmp_path / f"run{digit}"))
        assert main(["diffusion-train", "--config", example, "--no-progress", "--set", f"data.digits=[{digit}]",
                     "--set", "data.per_digit=8", "--set", "optim.max_steps=3", "--set", f"output_dir={runs[-1]}",
                     "--set", "optim.batch_size=4"]) == 0
    out = tmp_path / "samples"
    assert main(["generate", "--run", runs[0], "--run", runs[1], "--prompt", "a photo of sks digit",
                 "--num-per-prompt", "2", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [r["task"] for r in records] == ["task0", "task0", "task1", "task1"]
    # The multi-task images are those of each run alone.
    components, multi, names = load_multitask(runs)
    for i, run in enumerate(runs):
        single_components, single, _ = load_run(run)
        alone = generate(single_components, ["a photo of sks digit"], denoiser=single, seeds=[2 * i], steps=2)
        mixed = generate(components, ["a photo of sks digit"], denoiser=multi, task_ids=[names[i]], seeds=[2 * i],
                         steps=2)
        assert (alone - mixed).abs().max() < 1e-5
    for source in (["--run", runs[0]], ["--model", "tiny"]):
        assert main(["generate", *source, "--prompt", "a", "--prompt", "b", "--steps", "2", "--out",
                     str(tmp_path / source[0]), "--no-progress"]) == 0
        assert len(list((tmp_path / source[0]).glob("*.png"))) == 2
    assert main(["generate", "--run", runs[0], "--model", "tiny", "--prompt", "a"]) == 2
    capsys.readouterr()
    assert main(["fd", "--generated", str(out), "--reference", str(out), "--size", "28"]) == 0
    assert json.loads(capsys.readouterr().out)["fd_dinov2"] < 1e-3
    assert main(["fd", "--generated", str(out), "--reference", str(out), "--features", "inception"]) == 2
    assert "FID needs local Inception-v3 weights" in capsys.readouterr().err
    assert main(["diffusion-train", "--config", example, "--set", "optim.lrate=1"]) == 2
    assert "optim.lrate: unknown key" in capsys.readouterr().err


# --- metrics ---------------------------------------------------------------------------------------
def test_frechet_distance_basics():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=g)
    assert abs(frechet_distance(x, x)) < 1e-8
    distances = [frechet_distance(x, x + shift) for shift in (0.5, 1.0, 2.0)]
    assert distances == sorted(distances) and distances[0] > 0
    assert abs(distances[1] - 6.0) < 1e-6  # a shift of 1 in 6 dimensions, same covariance: |d mu|^2 = 6


def test_frechet_distance_closed_form():
    g = torch.Generator().manual_seed(1)
    dtype = torch.float64
    a, b = torch.randn(5, 5, generator=g, dtype=dtype), torch.randn(5, 5, generator=g, dtype=dtype)
    cov1, cov2 = a @ a.T + 0.1 * torch.eye(5, dtype=dtype), b @ b.T + 0.1 * torch.eye(5, dtype=dtype)
    mu1, mu2 = torch.randn(5, generator=g, dtype=dtype), torch.randn(5, generator=g, dtype=dtype)
    # tr sqrt(C1 C2) from the eigenvalues of the (non-symmetric) product: an independent route.
    cross = torch.linalg.eigvals(cov1 @ cov2).real.sqrt().sum()
    expected = (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * cross
    assert abs(frechet_distance_from_stats(mu1, cov1, mu2, cov2) - expected.item()) < 1e-9
    # Diagonal covariances: sum (sqrt(s1) - sqrt(s2))^2 + |d mu|^2.
    s1, s2 = torch.tensor([1.0, 4.0, 9.0], dtype=dtype), torch.tensor([4.0, 1.0, 1.0], dtype=dtype)
    zero = torch.zeros(3, dtype=dtype)
    assert abs(frechet_distance_from_stats(zero, s1.diag(), zero + 1, s2.diag()) - (3 + 1 + 1 + 4)) < 1e-9
    # Samples from those Gaussians approach the closed form.
    n = 20000
    x = torch.randn(n, 3, generator=g, dtype=dtype) * s1.sqrt()
    y = torch.randn(n, 3, generator=g, dtype=dtype) * s2.sqrt() + 1
    assert abs(frechet_distance(x, y) - 9.0) < 0.3


def test_fd_dinov2_on_real_digits():
    from restuning.data.shipped import mnist5k

    data = mnist5k()
    ones, zeros = data.inputs[data.labels == 1], data.inputs[data.labels == 0]
    extractor = DinoV2Features(size=56)
    a, b, c = extractor(ones[:5]), extractor(ones[5:10]), extractor(zeros[:5])
    assert a.shape == (5, 384) and torch.isfinite(a).all()
    assert frechet_distance(a, b) < frechet_distance(a, c)  # same digit closer than another digit


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script/load: what FID files are
def test_fid_needs_local_inception(tmp_path, monkeypatch):
    monkeypatch.delenv("RESTUNING_INCEPTION", raising=False)
    with pytest.raises(FIDUnavailable, match="FID needs local Inception-v3 weights"):
        InceptionFeatures()
    torch.save({"weight": torch.zeros(2)}, tmp_path / "state.pth")
    with pytest.raises(FIDUnavailable, match="not a TorchScript file"):
        InceptionFeatures(tmp_path / "state.pth")

    class Pool(torch.nn.Module):  # a stand-in feature extractor: per-channel means and maxima (6-d)
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1)

    torch.jit.script(Pool()).save(str(tmp_path / "pool.pt"))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 16, 16, generator=g)
    assert fid(images, images, tmp_path / "pool.pt") < 1e-8
    assert fid(images, images * 0.5, tmp_path / "pool.pt") > 1e-3


@pytest.mark.parametrize("method", ["bypass", "restuning", "peft_lora", "full"])
def test_bf16_mixed_precision_stores_the_frozen_unet_in_bf16_and_trains_in_float32(tmp_path, method,
                                                                                   fresh_accelerate_state):
    """With `mixed_precision: bf16` a frozen UNet is kept in bf16 (half its bytes) while the trainable weights
    and AdamW's state stay float32; `full` trains the UNet, so it stays float32 under autocast."""
    from restuning.diffusion.train import DiffusionTrainer

    components = tiny_pipeline(0)
    unet_before = {n: p.clone() for n, p in components.unet.state_dict().items()}
    base = run_config(tmp_path, method).to_dict()
    base["optim"]["mixed_precision"] = "bf16"
    trainer = DiffusionTrainer(from_dict(DiffusionTrainConfig, base), progress=False, components=components)
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    frozen = [p for p in trainer.model.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    if method == "full":
        assert not frozen
    else:
        assert frozen and all(p.dtype == torch.bfloat16 for p in components.unet.parameters() if not p.requires_grad)
    result = trainer.run()
    assert result["eval_loss"] < result["eval_loss_start"], result
    if method != "full":  # the stored bf16 weights are the fp32 ones rounded, and never change
        for n, p in components.unet.state_dict().items():
            if n in unet_before and p.dtype == torch.bfloat16:
                assert torch.equal(p, unet_before[n].to(torch.bfloat16)), n


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    from restuning.diffusion.train import DiffusionTrainer

    def config(name: str, **extra) -> DiffusionTrainConfig:
        base = run_config(tmp_path, "restuning").to_dict()
        base["optim"]["max_steps"] = 8
        return from_dict(DiffusionTrainConfig, {**base, "output_dir": str(tmp_path / name), **extra})

    straight = DiffusionTrainer(config("straight"), progress=False, components=tiny_pipeline(0))
    straight.run()
    killed = config("killed", checkpoint_every=4)
    assert DiffusionTrainer(killed, progress=False, components=tiny_pipeline(0)).run(stop_after_batches=6)["stopped"]
    resumed = DiffusionTrainer(killed, progress=False, components=tiny_pipeline(0))
    result = resumed.run()
    assert result["step"] == 8
    expected, got = straight.trainable(), resumed.trainable()
    assert expected.keys() == got.keys() and all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)
    def records(name: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    # The records of the steps after the checkpoint (5, 6) were dropped and written again: the same log as
    # the uninterrupted run's, the start loss once.
    assert [r["step"] for r in records("killed")] == [r["step"] for r in records("straight")] == [0, 4, 8]
    for a, b in zip(records("killed"), records("straight")):
        for key in ("train_loss", "eval_loss"):
            assert (key in a) == (key in b) and a.get(key, 0) == pytest.approx(b.get(key, 0), rel=1e-6)
    # Started again, a finished run trains no more and returns its last record.
    assert DiffusionTrainer(killed, progress=False, components=tiny_pipeline(0)).run() == result
    assert len(records("killed")) == 3
    # Without checkpoints too, a finished run started again trains no more and writes nothing (it used to
    # start over, replacing metrics.jsonl and final/).
    out = tmp_path / "straight"
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    again = DiffusionTrainer(config("straight"), progress=False, components=tiny_pipeline(0))
    assert again.run() == records("straight")[-1]
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()} == before
    # Another config in a finished run's folder is refused, naming what differs.
    changed = config("straight").to_dict()
    changed["optim"]["lr"] = 1e-3
    with pytest.raises(RunError, match=r"differs in:\n  optim.lr: saved 0.003, new 0.001\n"):
        DiffusionTrainer(from_dict(DiffusionTrainConfig, changed), progress=False, components=tiny_pipeline(0)).run()
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()} == before


def test_sd_folder_layout_round_trip(tmp_path):
    """`load_sd` reads the Stable Diffusion folder layout (here written from the tiny pipeline, whose text
    encoder is MiniLM rather than CLIP: the Auto classes load either)."""
    from restuning.diffusion.pipeline import load_sd, save_sd

    components = tiny_pipeline(0)
    save_sd(components, tmp_path / "sd")
    loaded = load_sd(tmp_path / "sd", max_length=components.max_length)
    assert loaded.noise_scheduler.config.beta_schedule == "scaled_linear" and loaded.scaling_factor == 0.18215
    prompts = ["a photo of the digit 3"]
    assert torch.allclose(loaded.encode_prompts(prompts), components.encode_prompts(prompts), atol=1e-6)
    assert (generate(loaded, prompts, steps=2) - generate(components, prompts, steps=2)).abs().max() < 1e-5
    shutil.rmtree(tmp_path / "sd" / "scheduler")
    with pytest.raises(ConfigError, match=r"missing \['scheduler'\]"):
        load_sd(tmp_path / "sd")


def test_diffusion_examples_load():
    paths = sorted(EXAMPLES.glob("diffusion_*.yaml"))
    assert len(paths) == 2
    for path in paths:
        config = load_diffusion_config(path, {"optim.epochs": 1})
        assert config.optim.epochs == 1 and config.optim.batch_size == 8  # paper Table 11's batch


def test_tiny_pipelines_do_not_share_a_mutable_text_encoder():
    """Moving one pipeline's frozen parts (to a device or a lower dtype, as mixed precision does) leaves
    the next pipeline built in the same process as it was."""
    first = tiny_pipeline(0).to("cpu", torch.bfloat16)
    second = tiny_pipeline(0)
    assert next(first.text_encoder.parameters()).dtype == torch.bfloat16
    assert second.text_encoder is not first.text_encoder
    assert next(second.text_encoder.parameters()).dtype == torch.float32
    assert second.encode_prompts(["a photo of the digit 3"]).dtype == torch.float32


@pytest.mark.parametrize("extra", [["--steps", "0"], ["--num-per-prompt", "0"], ["--batch-size", "-1"],
                                   ["--height", "15"], ["--prompts-file", "/nonexistent/prompts.txt"]])
def test_cli_generate_bad_arguments_are_clear_errors(tmp_path, capsys, extra):
    assert main(["generate", "--model", "tiny", "--prompt", "a", "--out", str(tmp_path / "png"), "--no-progress",
                 *extra]) == 2
    assert "generate: " in capsys.readouterr().err
    assert not (tmp_path / "png").exists()


def test_peft_lora_denoiser_alpha_follows_its_rank():
    pytest.importorskip("peft")
    from restuning.diffusion.pipeline import tiny_unet
    from restuning.diffusion.train import build_denoiser

    for options, scaling in (({}, 1.0), ({"r": 8}, 1.0), ({"r": 8, "lora_alpha": 4}, 0.5)):
        model = build_denoiser("peft_lora", tiny_unet(), options)
        scales = {m.scaling["default"] for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)}
        assert scales == {scaling}, options


@pytest.mark.parametrize("method", [
    ["--set", "method.name=peft_lora", "--set", "method.config={target_modules: [no_such_module]}"],
    ["--set", "method.config={mha: null, ffn: null, xattn: res_adapter, layers: [99]}"],
])
def test_cli_diffusion_train_bad_methods_are_clear_errors(tmp_path, capsys, method):
    example = str(EXAMPLES / "diffusion_mnist_restuning.yaml")
    assert main(["diffusion-train", "--config", example, "--no-progress", "--set", f"output_dir={tmp_path}",
                 *method]) == 2
    assert "diffusion-train: " in capsys.readouterr().err


def test_cli_generate_from_a_damaged_run_is_a_clear_error(tmp_path, capsys):
    config = DiffusionTrainConfig(output_dir=str(tmp_path))
    config.method.name = "bypass"
    (tmp_path / "final" / "weights").mkdir(parents=True)
    (tmp_path / "final" / "train_config.json").write_text(json.dumps(config.to_dict()))
    assert main(["generate", "--run", str(tmp_path), "--prompt", "a", "--out", str(tmp_path / "png")]) == 2
    assert "generate: " in capsys.readouterr().err
