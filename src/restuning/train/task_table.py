"""`TaskTable`: the finished runs answered on one frozen backbone, with one backbone forward per batch.

The table is what `restuning predict` and `restuning serve` answer with. Tasks of a multi-task method (the
bypass) read the taps of one shared backbone forward; tasks of other methods (Res-Tuning, LoRA, full
fine-tuning, Side-Tuning, LST, ...) change the backbone, so each runs its own forward on a copy of it.
Tasks come and go at run time without touching the backbone's weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..bypass import MultiTaskBypass
from ..bypass.config import BACKBONE_TOKENS
from ..data import LabelledData
from ..data.transforms import resize
from ..errors import CheckpointError, ConfigError
from ..methods import get_method
from .backbones import Backbone, load_backbone
from .finished import FinishedRun, open_run
from .trainer import FINAL

Inputs = Sequence[str] | torch.Tensor | Sequence[torch.Tensor]


def valid_task_name(name: object) -> bool:
    """A task name is a non-empty string without '.' or '/' (it names a module key and a URL path)."""
    return isinstance(name, str) and bool(name) and "." not in name and "/" not in name and len(name) <= 200


@dataclass
class Query:
    """Some inputs and the tasks that answer every one of them: texts, a (N, C, H, W) tensor in [0, 1], or a
    list of (C, H, W) images in [0, 1] of any size."""

    tasks: Sequence[str]
    inputs: Inputs


@dataclass
class Task:
    """One served run: `describe()` is what the service lists of it."""

    name: str
    run: FinishedRun
    shared: bool  # answered from the shared forward's taps
    model: nn.Module | None = None  # the tuned backbone of a task that is not shared

    def describe(self) -> dict:
        data = self.run.config.data
        return {"name": self.name, "run": str(self.run.path), "method": self.run.config.method.name,
                "backbone": self.run.config.backbone, "classes": list(self.run.classes),
                "shared_forward": self.shared, "image_size": data.image_size, "max_length": data.max_length}


class TaskTable:
    """Tasks on the backbone `backbone` (a shipped name, folder or Hub id). `image_size`/`max_length`
    override the input size the tasks were trained with; without them every task must share one.
    `share_forward=False` runs one backbone forward per task instead (the baseline the benchmarks compare
    with). `backbone_dtype` holds the backbone as runs trained in that `backbone_dtype` held it; None: as the
    first task's run did (the tasks of one table share one dtype). `forwards` counts backbone forwards."""

    def __init__(self, backbone: str, image_size: int | None = None, max_length: int | None = None,
                 share_forward: bool = True, backbone_dtype: str | None = None):
        self.backbone_name = backbone
        self.backbone_dtype, self._dtype_given = backbone_dtype, backbone_dtype is not None
        # Encodes every input; its model serves one use.
        self.backbone: Backbone = load_backbone(backbone, backbone_dtype or "float32")
        self._free = True  # whether self.backbone.model is still unused by any task
        self.image_size, self.max_length = image_size, max_length
        self._given = {"image_size": image_size is not None, "max_length": max_length is not None}
        self.share_forward = share_forward
        self.tasks: dict[str, Task] = {}
        self.multi: MultiTaskBypass | None = None
        self.forwards = 0

    @property
    def kind(self) -> str:
        """"text" or "image": what the backbone reads."""
        return self.backbone.kind

    @property
    def names(self) -> list[str]:
        return list(self.tasks)

    def describe(self) -> list[dict]:
        return [t.describe() for t in self.tasks.values()]

    # --- the table -----------------------------------------------------------------------------
    def add(self, name: str, run: str | Path | FinishedRun) -> Task:
        """Add the finished run `run` as task `name`. A run that is not finished, was trained on another
        backbone or another input size, or whose checkpoint does not load is refused (CheckpointError or
        ConfigError) and leaves the table as it was."""
        if not valid_task_name(name):
            raise ConfigError(f"task name {name!r}: expected a non-empty name without '.' or '/'")
        if name in self.tasks:
            raise ConfigError(f"task {name!r} already exists; tasks: {self.names}")
        run = run if isinstance(run, FinishedRun) else open_run(run)
        if run.config.backbone != self.backbone_name:
            raise ConfigError(f"task {name!r}: run {run.path} was trained on backbone {run.config.backbone!r}, "
                              f"this table serves {self.backbone_name!r}")
        self._check_size(name, run)
        self._check_dtype(name, run)
        shared = self.share_forward and get_method(run.config.method.name).serves_many(run.config.method.config)
        task = Task(name, run, shared)
        if shared:
            if self.multi is None:
                self.multi = MultiTaskBypass(self._take_model()).eval()
            if not len(self.multi.tasks):  # the first shared task's options bound the shared forward's chunks
                options = get_method(run.config.method.name).read_options(run.config.method.config, None)
                self.multi.backbone_batch = getattr(options, "backbone_batch", None)
                self.multi.backbone_tokens = getattr(options, "backbone_tokens", BACKBONE_TOKENS)
            try:
                self.multi.add_task(name, run.path / FINAL)
            except (ValueError, RuntimeError, KeyError) as err:
                raise CheckpointError(f"task {name!r}: {run.path / FINAL} does not load ({err})") from err
        else:
            try:
                task.model = run.model(self._take_backbone())
            except (CheckpointError, ConfigError):
                raise
            except Exception as err:  # e.g. safetensors' own error for a damaged file
                raise CheckpointError(f"task {name!r}: {run.path / FINAL} does not load "
                                      f"({type(err).__name__}: {err})") from err
        for key, given in self._given.items():  # the first task fixes the input size not given
            if not self.tasks and not given:
                setattr(self, key, getattr(run.config.data, key))
        self.tasks[name] = task
        return task

    def remove(self, name: str) -> Task:
        """Remove task `name` (KeyError if there is none); the backbone's weights are untouched."""
        if name not in self.tasks:
            raise KeyError(name)
        task = self.tasks.pop(name)
        if task.shared:
            self.multi.remove_task(name)
        return task

    def _check_size(self, name: str, run: FinishedRun) -> None:
        if not self.tasks:
            return
        data = run.config.data
        if any(not given and getattr(data, key) != getattr(self, key) for key, given in self._given.items()):
            raise ConfigError(
                f"task {name!r}: run {run.path} was trained on inputs of image_size {data.image_size}, max_length "
                f"{data.max_length}; the tasks here on {self.image_size}, {self.max_length}. Serve it apart, or "
                "fix the input size for all (image_size/max_length)")

    def _check_dtype(self, name: str, run: FinishedRun) -> None:
        """A run is answered on a backbone held as it was trained: the first task fixes the table's dtype."""
        dtype = run.config.backbone_dtype
        if self._dtype_given or self.tasks:
            if dtype != self.backbone_dtype:
                raise ConfigError(f"task {name!r}: run {run.path} was trained on a {dtype} backbone; this table "
                                  f"holds it in {self.backbone_dtype} (backbone_dtype), as its other tasks were "
                                  f"trained. Serve it apart")
            return
        if dtype != (self.backbone_dtype or "float32"):  # no task fixes it yet: hold the backbone as this run did
            self.backbone, self._free, self.multi = load_backbone(self.backbone_name, dtype), True, None
        self.backbone_dtype = dtype

    def _take_model(self) -> nn.Module:
        return self._take_backbone().model

    def _take_backbone(self) -> Backbone:
        """The encoding backbone the first time (its model is still plain), a fresh copy after."""
        if self._free:
            self._free = False
            return self.backbone
        return load_backbone(self.backbone_name, self.backbone_dtype or "float32")

    # --- answers -------------------------------------------------------------------------------
    def encode(self, inputs: Inputs) -> dict[str, torch.Tensor]:
        """The backbone's inputs for texts or images (resized to the tasks' image size)."""
        if self.kind == "text":
            if isinstance(inputs, torch.Tensor) or not all(isinstance(x, str) for x in inputs):
                raise ConfigError(f"backbone {self.backbone_name!r} reads texts; the inputs are not all strings")
            data = LabelledData(list(inputs), torch.zeros(len(inputs), dtype=torch.long), ["?"])
        else:
            if not isinstance(inputs, torch.Tensor):
                if any(not isinstance(x, torch.Tensor) or x.dim() != 3 for x in inputs):
                    raise ConfigError(f"backbone {self.backbone_name!r} reads images; expected (C, H, W) tensors")
                inputs = torch.cat([resize(x[None], self.image_size) for x in inputs])
            data = LabelledData(inputs, torch.zeros(len(inputs), dtype=torch.long), ["?"])
        return self.backbone.encode(data, self.image_size, self.max_length)

    @torch.no_grad()
    def answer(self, queries: Sequence[Query]) -> list[dict[str, torch.Tensor]]:
        """For each query, `{task: (n_inputs, n_classes) logits}`. All queries' inputs go through one
        backbone forward for the shared tasks (routed per sample), and one per other task that is asked."""
        if not queries:
            return []
        for q in queries:
            unknown = [t for t in q.tasks if t not in self.tasks]
            if unknown:
                raise KeyError(unknown[0])
        starts, flat, total = [], [], 0
        for q in queries:
            starts.append(total)
            total += len(q.inputs)
            flat.extend(q.inputs if not isinstance(q.inputs, torch.Tensor) else q.inputs.unbind(0))
        rows: dict[str, list[int]] = {}
        for q, start in zip(queries, starts):
            for t in dict.fromkeys(q.tasks):
                rows.setdefault(t, []).extend(range(start, start + len(q.inputs)))
        encoded = self.encode(flat)
        logits = self._logits(encoded, rows)
        positions = {t: {row: i for i, row in enumerate(r)} for t, r in rows.items()}
        out = []
        for q, start in zip(queries, starts):
            answer = {}
            for t in q.tasks:
                position = positions[t]
                index = torch.tensor([position[r] for r in range(start, start + len(q.inputs))], dtype=torch.long)
                answer[t] = logits[t].index_select(0, index)
            out.append(answer)
        return out

    def _logits(self, encoded: dict[str, torch.Tensor], rows: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """`{task: logits of the samples rows[task]}` from the encoded batch."""
        logits = {}
        shared = {t: r for t, r in rows.items() if self.tasks[t].shared}
        if shared:
            features = self.multi.features(**encoded)
            self.forwards += 1
            logits.update(self.multi.answer(features, encoded.get("attention_mask"), shared))
        for t, r in rows.items():
            task = self.tasks[t]
            if task.shared:
                continue
            index = torch.tensor(r, dtype=torch.long)
            part = {k: v.index_select(0, index) for k, v in encoded.items()}
            logits[t] = task.model(**part)
            self.forwards += 1
        return logits
