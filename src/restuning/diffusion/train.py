"""Text-to-image fine-tuning of a latent diffusion UNet with the noise-prediction (epsilon) loss, on Hugging
Face Accelerate (devices, processes, mixed precision, accumulation) as `restuning.train.loop`.

One step: images -> frozen VAE -> latents * scaling factor; captions -> frozen text encoder; noise and a
timestep per sample; the DDPM forward process `q(z_t | z_0)`; loss = MSE(model(z_t, t, text), noise).
The model is the UNet itself (`full`), the UNet with Res-Tuners (`restuning`), a Res-Tuning-Bypass
(`bypass`) or PEFT's LoRA (`peft_lora`); only its trainable parameters are optimised and saved.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..bypass.config import BypassConfig
from ..checkpoint import atomic_write_dir
from ..config import ConfigError, ResTuningConfig
from ..model import ResTuningModel, get_restuning_model
from .data import CaptionedImages, caption_folder, caption_jsonl, mnist_captions, random_flip, subject_prompt, to_signed
from .pipeline import SDComponents, load_components
from .train_config import DiffusionTrainConfig

CHECKPOINT = "checkpoint"
FINAL = "final"
METRICS = "metrics.jsonl"
WEIGHTS = "weights"  # final/weights: the method's own format (see `save_weights`)
# lora_alpha follows r unless given (`peft_lora`), as in diffusers' LoRA training scripts
LORA_DEFAULTS = {"r": 4, "lora_dropout": 0.0, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}


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


# --- methods -------------------------------------------------------------------------------------
def build_denoiser(method: str, unet: nn.Module, options: dict[str, Any]) -> nn.Module:
    """The trainable model around `unet` for `method`; called as `model(sample, timestep, text_states)`."""
    if method == "full":
        if options:
            raise ConfigError(f"method full takes no options, got {sorted(options)}")
        return unet.requires_grad_(True)
    if method == "restuning":
        return get_restuning_model(unet, ResTuningConfig.from_dict(options))
    if method == "bypass":
        return get_restuning_model(unet, BypassConfig.from_dict(options))
    if method == "peft_lora":
        from ..baselines.peft_lora import peft_lora

        return peft_lora(unet, {**LORA_DEFAULTS, **options})
    raise ConfigError(f"method.name: expected full, restuning, bypass or peft_lora, got {method!r}")


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


def save_weights(model: nn.Module, method: str, directory: Path) -> None:
    """Trainable weights in the method's own loadable format: a diffusers UNet folder (`full`), a restuning
    checkpoint (`restuning`, `bypass`), or a PEFT adapter folder (`peft_lora`)."""
    model.save_pretrained(str(directory) if method in ("full", "peft_lora") else directory)


def load_weights(unet: nn.Module, method: str, directory: Path) -> nn.Module:
    """The inverse of `save_weights`, onto a fresh `unet` of the same configuration; frozen, eval mode."""
    if method == "full":
        from diffusers import UNet2DConditionModel

        model = UNet2DConditionModel.from_pretrained(str(directory))
    elif method == "restuning":
        model = ResTuningModel.from_pretrained(unet, directory)
    elif method == "bypass":
        from .bypass import UNetBypassModel

        model = UNetBypassModel.from_pretrained(unet, directory)
    elif method == "peft_lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(unet, str(directory))
    else:
        raise ConfigError(f"method {method!r}: no saved weights to load")
    return model.requires_grad_(False).eval()


def load_run(run_dir: str | Path) -> tuple[SDComponents, nn.Module, DiffusionTrainConfig]:
    """A finished run: its base components (rebuilt from the config), the tuned denoiser and the config."""
    from ..train.config import from_dict

    final = Path(run_dir) / FINAL
    config_path = final / "train_config.json"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir}: not a finished diffusion run (no {FINAL}/train_config.json)")
    config = from_dict(DiffusionTrainConfig, json.loads(config_path.read_text()))
    components = load_components(config.model)
    return components, load_weights(components.unet, config.method.name, final / WEIGHTS), config


# --- the loss --------------------------------------------------------------------------------------
def diffusion_loss(model: nn.Module, noise_scheduler, latents: torch.Tensor, text: torch.Tensor,
                   noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """MSE between the predicted and the true noise of `z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) noise`.
    latents, noise: (B, C, h, w); text: (B, T, D); timesteps: (B,) ints in [0, num_train_timesteps)."""
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = predicted_noise(model(noisy, timesteps, text))
    return F.mse_loss(prediction.float(), noise.float())


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
class DiffusionTrainer:
    """One run of `config`: `run()` trains and writes `metrics.jsonl`, resumable checkpoints every
    `checkpoint_every` steps (`checkpoint/`), and `final/` (`weights/` in the method's format and
    `train_config.json`)."""

    def __init__(self, config: DiffusionTrainConfig, progress: bool = True,
                 components: SDComponents | None = None):
        self.config, self.progress = config, progress
        self.out = Path(config.output_dir)
        ddp = DistributedDataParallelKwargs(find_unused_parameters=config.method.name == "full")
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(), mixed_precision=config.optim.mixed_precision,
            gradient_accumulation_steps=config.optim.grad_accum,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True), kwargs_handlers=[ddp],
        )
        set_seed(config.seed)
        self.components = components or load_components(config.model)
        frozen_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.optim.mixed_precision)
        self.components.to(self.accelerator.device, frozen_dtype)
        self.data = load_captioned(config)
        torch.manual_seed(config.seed)
        self.model = build_denoiser(config.method.name, self.components.unet, config.method.config)

    def run(self, stop_after_steps: int | None = None) -> dict[str, Any]:
        """Train (resuming from `output_dir/checkpoint` if there is one); `stop_after_steps` stops early as
        a kill would (for tests)."""
        cfg, acc, comps = self.config, self.accelerator, self.components
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(f"method {cfg.method.name!r} left nothing trainable")
        optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        loader = torch.utils.data.DataLoader(torch.arange(len(self.data)), batch_size=cfg.optim.batch_size,
                                             shuffle=True, generator=torch.Generator().manual_seed(cfg.seed))
        model, optimizer, loader = acc.prepare(self.model, optimizer, loader)
        evaluation = fixed_batch(comps, self.data, cfg.eval_size, cfg.seed, acc.device)
        step, batches, start_loss = self._resume(optimizer)
        if start_loss is None:
            start_loss = fixed_batch_loss(acc.unwrap_model(model), comps.noise_scheduler, evaluation)
            self._log({"step": 0, "eval_loss": start_loss})
        total = cfg.optim.max_steps or (len(loader) // cfg.optim.grad_accum or 1) * cfg.optim.epochs
        bar = tqdm(total=total, initial=step, desc="diffusion", disable=not (self.progress and acc.is_main_process))
        window, began, done = [], time.perf_counter(), 0
        for epoch in range(batches // len(loader), cfg.optim.epochs if step < total else 0):
            model.train()
            loader.set_epoch(epoch)
            skip = batches - epoch * len(loader)  # a resumed epoch goes on where the checkpoint left it
            for index in acc.skip_first_batches(loader, skip) if skip else loader:
                g = torch.Generator().manual_seed(hash((cfg.seed, acc.process_index, batches)) % 2**31)
                batches += 1
                images, captions = self.data.batch(index.cpu())
                if cfg.data.random_flip:
                    images = random_flip(images, g)
                latents = comps.encode_images(to_signed(images).to(acc.device), g)
                text = comps.encode_prompts(captions)
                noise = torch.randn(latents.shape, generator=g).to(latents)
                timesteps = torch.randint(0, comps.noise_scheduler.config.num_train_timesteps, (len(index),),
                                          generator=g).to(acc.device)
                with acc.accumulate(model), acc.autocast():
                    loss = diffusion_loss(model, comps.noise_scheduler, latents, text, noise, timesteps)
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.optim.max_grad_norm is not None:
                        acc.clip_grad_norm_(params, cfg.optim.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                window.append(loss.item())
                if not acc.sync_gradients:
                    continue
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                record: dict[str, Any] = {}
                if step % cfg.log_every == 0 or step == total:
                    seconds = time.perf_counter() - began
                    record = {"epoch": epoch + 1, "train_loss": sum(window) / len(window), "lr": cfg.optim.lr,
                              "step_seconds": seconds / len(window) * cfg.optim.grad_accum}
                    window, began = [], time.perf_counter()
                if cfg.eval_every and step % cfg.eval_every == 0:
                    record["eval_loss"] = fixed_batch_loss(acc.unwrap_model(model), comps.noise_scheduler, evaluation)
                if record:
                    self._log({"step": step, **record})
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    self._save_checkpoint(optimizer, step, batches, start_loss)
                done += 1
                if stop_after_steps is not None and done >= stop_after_steps:
                    bar.close()
                    return {"stopped": True, "step": step}
                if step >= total:
                    break
            if step >= total:
                break
        bar.close()
        unwrapped = acc.unwrap_model(model)
        result = {"step": step, "eval_loss_start": start_loss,
                  "eval_loss": fixed_batch_loss(unwrapped, comps.noise_scheduler, evaluation),
                  **self.summary(unwrapped)}
        self._log(result)
        self._save_final(unwrapped)
        return result

    def summary(self, model: nn.Module) -> dict[str, Any]:
        return {"method": self.config.method.name, "model": self.config.model,
                "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}

    def _trainable(self) -> dict[str, torch.Tensor]:
        model = self.accelerator.unwrap_model(self.model)
        return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}

    def _save_checkpoint(self, optimizer, step: int, batches: int, start_loss: float) -> None:
        """Trainable weights (safetensors) and the optimizer, counters and RNG (tensors only), atomically."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        state = {"step": step, "batches": batches, "start_loss": start_loss, "optimizer": optimizer.state_dict(),
                 "torch_rng": torch.get_rng_state()}
        trainable = self._trainable()

        def write(d: Path) -> None:
            save_file(trainable, str(d / "trainable.safetensors"))
            torch.save(state, d / "state.pt")

        atomic_write_dir(self.out / CHECKPOINT, write)

    def _resume(self, optimizer) -> tuple[int, int, float | None]:
        """(optimizer steps, batches seen, the fixed-batch loss before training) of the checkpoint, if any."""
        directory = self.out / CHECKPOINT
        if not (directory / "state.pt").is_file():
            return 0, 0, None
        state = torch.load(directory / "state.pt", weights_only=True)  # tensors and numbers only, no code
        tensors = load_file(str(directory / "trainable.safetensors"))
        params = dict(self.accelerator.unwrap_model(self.model).named_parameters())
        missing = sorted(set(tensors) ^ {n for n, p in params.items() if p.requires_grad})
        if missing:
            raise ConfigError(f"{directory}: the checkpoint does not fit this run's method ({missing[:4]} ...)")
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        return state["step"], state["batches"], state["start_loss"]

    def _log(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _save_final(self, model: nn.Module) -> None:
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return

        def write(d: Path) -> None:
            save_weights(model, self.config.method.name, d / WEIGHTS)
            (d / "train_config.json").write_text(json.dumps(self.config.to_dict(), indent=2))

        atomic_write_dir(self.out / FINAL, write)


def train_diffusion(config: DiffusionTrainConfig, progress: bool = True,
                    components: SDComponents | None = None) -> dict[str, Any]:
    """Train `config` and return the final record (fixed-batch loss before and after, trainable params)."""
    return DiffusionTrainer(config, progress, components).run()
