"""Trainable-parameter counts, shared by every tuned model."""

from __future__ import annotations


class ParameterReport:
    """`get_nb_trainable_parameters` and `print_trainable_parameters`, as PEFT's models have them."""

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; `all` counts the frozen backbone too."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        share = 100 * trainable / total
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")
