"""Finding the ops of a backbone: a family map, a structural search, or the user's names."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from ..config import OP_KINDS, ResTuningConfig
from ..errors import OpMatchError
from .maps import FAMILIES, FamilyMap, family_for_model
from .matching import name_matches


@dataclass(frozen=True)
class AttentionSite:
    """Full module names of an MHA's projections, plus what the prefix/prompt tuners need.

    `query == key == value` names one fused projection whose output is `[q; k; v]` (GPT-2's `c_attn`).
    Queries have `num_heads` heads of `head_dim`, keys and values `num_kv_heads` (fewer under grouped-query
    attention). `scale` multiplies the scores (None: `head_dim ** -0.5`). `exact`: the scores are
    `softmax(Q K^T * scale + mask)` and nothing else, so prefix/prompt unbinding can be exact (False where the
    attention adds relative-position terms: DeBERTa, Swin).
    """

    query: str
    key: str
    value: str
    out: str
    norm: str | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float | None = None
    exact: bool = True

    @property
    def fused(self) -> bool:
        return self.query == self.key == self.value


@dataclass(frozen=True)
class OpSite:
    """One frozen op: `x` is the first input of `entry`, `OP(x)` the output of `exit`."""

    kind: str
    layer: int | None
    entry: str
    exit: str
    in_features: int
    out_features: int
    attention: AttentionSite | None = None
    block: str | None = None  # name of the enclosing block, where there is one
    layout: str = "tokens"  # "map": the op reads and writes (B, C, H, W) feature maps

    @property
    def key(self) -> str:
        """A stable, ModuleDict-safe name for the tuner on this op."""
        return f"{self.kind}@{self.exit}".replace(".", "/")


_Q = re.compile(r"(q|query|q_proj|to_q|q_lin|query_proj)")
_K = re.compile(r"(k|key|k_proj|to_k|k_lin|key_proj)")
_V = re.compile(r"(v|value|v_proj|to_v|v_lin|value_proj)")
# A fused projection whose output is [q; k; v] in thirds (GPT-2, timm). Names whose layout interleaves the heads
# (BLOOM's and Falcon's `query_key_value`) are deliberately absent: splitting them in thirds would be wrong.
_QKV = re.compile(r"(c_attn|qkv)")
_PRE_NORM = re.compile(r"(norm1|norm_1|ln_1|layernorm_before|layer_norm1|ln1|attention_norm|input_layernorm)")
# Signs that an attention adds position terms to its scores (relative-position biases) or normalises q/k after
# projecting them: exact prefix/prompt unbinding from the projections' outputs does not hold there.
_NOT_PLAIN = re.compile(r"(.*\.)?(relative_position\w*|pos_\w+|q_norm|k_norm)")


def find_ops(model: nn.Module, config: ResTuningConfig) -> list[OpSite]:
    """Every op that `config` puts a tuner on, in module order.

    Op kinds named in `target_modules` are found by name on any module; block lists are searched only
    for the kinds without an override (and, when some are found, to number the override sites by
    block; a site outside every block has `layer=None`).

    Raises OpMatchError (listing what was found, with a `target_modules` example that works for this model)
    when an op kind that has a tuner matches nothing, or when a match is ambiguous.
    """
    specs = config.specs()
    stacks = _stacks_for(model, config, [kind for kind in specs if kind not in config.target_modules])
    sites: list[OpSite] = []
    for kind, spec in specs.items():
        layers = spec.layers if spec.layers is not None else config.layers
        if kind in config.target_modules:
            pool = stacks
            found = _override_sites(model, kind, config.target_modules[kind], stacks)
        else:
            pool = [stack for stack in stacks if stack.has(kind)]
            if not pool:
                stacks[0].sites(kind)  # raises, naming the family
            found = [site for stack in pool for site in stack.sites(kind)]
        if layers is not None:
            if not pool:
                raise OpMatchError(
                    f"{kind}.layers={layers}: layer indices count blocks, and no blocks were found in "
                    f"{type(model).__name__}; drop `layers` and choose the modules with target_modules[{kind!r}]"
                )
            depth = max((s.offset + len(s.blocks) for s in pool), default=0)
            bad = [i for i in layers if not 0 <= i < depth]
            if bad:
                raise OpMatchError(f"{kind}.layers: {bad} out of range; the backbone has blocks 0..{depth - 1}")
            found = [s for s in found if s.layer in layers]
        if not found:
            raise OpMatchError(f"no {kind} op matched; blocks found: {[s.name for s in stacks] or 'none'}. "
                               f"{target_modules_hint(model)}")
        sites.extend(found)
    return sites


def _stacks_for(model: nn.Module, config: ResTuningConfig, unnamed: list[str]) -> list[BlockStack]:
    """The block lists of `model`, for the op kinds in `unnamed` (those without target_modules).

    With every kind named, blocks only number the sites: a model without any (a plain MLP) gives [].
    A forced family map is still checked against the model, since the user asked for it.
    """
    if not unnamed:
        try:
            return block_stacks(model, config.family)
        except OpMatchError:
            if config.family not in (None, "structural"):
                raise
            return []
    try:
        return block_stacks(model, config.family)
    except OpMatchError as err:
        raise OpMatchError(
            f"{err}\nThe op kinds {unnamed} are looked up in blocks, and none were found. {target_modules_hint(model)}"
        ) from err


def target_modules_hint(model: nn.Module) -> str:
    """What to write instead of relying on blocks or maps: two configs naming this model's own weight layers
    (nn.Linear, transformers' Conv1D), which work on it as written."""
    layers = [n for n, m in model.named_modules() if n and _weight_widths(m) is not None]
    if not layers:
        return "Name the ops with target_modules (PEFT's matching rules)."
    chosen = layers[:8]
    exact = all(not name_matches(n, chosen) or n in chosen for n, _ in model.named_modules())
    target = chosen if exact else "|".join(re.escape(n) for n in chosen)
    return (
        f"Name the ops with target_modules instead; for example, a Res-Adapter in parallel to weight layers of "
        f"this model: ResTuningConfig(mha=None, ffn='res_adapter', target_modules={{'ffn': {target!r}}}), or LoRA "
        f"on them: ResTuningConfig(mha=None, ffn=None, custom={{'lora': 'lora'}}, target_modules={{'lora': "
        f"{target!r}}}). Weight layers: {layers[:40]}{' ...' if len(layers) > 40 else ''}"
    )


@dataclass
class BlockStack:
    """One list of blocks with the per-block map of its ops. `offset` numbers the blocks of chained
    lists (the stages of a CNN, of a Swin) globally."""

    model: nn.Module
    name: str
    blocks: list[nn.Module]
    family: FamilyMap
    offset: int = 0

    def has(self, kind: str) -> bool:
        if kind == "block":
            return self.family.block_op
        return getattr(self.family, kind, None) is not None

    def sites(self, kind: str) -> list[OpSite]:
        if not self.has(kind):
            raise OpMatchError(
                f"the {self.family.name} family has no {kind} op (a CNN has blocks only; xattn needs a "
                f"cross-attention); use block=..., or name modules with target_modules. "
                f"{target_modules_hint(self.model)}"
            )
        return [self.site(kind, i) for i in range(len(self.blocks))]

    def site(self, kind: str, i: int) -> OpSite:
        prefix = f"{self.name}.{i}"
        fam = self.family
        if kind == "block":
            entry = exit_ = prefix
        else:
            rel_entry, rel_exit = getattr(fam, kind)
            entry, exit_ = f"{prefix}.{rel_entry}", f"{prefix}.{rel_exit}"
        attention = None
        if kind == "xattn":
            attention = _attention_site(self.model, entry)
        elif kind == "mha":
            attention = attention_site(
                self.model, *(f"{prefix}.{n}" for n in (fam.query, fam.key, fam.value, fam.out)),
                norm=f"{prefix}.{fam.norm}" if fam.norm else None, exact=fam.exact)
        return _make_site(self.model, kind, self.offset + i, entry, exit_, attention, prefix, fam.layout)


def _make_site(
    model: nn.Module, kind: str, layer: int | None, entry: str, exit_: str, attention: AttentionSite | None,
    block: str | None, layout: str = "tokens",
) -> OpSite:
    in_features, _ = widths(_get(model, entry), f"{kind} op {entry!r}")
    _, out_features = widths(_get(model, exit_), f"{kind} op {exit_!r}")
    return OpSite(kind, layer, entry, exit_, in_features, out_features, attention, block, layout)


def _weight_widths(module: nn.Module) -> tuple[int, int] | None:
    """(input, output) width of one weight layer: a Linear, a Conv, or transformers' `Conv1D` (GPT-2's linear
    layer, weight stored (in, out)); None for any other module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.in_channels, module.out_channels
    if type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int):
        return module.weight.shape[0], module.nf
    return None


def widths(module: nn.Module, where: str) -> tuple[int, int]:
    """(input, output) width of a module: the first weight layer's input, the last one's output
    (features of a Linear or a transformers Conv1D, channels of a Conv)."""
    layers = [w for m in module.modules() if (w := _weight_widths(m)) is not None]
    if not layers:
        raise OpMatchError(f"{where}: no linear or convolution layer inside to read its width from")
    return layers[0][0], layers[-1][1]


def block_stacks(model: nn.Module, family: str | None = None) -> list[BlockStack]:
    """The lists of blocks of `model`: by its family map (or the forced `family`), else structurally."""
    fam = _choose_family(model, family)
    if fam is not None:
        stacks = [stack for part in (fam, *fam.parts) for stack in _family_stacks(model, part)]
        if stacks:
            return stacks
        if family is not None:
            raise OpMatchError(
                f"family {fam.name!r}: no ModuleList named like {fam.blocks!r}; ModuleLists found: "
                f"{[n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]}. {target_modules_hint(model)}"
            )
    return _structural_stacks(model)


def _family_stacks(model: nn.Module, fam: FamilyMap) -> list[BlockStack]:
    """The block lists that one family map (or one part of it) names, checked against the map."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential))
             and re.fullmatch(fam.blocks, n)]
    stacks, offset = [], 0
    for n, m in lists:
        stacks.append(BlockStack(model, n, list(m), fam, offset if fam.chained else 0))
        offset += len(m)
    if stacks:
        _check_family_names(model, stacks[0])
    return stacks


def _choose_family(model: nn.Module, forced: str | None) -> FamilyMap | None:
    if forced == "structural":
        return None
    if forced is not None:
        if forced not in FAMILIES:
            raise OpMatchError(f"family: unknown {forced!r}; expected one of {sorted(FAMILIES)} or 'structural'")
        return FAMILIES[forced]
    return family_for_model(model)


def _check_family_names(model: nn.Module, stack: BlockStack) -> None:
    fam, prefix = stack.family, f"{stack.name}.0"
    ops = {*(fam.mha or ()), *(fam.ffn or ()), *(fam.xattn or ())}
    names = {*ops, fam.query, fam.key, fam.value, fam.out, fam.norm} - {None}
    present = {n for n, _ in stack.blocks[0].named_modules()}
    missing = sorted(n for n in names if n not in present)
    if missing:
        raise OpMatchError(
            f"family map {fam.name!r} does not fit this model (transformers version?): block {prefix!r} has no "
            f"{missing}; its modules are {sorted(p for p in present if p)}. Pass family='structural', or "
            f"{target_modules_hint(model)}"
        )


def _structural_stacks(model: nn.Module) -> list[BlockStack]:
    """Blocks = ModuleLists of same-class children that each hold one q/k/v attention and an FFN.

    Every such list is tried; a list found inside another one that fits is not a list of blocks (it lives
    in a block), while a list whose blocks hold several attentions (a Swin stage) gives way to the lists
    inside it. Lists whose names differ only in an index (`encoder.layers.0.blocks`, `encoder.layers.1.blocks`)
    run one after another: their blocks are numbered globally.
    """
    found, problems = [], []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(b) for b in mod}) != 1:
            problems.append(f"{name}: children of several classes {sorted({type(b).__name__ for b in mod})}")
            continue
        count = len(_linears(mod[0]))
        if count < 4:
            problems.append(f"{name}: a block holds {count} weight layers (nn.Linear or Conv1D); an attention and "
                            "an FFN need at least 4")
            continue
        try:
            found.append((name, mod, _structural_map(model, mod[0], f"{name}.0")))
        except OpMatchError as err:
            problems.append(str(err))
    found = [f for f in found if not any(f[0].startswith(o[0] + ".") for o in found)]
    if not found:
        lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        names = [n for n, _ in model.named_modules() if n]
        raise OpMatchError(
            "could not find transformer blocks: no known family map for "
            f"model_type={getattr(getattr(model, 'config', None), 'model_type', None)!r}, and the structural "
            f"search found none. ModuleLists: {lists}. Problems: {problems}. Modules: {names[:40]}"
            f"{' ...' if len(names) > 40 else ''}."
        )
    stacks, offsets = [], {}
    for name, mod, fam in found:
        chain = re.sub(r"\.\d+\.", ".#.", name)
        stacks.append(BlockStack(model, name, list(mod), fam, offsets.get(chain, 0)))
        offsets[chain] = offsets.get(chain, 0) + len(mod)
    return stacks


