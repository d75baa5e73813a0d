"""The service's requests, checked before they reach a backbone: one bad request gets its own 4xx and never
spoils the batch it would have joined."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import torch

from ..data.sources import ImageTooLarge, decode_image
from ..data.transforms import resize
from ..errors import DataError, RestuningError
from .config import ServeConfig


class RequestError(RestuningError):
    """A request the service refuses; `status` is its HTTP status (4xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Predict:
    """A checked `POST /v1/predict`: the tasks that answer every input, all on `backbone`."""

    tasks: list[str]
    inputs: list[str] | list[torch.Tensor]
    backbone: str


def parse_predict(body: Any, tasks: dict[str, dict], config: ServeConfig) -> Predict:
    """Check a predict body `{"task": name | "tasks": [names], "inputs": [...]}` against the served `tasks`
    (`{name: its description, with "backbone" and "kind"}`) and the limits of `config`; decode images (base64
    strings, optionally `data:image/...;base64,` URLs) into (3, H, W) tensors in [0, 1]."""
    if not isinstance(body, dict):
        raise RequestError(400, f"expected a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - {"task", "tasks", "inputs"})
    if unknown:
        raise RequestError(400, f"unknown keys {unknown}; expected 'task' or 'tasks', and 'inputs'")
    if ("task" in body) == ("tasks" in body):
        raise RequestError(400, "give either 'task' (one name) or 'tasks' (a list of names)")
    names = [body["task"]] if "task" in body else body["tasks"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise RequestError(400, "'tasks': expected a non-empty list of task names")
    missing = [n for n in names if n not in tasks]
    if missing:
        raise RequestError(404, f"unknown task {missing[0]!r}; tasks: {sorted(tasks)}")
    backbones = {tasks[n]["backbone"] for n in names}
    if len(backbones) > 1:
        raise RequestError(400, f"tasks {names} are on different backbones {sorted(backbones)}; one request "
                           "asks tasks of one backbone")
    kind = tasks[names[0]]["kind"]
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(400, "'inputs': expected a non-empty list of " +
                           ("texts" if kind == "text" else "base64-encoded images"))
    if len(inputs) > config.max_inputs:
        raise RequestError(413, f"{len(inputs)} inputs in one request; at most {config.max_inputs} (max_inputs)")
    if not all(isinstance(x, str) for x in inputs):
        raise RequestError(400, "'inputs': expected strings (" +
                           ("texts" if kind == "text" else "base64-encoded images") + ")")
    if kind == "text":
        images = [i for i, x in enumerate(inputs) if _looks_like_an_image(x)]
        if images:
            raise RequestError(400, f"input {images[0]}: an image, sent to a text task ({names[0]!r} reads texts)")
        long = [i for i, x in enumerate(inputs) if len(x) > config.max_text_chars]
        if long:
            raise RequestError(413, f"input {long[0]}: {len(inputs[long[0]])} characters; at most "
                               f"{config.max_text_chars} (max_text_chars)")
        return Predict(list(names), inputs, backbones.pop())
    size = tasks[names[0]].get("image_size")
    images = [_image(x, i, config.max_image_pixels) for i, x in enumerate(inputs)]
    if size:  # resized here, as the backbone would: what travels to the replica is small
        images = [resize(x[None], size)[0] for x in images]
    return Predict(list(names), images, backbones.pop())


IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")


def _looks_like_an_image(text: str) -> bool:
    """A data URL of an image, or base64 whose bytes open like an image file."""
    if text.startswith("data:image/"):
        return True
    if len(text) < 64 or " " in text[:64]:
        return False
    try:
        head = base64.b64decode(text[:64], validate=True)
    except (binascii.Error, ValueError):
        return False
    return head.startswith(IMAGE_MAGIC)


def _image(text: str, index: int, max_pixels: int) -> torch.Tensor:
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise RequestError(400, f"input {index}: a data URL must be data:image/...;base64,<data>")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)  # line breaks of wrapped base64 dropped
    except (binascii.Error, ValueError) as err:
        raise RequestError(400, f"input {index}: not base64 ({err}); the image task takes base64-encoded image "
                           "files (did you send text to an image task?)") from err
    try:
        return decode_image(data, f"input {index}", max_pixels)
    except ImageTooLarge as err:
        raise RequestError(413, f"{err} (max_image_pixels)") from err
    except DataError as err:
        raise RequestError(400, f"{err}; the image task takes base64-encoded image files (did you send text to "
                           "an image task?)") from err
