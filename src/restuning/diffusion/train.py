"""Text-to-image fine-tuning of a latent diffusion UNet with the noise-prediction (epsilon) loss, run by the
same `restuning.train.loop.TrainingLoop` (Hugging Face Accelerate) as classification.

One step: images -> frozen VAE -> latents * scaling factor; captions -> frozen text encoder; noise and a
timestep per sample; the DDPM forward process `q(z_t | z_0)`; loss = MSE(model(z_t, t, text), noise).
The model is the UNet itself (`full`), the UNet with Res-Tuners (`restuning`), a Res-Tuning-Bypass
(`bypass`) or PEFT's LoRA (`peft_lora`); only its trainable parameters are optimised and saved.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import from_dict
from ..errors import ConfigError
from ..methods import get_method, load_model, save_model
from ..precision import set_backbone_dtype
from ..train.loop import FINAL, LoopSettings, TrainingLoop
from .data import (
    CaptionedImages,
    caption_folder,
    caption_jsonl,
    class_prompt,
    mnist_captions,
    random_flip,
    subject_prompt,
    to_signed,
)
from .pipeline import SDComponents, load_components
from .train_config import DiffusionTrainConfig

RUN_CONFIG = "train_config.json"  # in final/, beside the method's checkpoint


# --- data ----------------------------------------------------------------------------------------
def load_captioned(config: DiffusionTrainConfig) -> CaptionedImages:
    """The run's images and captions (subject mode: one templated prompt for all)."""
    d = config.data
    if d.source == "mnist":
        data = mnist_captions(d.resolution, d.digits, d.per_digit)
    elif d.source == "folder":
        data = caption_folder(d.path, d.resolution, d.center_crop, need_captions=d.mode == "caption")
    else:
        data = caption_jsonl(d.path, d.resolution, d.center_crop)
    data.center_crop = d.center_crop
    if d.max_items is not None:
        data = CaptionedImages(data.images[: d.max_items], data.captions[: d.max_items], data.resolution,
                               data.center_crop)
    if d.mode == "subject":
        data = data.with_captions(subject_prompt(d.token, d.class_name or "digit", d.template))
    return data


def load_class_images(config: DiffusionTrainConfig) -> CaptionedImages | None:
    """Subject mode's class images for the prior-preservation loss, all with the class prompt; None without."""
    d = config.data
    if d.class_path is None:
        return None
    images = caption_folder(d.class_path, d.resolution, d.center_crop, need_captions=False)
    return images.with_captions(d.class_prompt or class_prompt(d.class_name or "digit", d.template))


# --- methods ---------------------------------------------------------------------------------------
def build_denoiser(method: str, unet: nn.Module, options: dict[str, Any]) -> nn.Module:
    """The trainable model around `unet` for registered `method`; called as `model(sample, timestep,
    text_states)`."""
    entry = get_method(method, "diffusion")
    return entry.build(unet, entry.read_options(options, None, "diffusion"), None)