def _structural_map(model: nn.Module, block: nn.Module, where: str) -> FamilyMap:
    linears = _linears(block)
    widths_of = dict(linears)
    order = [n for n, _ in linears]
    fused = [n for n in order if _QKV.fullmatch(n.rpartition(".")[2]) and widths_of[n][1] == 3 * widths_of[n][0]]
    try:
        q = _one(linears, _Q, where, "query")
        k = _one(linears, _K, where, "key")
        v = _one(linears, _V, where, "value")
        query_width = widths_of[q][1]
    except OpMatchError:
        if len(fused) != 1:
            raise
        q = k = v = fused[0]
        query_width = widths_of[q][1] // 3
    # Position projections of a relative attention (DeBERTa's pos_key_proj) are neither output nor FFN layers.
    after_v = [n for n in order[order.index(v) + 1:] if n not in (q, k) and not _NOT_PLAIN.fullmatch(n)]
    out = next((n for n in after_v if widths_of[n][0] == query_width), None)
    if out is None:
        raise OpMatchError(f"{where}: no output projection (input width {query_width}) after {v!r}; "
                           f"linear layers: {order}")
    after_out = after_v[after_v.index(out) + 1:]
    hidden = widths_of[out][1]
    fc1 = next((n for n in after_out if widths_of[n][0] == hidden and widths_of[n][1] != hidden), None)
    fc2 = None if fc1 is None else next(
        (n for n in after_out[after_out.index(fc1) + 1:]
         if widths_of[n][0] == widths_of[fc1][1] and widths_of[n][1] == hidden), None)
    if fc2 is None:
        raise OpMatchError(f"{where}: no FFN (hidden -> wider -> hidden) after {out!r}; linear layers: {order}")
    norms = [n for n, m in block.named_children() if _is_norm(m) and _PRE_NORM.fullmatch(n)]
    attention = block.get_submodule(q.rpartition(".")[0]) if "." in q else block
    return FamilyMap(
        name="structural", model_types=(), blocks="", mha=_op_span(block, q, out), ffn=_op_span(block, fc1, fc2),
        query=q, key=k, value=v, out=out, norm=norms[0] if len(norms) == 1 else None, exact=_plain_scores(attention),
    )


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def _plain_scores(attention: nn.Module) -> bool:
    """No sign of relative-position terms or of a q/k norm in this attention (see `_NOT_PLAIN`)."""
    if getattr(attention, "relative_attention", False):
        return False
    names = [n for n, _ in attention.named_modules()] + [n for n, _ in attention.named_parameters()]
    return not any(_NOT_PLAIN.fullmatch(n) for n in names if n)


