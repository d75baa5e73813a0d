"""Task types, as PEFT's `TaskType` names them: which of a model's modules a task trains and saves in full
beside the tuners (PEFT's `modules_to_save` defaults), plus `IMAGE_CLS`, which PEFT lacks.

A task with heads needs at least one of them in the model (matched by PEFT's rules for a list: an exact
name or a `.suffix`). `CAUSAL_LM`, `SEQ_2_SEQ_LM` and `FEATURE_EXTRACTION` train no head, as in PEFT: the
language-model head is the pretrained output layer (often tied to the input embeddings, and a vocabulary
wide); name it in `modules_to_save` to train it anyway.
"""

from __future__ import annotations

from torch import nn

from .errors import ConfigError
from .ops.matching import name_matches

TASK_HEADS: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "IMAGE_CLS": ("classifier",),
    "QUESTION_ANS": ("qa_outputs",),
    "CAUSAL_LM": (),
    "SEQ_2_SEQ_LM": (),
    "FEATURE_EXTRACTION": (),
}
TASK_TYPES = tuple(TASK_HEADS)
_LANGUAGE_MODELS = ("CAUSAL_LM", "SEQ_2_SEQ_LM")


def task_heads(model: nn.Module, task_type: str | None) -> list[str]:
    """Full names of the modules `task_type` trains and saves on `model`, outermost only.

    Raises ConfigError when the model lacks what the task needs: a head named as the task's heads are, or
    (for a language model) an output embedding.
    """
    if task_type is None:
        return []
    if task_type not in TASK_HEADS:
        raise ConfigError(f"task_type: expected one of {list(TASK_TYPES)}, got {task_type!r}")
    heads = list(TASK_HEADS[task_type])
    if task_type in _LANGUAGE_MODELS:
        output = getattr(model, "get_output_embeddings", None)
        if callable(output) and output() is None:
            raise ConfigError(f"task_type {task_type}: {type(model).__name__} has no language-model head "
                              "(get_output_embeddings() is None); expected a ...ForCausalLM or "
                              "...ForConditionalGeneration model, or task_type FEATURE_EXTRACTION for a bare backbone")
    if not heads:
        return []
    found = outermost([n for n, _ in model.named_modules() if n and name_matches(n, heads)])
    if not found:
        children = [n for n, _ in model.named_children()]
        raise ConfigError(f"task_type {task_type}: {type(model).__name__} has no head named {' or '.join(heads)}; "
                          f"its top-level modules are {children}. Name the head in modules_to_save, or use a "
                          "...For<Task> model")
    return found


def outermost(names: list[str]) -> list[str]:
    """`names` without those inside another of them, in their order."""
    return [n for n in names if not any(n.startswith(other + ".") for other in names)]
