"""The parts of a latent text-to-image diffusion model: UNet, VAE, text encoder + tokenizer, noise schedules.

`load_sd(folder)` reads a Stable Diffusion v1.5 folder (or hub id, online); `tiny_pipeline(seed)` builds a
small UNet and VAE in code around the shipped MiniLM text encoder, for tests and demos that run offline.
The VAE and the text encoder are always frozen; only the UNet (or what is attached to it) trains.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError

# Stable Diffusion v1.x training noise schedule (its scheduler/scheduler_config.json).
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
TINY = "tiny"


@dataclass
class SDComponents:
    """A UNet (trainable or tuned), a frozen VAE and text encoder, the tokenizer and the DDPM schedule.

    `max_length`: tokens per prompt (77 for SD's CLIP); prompts are padded to it, as SD does.
    """

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    noise_scheduler: Any  # diffusers.DDPMScheduler (training); sampling builds a PNDMScheduler from its config
    max_length: int
    name: str = TINY

    def __post_init__(self) -> None:
        for frozen in (self.vae, self.text_encoder):
            frozen.requires_grad_(False).eval()

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def to(self, device: torch.device | str, frozen_dtype: torch.dtype | None = None) -> SDComponents:
        """Move all parts to `device`; the frozen VAE and text encoder may take a lower `frozen_dtype`."""
        self.unet.to(device)
        for frozen in (self.vae, self.text_encoder):
            frozen.to(device) if frozen_dtype is None else frozen.to(device=device, dtype=frozen_dtype)
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """N prompts -> text states (N, max_length, text width), the UNet's `encoder_hidden_states`."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts: expected a list of strings, got {prompts!r:.200}")
        batch = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        device = self.device
        kwargs = {"input_ids": batch["input_ids"].to(device)}
        if "attention_mask" in batch and not _is_clip(self.text_encoder):  # CLIP is causal: SD passes no mask
            kwargs["attention_mask"] = batch["attention_mask"].to(device)
        return self.text_encoder(**kwargs)[0]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latents (B, C, H/f, W/f), sampled and multiplied by the VAE's
        scaling factor (f = `vae_scale_factor`)."""
        _check_images(images, "images", signed=True)
        vae_dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode(images.to(self.device, vae_dtype)).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32).to(dist.mean)
        return (dist.mean + dist.std * noise) * self.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, h*f, w*f) in [0, 1], float32."""
        vae_dtype = next(self.vae.parameters()).dtype
        images = self.vae.decode(latents.to(vae_dtype) / self.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)


def _is_clip(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", "").startswith("clip")


def _check_images(images: Any, name: str, signed: bool) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name}: expected a (B, 3, H, W) tensor, got {shape}")
    low = -1.0 if signed else 0.0
    if images.min() < low - 1e-3 or images.max() > 1 + 1e-3:
        raise ValueError(f"{name}: expected values in [{low:g}, 1], got [{images.min():.3g}, {images.max():.3g}]")


def ddpm_scheduler(config: dict[str, Any] | None = None):
    """The training schedule: DDPM over 1000 steps with SD's scaled-linear betas 0.00085..0.012."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**{**SD_SCHEDULE, "clip_sample": False, **(config or {})})


def pndm_scheduler(noise_scheduler):
    """The sampling schedule: PNDM (PLMS only, `skip_prk_steps=True`, as SD's default pipeline) on the same
    betas as the training schedule; a fresh one per sampling run (it keeps the past steps' noises)."""
    from diffusers import PNDMScheduler

    betas = {k: noise_scheduler.config[k] for k in SD_SCHEDULE}
    return PNDMScheduler(**betas, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)


def load_sd(folder: str | Path, dtype: torch.dtype = torch.float32, max_length: int | None = None,
            unet_dtype: str = "float32") -> SDComponents:
    """A Stable Diffusion v1.x model in the diffusers folder layout (`unet/`, `vae/`, `text_encoder/`,
    `tokenizer/`, `scheduler/`), e.g. a local copy of `runwayml/stable-diffusion-v1-5` (or that hub id when
    online). The text encoder and tokenizer load through the Auto classes (CLIP for SD). `dtype` applies to the
    frozen VAE and text encoder; the UNet is held in `unet_dtype` (a `backbone_dtype`: float32 for training it;
    bfloat16 or int8 for a frozen one, built held module by module from a local safetensors file, so that its
    float32 weights are never all in memory). `max_length`: tokens per prompt (default: the tokenizer's, capped
    by the encoder's positions; 77 for SD)."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import AutoModel, AutoTokenizer

    source = str(folder)
    if Path(source).exists():
        parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
        missing = [s for s in parts if not (Path(source) / s).is_dir()]
        if missing:
            raise ConfigError(f"{source}: not a Stable Diffusion folder, missing {missing} "
                              "(expected unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer")
        text_encoder = AutoModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype)
        unet = _load_unet(source, unet_dtype)
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
        if noise_scheduler.config.prediction_type != "epsilon":  # training and sampling predict the noise
            raise ConfigError(f"{source}: the scheduler predicts {noise_scheduler.config.prediction_type!r}; "
                              "restuning trains and samples epsilon-prediction models (Stable Diffusion v1.x)")
    except OSError as err:
        raise ConfigError(f"model: cannot load a Stable Diffusion model from {source!r}: {err}") from err
    positions = getattr(text_encoder.config, "max_position_embeddings", tokenizer.model_max_length)
    length = max_length or min(tokenizer.model_max_length, positions)
    return SDComponents(unet, vae, text_encoder, tokenizer, noise_scheduler, length, source)


def _load_unet(source: str, dtype: str) -> nn.Module:
    from diffusers import UNet2DConditionModel

    from ..precision import SafetensorsWeights, build_held, set_backbone_dtype

    weights = Path(source) / "unet" / "diffusion_pytorch_model.safetensors"
    if dtype != "float32" and weights.is_file():
        config = UNet2DConditionModel.load_config(source, subfolder="unet")
        unet = build_held(lambda: UNet2DConditionModel.from_config(config), dtype, SafetensorsWeights(weights))
        unet.register_to_config(_name_or_path=source)
        return unet.eval()  # as from_pretrained returns it
    low = torch.bfloat16 if dtype != "float32" else torch.float32  # a hub id, or sharded / .bin weights
    return set_backbone_dtype(UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=low), dtype)


def save_sd(components: SDComponents, folder: str | Path) -> None:
    """Write `components` in the Stable Diffusion folder layout that `load_sd` reads (the UNet as it is)."""
    folder = Path(folder)
    components.unet.save_pretrained(str(folder / "unet"))
    components.vae.save_pretrained(str(folder / "vae"))
    components.text_encoder.save_pretrained(str(folder / "text_encoder"))
    components.tokenizer.save_pretrained(str(folder / "tokenizer"))
    components.noise_scheduler.save_pretrained(str(folder / "scheduler"))


@functools.lru_cache(maxsize=1)
def _minilm() -> tuple[nn.Module, Any]:
    from ..assets import minilm

    model, tokenizer = minilm()
    return model.requires_grad_(False).eval(), tokenizer


def tiny_unet(cross_attention_dim: int = 384, seed: int = 0) -> nn.Module:
    """A 2-stage SD-style UNet (32, 64 channels; cross-attention in the first down and last up stage)
    on 4 x 8 x 8 latents: the same layout as SD's, 0.9M parameters."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=8, sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )


def tiny_pipeline(seed: int = 0, max_length: int = 16) -> SDComponents:
    """UNet and VAE built in code (random weights from `seed`; 16 x 16 images <-> 4 x 8 x 8 latents) and the
    shipped all-MiniLM-L6-v2 as text encoder (384-wide token states).

    MiniLM rather than a tiny random CLIP text model: it is real and pretrained, so prompts that differ
    ("the digit 3" / "the digit 5") give states that differ meaningfully, which makes the demos'
    conditioning learnable; it is frozen like SD's CLIP and costs milliseconds per prompt on CPU.
    """
    from diffusers import AutoencoderKL

    text_encoder, tokenizer = _minilm()
    # A copy: `SDComponents.to` moves and casts the frozen parts in place, which must not reach the cached
    # model that later pipelines in this process start from.
    text_encoder = copy.deepcopy(text_encoder)
    unet = tiny_unet(text_encoder.config.hidden_size, seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16,
    )
    return SDComponents(unet, vae, text_encoder, tokenizer, ddpm_scheduler(), max_length, TINY)


def load_components(model: str, seed: int = 0, unet_dtype: str = "float32") -> SDComponents:
    """`tiny` (built in code from `seed`) or a Stable Diffusion folder / hub id, its UNet held in `unet_dtype`
    (a `backbone_dtype`)."""
    if model != TINY:
        return load_sd(model, unet_dtype=unet_dtype)
    from ..precision import set_backbone_dtype

    components = tiny_pipeline(seed)
    set_backbone_dtype(components.unet, unet_dtype)
    return components