def upcast_trainable(model: nn.Module) -> nn.Module:
    """Trainable parameters to float32, the optimizer's master copy (and what a GradScaler unscales); frozen
    ones keep their dtype. Tuners are built in float32 beside a low-precision UNet already (`trainable_dtype`);
    this also covers a method whose own modules are not (full fine-tuning trains the UNet's weights)."""
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def predicted_noise(output: Any) -> torch.Tensor:
    """A denoiser's output as a tensor: diffusers' `UNet2DConditionOutput.sample`, a tuple's first item, or
    the tensor itself (the bypass returns one)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, tuple):
        return output[0]
    raise TypeError(f"denoiser returned {type(output).__name__}; expected a tensor or an object with .sample")


def load_run(run_dir: str | Path) -> tuple[SDComponents, nn.Module, DiffusionTrainConfig]:
    """A finished run: its base components (rebuilt from the config), the tuned denoiser and the config."""
    final = Path(run_dir) / FINAL
    config_path = final / RUN_CONFIG
    if not config_path.is_file():
        raise ConfigError(f"{run_dir}: not a finished diffusion run (no {FINAL}/{RUN_CONFIG})")
    config = from_dict(DiffusionTrainConfig, json.loads(config_path.read_text()))
    components = load_components(config.model, unet_dtype=config.backbone_dtype)
    return components, load_model(components.unet, final), config


# --- the loss --------------------------------------------------------------------------------------
def diffusion_loss(model: nn.Module, noise_scheduler, latents: torch.Tensor, text: torch.Tensor,
                   noise: torch.Tensor, timesteps: torch.Tensor, prior_weight: float | None = None) -> torch.Tensor:
    """MSE between the predicted and the true noise of `z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) noise`.
    latents, noise: (B, C, h, w); text: (B, T, D); timesteps: (B,) ints in [0, num_train_timesteps).
    With `prior_weight` the second half of the batch is class images (DreamBooth's prior preservation):
    MSE(first half) + prior_weight x MSE(second half)."""
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = predicted_noise(model(noisy, timesteps, text)).float()
    if prior_weight is None:
        return F.mse_loss(prediction, noise.float())
    instance, prior = prediction.chunk(2)
    instance_noise, prior_noise = noise.float().chunk(2)
    return F.mse_loss(instance, instance_noise) + prior_weight * F.mse_loss(prior, prior_noise)


def fixed_batch(components: SDComponents, data: CaptionedImages, size: int, seed: int,
                device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The first `size` images (no flip) with fixed latents, noise and evenly spread timesteps: the same
    loss problem at every evaluation, so losses before and after training compare."""
    g = torch.Generator().manual_seed(seed)
    images, captions = data.batch(range(min(size, len(data))))
    latents = components.encode_images(to_signed(images).to(device), g)
    steps = components.noise_scheduler.config.num_train_timesteps
    return {"latents": latents, "text": components.encode_prompts(captions),
            "noise": torch.randn(latents.shape, generator=g).to(latents),
            "timesteps": torch.linspace(0, steps - 1, len(images)).round().long().to(latents.device)}


@torch.no_grad()
def fixed_batch_loss(model: nn.Module, noise_scheduler, batch: dict[str, torch.Tensor]) -> float:
    return diffusion_loss(model, noise_scheduler, **batch).item()


# --- the run -------------------------------------------------------------------------------------
class DiffusionTrainer(TrainingLoop):
    """One text-to-image run of `config`: `run()` trains and writes `metrics.jsonl` (a record every
    `log_every` `unit`s, optimizer steps by default, the fixed-batch loss every `eval_every`), resumable
    checkpoints every `checkpoint_every` (`checkpoints/`), and `final/` (the method's checkpoint, which
    `restuning.methods.load_model` opens, and `train_config.json`)."""

    def __init__(self, config: DiffusionTrainConfig, progress: bool = True,
                 components: SDComponents | None = None, allow_changes: tuple[str, ...] = ()):
        o = config.optim
        method = get_method(config.method.name, "diffusion")
        self.config, self.method = config, method  # before the loop opens the folder: it checks the config
        self.components = components
        super().__init__(LoopSettings(
            output_dir=config.output_dir, seed=config.seed, epochs=o.epochs, batch_size=o.batch_size, lr=o.lr,
            weight_decay=o.weight_decay, grad_accum=o.grad_accum, mixed_precision=o.mixed_precision,
            schedule="constant", max_steps=o.max_steps, max_grad_norm=o.max_grad_norm, unit=config.unit,
            log_every=config.log_every, eval_every=config.eval_every, checkpoint_every=config.checkpoint_every,
            find_unused_parameters=method.trains_backbone, allow_changes=tuple(allow_changes)), progress)

    def setup(self) -> None:
        config, method, o = self.config, self.method, self.config.optim
        self.components = self.components or load_components(config.model, unet_dtype=config.backbone_dtype)
        half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(o.mixed_precision)
        if half is not None and not method.trains_backbone and config.backbone_dtype == "float32":
            self.components.unet.to(dtype=half)  # frozen: stored in half precision, as the VAE and text encoder
        self.components.to(self.accelerator.device, half)  # cast before the move: no float32 copy on the device
        set_backbone_dtype(self.components.unet, config.backbone_dtype)
        self.data = load_captioned(config)
        self.class_images = load_class_images(config)
        self.num_examples = len(self.data)
        torch.manual_seed(config.seed)
        self.model = upcast_trainable(method.build(self.components.unet, method.read_options(
            config.method.config, None, "diffusion"), None))
        self.evaluation = fixed_batch(self.components, self.data, config.eval_size, config.seed,
                                      self.accelerator.device)
        self.start_loss: float | None = None

    def run_config(self) -> dict[str, Any]:
        return self.config.to_dict()

    def batch_loss(self, model: nn.Module, index: torch.Tensor, epoch: int, batch: int) -> torch.Tensor:
        """Images -> latents, captions -> text states, a noise and a timestep per sample, from a generator
        seeded by the batch's place in the run (so a resumed run draws the same). With class images, as many
        of them (drawn at random) follow the subject's, for the prior-preservation loss."""
        comps, acc = self.components, self.accelerator
        g = torch.Generator().manual_seed(hash((self.config.seed, acc.process_index, epoch, batch)) % 2**31)
        images, captions = self.data.batch(index)
        prior_weight = None
        if self.class_images is not None:
            class_images, class_captions = self.class_images.batch(
                torch.randint(len(self.class_images), (len(index),), generator=g))
            images, captions = torch.cat([images, class_images]), captions + class_captions
            prior_weight = self.config.data.prior_loss_weight
        if self.config.data.random_flip:
            images = random_flip(images, g)
        latents = comps.encode_images(to_signed(images).to(acc.device), g)
        text = comps.encode_prompts(captions)
        noise = torch.randn(latents.shape, generator=g).to(latents)
        timesteps = torch.randint(0, comps.noise_scheduler.config.num_train_timesteps, (len(images),),
                                  generator=g).to(acc.device)
        return diffusion_loss(model, comps.noise_scheduler, latents, text, noise, timesteps, prior_weight)

    def evaluate(self) -> dict[str, float]:
        with self.accelerator.autocast():  # as training: with mixed precision the frozen UNet is half
            return {"eval_loss": fixed_batch_loss(self.unwrapped, self.components.noise_scheduler, self.evaluation)}

    def start_record(self) -> dict[str, Any]:
        record = self.evaluate()
        self.start_loss = record["eval_loss"]
        return record

    def run_state(self) -> dict[str, Any]:
        return {"start_loss": self.start_loss}

    def load_run_state(self, state: dict[str, Any]) -> None:
        self.start_loss = state.get("start_loss")

    def summary(self) -> dict[str, Any]:
        return {"method": self.config.method.name, "model": self.config.model, "eval_loss_start": self.start_loss,
                **super().summary(), "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}

    def write_final(self, directory: Path) -> None:
        """The method's checkpoint (`restuning.methods.load_model` opens it on the base UNet) and the run config."""
        save_model(self.unwrapped, self.config.method.name, self.config.method.config, None, self.components.unet,
                   directory, task="diffusion")
        (directory / RUN_CONFIG).write_text(json.dumps(self.config.to_dict(), indent=2))


def train_diffusion(config: DiffusionTrainConfig, progress: bool = True, components: SDComponents | None = None,
                    allow_changes: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train `config` and return the final record (fixed-batch loss before and after, trainable params);
    `allow_changes`: see `TrainingLoop.run`."""
    return DiffusionTrainer(config, progress, components, allow_changes).run()
