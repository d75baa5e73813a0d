"""`DiffusionTrainConfig`: one text-to-image fine-tuning run as plain data, read from YAML with every key and
type checked before any work starts. Defaults follow paper Table 11 (AdamW, lr 1e-4 constant, batch 8,
10 epochs, CenterCrop + RandomHorizontalFlip, 512 px)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigBase, from_dict, option, read_yaml
from ..errors import ConfigError
from ..precision import BACKBONE_DTYPES
from ..train.config import PRECISIONS, MethodConfig, check_backbone_dtype
from .data import SUBJECT_TEMPLATE

SOURCES = ("mnist", "folder", "jsonl")
MODES = ("caption", "subject")


@dataclass
class DiffusionDataConfig(ConfigBase):
    """The captioned images a diffusion run trains on (`data:`)."""

    source: str = option("mnist", choices=SOURCES, help="`mnist` (the shipped MNIST-5k, captioned \"a photo of the "
                         "digit 3\"), `folder` (images with same-named .txt captions) or `jsonl` (`{\"image\": path, "
                         "\"text\": caption}` lines); the last two need `path`")
    path: str | None = option(None, help="the folder or JSONL file of `folder` and `jsonl`")
    resolution: int = option(512, ge=1, help="images are resized (shorter side) and centre-cropped to this square; "
                             "latents are `resolution / 8` for SD (`/ 2` for the tiny pipeline)")
    center_crop: bool = option(True, help="false squashes the image to a square instead of cropping")
    random_flip: bool = option(True, help="mirror each training image with probability 0.5")
    mode: str = option("caption", choices=MODES, help="`caption` (each image's own caption) or `subject` "
                       "(DreamBooth-style: every image is the one subject of this task, prompted `template` with "
                       "`token` and `class_name`; captions are ignored)")
    digits: list[int] | None = option(None, choices=tuple(range(10)), help="MNIST only: which digits (subject mode: "
                                      "exactly one, the task's class); null: all")
    per_digit: int | None = option(None, ge=1, help="MNIST only: images of each digit; null: all")
    max_items: int | None = option(None, ge=1, help="keep the first n images; null: all")
    token: str = option("sks", help="subject mode: the rare token that names the subject")
    class_name: str | None = option(None, help="subject mode: the subject's class, e.g. `dog` (required except on "
                                    "mnist)")
    template: str = option(SUBJECT_TEMPLATE, help="subject mode: the prompt, with `{token}` and `{class_name}`")
    class_path: str | None = option(None, help="subject mode: a folder of images of the subject's class, for "
                                    "DreamBooth's prior-preservation loss (each batch adds as many class images; the "
                                    "loss is the subject's MSE + `prior_loss_weight` x theirs); make them with the "
                                    "base model: `restuning generate --model <base> --prompt \"a photo of dog\" --out "
                                    "DIR`")
    class_prompt: str | None = option(None, help="the class images' prompt; null: `template` without its token")
    prior_loss_weight: float = option(1.0, gt=0, help="weight of the class images' loss (prior preservation)")


@dataclass
class DiffusionOptimConfig(ConfigBase):
    """How a diffusion run optimizes (`optim:`): AdamW at a constant learning rate (paper Table 11)."""

    lr: float = option(1e-4, gt=0, help="AdamW's learning rate (constant)")
    weight_decay: float = option(1e-2, ge=0, help="AdamW's weight decay")
    epochs: int = option(10, ge=1, help="passes over the training images")
    max_steps: int | None = option(None, ge=1, help="optimizer steps that end the run before `epochs` do; null: "
                                   "`epochs` alone")
    batch_size: int = option(8, ge=1, help="images per batch")
    grad_accum: int = option(1, ge=1, help="batches per optimizer step (gradient accumulation)")
    max_grad_norm: float | None = option(1.0, gt=0, help="clip the gradients' total norm to this; null: no "
                                         "clipping")
    mixed_precision: str = option("no", choices=PRECISIONS, help="`no`, `bf16` or `fp16`: autocast, and the frozen "
                                  "VAE, text encoder and (all methods but `full`) UNet stored in that dtype, as "
                                  "diffusers' training scripts do; trainable weights and the optimizer stay float32")


@dataclass
class DiffusionTrainConfig(ConfigBase):
    """One text-to-image run (`restuning diffusion-train --config`). Each field's meaning is its `help`
    (`restuning config` prints them all, as does docs/configuration.md)."""

    model: str = option("tiny", help="`tiny` (a small UNet and VAE built in code with the shipped MiniLM text "
                        "encoder, offline) or a Stable Diffusion v1.x folder in the diffusers layout (or its hub id, "
                        "online)")
    method: MethodConfig = option(default_factory=MethodConfig, help="the training method and its options: `full`, "
                                  "`restuning` (default: Res-Adapters on MHA and FFN of the middle block and decoder, "
                                  "as the paper), `bypass` or `peft_lora` (default: rank 4 on to_q, to_k, to_v, "
                                  "to_out.0 of every attention)")
    backbone_dtype: str = option("float32", choices=BACKBONE_DTYPES, help="how the frozen UNet is held: `float32`, "
                                 "`bfloat16`, or `int8` (its linear and convolution weights int8 weight-only through "
                                 "torchao; it computes in bfloat16; a Stable Diffusion folder's UNet is loaded so, one "
                                 "module at a time); trainable weights and the optimizer stay float32; not for `full`")
    data: DiffusionDataConfig = option(default_factory=DiffusionDataConfig, help="the captioned images")
    optim: DiffusionOptimConfig = option(default_factory=DiffusionOptimConfig, help="the optimizer")
    seed: int = option(0, help="seeds the initialisation, the noise and timesteps, and the batch order")
    output_dir: str = option("runs/diffusion", help="metrics.jsonl, checkpoints and the final weights (`final/`) go "
                             "here; a run started again resumes there if its config is the same")
    unit: str = option("step", choices=("epoch", "step"), help="what `log_every`, `eval_every` and "
                       "`checkpoint_every` count: `step` (optimizer steps) or `epoch`")
    log_every: int = option(10, ge=1, help="units per metrics.jsonl record")
    eval_every: int = option(0, ge=0, help="units between losses on a fixed batch (fixed noise and timesteps, so "
                             "they are comparable); 0: at the start and the end only")
    eval_size: int = option(8, ge=1, help="images in that fixed batch")
    checkpoint_every: int = option(0, ge=0, help="units between resumable checkpoints (`checkpoints/`; a run that "
                                   "checkpoints also does so at its end); 0: none")

    def validate(self) -> None:
        from ..methods import get_method  # the registry sits above the run config's module

        d = self.data
        method = get_method(self.method.name, "diffusion")
        method.read_options(self.method.config, None, "diffusion")
        check_backbone_dtype(self.backbone_dtype, method, "diffusion")
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
