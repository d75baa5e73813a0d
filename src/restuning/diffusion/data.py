"""Image-caption data for text-to-image fine-tuning: a folder of images with same-named `.txt` captions, a
JSONL file of `{"image": path, "text": caption}`, or the shipped MNIST-5k with captions; and a subject mode
(DreamBooth-style, one subject or class per task) where every image of the set gets one templated prompt.

Images are resized (shorter side) and centre-cropped to a square when loaded; `random_flip` and `to_signed`
run per batch in plain torch (torchvision does not work here).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MNIST_CAPTION = "a photo of the digit {digit}"
SUBJECT_TEMPLATE = "a photo of {token} {class_name}"


@dataclass
class CaptionedImages(torch.utils.data.Dataset):
    """N images with captions. `images[i]` is a file path or a (C, H, W) tensor in [0, 1]; an item is
    `(image (3, resolution, resolution) in [0, 1], caption)`, loaded lazily and centre-cropped."""

    images: list[Path | torch.Tensor]
    captions: list[str]
    resolution: int
    center_crop: bool = True

    def __post_init__(self) -> None:
        if len(self.images) != len(self.captions):
            raise DataError(f"{len(self.images)} images but {len(self.captions)} captions")
        if not self.images:
            raise DataError("no images: expected at least one image with a caption")
        if self.resolution < 1:
            raise DataError(f"resolution: expected a positive integer, got {self.resolution}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        image = self.images[i]
        image = read_image(image) if isinstance(image, Path) else image
        return square(image, self.resolution, self.center_crop), self.captions[i]

    def batch(self, index: list[int] | torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        """(B, 3, R, R) in [0, 1] and B captions."""
        items = [self[int(i)] for i in index]
        return torch.stack([im for im, _ in items]), [c for _, c in items]

    def with_captions(self, captions: list[str] | str) -> CaptionedImages:
        """The same images with other captions (one for all, or one each)."""
        captions = [captions] * len(self) if isinstance(captions, str) else captions
        return CaptionedImages(self.images, list(captions), self.resolution, self.center_crop)


# --- per-image transforms ------------------------------------------------------------------------
def read_image(path: Path) -> torch.Tensor:
    """An image file -> (3, H, W) float in [0, 1] (RGB; grey and alpha images are converted)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"{path}: not a readable image ({err})") from err
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).float() / 255


def square(image: torch.Tensor, size: int, center_crop: bool = True) -> torch.Tensor:
    """(C, H, W) in [0, 1] -> (3, size, size): shorter side resized to `size`, then the centre cut out
    (`center_crop=False`: squashed to a square instead). Grey images are repeated to RGB."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise DataError(f"image: expected a (1|3, H, W) tensor, got {tuple(image.shape)}")
    image = image.expand(3, -1, -1) if image.shape[0] == 1 else image
    height, width = image.shape[-2:]
    if center_crop:
        scale = size / min(height, width)
        new = (max(size, round(height * scale)), max(size, round(width * scale)))
    else:
        new = (size, size)
    if new != (height, width):
        image = F.interpolate(image[None], size=new, mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    return image[:, top:top + size, left:left + size].clamp(0, 1).contiguous()


def random_flip(images: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """(B, C, H, W): each image mirrored left-right with probability `p`."""
    flip = torch.rand(images.shape[0], generator=generator) < p
    return torch.where(flip.view(-1, 1, 1, 1).to(images.device), images.flip(-1), images)


def to_signed(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1], the VAE's input range."""
    return images * 2 - 1


# --- sources -------------------------------------------------------------------------------------
def caption_folder(path: str | Path, resolution: int, center_crop: bool = True,
                   need_captions: bool = True) -> CaptionedImages:
    """Every image in `path` (sorted by name) with the caption in the `.txt` file of the same name.
    `need_captions=False` (subject mode) accepts images without one, captioned later."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (expected images with same-named .txt captions)")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    captions = []
    for image in images:
        text = image.with_suffix(".txt")
        if text.is_file():
            captions.append(text.read_text(encoding="utf-8").strip())
        elif need_captions:
            raise DataError(f"{image}: no caption; expected {text.name} beside it")
        else:
            captions.append("")
    return CaptionedImages(list(images), captions, resolution, center_crop)


def caption_jsonl(path: str | Path, resolution: int, center_crop: bool = True) -> CaptionedImages:
    """One `{"image": path, "text": caption}` object per line; relative paths are read from the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such JSONL file")
    images, captions = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err})") from err
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(row.get("text"), str):
            raise DataError(f'{path}:{number}: expected {{"image": path, "text": caption}}, got {line[:200]!r}')
        image = Path(row["image"]) if Path(row["image"]).is_absolute() else path.parent / row["image"]
        if not image.is_file():
            raise DataError(f"{path}:{number}: image {str(image)!r} does not exist")
        images.append(image)
        captions.append(row["text"])
    return CaptionedImages(images, captions, resolution, center_crop)


def mnist_captions(resolution: int, digits: list[int] | None = None, per_digit: int | None = None,
                   template: str = MNIST_CAPTION) -> CaptionedImages:
    """The shipped MNIST-5k (500 per digit) captioned `template.format(digit=d)`, e.g. "a photo of the
    digit 3"; `digits` picks some, `per_digit` keeps the first n of each."""
    from ..data.shipped import mnist5k

    data = mnist5k()
    digits = list(range(10)) if digits is None else digits
    bad = [d for d in digits if not isinstance(d, int) or not 0 <= d <= 9]
    if bad or not digits:
        raise DataError(f"digits: expected integers 0..9, got {digits!r}")
    index = []
    for d in digits:
        rows = torch.nonzero(data.labels == d).flatten().tolist()
        index += rows[:per_digit] if per_digit is not None else rows
    index.sort()
    captions = [template.format(digit=int(data.labels[i])) for i in index]
    return CaptionedImages([data.inputs[i] for i in index], captions, resolution)


def class_prompt(class_name: str, template: str = SUBJECT_TEMPLATE) -> str:
    """DreamBooth's class prompt: the instance prompt without its token, e.g. "a photo of dog"."""
    return " ".join(subject_prompt("", class_name, template).split())


def subject_prompt(token: str, class_name: str, template: str = SUBJECT_TEMPLATE) -> str:
    """DreamBooth's instance prompt, e.g. "a photo of sks dog"."""
    try:
        return template.format(token=token, class_name=class_name)
    except KeyError as err:
        raise DataError(f"template {template!r}: unknown field {err}; expected {{token}} and {{class_name}}") from err
