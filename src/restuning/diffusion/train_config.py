"""`DiffusionTrainConfig`: one text-to-image fine-tuning run as plain data, read from YAML with every key and
type checked before any work starts. Defaults follow paper Table 11 (AdamW, lr 1e-4 constant, batch 8,
10 epochs, CenterCrop + RandomHorizontalFlip, 512 px)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigBase, from_dict, option, read_yaml
from ..errors import ConfigError
from ..train.config import PRECISIONS, MethodConfig
from .data import SUBJECT_TEMPLATE

SOURCES = ("mnist", "folder", "jsonl")
MODES = ("caption", "subject")


@dataclass
class DiffusionDataConfig(ConfigBase):
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

    source: str = option("mnist", choices=SOURCES)
    path: str | None = None
    resolution: int = option(512, ge=1)
    center_crop: bool = True
    random_flip: bool = True
    mode: str = option("caption", choices=MODES)
    digits: list[int] | None = option(None, choices=tuple(range(10)))
    per_digit: int | None = option(None, ge=1)
    max_items: int | None = option(None, ge=1)
    token: str = "sks"
    class_name: str | None = None
    template: str = SUBJECT_TEMPLATE
    class_path: str | None = None
    class_prompt: str | None = None
    prior_loss_weight: float = option(1.0, gt=0)


@dataclass
class DiffusionOptimConfig(ConfigBase):
    """AdamW at a constant `lr`; `max_steps` (optimizer steps) ends the run before `epochs` do."""

    lr: float = option(1e-4, gt=0)
    weight_decay: float = option(1e-2, ge=0)
    epochs: int = option(10, ge=1)
    max_steps: int | None = option(None, ge=1)
    batch_size: int = option(8, ge=1)
    grad_accum: int = option(1, ge=1)
    max_grad_norm: float | None = option(1.0, gt=0)
    # no | bf16 | fp16: autocast, and the frozen VAE, text encoder and (all methods but `full`) UNet stored in
    # that dtype, as diffusers' training scripts do; trainable weights and the optimizer stay float32.
    mixed_precision: str = option("no", choices=PRECISIONS)


@dataclass
class DiffusionTrainConfig(ConfigBase):
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
    unit: str = option("step", choices=("epoch", "step"))
    log_every: int = option(10, ge=1)
    eval_every: int = option(0, ge=0)
    eval_size: int = option(8, ge=1)
    checkpoint_every: int = option(0, ge=0)

    def validate(self) -> None:
        from ..methods import get_method  # the registry sits above the run config's module

        d = self.data
        get_method(self.method.name, "diffusion").read_options(self.method.config, None, "diffusion")
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
        if d.class_path is not None and d.mode != "subject":
            raise ConfigError("data.class_path: class images (prior preservation) are for data.mode subject")

def load_diffusion_config(path: str | Path, overrides: dict[str, Any] | None = None) -> DiffusionTrainConfig:
    """Read a YAML run config; `overrides` (dotted keys, e.g. {"optim.max_steps": 10}) win."""
    return from_dict(DiffusionTrainConfig, read_yaml(path, overrides))
