"""The bound (original) forms of prefix tuning, VPT-deep and the serial Houlsby adapter.

They exist to prove the unbound Res-Tuners exact (tests, `benchmarks/equivalence.py`), so they are
written the way the published methods work, on real transformers modules:
- prefix tuning concatenates K_pre, V_pre to every MHA's keys and values inside transformers' own
  attention function (eager or SDPA, whichever the model uses), through its `AttentionInterface`;
- VPT-deep joins prompt tokens to every block's input and drops them after the block;
- the Houlsby adapter runs serially on the FFN's output.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..attention import split_heads
from ..hooks import add_to_output, extend_mask, first_input, output_tensor, with_input
from ..ops import OpSite, widths
from ..tuners import OpContext, ResAdapter

_BOUND_NAME = "restuning_bound_prefix"
_PREFIXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # attention module -> (holder, key, impl)


def _bound_prefix_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' own attention with the prefix joined in front of the keys and values it receives: (B, H_kv,
    S, d) after RoPE and after the KV cache update, so prefix keys carry no position and never enter the cache."""
    holder, key_name, impl = _PREFIXES[module]
    k_pre, v_pre = holder.prefix(key_name)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", False) if causal is None else causal
    if attention_mask is None and causal and query.shape[2] > 1:  # SDPA's is_causal shortcut: spell the mask out
        t, s = query.shape[2], key.shape[2]
        attention_mask = torch.ones(t, s, dtype=torch.bool, device=query.device).tril(s - t)[None, None]
    b = key.shape[0]
    key = torch.cat([k_pre.to(key.dtype).expand(b, -1, -1, -1), key], dim=2)
    value = torch.cat([v_pre.to(value.dtype).expand(b, -1, -1, -1), value], dim=2)
    attention_mask = extend_mask(attention_mask, k_pre.shape[2], at_end=False, rows=False)
    if impl == "eager":
        original = sys.modules[type(module).__module__].eager_attention_forward
    else:
        original = ALL_ATTENTION_FUNCTIONS[impl]
    return original(module, query, key, value, attention_mask, **kwargs)


def _register_bound(impl: str) -> str:
    """Register the bound-prefix attention for `impl`, with `impl`'s own mask builder (transformers
    builds masks per implementation name, and gives none to a name it does not know)."""
    if impl not in ("eager", "sdpa"):
        raise NotImplementedError(f"bound prefix reference supports eager and sdpa, not {impl!r}")
    name = f"{_BOUND_NAME}_{impl}"
    AttentionInterface.register(name, _bound_prefix_attention)
    AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping[impl])
    return name


