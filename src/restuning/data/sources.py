"""A user's own data: a folder of images per class, a CSV/JSONL table of texts, a local HF dataset.

Bad data is a `DataError` naming the file, and the line or row where there is one: text that is not UTF-8,
a malformed JSON line, a blank text or label, an image that cannot be decoded, fewer than 2 classes."""

from __future__ import annotations

import codecs
import csv
import json
import math
import re
from collections.abc import Iterable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from .labelled import LabelledData
from .transforms import resize

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
JSON_SUFFIXES = (".jsonl", ".json")  # anything else is read as CSV by `text_table`
TABLE_SUFFIXES = (".csv", *JSON_SUFFIXES)
_INTEGER = re.compile(r"[+-]?[0-9]+")


# --- images ------------------------------------------------------------------------------------
def image_folder(path: str | Path, image_size: int) -> LabelledData:
    """`path/<class>/<image>`: one subfolder per class (sorted names, at least 2, each with at least one
    image), images resized to a square `image_size` and held in memory as RGB in [0, 1]. Hidden folders and
    files (names starting with `.`) are skipped."""
    root = Path(path)
    expected = f"expected one subfolder of images per class ({root}/<class>/<image>), at least 2"
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; {expected}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"{root}: {len(classes)} class folder{'' if len(classes) == 1 else 's'} {classes}; {expected}")
    images, labels = [], []
    for label, name in enumerate(classes):
        files = [f for f in sorted((root / name).iterdir())
                 if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".") and f.is_file()]
        if not files:
            raise DataError(f"{root / name}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}); every class folder "
                            f"needs at least one")
        for file in files:
            images.append(resize(load_image(file)[None], image_size)[0])
            labels.append(label)
    return LabelledData(torch.stack(images), torch.tensor(labels), classes)


def load_image(path: str | Path) -> torch.Tensor:
    """One image file as RGB (3, H, W) in [0, 1]; a missing, truncated or undecodable file is a `DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such image file")
    return _decode_image(path, str(path), "a complete image file")


def decode_image(data: bytes, where: str = "image", max_pixels: int | None = None) -> torch.Tensor:
    """An encoded image (PNG, JPEG, ... bytes) as RGB (3, H, W) in [0, 1]; undecodable bytes, or an image of
    more than `max_pixels` pixels (checked before it is decoded), are a `DataError`."""
    import io

    return _decode_image(io.BytesIO(data), where, "the bytes of a complete image file", max_pixels)


class ImageTooLarge(DataError):
    """An image with more pixels than its reader allows."""


def _decode_image(source, where: str, expected: str, max_pixels: int | None = None) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(source) as img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise ImageTooLarge(f"{where}: an image of {img.width} x {img.height} pixels; at most {max_pixels}")
            rgb = img.convert("RGB")  # decodes the whole file: a truncated one fails here, not later
    except ImageTooLarge:
        raise
    # PIL reports damaged files as OSError (UnidentifiedImageError, "image file is truncated"), and some
    # broken chunks as SyntaxError or ValueError.
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{where}: not a readable image ({err}); expected {expected} "
                        f"({', '.join(sorted(IMAGE_SUFFIXES))})") from err
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return pixels.view(rgb.height, rgb.width, 3).permute(2, 0, 1).float() / 255


# --- text tables -------------------------------------------------------------------------------
def text_table(path: str | Path, text_column: str = "text", label_column: str = "label") -> LabelledData:
    """A UTF-8 CSV (header row) or JSONL file (one object per line; a `.json` file may instead hold one
    array of objects) of texts and labels; labels may be names or integers. A leading BOM is dropped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return _from_rows(path, _table_rows(path), text_column, label_column)


