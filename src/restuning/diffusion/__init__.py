"""Stable Diffusion UNets: Res-Tuning-Bypass for the UNet, and generative training and sampling."""

from .bypass import UNetBypassModel, UNetBypassTask, UNetMultiTaskBypass, plan_unet_taps  # noqa: F401
from .data import CaptionedImages, caption_folder, caption_jsonl, mnist_captions, subject_prompt  # noqa: F401, E402
from .generate import generate, load_for_generation, load_multitask  # noqa: F401, E402
from .metrics import FIDUnavailable, fd_dinov2, fid, frechet_distance, frechet_distance_from_stats  # noqa: F401, E402
from .pipeline import SDComponents, load_sd, tiny_pipeline  # noqa: F401, E402
from .train import load_run, train_diffusion  # noqa: F401, E402
from .train_config import DiffusionTrainConfig, load_diffusion_config  # noqa: F401, E402
