"""`BypassConfig`: the Res-Tuning-Bypass network of paper eq. 8, as plain data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ConfigBase, TunerSpec, check_family, option
from ..errors import ConfigError

POOLINGS = ("auto", "cls", "mean", "avg", "last")
VARIANTS = ("none", "horizontal", "vertical", "both")


@dataclass
class BypassConfig(ConfigBase):
    """Res-Tuning-Bypass: `b_l = lam_l * H_l(x_l) + (1 - lam_l) * V_l(b_{l-1})`, `lam_l = sigmoid(theta_l)`.

    The backbone runs once without autograd; `x_l` are its tapped layer outputs and `b_0` is the input
    of its first layer. `H_l` and `V_l` are `identity + Res-Tuner`, zero at initialisation.

    Args:
        horizontal / vertical: the Res-Tuner of `H_l` / `V_l` (a name, a `TunerSpec`, or `None` for the
            identity). Any registered tuner works. Table 3(b)'s variants: `BypassConfig.variant(...)`.
        dim: default tuner size (paper: 10).
        layers: indices of the tapped layers that feed the bypass, in forward order whatever order they
            are given in (`None`: every layer).
        num_classes: adds a linear head; the model then returns logits (batch, num_classes). `None`:
            the model returns the pooled final bypass state (batch, width).
        pooling: `cls` (first token), `mean` (over the attention mask), `avg` (spatial mean of a
            feature map), `last` (the last non-padding token by the attention mask, whichever side pads: a
            decoder's sequence summary), or `auto`: `avg` for CNNs, `last` for decoders (causal LMs), `mean`
            for text encoders, `cls` otherwise.
        final_norm: apply the backbone's own (frozen) final norm to the last bypass state.
        gate_init: initial `theta_l` (paper: 0, so `lam_l = 0.5`).
        recompute: keep only `b_{l-1}` of each bypass step for backward and recompute the step there
            (the bypass is tiny next to the backbone, so this costs little time and saves most of what
            autograd would hold). Results are the same either way.
        taps: override the tapped modules by name (PEFT matching rules), in forward order.
        family: force an op map (as in `ResTuningConfig.family`).
        tower: of a model with several towers (CLIPModel: `text_model`, `vision_model`), the submodule the bypass
            reads: its blocks are tapped (and `taps` are names inside it) and the backbone is called through it, so
            the model takes that tower's inputs alone.
    """

    horizontal: TunerSpec | str | None = "res_adapter"
    vertical: TunerSpec | str | None = "res_adapter"
    dim: int = option(10, ge=1)
    layers: list[int] | None = option(None, ge=0)
    num_classes: int | None = option(None, ge=1)
    pooling: str = option("auto", choices=POOLINGS)
    final_norm: bool = True
    gate_init: float = 0.0
    recompute: bool = True
    taps: str | list[str] | None = None
    family: str | None = None
    tower: str | None = None

    def validate(self) -> None:
        self.horizontal = TunerSpec.coerce(self.horizontal, "horizontal")
        self.vertical = TunerSpec.coerce(self.vertical, "vertical")
        check_family(self.family)

    @classmethod
    def variant(cls, name: str, tuner: str = "res_adapter", **kwargs: Any) -> BypassConfig:
        """Paper Table 3(b): `none` (a gated ensemble of layer features), `horizontal`, `vertical`, `both`."""
        if name not in VARIANTS:
            raise ConfigError(f"bypass variant: expected one of {VARIANTS}, got {name!r}")
        use_h, use_v = name in ("horizontal", "both"), name in ("vertical", "both")
        return cls(horizontal=tuner if use_h else None, vertical=tuner if use_v else None, **kwargs)