def table_columns(path: str | Path) -> list[str]:
    """The column names of a CSV file (its header row) or of a JSONL/JSON file (the keys of its first object),
    in file order, reading only that much of it (a `.json` array is parsed whole)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix.lower() not in JSON_SUFFIXES:
        with closing(_lines(path)) as lines:  # closed at once, the rest of the file unread
            return _csv_header(path, csv.reader(lines))
    with closing(_json_rows(path)) as rows:
        for _, row in rows:
            return list(row)
    raise DataError(f"{path}: no rows; expected one JSON object per line")


def _lines(path: Path) -> Iterator[str]:
    """The file's lines decoded as UTF-8, line endings kept and split as `open(newline="")` does (for
    `csv`), a leading BOM dropped; read lazily, so an error names the line it is on."""
    number = 0
    with open(path, "rb") as f:
        for chunk in f:  # split at b"\n" only; splitlines also splits at a lone b"\r"
            for raw in chunk.splitlines(keepends=True):
                number += 1
                if b"\x00" in raw:  # valid UTF-8, but never in a text table: UTF-16 without a BOM
                    raise DataError(f"{path}, line {number}: not UTF-8 text (it holds NUL bytes: UTF-16?); "
                                    f"expected UTF-8: save the file as UTF-8")
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(_not_utf8(path, number, raw, err)) from None
                yield text.removeprefix("\ufeff") if number == 1 else text


def _not_utf8(path: Path, number: int, raw: bytes, err: UnicodeDecodeError) -> str:
    column = len(raw[:err.start].decode("utf-8", errors="replace")) + 1
    if number == 1 and raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        guess = "it starts with a UTF-16 byte order mark"
    else:
        guess = "Latin-1 or Windows-1252?"
    return (f"{path}, line {number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {column}; {guess}); "
            f"expected UTF-8: save the file as UTF-8")


def _table_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for each row of a CSV or JSON(L) file; `where` names the file and line."""
    if path.suffix.lower() in JSON_SUFFIXES:
        yield from _json_rows(path)
        return
    reader = csv.reader(_lines(path))
    header = _csv_header(path, reader)
    while True:
        start = reader.line_num + 1  # a quoted cell may span lines: name the record's first
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({err})") from err
        if cells:  # a blank line reads as []
            yield f"{path}, line {start}", {c: cells[i] if i < len(cells) else None for i, c in enumerate(header)}


def _csv_header(path: Path, reader: Iterator[list[str]]) -> list[str]:
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: empty; expected a header row of column names (e.g. text,label), then one "
                        f"row per example") from None
    except csv.Error as err:
        raise DataError(f"{path}, line 1: not valid CSV ({err})") from err
    twice = sorted({c for c in header if header.count(c) > 1})
    if twice:
        raise DataError(f"{path}, line 1: column {twice[0]!r} appears twice in the header {header}")
    return header


