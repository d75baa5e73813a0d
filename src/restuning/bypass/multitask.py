"""`MultiTaskBypass`: N bypass tasks served by one backbone forward per batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from .config import BACKBONE_TOKENS, BypassConfig
from .model import FrozenBackbone, ResTuningBypassModel, _build_task, _needed, load_task, save_task
from .network import BypassTask

TaskSource = ResTuningBypassModel | BypassTask | BypassConfig | str | Path


class MultiTaskBypass(FrozenBackbone):
    """A frozen backbone and several bypass tasks that read the same tapped features.

    `model(**inputs)` returns `{task: output}` for every task and every sample; with
    `task_ids=[...]` (one task name or index per sample) it returns a list with each sample's answer
    from its own task. Adding or removing a task changes only the taps and the task table, never the
    backbone's weights.

    Subclasses for other backbones set `task_class` and `single_class`, and may change how a task's
    answer is read out (`_run`) and how per-sample answers are put together (`_gather`).
    """

    task_class: type[BypassTask] = BypassTask
    single_class: type[ResTuningBypassModel] = ResTuningBypassModel

    def __init__(self, model: nn.Module, tasks: Mapping[str, TaskSource] | None = None,
                 backbone_batch: int | None = None, backbone_tokens: int | None = BACKBONE_TOKENS):
        """`backbone_batch`, `backbone_tokens`: the chunks of the shared frozen forward (as `BypassConfig`'s; the
        tasks' own configs do not set them, since one forward serves them all)."""
        chunks = BypassConfig(backbone_batch=backbone_batch, backbone_tokens=backbone_tokens)  # checks both
        plan = self.task_class.plan_for(model, BypassConfig())
        super().__init__(model, plan, needed=1)
        self.backbone_batch, self.backbone_tokens = chunks.backbone_batch, chunks.backbone_tokens
        self.tasks = nn.ModuleDict()
        for name, source in (tasks or {}).items():
            self.add_task(name, source)

    # --- the task table ----------------------------------------------------------------------
    def add_task(self, name: str, source: TaskSource) -> BypassTask:
        """Add a task from a single-task model, a task, a fresh config, or a checkpoint folder."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"task name {name!r}: expected a non-empty string without '.'")
        if name in self.tasks:
            raise ValueError(f"task {name!r} already exists; tasks: {list(self.tasks)}")
        kind = self.task_class
        if isinstance(source, self.single_class):
            task = source.task
        elif isinstance(source, kind):
            task = source
        elif isinstance(source, BypassConfig):
            task = _build_task(self.base_model, kind.plan_for(self.base_model, source), source, kind)
        elif isinstance(source, (str, Path)):
            task = load_task(self.base_model, Path(source), kind)
        else:
            raise ConfigError(f"task {name!r}: expected a bypass model, task, BypassConfig or checkpoint folder, "
                              f"got {type(source).__name__}")
        if task.reinjected:
            raise ConfigError(f"task {name!r} re-injects its bypass state into the last {task.config.reinject} "
                              f"blocks, which then run on that task's own state: one backbone forward cannot serve "
                              f"it beside other tasks; run it on its own (ResTuningBypassModel)")
        if task.plan.points != self.plan.points:
            raise ConfigError(f"task {name!r} taps {list(task.plan.points)}, this backbone {list(self.plan.points)}")
        self.tasks[name] = task
        self._retap_for_tasks()
        return task

    def remove_task(self, name: str) -> BypassTask:
        task = self.tasks.pop(name)
        if self.tasks:
            self._retap_for_tasks()
        return task

    def _retap_for_tasks(self) -> None:
        tasks = list(self.tasks.values())
        self._retap(max(_needed(t) for t in tasks), all(t.first_token_only for t in tasks))

    def save_task(self, name: str, directory: str | Path) -> None:
        """Save one task as a checkpoint that the single-task model's `from_pretrained` also reads."""
        save_task(self.tasks[name], self.base_model, Path(directory))

    # --- inference -----------------------------------------------------------------------------
    def forward(
        self, *args: Any, task_ids: Sequence[str | int] | torch.Tensor | None = None, **kwargs: Any
    ) -> dict[str, torch.Tensor] | list[torch.Tensor]:
        if not self.tasks:
            raise RuntimeError("MultiTaskBypass has no tasks; add one with add_task")
        features = self.features(*args, **kwargs)
        mask = kwargs.get("attention_mask")
        if task_ids is None:
            return {name: self._run(task, features, mask) for name, task in self.tasks.items()}
        names = self._task_names(task_ids, features[0].shape[0])
        rows = {name: [i for i, n in enumerate(names) if n == name] for name in self.tasks}
        answers: list[torch.Tensor | None] = [None] * len(names)
        for name, out in self.answer(features, mask, rows).items():
            for row, value in zip(rows[name], out, strict=True):
                answers[row] = value
        return self._gather(answers)

    def answer(self, features: list[torch.Tensor], mask: torch.Tensor | None,
               rows: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
        """`{task: its answer for the samples rows[task]}`, each (len(rows[task]), ...) (logits
        (len(rows[task]), num_classes) for a classification task), from the tapped `features` (each (B, ...),
        from `self.features`) of one backbone forward; a sample may go to several tasks, a task with no rows
        is skipped. `mask`: the (B, L) attention mask of token backbones, or None."""
        out = {}
        for name, wanted in rows.items():
            if not wanted:
                continue
            if name not in self.tasks:
                raise ValueError(f"unknown task {name!r}; tasks are {list(self.tasks)}")
            if len(wanted) == features[0].shape[0] and list(wanted) == list(range(len(wanted))):
                out[name] = self._run(self.tasks[name], features, mask)
                continue
            index = torch.tensor(list(wanted), device=features[0].device)
            out[name] = self._run(self.tasks[name], [f.index_select(0, index) for f in features],
                                  None if mask is None else mask.index_select(0, index))
        return out

    def _run(self, task: BypassTask, features: list[torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
        """One task's answer for the samples whose features are given."""
        return task(features, mask, self.final_norm)

    def _gather(self, answers: list[torch.Tensor]) -> Any:
        """Per-sample answers (each from its own task), in batch order; here the list itself."""
        return answers

    def _task_names(self, task_ids: Sequence[str | int] | torch.Tensor, batch: int) -> list[str]:
        ids = task_ids.tolist() if isinstance(task_ids, torch.Tensor) else list(task_ids)
        if len(ids) != batch:
            raise ValueError(f"task_ids: expected one task per sample ({batch}), got {len(ids)}")
        order = list(self.tasks)
        names = []
        for t in ids:
            if isinstance(t, int) and 0 <= t < len(order):
                names.append(order[t])
            elif isinstance(t, str) and t in self.tasks:
                names.append(t)
            else:
                raise ValueError(
                    f"task_ids: unknown task {t!r}; tasks are {order} (names or indices 0..{len(order) - 1})"
                )
        return names