def _op_span(block: nn.Module, first: str, last: str) -> tuple[str, str]:
    """The op spans the parent of its first linear to its last linear, or is their common parent.
    A container that is never called itself (ModuleDict, ModuleList) cannot carry hooks: then the op
    spans the linears themselves."""

    def callable_parent(name: str) -> str:
        parent = name.rpartition(".")[0]
        if not parent or isinstance(block.get_submodule(parent), (nn.ModuleDict, nn.ModuleList)):
            return ""
        return parent

    p1, p2 = callable_parent(first), callable_parent(last)
    if p1 and p1 == p2:
        return p1, p1
    return p1 or first, last


def _override_sites(
    model: nn.Module, kind: str, target: str | list[str], stacks: list[BlockStack]
) -> list[OpSite]:
    names = [n for n, _ in model.named_modules() if n and name_matches(n, target)]
    if not names:
        sample = [n for n, _ in model.named_modules() if n][:40]
        raise OpMatchError(f"target_modules[{kind!r}]={target!r} matched no module; module names include {sample}. "
                           f"{target_modules_hint(model)}")
    nested = [(a, b) for a in names for b in names if b.startswith(a + ".")]
    if nested:
        raise OpMatchError(
            f"target_modules[{kind!r}]={target!r} is ambiguous: it matches nested modules {nested[:5]}; "
            f"all matches: {names}"
        )
    sites = []
    for name in names:
        layer, block, stack = _layer_of(name, stacks)
        attention = _attention_inside(model, name) if kind in ("mha", "xattn") else None
        layout = (stack or stacks[0]).family.layout if stacks else "tokens"
        sites.append(_make_site(model, kind, layer, name, name, attention, block, layout))
    return sites


