"""`BypassConfig`: the Res-Tuning-Bypass network of paper eq. 8, as plain data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ConfigBase, TunerSpec, check_family, option
from ..errors import ConfigError

POOLINGS = ("auto", "cls", "mean", "avg", "last", "attention")
COMBINES = ("gates", "softmax")
VARIANTS = ("none", "horizontal", "vertical", "both")
# Positions per frozen-forward chunk by default: on 2 CPU cores, chunks of at most 2048 positions ran the no-grad
# forward of ViT-B/16, MiniLM and ResNet-50 at batch 32 in 0.77-1.03 of the whole batch's CPU time
# (benchmarks/backbone_chunks.py, docs/backbone_chunks.json).
BACKBONE_TOKENS = 2048


def backbone_batch_option() -> Any:
    """The `backbone_batch` option of every method that reads a frozen backbone without autograd."""
    return option(None, ge=1, help="run the frozen backbone on at most this many examples at a time and join "
                  "their features (the same features, since it runs without autograd; its transient activations "
                  "shrink with the chunk); overrides `backbone_tokens`; null: chunks by `backbone_tokens`")


def backbone_tokens_option() -> Any:
    """The `backbone_tokens` option of every method that reads a frozen backbone without autograd."""
    return option(BACKBONE_TOKENS, ge=1, help="unless `backbone_batch` is set, run the frozen backbone on chunks "
                  "of as many whole examples as hold at most this many positions of its first tapped state (a "
                  "sequence's tokens, a map's H x W; at least one example; counted once per input shape by running "
                  "one example up to that state): the same features, less transient memory, and on CPU within 3% "
                  "of the whole batch's time or faster (benchmarks/backbone_chunks.py). Only calls whose every "
                  "tensor argument is (batch, ...) with 2 or more dimensions are cut (not a KV cache, a UNet's "
                  "timesteps or SDXL's added conditions); a run with `reinject` runs the whole batch; null: the "
                  "whole batch at once")


@dataclass
class BypassConfig(ConfigBase):
    """Res-Tuning-Bypass: `b_l = lam_l * H_l(x_l) + (1 - lam_l) * V_l(b_{l-1})`, `lam_l = sigmoid(theta_l)`.

    The backbone runs once without autograd; `x_l` are its tapped layer outputs and `b_0` is the input
    of its first layer. `H_l` and `V_l` are `identity + Res-Tuner`, zero at initialisation.

    Each field's meaning is its `help` (`restuning config --method bypass` prints them all).
    """

    horizontal: TunerSpec | str | None = option("res_adapter", help="the Res-Tuner of `H_l`: a tuner name, a "
                                                "TunerSpec mapping, or null for the identity (Table 3(b)'s variants: "
                                                "`BypassConfig.variant(...)`)")
    vertical: TunerSpec | str | None = option("res_adapter", help="the Res-Tuner of `V_l` (as `horizontal`)")
    dim: int = option(10, ge=1, help="default tuner size (paper: 10)")
    layers: list[int] | None = option(None, ge=0, help="indices of the tapped layers that feed the bypass, in "
                                      "forward order whatever order they are given in; null: every layer")
    num_classes: int | None = option(None, ge=1, help="adds a linear head: the model returns logits (batch, "
                                     "num_classes); null: the pooled final bypass state (batch, width); a run sets it "
                                     "from its data")
    pooling: str = option("auto", choices=POOLINGS, help="`cls` (first token), `mean` (over the attention mask; "
                          "over every position of a feature map), "
                          "`avg` (spatial mean of a feature map), `last` (the last non-padding token by the "
                          "attention mask, whichever side pads: a decoder's summary), `attention` (a learned query "
                          "attends over the final state's tokens; the mean at init), or `auto`: `avg` for CNNs, "
                          "`last` for decoders (causal LMs), `mean` for text encoders, `cls` otherwise")
    combine: str = option("gates", choices=COMBINES, help="how the layers join: `gates` (eq. 8's chain, "
                          "`b_l = lam_l H_l(x_l) + (1 - lam_l) V_l(b_{l-1})`) or `softmax` (a learned softmax over "
                          "the layers, `b = sum_l w_l H_l(x_l)`, UniPT/SHERL-style; equal weights at init; no "
                          "vertical tuners, and one width and token count across the layers)")
    final_norm: bool = option(True, help="apply the backbone's own (frozen) final norm to the last bypass state")
    gate_init: float = option(0.0, help="initial `theta_l` (paper: 0, so `lam_l = 0.5`)")
    recompute: bool = option(True, help="keep only `b_{l-1}` of each bypass step for backward and recompute the step "
                             "there (little time, most of autograd's memory saved; the same results either way); "
                             "for features the backbone computes in the same call: training from a feature cache "
                             "never recomputes (the cache holds every x_l already)")
    taps: str | list[str] | None = option(None, help="override the tapped modules by name (PEFT matching rules), in "
                                          "forward order")
    family: str | None = option(None, help="force an op map (as `family` of restuning)")
    backbone_batch: int | None = backbone_batch_option()
    backbone_tokens: int | None = backbone_tokens_option()
    reinject: int = option(0, ge=0, help="late re-injection: the bypass state is added back into the inputs of the "
                           "last `reinject` tapped blocks (`z = x + s (b - x)`, one gate `s` per block, zero at "
                           "init), which then run again with autograd through their activations, never their "
                           "weights; more memory, and it gives up the feature cache and the one backbone forward "
                           "for many tasks (only the blocks before the injection are shared); token backbones, "
                           "every layer tapped; 0: off")
    tower: str | None = option(None, help="of a model with several towers (CLIPModel: `text_model`, `vision_model`), "
                               "the submodule the bypass reads: its blocks are tapped (`taps` are names inside it) and "
                               "the backbone is called through it, so the model takes that tower's inputs alone")

    def validate(self) -> None:
        self.horizontal = TunerSpec.coerce(self.horizontal, "horizontal")
        self.vertical = TunerSpec.coerce(self.vertical, "vertical")
        check_family(self.family)
        if self.combine == "softmax" and self.vertical is not None:
            raise ConfigError("combine: softmax weights each layer's H_l(x_l) on its own, with no chain between "
                              "layers for vertical tuners to run on; set vertical: null")
        if self.reinject:
            if self.combine != "gates":
                raise ConfigError("reinject adds the chain's state b_l back into the blocks; combine: softmax has no "
                                  "chain (set combine: gates, or reinject: 0)")
            if self.layers is not None:
                raise ConfigError("reinject runs the last blocks again on the bypass state of the layer before, so "
                                  "every layer must feed the bypass; set layers: null (or reinject: 0)")
            if self.backbone_batch is not None:
                raise ConfigError("reinject re-runs the last blocks on the whole batch with autograd; "
                                  "backbone_batch: null (or reinject: 0)")

    @property
    def shares_forward(self) -> bool:
        """Whether one backbone forward can serve this task beside others (no block runs on its own state)."""
        return self.reinject == 0

    @classmethod
    def variant(cls, name: str, tuner: str = "res_adapter", **kwargs: Any) -> BypassConfig:
        """Paper Table 3(b): `none` (a gated ensemble of layer features), `horizontal`, `vertical`, `both`."""
        if name not in VARIANTS:
            raise ConfigError(f"bypass variant: expected one of {VARIANTS}, got {name!r}")
        use_h, use_v = name in ("horizontal", "both"), name in ("vertical", "both")
        return cls(horizontal=tuner if use_h else None, vertical=tuner if use_v else None, **kwargs)
