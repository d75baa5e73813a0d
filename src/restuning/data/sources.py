"""A user's own data: a folder of images per class, a CSV/JSONL table of texts, a local HF dataset."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from .labelled import LabelledData
from .transforms import resize

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def image_folder(path: str | Path, image_size: int) -> LabelledData:
    """`path/<class>/<image>`: one subfolder per class (sorted names), images resized to a square
    `image_size` and held in memory as RGB in [0, 1]."""
    root = Path(path)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not classes:
        raise FileNotFoundError(f"{root}: expected one subfolder of images per class")
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                images.append(resize(load_image(file)[None], image_size)[0])
                labels.append(label)
    if not images:
        raise FileNotFoundError(f"{root}: no images ({sorted(IMAGE_SUFFIXES)}) in {classes}")
    return LabelledData(torch.stack(images), torch.tensor(labels), classes)


def load_image(path: Path) -> torch.Tensor:
    """One image file as RGB (3, H, W) in [0, 1]."""
    from PIL import Image

    with Image.open(path) as img:
        pixels = torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8)
        return pixels.view(img.height, img.width, 3).permute(2, 0, 1).float() / 255


def text_table(path: str | Path, text_column: str = "text", label_column: str = "label") -> LabelledData:
    """A CSV (header row) or JSONL file of texts and labels; labels may be names or integers."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    return _from_rows(rows, text_column, label_column, str(path))


def hf_dataset(path: str | Path, text_column: str = "text", label_column: str = "label",
               split: str = "train") -> LabelledData:
    """A Hugging Face `datasets` dataset from local files (a saved dataset folder, or csv/json/parquet
    files) read offline; needs the optional `datasets` package."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError("data.format 'hf' needs `pip install datasets`") from err
    path = Path(path)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        table = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    else:
        builder = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"{path}: expected a saved dataset folder or a .csv/.json/.jsonl/.parquet file")
        table = datasets.load_dataset(builder, data_files=str(path), split=split)
    return _from_rows(list(table), text_column, label_column, str(path))


def _from_rows(rows: list[dict], text_column: str, label_column: str, where: str) -> LabelledData:
    if not rows:
        raise ValueError(f"{where}: no rows")
    for column in (text_column, label_column):
        if column not in rows[0]:
            raise KeyError(f"{where}: no column {column!r}; columns are {sorted(rows[0])}")
    raw = [r[label_column] for r in rows]
    if all(isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit()) for v in raw):
        values = sorted({int(v) for v in raw})  # e.g. -1/1 or 0..K-1: class i is the i-th smallest value
        classes = [str(v) for v in values]
        ints = [values.index(int(v)) for v in raw]
    else:
        classes = sorted({str(v) for v in raw})
        ints = [classes.index(str(v)) for v in raw]
    return LabelledData([str(r[text_column]) for r in rows], torch.tensor(ints), classes)