def _attention_inside(model: nn.Module, name: str) -> AttentionSite | None:
    try:
        return _attention_site(model, name)
    except OpMatchError:
        return None


def _attention_site(model: nn.Module, name: str) -> AttentionSite:
    """The attention whose q/k/v/out projections are found by name inside module `name`; no norm
    (a cross-attention's keys come from another sequence, and an override names no norm)."""
    module = _get(model, name)
    try:
        fam = _structural_map_attention(module)
    except OpMatchError as err:
        raise OpMatchError(f"{name}: not an attention with q/k/v and one output projection ({err})") from err
    q, k, v, out = (f"{name}.{n}" for n in fam)
    return attention_site(model, q, k, v, out, None, _plain_scores(module))


def attention_site(model: nn.Module, query: str, key: str, value: str, out: str, norm: str | None,
                   exact: bool = True) -> AttentionSite:
    """The AttentionSite of projections named in `model`: head counts, head size and score scale read from
    the attention module (the parent of `query`) or the model config, else from the projections' widths."""
    heads = _num_heads(model, query)
    attention = _get(model, query.rpartition(".")[0])
    q_width = widths(_get(model, query), query)[1]
    if query == key == value:
        kv_heads = _attr_int(attention, model, ("num_key_value_heads", "num_kv_heads")) or heads
        head_dim = q_width // (heads + 2 * kv_heads)
    else:
        head_dim = q_width // heads
        kv_heads = widths(_get(model, key), key)[1] // head_dim
    if heads % kv_heads:
        raise OpMatchError(f"{query}: {heads} query heads do not group evenly over {kv_heads} key/value heads")
    scale = getattr(attention, "scaling", None)
    return AttentionSite(query, key, value, out, norm, heads, kv_heads, head_dim,
                         float(scale) if isinstance(scale, (int, float)) else None, exact)


