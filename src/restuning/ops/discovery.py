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
    """Full module names of an MHA's projections, plus what the prefix/prompt tuners need."""

    query: str
    key: str
    value: str
    out: str
    norm: str | None
    num_heads: int


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


_Q = re.compile(r"(q|query|q_proj|to_q|q_lin)")
_K = re.compile(r"(k|key|k_proj|to_k|k_lin)")
_V = re.compile(r"(v|value|v_proj|to_v|v_lin)")
_PRE_NORM = re.compile(r"(norm1|norm_1|ln_1|layernorm_before|layer_norm1|ln1|attention_norm)")


def find_ops(model: nn.Module, config: ResTuningConfig) -> list[OpSite]:
    """Every op that `config` puts a tuner on, in module order.

    Op kinds named in `target_modules` are found by name on any module; block lists are searched only
    for the kinds without an override (and, when some are found, to number the override sites by
    block; a site outside every block has `layer=None`).

    Raises OpMatchError (listing what was found) when an op kind that has a tuner matches nothing,
    or when a match is ambiguous.
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
            raise OpMatchError(f"no {kind} op matched; blocks found: {[s.name for s in stacks] or 'none'}")
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
        raise OpMatchError(f"{err}\n{_target_modules_hint(model, unnamed)}") from err


def _target_modules_hint(model: nn.Module, kinds: list[str]) -> str:
    """What to write instead of relying on blocks: a config naming this model's own Linear layers."""
    linears = [n for n, m in model.named_modules() if n and isinstance(m, nn.Linear)]
    needs = f"op kinds {kinds} are looked up in blocks, and none were found."
    if not linears:
        return f"The {needs} Name the ops with target_modules (PEFT's matching rules)."
    chosen = linears[:8]
    exact = all(not name_matches(n, chosen) or n in chosen for n, _ in model.named_modules())
    target = chosen if exact else "|".join(re.escape(n) for n in chosen)
    return (
        f"The {needs} Name the ops with target_modules instead; for example, a Res-Adapter in parallel to "
        f"Linear layers of this model: ResTuningConfig(mha=None, ffn='res_adapter', target_modules={{'ffn': "
        f"{target!r}}}), or LoRA on them: ResTuningConfig(mha=None, ffn=None, custom={{'lora': 'lora'}}, "
        f"target_modules={{'lora': {target!r}}}). Linear layers: {linears[:40]}"
    )


@dataclass
class BlockStack:
    """One list of blocks with the per-block map of its ops. `offset` numbers the blocks of chained
    lists (the stages of a CNN) globally."""

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
                "cross-attention); use block=..., or name modules with target_modules"
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
            attention = AttentionSite(
                query=f"{prefix}.{fam.query}",
                key=f"{prefix}.{fam.key}",
                value=f"{prefix}.{fam.value}",
                out=f"{prefix}.{fam.out}",
                norm=f"{prefix}.{fam.norm}" if fam.norm else None,
                num_heads=_num_heads(self.model, f"{prefix}.{fam.query}"),
            )
        return _make_site(self.model, kind, self.offset + i, entry, exit_, attention, prefix, fam.layout)


def _make_site(
    model: nn.Module, kind: str, layer: int | None, entry: str, exit_: str, attention: AttentionSite | None,
    block: str | None, layout: str = "tokens",
) -> OpSite:
    in_features, _ = widths(_get(model, entry), f"{kind} op {entry!r}")
    _, out_features = widths(_get(model, exit_), f"{kind} op {exit_!r}")
    return OpSite(kind, layer, entry, exit_, in_features, out_features, attention, block, layout)


def widths(module: nn.Module, where: str) -> tuple[int, int]:
    """(input, output) width of a module: the first weight layer's input, the last one's output
    (features of a Linear, channels of a Conv)."""
    layers = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    if not layers:
        raise OpMatchError(f"{where}: no linear or convolution layer inside to read its width from")
    first, last = layers[0], layers[-1]
    return (getattr(first, "in_features", None) or first.in_channels,
            getattr(last, "out_features", None) or last.out_channels)


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
                f"{[n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]}"
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
            f"{missing}; its modules are {sorted(p for p in present if p)}. Pass family='structural' or "
            "target_modules to locate the ops."
        )


