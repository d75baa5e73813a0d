"""Image preprocessing and augmentation in plain torch (torchvision does not work here)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size), bilinear with antialiasing."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def normalise(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(B, 1|3, H, W) in [0, 1] -> (B, 3, H, W) standardised; grey images are repeated to RGB."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    mean = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def random_resized_crop(images: torch.Tensor, size: int, generator: torch.Generator, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3), flip: bool = True) -> torch.Tensor:
    """Per image: a random crop of `scale` of the area and `ratio` aspect, resized to `size`, then a
    horizontal flip with probability 0.5. (B, C, H, W) -> (B, C, size, size)."""
    out = []
    height, width = images.shape[-2:]
    for image in images:
        top, left, h, w = _crop_box(height, width, scale, ratio, generator)
        crop = resize(image[None, :, top:top + h, left:left + w], size)[0]
        if flip and torch.rand((), generator=generator) < 0.5:
            crop = crop.flip(-1)
        out.append(crop)
    return torch.stack(out)


def _crop_box(height: int, width: int, scale, ratio, g: torch.Generator) -> tuple[int, int, int, int]:
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(torch.empty(()).uniform_(scale[0], scale[1], generator=g))
        aspect = math.exp(float(torch.empty(()).uniform_(*log_ratio, generator=g)))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            return top, left, h, w
    side = min(height, width)  # fall back to a centre crop
    return (height - side) // 2, (width - side) // 2, side, side