class BoundPrefixTuning(nn.Module):
    """Prefix tuning: per MHA, K_pre and V_pre of shape (H_kv, n, d) joined to the keys and values (under
    grouped-query attention each prefix head serves its group of query heads, as a cached key would)."""

    def __init__(self, model: nn.Module, sites: list[OpSite], tokens: int):
        super().__init__()
        self.model = [model]  # a list, so the backbone is not a submodule of this holder
        self._init_parameters()
        self._configs = []
        for site in sites:
            att = site.attention
            module = model.get_submodule(att.query.rpartition(".")[0])
            query = model.get_submodule(att.query)
            self._add_prefix(site, tokens, query.weight.dtype)
            impl = module.config._attn_implementation
            _PREFIXES[module] = (self, site.key, impl)
            if all(c is not module.config for c, _ in self._configs):
                self._configs.append((module.config, impl))
        for config, impl in self._configs:
            config._attn_implementation = _register_bound(impl)

    def _init_parameters(self) -> None:
        self.prefix_key, self.prefix_value = nn.ParameterDict(), nn.ParameterDict()

    def _add_prefix(self, site: OpSite, tokens: int, dtype: torch.dtype) -> None:
        att = site.attention
        shape = (att.num_kv_heads, tokens, att.head_dim)
        self.prefix_key[site.key] = nn.Parameter(torch.randn(shape, dtype=dtype) * 0.02)
        self.prefix_value[site.key] = nn.Parameter(torch.randn(shape, dtype=dtype))

    def prefix(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix keys and values of the MHA `key`, (1, H_kv, n, d) each."""
        return self.prefix_key[key][None], self.prefix_value[key][None]

    def forward(self, *args, **kwargs):
        return self.model[0](*args, **kwargs)

    def remove(self) -> None:
        for config, impl in self._configs:
            config._attn_implementation = impl


class BoundDeepPrompt(BoundPrefixTuning):
    """Deep prompt tuning as a decoder takes it: per MHA, prompt tokens (n, D) go through that layer's frozen
    pre-norm and key/value projections, and their keys and values join the attention's own, without a position
    (RoPE never rotates them) and outside the KV cache. For the real tokens this is VPT-deep's effect (prompts
    joined to the block input, their own outputs dropped) with position-free prompts."""

    def _init_parameters(self) -> None:
        self.prompts, self._projections = nn.ParameterDict(), {}

    def _add_prefix(self, site: OpSite, tokens: int, dtype: torch.dtype) -> None:
        att = site.attention
        model = self.model[0]
        width = widths(model.get_submodule(att.key), att.key)[0]
        self.prompts[site.key] = nn.Parameter(torch.randn(tokens, width, dtype=dtype))
        get = model.get_submodule
        self._projections[site.key] = (att, get(att.norm) if att.norm else None, get(att.key), get(att.value))

    def prefix(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        att, norm, k_proj, v_proj = self._projections[key]
        tokens = self.prompts[key][None]
        if norm is not None:
            tokens = norm(tokens)
        if att.fused:
            k = k_proj(tokens)[..., att.num_heads * att.head_dim:]
            k, v = k.split(att.num_kv_heads * att.head_dim, dim=-1)
        else:
            k, v = k_proj(tokens), v_proj(tokens)
        return split_heads(k, att.num_kv_heads), split_heads(v, att.num_kv_heads)


class _HookedReference(nn.Module):
    """A reference form that runs the backbone (held outside the module tree) with its own hooks."""

    def forward(self, *args, **kwargs):
        return self.model[0](*args, **kwargs)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class BoundVPTDeep(_HookedReference):
    """VPT-deep: per block, n prompt tokens (n, D) joined to the block input, dropped after it."""

    def __init__(self, model: nn.Module, blocks: list[str], tokens: int, width: int):
        super().__init__()
        self.model = [model]
        self.prompts = nn.ParameterDict()
        self.handles = []
        for name in blocks:
            key = name.replace(".", "/")
            block = model.get_submodule(name)
            self.prompts[key] = nn.Parameter(torch.randn(tokens, width, dtype=next(block.parameters()).dtype))
            self.handles.append(block.register_forward_pre_hook(self._join(key), with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._drop(tokens)))

    def _join(self, key: str):
        def hook(module, args, kwargs):
            x = first_input(args, kwargs)
            prompts = self.prompts[key].to(x.dtype).expand(x.shape[0], -1, -1)
            n = prompts.shape[1]
            return with_input(args, kwargs, torch.cat([x, prompts], dim=1), lambda m: extend_mask(m, n, True, True))

        return hook

    def _drop(self, n: int):
        def hook(module, args, output):
            out = output_tensor(output)[:, :-n]
            return out if isinstance(output, torch.Tensor) else (out, *output[1:])

        return hook



class BoundHoulsbyAdapter(_HookedReference):
    """Serial adapter after each FFN: `h = FFN(x); h + up(act(down(h)))`."""

    def __init__(self, model: nn.Module, sites: list[OpSite], dim: int):
        super().__init__()
        self.model = [model]
        self.adapters = nn.ModuleDict()
        self.handles = []
        for site in sites:
            module = model.get_submodule(site.exit)
            adapter = ResAdapter(OpContext(site.out_features, site.out_features), dim, reads="input")
            nn.init.normal_(adapter.up.weight, std=0.02)
            adapter.to(next(module.parameters()).dtype)
            self.adapters[site.key] = adapter
            self.handles.append(module.register_forward_hook(self._serial(adapter)))

    @staticmethod
    def _serial(adapter: ResAdapter):
        def hook(module, args, output):
            h = output_tensor(output)
            return add_to_output(output, adapter(h, h))

        return hook



@dataclass
class FormComparison:
    """Bound vs unbound: largest output and gradient differences, and seconds per forward+backward."""

    form: str
    output_diff: float
    grad_diff: float
    output_scale: float  # max |output| of the bound form, to read the differences relative to
    grad_scale: float
    bound_seconds: float
    unbound_seconds: float

    @property
    def relative_output_diff(self) -> float:
        return self.output_diff / self.output_scale

    @property
    def relative_grad_diff(self) -> float:
        return self.grad_diff / self.grad_scale


def compare_forms(
    model: nn.Module, inputs: dict, form: str, read=lambda out: out.last_hidden_state, tokens: int = 10,
    repeats: int = 1,
) -> FormComparison:
    """Run `form` ("prefix", "prompt" or "adapter") bound and unbound on copies of `model` with the same
    weights; compare outputs and the gradients of every tuner parameter for one random linear loss."""
    from ..baselines.presets import preset_config
    from ..model import get_restuning_model

    presets = {"prefix": "prefix", "prompt": "vpt_deep", "adapter": "adapter"}  # the trainer's method names
    if form not in presets:
        raise ValueError(f"form: expected one of {sorted(presets)}, got {form!r}")
    tuned = get_restuning_model(copy.deepcopy(model), preset_config(presets[form], model, {"dim": tokens}))
    sites = list(tuned.sites.values())
    bound_model = copy.deepcopy(model).requires_grad_(False)  # frozen, as any user of these methods has it
    if form == "prefix":
        bound = BoundPrefixTuning(bound_model, sites, tokens)
        pairs = [(bound.prefix_key[s.key], tuned.tuners[s.key].prefix_key) for s in sites]
        pairs += [(bound.prefix_value[s.key], tuned.tuners[s.key].prefix_value) for s in sites]
    elif form == "prompt":
        width = sites[0].in_features
        bound = BoundVPTDeep(bound_model, [s.block for s in sites], tokens, width)
        pairs = [(bound.prompts[s.block.replace(".", "/")], tuned.tuners[s.key].prompt) for s in sites]
    else:
        bound = BoundHoulsbyAdapter(bound_model, sites, tokens)
        pairs = [(pb, pu) for s in sites for pb, pu in
                 zip(bound.adapters[s.key].parameters(), tuned.tuners[s.key].parameters())]
    with torch.no_grad():
        for pb, pu in pairs:
            pu.copy_(pb)
    try:
        times_b, times_u = [], []
        for _ in range(repeats + 1):  # interleaved; the first round warms up and is not timed
            out_b, t_b = _forward_backward(bound, inputs, read)
            out_u, t_u = _forward_backward(tuned, inputs, read)
            times_b.append(t_b)
            times_u.append(t_u)
        grad_diff = max((pb.grad - pu.grad).abs().max().item() for pb, pu in pairs)
        grad_scale = max(pb.grad.abs().max().item() for pb, _ in pairs)
    finally:
        bound.remove()
    return FormComparison(form, (out_b - out_u).abs().max().item(), grad_diff, out_b.abs().max().item(),
                          grad_scale, statistics.median(times_b[1:]), statistics.median(times_u[1:]))


def _forward_backward(model: nn.Module, inputs: dict, read) -> tuple[torch.Tensor, float]:
    for p in model.parameters():
        p.grad = None
    start = time.perf_counter()
    out = read(model(**inputs))
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weights).sum().backward()
    return out.detach(), time.perf_counter() - start