def _json_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, object) for each line of a JSONL file, or each item of a `.json` file holding one array."""
    lines, first = enumerate(_lines(path), 1), True
    for number, line in lines:
        if not line.strip():
            continue
        if first and path.suffix.lower() == ".json" and line.lstrip().startswith("["):
            yield from _json_array(path, "\n" * (number - 1) + line + "".join(text for _, text in lines))
            return
        first = False
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {number}: not valid JSON ({err.msg} at column {err.colno}); expected "
                            f"one JSON object per line") from None
        yield _json_object(f"{path}, line {number}", row)


def _json_array(path: Path, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
    for i, item in enumerate(items if isinstance(items, list) else [items]):
        yield _json_object(f"{path}, item {i + 1}", item)


def _json_object(where: str, row: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(row, dict):
        raise DataError(f'{where}: expected a JSON object such as {{"text": "...", "label": "..."}}, got '
                        f"{_a(row)}")
    return where, row


def _a(value: Any) -> str:
    name = {list: "list", dict: "dict", str: "string", bool: "boolean", type(None): "null"}.get(type(value))
    return f"a {name or type(value).__name__}"


# --- Hugging Face datasets ---------------------------------------------------------------------
def hf_dataset(path: str | Path, text_column: str = "text", label_column: str = "label",
               split: str = "train") -> LabelledData:
    """A Hugging Face `datasets` dataset from local files (a saved dataset folder, or csv/json/parquet
    files) read offline; needs the optional `datasets` package."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError("data.format 'hf' needs `pip install datasets`") from err
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        try:
            loaded = datasets.load_from_disk(str(path))
        except (OSError, ValueError, KeyError, IndexError) as err:  # IndexError: a saved dataset of no rows
            raise DataError(f"{path}: not a readable saved dataset ({type(err).__name__}: {err}); empty or "
                            f"damaged?") from err
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{path}: no split {split!r}; its splits are {sorted(loaded)}")
            loaded = loaded[split]
        table = loaded
    else:
        builder = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(path.suffix.lower())
        if builder is None or not path.is_file():
            raise DataError(f"{path}: expected a saved dataset folder (save_to_disk) or a .csv/.json/.jsonl/.parquet "
                            f"file")
        try:
            table = datasets.load_dataset(builder, data_files=str(path), split=split)
        # ValueError: a CSV of a header only ("corresponds to no data"); StopIteration: an empty JSON file
        except (datasets.exceptions.DatasetGenerationError, ValueError, StopIteration) as err:
            cause = err.__cause__ or err
            raise DataError(f"{path}: could not be read as {builder} ({type(cause).__name__}: {cause}); empty, "
                            f"damaged{'' if builder == 'parquet' else ' or not UTF-8'}?") from err
    return _from_rows(path, ((f"{path}, row {i + 1}", row) for i, row in enumerate(table)), text_column,
                      label_column)


# --- rows to examples --------------------------------------------------------------------------
def _from_rows(path: Path, rows: Iterable[tuple[str, dict[str, Any]]], text_column: str,
               label_column: str) -> LabelledData:
    """Texts and labels from (where, row) pairs; the first row's keys are the columns every row should have."""
    texts, raw = [], []
    for where, row in rows:
        if not texts:
            for column in (text_column, label_column):
                if column not in row:
                    raise DataError(f"{path}: no column {column!r}; columns are {sorted(row)}")
        text, label = row.get(text_column), row.get(label_column)
        if _blank(text):
            raise DataError(f"{where}: the text (column {text_column!r}) is missing or blank; every row needs a text "
                            f"and a label")
        if isinstance(text, (list, dict)):
            raise DataError(f"{where}: the text (column {text_column!r}) is {_a(text)}; expected a string")
        if _blank(label):
            raise DataError(f"{where}: the label (column {label_column!r}) is missing or blank; every row needs a "
                            f"class name or integer")
        if isinstance(label, (list, dict)):
            raise DataError(f"{where}: the label (column {label_column!r}) is {_a(label)}; expected a class name or "
                            f"integer")
        texts.append(str(text))
        raw.append(label)
    if not texts:
        raise DataError(f"{path}: no rows; expected one example (a text and a label) per row")
    if all(isinstance(v, int) or (isinstance(v, str) and _INTEGER.fullmatch(v.strip())) for v in raw):
        values = sorted({int(v) for v in raw})  # e.g. -1/1 or 0..K-1: class i is the i-th smallest value
        classes = [str(v) for v in values]
        index = {v: i for i, v in enumerate(values)}
        ints = [index[int(v)] for v in raw]
    else:
        classes = sorted({str(v) for v in raw})
        index = {c: i for i, c in enumerate(classes)}
        ints = [index[str(v)] for v in raw]
    if len(classes) < 2:
        raise DataError(f"{path}: every row has the label {classes[0]!r}; classification needs at least 2 classes")
    return LabelledData(texts, torch.tensor(ints), classes)


def _blank(value: Any) -> bool:
    """None, an empty or all-space string, or NaN (how pandas, under `datasets`' CSV reader, reads a blank cell)."""
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and math.isnan(value))
