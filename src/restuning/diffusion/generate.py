"""Sampling: PNDM (PLMS) with classifier-free guidance, SD's defaults (50 steps, guidance 3.0 as paper
Table 11), one seeded generator per sample, and a multi-task mode where samples of different bypass tasks
share one batched UNet forward per denoising step.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import ConfigError
from .pipeline import SDComponents, load_components, pndm_scheduler
from .train import FINAL, RUN_CONFIG, load_run, predicted_noise


@torch.no_grad()
def generate(
    components: SDComponents, prompts: Sequence[str], *, denoiser: Callable[..., Any] | None = None,
    seeds: int | Sequence[int] = 0, steps: int = 50, guidance: float = 3.0, height: int | None = None,
    width: int | None = None, negative_prompt: str = "", task_ids: Sequence[str | int] | None = None,
    batch_size: int | None = None, out_dir: str | Path | None = None, progress: bool = False,
) -> torch.Tensor:
    """Images for `prompts`, (N, 3, H, W) float in [0, 1] on the CPU.

    Args:
        denoiser: `denoiser(latents, t, text_states, [task_ids=...])` -> noise (a tensor or an output with
            `.sample`): a tuned model, a bypass, or by default `components.unet`.
        seeds: one per prompt, or an int `s` for `s, s+1, ...`. Sample i's starting noise comes from its own
            `torch.Generator` seeded `seeds[i]`, so its image does not depend on the batch it is in.
        steps, guidance: PLMS steps and the classifier-free guidance scale (<= 1: no unconditional pass).
        height, width: image size, a multiple of the VAE's factor (default: the UNet's sample size x factor).
        task_ids: one bypass task per prompt, for a multi-task bypass (each sample is routed to its own task
            inside one UNet forward).
        batch_size: prompts per batch (default: all at once). Results do not depend on it.
        out_dir: also write `0000.png, ...` and `prompts.jsonl` there.
    """
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts: expected a non-empty list of strings, got {prompts!r:.200}")
    n = len(prompts)
    seeds = list(range(seeds, seeds + n)) if isinstance(seeds, int) else list(seeds)
    if len(seeds) != n:
        raise ValueError(f"seeds: expected one per prompt ({n}), got {len(seeds)}")
    if task_ids is not None and len(task_ids) != n:
        raise ValueError(f"task_ids: expected one per prompt ({n}), got {len(task_ids)}")
    if steps < 1:
        raise ValueError(f"steps: expected a positive integer, got {steps}")
    denoiser = denoiser if denoiser is not None else components.unet
    if isinstance(denoiser, nn.Module):
        denoiser.eval()
    size = latent_size(components, height, width)
    batch_size = batch_size or n
    images = []
    for start in tqdm(range(0, n, batch_size), desc="generate", disable=not progress):
        chunk = slice(start, start + batch_size)
        images.append(_sample(components, denoiser, prompts[chunk], seeds[chunk], steps, guidance, size,
                              negative_prompt, None if task_ids is None else list(task_ids[chunk])))
    images = torch.cat(images)
    if out_dir is not None:
        save_images(images, out_dir, [{"prompt": p, "seed": s, **({} if task_ids is None else {"task": t})}
                                      for p, s, t in zip(prompts, seeds, task_ids or [None] * n)])
    return images


def latent_size(components: SDComponents, height: int | None, width: int | None) -> tuple[int, int]:
    factor = components.vae_scale_factor
    default = components.unet.config.sample_size * factor
    height, width = height or default, width or default
    if height % factor or width % factor:
        raise ValueError(f"height, width: expected multiples of {factor} (the VAE's factor), got {height}, {width}")
    return height // factor, width // factor


def _sample(components: SDComponents, denoiser: Callable[..., Any], prompts: list[str], seeds: list[int],
            steps: int, guidance: float, size: tuple[int, int], negative_prompt: str,
            task_ids: list[str | int] | None) -> torch.Tensor:
    device = components.device
    channels = components.unet.config.in_channels
    scheduler = pndm_scheduler(components.noise_scheduler)
    scheduler.set_timesteps(steps, device=device)
    latents = torch.stack([torch.randn((channels, *size), generator=torch.Generator().manual_seed(s))
                           for s in seeds]).to(device) * scheduler.init_noise_sigma
    text = components.encode_prompts(prompts)
    guided = guidance > 1.0
    kwargs: dict[str, Any] = {}
    if guided:  # one forward for [unconditional; conditional]
        text = torch.cat([components.encode_prompts([negative_prompt] * len(prompts)), text])
    if task_ids is not None:
        kwargs["task_ids"] = task_ids * 2 if guided else task_ids
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
        noise = predicted_noise(denoiser(model_input, t, text.to(model_input.dtype), **kwargs))
        if guided:
            uncond, cond = noise.chunk(2)
            noise = uncond + guidance * (cond - uncond)
        latents = scheduler.step(noise, t, latents).prev_sample
    return components.decode_latents(latents).cpu()


def save_images(images: torch.Tensor, out_dir: str | Path, records: list[dict[str, Any]] | None = None) -> list[Path]:
    """(N, 3, H, W) in [0, 1] -> out_dir/0000.png, ... (8-bit RGB) and `prompts.jsonl` with `records`."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    for i, array in enumerate(pixels):
        paths.append(out / f"{i:04d}.png")
        Image.fromarray(array, "RGB").save(paths[-1])
    if records is not None:
        lines = [json.dumps({"file": p.name, **r}) for p, r in zip(paths, records)]
        (out / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return paths


def load_multitask(run_dirs: Sequence[str | Path]) -> tuple[SDComponents, nn.Module, list[str]]:
    """Bypass runs trained on one base model -> (components, a UNet multi-task bypass, task names): one UNet
    forward serves all of them. Tasks are named `task0, task1, ...` in the order given."""
    from ..config import from_dict
    from ..methods import get_method
    from .bypass import UNetMultiTaskBypass
    from .train_config import DiffusionTrainConfig

    configs = []
    for run in run_dirs:
        path = Path(run) / FINAL / RUN_CONFIG
        if not path.is_file():
            raise ConfigError(f"{run}: not a finished diffusion run (no {FINAL}/{RUN_CONFIG})")
        configs.append(from_dict(DiffusionTrainConfig, json.loads(path.read_text())))
    not_bypass = [str(r) for r, c in zip(run_dirs, configs) if not get_method(c.method.name).multi_task]
    if not_bypass:
        raise ConfigError(f"multi-task generation needs runs of a multi-task method (bypass); these are not: "
                          f"{not_bypass}")
    models = {c.model for c in configs}
    if len(models) != 1:
        raise ConfigError(f"multi-task generation needs runs on one base model, got {sorted(models)}")
    dtypes = {c.backbone_dtype for c in configs}
    if len(dtypes) != 1:
        raise ConfigError(f"multi-task generation needs runs trained on a UNet held in one dtype, got "
                          f"backbone_dtype {sorted(dtypes)}")
    components = load_components(models.pop(), unet_dtype=dtypes.pop())
    names = [f"task{i}" for i in range(len(run_dirs))]
    tasks = {name: Path(run) / FINAL for name, run in zip(names, run_dirs)}
    return components, UNetMultiTaskBypass(components.unet, tasks).eval(), names


def load_for_generation(runs: Sequence[str | Path], model: str | None) -> tuple[SDComponents, Any, list[str] | None]:
    """What `restuning generate` samples from: a base model (`model`), one run, or several bypass runs
    (multi-task). Returns (components, denoiser, task names or None)."""
    if runs and model is not None:
        raise ConfigError("give either --model (the base model) or --run (trained runs), not both")
    if not runs:
        return load_components(model or "tiny"), None, None
    if len(runs) == 1:
        components, denoiser, _ = load_run(runs[0])
        return components, denoiser, None
    return load_multitask(runs)
