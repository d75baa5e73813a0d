"""`DiffusionTrainConfig`: one text-to-image fine-tuning run as plain data, read from YAML with every key and
type checked before any work starts. Defaults follow paper Table 11 (AdamW, lr 1e-4 constant, batch 8,
10 epochs, CenterCrop + RandomHorizontalFlip, 512 px)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..train.config import MethodConfig, from_dict, read_yaml, require_positive
from .data import SUBJECT_TEMPLATE

METHODS = ("full", "restuning", "bypass", "peft_lora")
SOURCES = ("mnist", "folder", "jsonl")
MODES = ("caption", "subject")


@dataclass
class DiffusionDataConfig:
    """Args:
        source: `mnist` (the shipped MNIST-5k, captioned "a photo of the digit 3"), `folder` (images with
            same-named .txt captions) or `jsonl` (`{"image": path, "text": caption}` lines); the last two
            need `path`.
        resolution: images are resized (shorter side) and centre-cropped to this square; latents are
            `resolution / 8` for SD (`/ 2` for the tiny pipeline).
        center_crop: `false` squashes the image to a square instead of cropping.
        random_flip: mirror each training image with probability 0.5.
        mode: `caption` (each image's own caption) or `subject` (DreamBooth-style: every image is the one
            subject of this task, prompted `template` with `token` and `class_name`; captions are ignored).
        digits, per_digit: MNIST only: which digits (subject mode: exactly one, the task's class) and how
            many images of each.
        max_items: keep the first n images.
        class_path: subject mode only: a folder of images of the subject's class, for DreamBooth's
            prior-preservation loss (each batch adds as many class images, prompted "a photo of dog", and
            the loss is the subject's MSE + `prior_loss_weight` x the class images' MSE). DreamBooth makes
            them with the base model: `restuning generate --model <base> --prompt "a photo of dog" --out DIR`.
        class_prompt: the class images' prompt; default: `template` without its token.
    """

    source: str = "mnist"
    path: str | None = None
    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = True
    mode: str = "caption"
    digits: list[int] | None = None
    per_digit: int | None = None
    max_items: int | None = None
    token: str = "sks"
    class_name: str | None = None
    template: str = SUBJECT_TEMPLATE
    class_path: str | None = None
    class_prompt: str | None = None
    prior_loss_weight: float = 1.0


@dataclass
class DiffusionOptimConfig:
    """AdamW at a constant `lr`; `max_steps` (optimizer steps) ends the run before `epochs` do."""

    lr: float = 1e-4
    weight_decay: float = 1e-2
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    # no | bf16 | fp16: autocast, and the frozen VAE, text encoder and (all methods but `full`) UNet stored in
    # that dtype, as diffusers' training scripts do; trainable weights and the optimizer stay float32.
    mixed_precision: str = "no"


@dataclass
class DiffusionTrainConfig:
    """Args:
        model: `tiny` (a small UNet and VAE built in code with the shipped MiniLM text encoder, offline) or
            a Stable Diffusion v1.x folder in the diffusers layout (or its hub id, online).
        method: `full`, `restuning` (`ResTuningConfig` fields; default: Res-Adapters on MHA and FFN of the
            middle block and decoder, as the paper), `bypass` (`BypassConfig` fields) or `peft_lora`
            (`peft.LoraConfig` fields; default rank 4 on to_q, to_k, to_v, to_out.0 of every attention).
        output_dir: metrics.jsonl, checkpoints and the final weights (`final/`) go here (see
            `restuning.train.rundir`); a run started again resumes there if its config is the same.
        unit: `step` (optimizer steps) or `epoch`: what `log_every`, `eval_every` and `checkpoint_every`
            count.
        log_every: units per metrics.jsonl record.
        eval_every: units between losses on a fixed batch (fixed noise and timesteps, so they are
            comparable); 0: at the start and the end only.
        eval_size: images in that fixed batch.
        checkpoint_every: units between resumable checkpoints (`output_dir/checkpoints`; a run started
            again goes on from there; a run that checkpoints also does so at its end); 0: none.
    """

    model: str = "tiny"
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DiffusionDataConfig = field(default_factory=DiffusionDataConfig)
    optim: DiffusionOptimConfig = field(default_factory=DiffusionOptimConfig)
    seed: int = 0
    output_dir: str = "runs/diffusion"
    unit: str = "step"
    log_every: int = 10
    eval_every: int = 0
    eval_size: int = 8
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        d, o = self.data, self.optim
        if self.method.name not in METHODS:
            raise ConfigError(f"method.name: expected one of {METHODS}, got {self.method.name!r}")
        if d.source not in SOURCES:
            raise ConfigError(f"data.source: expected one of {SOURCES}, got {d.source!r}")
        if d.mode not in MODES:
            raise ConfigError(f"data.mode: expected one of {MODES}, got {d.mode!r}")
        # Paths are read (and missing ones reported) when a run loads its data, not here: a finished run's
        # config must still load (`generate`, `load_run`) after its training images are gone.
        if d.source != "mnist":
            if not d.path:
                raise ConfigError(f"data.path: data.source {d.source!r} needs a path")
            if d.digits is not None or d.per_digit is not None:
                raise ConfigError("data.digits / data.per_digit: only for data.source mnist")
        if d.mode == "subject":
            if d.source == "mnist" and (d.digits is None or len(d.digits) != 1):
                raise ConfigError(f"data.digits: subject mode on mnist takes exactly one digit (one class per "
                                  f"task), got {d.digits!r}")
            if d.source != "mnist" and not d.class_name:
                raise ConfigError("data.class_name: subject mode needs the subject's class, e.g. dog")
        if d.class_path is not None:
            if d.mode != "subject":
                raise ConfigError("data.class_path: class images (prior preservation) are for data.mode subject")
            if d.prior_loss_weight <= 0:
                raise ConfigError(f"data.prior_loss_weight: expected a positive number, got {d.prior_loss_weight!r}")
        require_positive({"data.resolution": d.resolution, "optim.epochs": o.epochs, "optim.batch_size": o.batch_size,
                          "optim.grad_accum": o.grad_accum, "log_every": self.log_every, "eval_size": self.eval_size})
        require_positive({"optim.max_steps": o.max_steps, "data.per_digit": d.per_digit,
                          "data.max_items": d.max_items}, optional=True)
        if self.unit not in ("epoch", "step"):
            raise ConfigError(f"unit: expected epoch or step, got {self.unit!r}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every: expected 0 (none) or more, got {self.checkpoint_every!r}")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every: expected 0 (start and end only) or more, got {self.eval_every!r}")
        if o.lr <= 0 or o.weight_decay < 0:
            raise ConfigError(f"optim.lr must be positive and optim.weight_decay not negative, got {o.lr!r}, "
                              f"{o.weight_decay!r}")
        if o.max_grad_norm is not None and o.max_grad_norm <= 0:
            raise ConfigError(f"optim.max_grad_norm: expected a positive number or null, got {o.max_grad_norm!r}")
        if o.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"optim.mixed_precision: expected no, bf16 or fp16, got {o.mixed_precision!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_diffusion_config(path: str | Path, overrides: dict[str, Any] | None = None) -> DiffusionTrainConfig:
    """Read a YAML run config; `overrides` (dotted keys, e.g. {"optim.max_steps": 10}) win."""
    return from_dict(DiffusionTrainConfig, read_yaml(path, overrides))