def _structural_map_attention(module: nn.Module) -> tuple[str, str, str, str]:
    linears = _linears(module)
    q, k, v = (_one(linears, p, "override", r) for p, r in ((_Q, "query"), (_K, "key"), (_V, "value")))
    rest = [n for n, m in linears if n not in (q, k, v)]
    if len(rest) != 1:
        raise OpMatchError("no single output projection")
    return q, k, v, rest[0]


def _layer_of(name: str, stacks: list[BlockStack]) -> tuple[int | None, str | None, BlockStack | None]:
    for stack in stacks:
        if name.startswith(stack.name + "."):
            index = int(name[len(stack.name) + 1:].split(".")[0])
            return stack.offset + index, f"{stack.name}.{index}", stack
    return None, None, None


def _one(linears: list[tuple[str, tuple[int, int]]], pattern: re.Pattern, where: str, role: str) -> str:
    hits = [n for n, _ in linears if pattern.fullmatch(n.rpartition(".")[2])]
    if len(hits) != 1:
        raise OpMatchError(
            f"{where}: expected one {role} projection, found {hits or 'none'}; linear layers: {[n for n, _ in linears]}"
        )
    return hits[0]


def _num_heads(model: nn.Module, query_name: str) -> int:
    parent = _get(model, query_name.rpartition(".")[0])
    value = _attr_int(parent, model, ("num_attention_heads", "num_heads", "heads", "n_heads"))
    if value is None:
        raise OpMatchError(f"{query_name}: cannot tell the number of attention heads")
    return value


def _attr_int(module: nn.Module, model: nn.Module, attrs: tuple[str, ...]) -> int | None:
    """The first integer attribute of `module` among `attrs`, else of the model's config."""
    for attr in attrs:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    config = getattr(model, "config", None)
    for attr in attrs:
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _linears(module: nn.Module) -> list[tuple[str, tuple[int, int]]]:
    """(name, (in, out)) of every weight layer (nn.Linear, transformers Conv1D) inside `module`."""
    return [(n, w) for n, m in module.named_modules()
            if not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and (w := _weight_widths(m)) is not None]


def _get(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise OpMatchError(f"no module named {name!r} in {type(model).__name__}") from err


def describe(sites: Iterable[OpSite]) -> str:
    return "\n".join(f"{s.kind:>6} layer {s.layer}: {s.entry} -> {s.exit}" for s in sites)


__all__ = ["AttentionSite", "BlockStack", "OpMatchError", "OpSite", "OP_KINDS", "attention_site", "block_stacks",
           "describe", "find_ops", "target_modules_hint", "widths"]