def _structural_stacks(model: nn.Module) -> list[BlockStack]:
    """Blocks = ModuleLists of same-class children that each hold a q/k/v attention and an FFN."""
    candidates = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(b) for b in mod}) != 1 or len(_linears(mod[0])) < 4:
            continue
        if any(name.startswith(c + ".") for c, _ in candidates):
            continue
        candidates.append((name, mod))
    stacks, problems = [], []
    for name, mod in candidates:
        try:
            stacks.append(BlockStack(model, name, list(mod), _structural_map(mod[0], f"{name}.0")))
        except OpMatchError as err:
            problems.append(str(err))
    if not stacks:
        lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        names = [n for n, _ in model.named_modules() if n]
        raise OpMatchError(
            "could not find transformer blocks: no known family map for "
            f"model_type={getattr(getattr(model, 'config', None), 'model_type', None)!r}, and the structural "
            f"search found none. ModuleLists: {lists}. Problems: {problems}. Modules: {names[:40]}"
            f"{' ...' if len(names) > 40 else ''}. Name the ops with target_modules."
        )
    return stacks


def _structural_map(block: nn.Module, where: str) -> FamilyMap:
    linears = _linears(block)
    q = _one(linears, _Q, where, "query")
    k = _one(linears, _K, where, "key")
    v = _one(linears, _V, where, "value")
    order = [n for n, _ in linears]
    widths = dict(linears)
    after_v = [n for n in order[order.index(v) + 1:] if n not in (q, k)]
    out = next((n for n in after_v if widths[n].in_features == widths[v].out_features), None)
    if out is None:
        raise OpMatchError(f"{where}: no output projection after {v!r}; linear layers: {order}")
    after_out = order[order.index(out) + 1:]
    hidden = widths[out].out_features
    fc1 = next((n for n in after_out if widths[n].in_features == hidden and widths[n].out_features != hidden), None)
    fc2 = None if fc1 is None else next(
        (n for n in after_out[after_out.index(fc1) + 1:]
         if widths[n].in_features == widths[fc1].out_features and widths[n].out_features == hidden), None)
    if fc2 is None:
        raise OpMatchError(f"{where}: no FFN (hidden -> wider -> hidden) after {out!r}; linear layers: {order}")
    norms = [n for n, m in block.named_children() if isinstance(m, nn.LayerNorm) and _PRE_NORM.fullmatch(n)]
    return FamilyMap(
        name="structural", model_types=(), blocks="", mha=_op_span(block, q, out), ffn=_op_span(block, fc1, fc2),
        query=q, key=k, value=v, out=out, norm=norms[0] if len(norms) == 1 else None,
    )


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
        raise OpMatchError(f"target_modules[{kind!r}]={target!r} matched no module; module names include {sample}")
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
    try:
        fam = _structural_map_attention(_get(model, name))
    except OpMatchError as err:
        raise OpMatchError(f"{name}: not an attention with q/k/v and one output projection ({err})") from err
    q, k, v, out = (f"{name}.{n}" for n in fam)
    return AttentionSite(q, k, v, out, None, _num_heads(model, q))


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


def _one(linears: list[tuple[str, nn.Linear]], pattern: re.Pattern, where: str, role: str) -> str:
    hits = [n for n, _ in linears if pattern.fullmatch(n.rpartition(".")[2])]
    if len(hits) != 1:
        raise OpMatchError(
            f"{where}: expected one {role} projection, found {hits or 'none'}; linear layers: {[n for n, _ in linears]}"
        )
    return hits[0]


def _num_heads(model: nn.Module, query_name: str) -> int:
    parent = _get(model, query_name.rpartition(".")[0])
    for attr in ("num_attention_heads", "num_heads", "heads", "n_heads"):
        value = getattr(parent, attr, None)
        if isinstance(value, int):
            return value
    value = getattr(getattr(model, "config", None), "num_attention_heads", None)
    if isinstance(value, int):
        return value
    raise OpMatchError(f"{query_name}: cannot tell the number of attention heads")


def _linears(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    if isinstance(module, nn.Linear):
        return [("", module)]
    return [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]


def _get(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise OpMatchError(f"no module named {name!r} in {type(model).__name__}") from err


def describe(sites: Iterable[OpSite]) -> str:
    return "\n".join(f"{s.kind:>6} layer {s.layer}: {s.entry} -> {s.exit}" for s in sites)


__all__ = ["AttentionSite", "BlockStack", "OpMatchError", "OpSite", "OP_KINDS", "block_stacks", "describe",
           "find_ops", "widths"]
