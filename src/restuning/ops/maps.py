"""Where the ops are, per backbone family: data, not code paths.

Names are relative to one block. An op is a pair (entry, exit): the op's input `x` is the first
input of `entry` and `OP(x)` is the output of `exit`. They differ where a family splits one op over
sibling modules, as BERT does (`attention.self` computes the heads, `attention.output.dense` projects
them, then a residual LayerNorm follows that is not part of the op).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyMap:
    name: str
    model_types: tuple[str, ...]
    blocks: str  # re.fullmatch pattern for the names of the ModuleLists of blocks
    mha: tuple[str, str]
    ffn: tuple[str, str]
    query: str
    key: str
    value: str
    out: str
    norm: str | None  # the pre-norm before MHA (prompt tokens pass through it); None if post-norm


FAMILIES: dict[str, FamilyMap] = {
    m.name: m
    for m in (
        FamilyMap(
            name="vit",
            model_types=("vit", "deit", "vit_mae", "vit_msn"),
            blocks=r"(.*\.)?(encoder\.layer|layers)",  # transformers 5.23 ViT: `layers`; older: `encoder.layer`
            mha=("attention", "attention"),
            ffn=("mlp", "mlp"),
            query="attention.q_proj",
            key="attention.k_proj",
            value="attention.v_proj",
            out="attention.o_proj",
            norm="layernorm_before",
        ),
        FamilyMap(
            name="dinov2",
            model_types=("dinov2",),
            blocks=r"(.*\.)?encoder\.layer",
            mha=("attention", "attention"),
            ffn=("mlp", "mlp"),
            query="attention.q_proj",
            key="attention.k_proj",
            value="attention.v_proj",
            out="attention.o_proj",
            norm="norm1",
        ),
        FamilyMap(
            name="bert",
            model_types=("bert", "roberta", "xlm-roberta", "camembert", "electra"),
            blocks=r"(.*\.)?encoder\.layer",
            mha=("attention.self", "attention.output.dense"),
            ffn=("intermediate", "output.dense"),
            query="attention.self.query",
            key="attention.self.key",
            value="attention.self.value",
            out="attention.output.dense",
            norm=None,
        ),
        FamilyMap(
            name="clip",
            model_types=("clip", "clip_vision_model", "clip_text_model"),
            blocks=r"(.*\.)?encoder\.layers",
            mha=("self_attn", "self_attn"),
            ffn=("mlp", "mlp"),
            query="self_attn.q_proj",
            key="self_attn.k_proj",
            value="self_attn.v_proj",
            out="self_attn.out_proj",
            norm="layer_norm1",
        ),
    )
}


def family_for_model_type(model_type: str | None) -> FamilyMap | None:
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    return None
