"""`transformers.Trainer` with a `ResTuningModel`: checkpoints that hold the adapters only, and resume.

`Trainer(model=tuned, ..., callbacks=[ResTuningCallback()])`. The Trainer saves any model that is not a
`PreTrainedModel` as `model.state_dict()` (the whole backbone, each checkpoint) and resumes with
`load_state_dict(..., strict=False)`. The callback gives the model PyTorch's own state-dict hooks when the
Trainer is built: its state dict is then its adapters alone (the frozen backbone comes from its own
checkpoint), and loading one does not report the backbone as missing. So the Trainer's `checkpoint-N/`
holds the adapters' tensors and the optimizer state for them, and resumes as usual
(`trainer.train(resume_from_checkpoint=True)`). Each checkpoint also gets the library's checkpoint
(`save_pretrained`: weights, config, model card with the last logged metrics), which
`ResTuningModel.from_pretrained(backbone, "out/checkpoint-N")` opens.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .errors import ConfigError
from .model import ResTuningModel

ADAPTERS = "adapters."


def keep_adapters_only(model: ResTuningModel) -> None:
    """From now on, `model.state_dict()` holds its adapters alone, and `model.load_state_dict` of such a
    state does not report the frozen backbone's entries as missing (a missing adapter entry still is)."""
    if not isinstance(model, ResTuningModel):
        raise ConfigError(f"ResTuningCallback: expected the Trainer's model to be a ResTuningModel, got "
                          f"{type(model).__name__}")
    if getattr(model, "_adapters_only_state", False):
        return

    def drop_backbone(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for key in [k for k in state if k.startswith(prefix) and not k.startswith(prefix + ADAPTERS)]:
            del state[key]

    def backbone_not_missing(module: nn.Module, incompatible: Any) -> None:
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k.startswith(ADAPTERS)]

    model.register_state_dict_post_hook(drop_backbone)
    model.register_load_state_dict_post_hook(backbone_not_missing)
    model._adapters_only_state = True


class ResTuningCallback(TrainerCallback):
    """Make a `transformers.Trainer` checkpoint and resume a `ResTuningModel`'s adapters only, and write
    the library's checkpoint (loadable with `ResTuningModel.from_pretrained`) into each checkpoint folder."""

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, **kwargs: Any) -> None:
        keep_adapters_only(model)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                model: nn.Module | None = None, **kwargs: Any) -> None:
        if not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        model.save_pretrained(folder, metrics=last_metrics(state))


def last_metrics(state: TrainerState) -> dict[str, Any] | None:
    """The latest evaluation metrics the Trainer logged (else the latest training loss), with the step."""
    for entry in reversed(state.log_history):
        metrics = {k: v for k, v in entry.items() if k.startswith("eval_")}
        if metrics:
            return {"step": entry.get("step"), **metrics}
    for entry in reversed(state.log_history):
        if "loss" in entry:
            return {"step": entry.get("step"), "train_loss": entry["loss"]}
    return None
