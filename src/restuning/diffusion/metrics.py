"""Frechet distances between generated and reference images in the feature space of a frozen network:
FD-DINOv2 with the shipped DINOv2-small (runs offline, CLIP-free), and FID with Inception-v3 features when
a local TorchScript Inception is given (its weights cannot be downloaded here).

    FD = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1^1/2 S_2 S_1^1/2)^1/2)

computed in float64 with symmetric eigendecompositions only (no scipy, no non-symmetric square roots).
FD-DINOv2 here uses ViT-S/14, so its values are not comparable with published FD-DINOv2 (ViT-L/14).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.transforms import normalise
from ..errors import RestuningError

INCEPTION_ENV = "RESTUNING_INCEPTION"


class FIDUnavailable(RestuningError, RuntimeError):
    """FID was asked for without local Inception weights."""


# --- the distance ----------------------------------------------------------------------------------
def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) features -> mean (D,) and unbiased covariance (D, D), float64."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features: expected (N, D) with N >= 2, got {tuple(features.shape)}")
    x = features.double()
    mean = x.mean(0)
    centred = x - mean
    return mean, centred.T @ centred / (x.shape[0] - 1)


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix; tiny negative eigenvalues (rounding) -> 0."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance_from_stats(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor,
                                cov2: torch.Tensor) -> float:
    """Frechet distance between N(mu1, cov1) and N(mu2, cov2); mu (D,), cov (D, D)."""
    mu1, cov1, mu2, cov2 = (t.double() for t in (mu1, cov1, mu2, cov2))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shapes do not fit: mu {tuple(mu1.shape)}, {tuple(mu2.shape)}; cov {tuple(cov1.shape)}, "
                         f"{tuple(cov2.shape)}")
    root1 = _sqrt_psd(cov1)
    middle = root1 @ cov2 @ root1  # similar to cov1 @ cov2, but symmetric PSD: eigvalsh is stable
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * cross
    return max(float(distance), 0.0)


def frechet_distance(features1: torch.Tensor, features2: torch.Tensor) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets (N1, D) and (N2, D)."""
    if features1.ndim != 2 or features2.ndim != 2 or features1.shape[1] != features2.shape[1]:
        raise ValueError(f"features: expected (N1, D) and (N2, D), got {tuple(features1.shape)} and "
                         f"{tuple(features2.shape)}")
    return frechet_distance_from_stats(*feature_stats(features1), *feature_stats(features2))


# --- feature extractors ----------------------------------------------------------------------------
class DinoV2Features:
    """DINOv2-small CLS features (after its final norm), 384-d, of images (N, 3, H, W) in [0, 1], resized
    to `size` (a multiple of the patch size 14) and ImageNet-normalised."""

    dim = 384

    def __init__(self, size: int = 224, device: torch.device | str = "cpu"):
        from ..assets import dinov2_small

        if size % 14:
            raise ValueError(f"size: expected a multiple of DINOv2's patch size 14, got {size}")
        self.size, self.device = size, torch.device(device)
        self.model = dinov2_small().to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = _checked(images).to(self.device)
        images = F.interpolate(images, size=(self.size, self.size), mode="bicubic", antialias=True,
                               align_corners=False).clamp(0, 1)
        return self.model(pixel_values=normalise(images)).pooler_output.float().cpu()


class InceptionFeatures:
    """Inception-v3 pool features (2048-d) from a local TorchScript file, e.g. the `pt_inception-2015-12-05`
    detector of StyleGAN/clean-fid (called as `model(x, return_features=True)` on [0, 255] pixels at any
    size). Other TorchScript extractors: `input_range` "0-255", "0-1" or "-1-1", and they are resized to
    299 px here; they must return (N, 2048) or (N, 2048, 1, 1)."""

    def __init__(self, path: str | Path | None = None, input_range: str = "0-255",
                 device: torch.device | str = "cpu"):
        path = path or os.environ.get(INCEPTION_ENV)
        if not path:
            raise FIDUnavailable(
                "FID needs local Inception-v3 weights, which cannot be downloaded here: pass a TorchScript "
                f"Inception feature extractor (e.g. pt_inception-2015-12-05-6726825d.pt) or set ${INCEPTION_ENV}; "
                "FD-DINOv2 (features='dinov2') runs offline")
        path = Path(path)
        if not path.is_file():
            raise FIDUnavailable(f"Inception weights: {path} does not exist")
        if input_range not in ("0-255", "0-1", "-1-1"):
            raise ValueError(f"input_range: expected 0-255, 0-1 or -1-1, got {input_range!r}")
        try:
            self.model = torch.jit.load(str(path), map_location=device).eval()
        except RuntimeError as err:
            raise FIDUnavailable(
                f"{path}: not a TorchScript file ({err.__class__.__name__}). A plain state dict needs the "
                "Inception-v3 code of torchvision, which does not work here: export the extractor with "
                "torch.jit.script/trace where torchvision works and pass that file") from err
        self.input_range, self.device = input_range, torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = _checked(images).to(self.device)
        if self.input_range == "0-255":  # the StyleGAN detector resizes to 299 itself
            try:
                features = self.model(images * 255, return_features=True)
            except (RuntimeError, TypeError):
                features = self.model(_resize299(images) * 255)
        else:
            scaled = _resize299(images)
            features = self.model(scaled * 2 - 1 if self.input_range == "-1-1" else scaled)
        features = features[0] if isinstance(features, (tuple, list)) else features
        return features.reshape(features.shape[0], -1).float().cpu()


def _resize299(images: torch.Tensor) -> torch.Tensor:
    return F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)


def _checked(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected (N, 1|3, H, W) in [0, 1], got {shape}")
    return images.float().expand(-1, 3, -1, -1)


def extract(extractor: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
            batch_size: int = 32) -> torch.Tensor:
    """Features (N, D) of images (N, C, H, W) in [0, 1], in batches."""
    return torch.cat([extractor(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def fd_dinov2(generated: torch.Tensor, reference: torch.Tensor, size: int = 224, batch_size: int = 32,
              device: torch.device | str = "cpu") -> float:
    """FD-DINOv2 (DINOv2-small) between two image sets (N, C, H, W) in [0, 1]."""
    extractor = DinoV2Features(size, device)
    return frechet_distance(extract(extractor, generated, batch_size), extract(extractor, reference, batch_size))


def fid(generated: torch.Tensor, reference: torch.Tensor, inception: str | Path | None = None,
        batch_size: int = 32, device: torch.device | str = "cpu") -> float:
    """FID with a local TorchScript Inception (`inception`, or $RESTUNING_INCEPTION); `FIDUnavailable` if none."""
    extractor = InceptionFeatures(inception, device=device)
    return frechet_distance(extract(extractor, generated, batch_size), extract(extractor, reference, batch_size))


def load_image_folder(path: str | Path, size: int | None = None) -> torch.Tensor:
    """Every image in a folder (sorted), as (N, 3, H, W) in [0, 1]; `size` centre-crops them to a square
    (needed when their sizes differ)."""
    from .data import IMAGE_SUFFIXES, read_image, square

    folder = Path(path)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise ValueError(f"{folder}: no images found (expected a folder of {', '.join(IMAGE_SUFFIXES)} files)")
    images = [read_image(p) for p in files]
    if size is not None:
        images = [square(im, size) for im in images]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise ValueError(f"{folder}: images of several sizes {sorted(shapes)[:4]}; give a size to crop them to")
    return torch.stack(images)
