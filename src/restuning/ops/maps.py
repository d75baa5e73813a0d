"""Where the ops are, per backbone family: data, not code paths.

Names are relative to one block (op names) or to the model (block, tap and norm patterns). An op is
a pair (entry, exit): the op's input `x` is the first input of `entry` and `OP(x)` is the output of
`exit`. They differ where a family splits one op over sibling modules, as BERT does (`attention.self`
computes the heads, `attention.output.dense` projects them, then a residual LayerNorm follows that is
not part of the op).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyMap:
    name: str
    model_types: tuple[str, ...]
    blocks: str  # re.fullmatch pattern for the names of the ModuleLists/Sequentials of blocks
    mha: tuple[str, str] | None  # None for CNNs: only the block op exists
    ffn: tuple[str, str] | None
    query: str | None
    key: str | None
    value: str | None
    out: str | None
    norm: str | None  # the pre-norm before MHA (prompt tokens pass through it); None if post-norm
    class_names: tuple[str, ...] = ()  # for backbones without a `config.model_type`
    layout: str = "tokens"  # "tokens": (B, T, D) features; "map": (B, C, H, W), channels first
    chained: bool = False  # several block lists run one after another (CNN stages): number blocks globally
    taps: str | None = None  # pattern of the containers whose children the bypass taps; None: the blocks
    final_norm: str | None = None  # pattern of the backbone's final norm, applied to the last bypass state
    norm_after_pool: bool = False  # the final norm works on the pooled vector (ConvNeXt)
    # The cross-attention op (queries from the tokens, keys/values from another sequence); its q/k/v/out
    # projections are found by name inside it, and no norm acts on the other sequence.
    xattn: tuple[str, str] | None = None
    # Further block lists of the same model with their own op maps (a UNet's ResNet blocks beside its
    # transformer blocks). Each part numbers its blocks on its own.
    parts: tuple[FamilyMap, ...] = ()
    block_op: bool = True  # False: the blocks are not themselves "block" ops, only their inner ops are
    # The attention's scores are softmax(Q K^T * scale + mask) and nothing else, so prefix/prompt unbinding can be
    # exact; False where relative-position terms join them (DeBERTa, Swin).
    exact: bool = True
    # A decoder (causal LM): a sequence is read at its last non-padding token, not at a CLS token or by a mean.
    causal: bool = False


# Shared parts of the maps below.
_VISION_ATTENTION = dict(mha=("attention", "attention"), ffn=("mlp", "mlp"), query="attention.q_proj",
                         key="attention.k_proj", value="attention.v_proj", out="attention.o_proj")
CNN_OPS = dict(mha=None, ffn=None, query=None, key=None, value=None, out=None, norm=None, layout="map", chained=True)
_HF_STAGES = dict(blocks=r"(.*\.)?encoder\.stages\.\d+\.layers", taps=r"(.*\.)?encoder\.stages")

FAMILIES: dict[str, FamilyMap] = {
    m.name: m
    for m in (
        FamilyMap(
            name="vit",
            model_types=("vit", "deit", "vit_mae", "vit_msn"),
            blocks=r"(.*\.)?(encoder\.layer|layers)",  # transformers 5.23 ViT: `layers`; older: `encoder.layer`
            **_VISION_ATTENTION,
            norm="layernorm_before",
            final_norm=r"(.*\.)?layernorm",
        ),
        FamilyMap(
            name="dinov2",
            model_types=("dinov2",),
            blocks=r"(.*\.)?encoder\.layer",
            **_VISION_ATTENTION,
            norm="norm1",
            final_norm=r"(.*\.)?layernorm",
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
            final_norm=r"(.*\.)?(final_layer_norm|post_layernorm)",
        ),
        FamilyMap(
            # DeBERTa-v2/v3: BERT's layout with `*_proj` names; its disentangled attention adds relative-position
            # terms to the scores and scales them by sqrt(d * (1 + #position terms)).
            name="deberta_v2",
            model_types=("deberta-v2",),
            blocks=r"(.*\.)?encoder\.layer",
            mha=("attention.self", "attention.output.dense"),
            ffn=("intermediate", "output.dense"),
            query="attention.self.query_proj",
            key="attention.self.key_proj",
            value="attention.self.value_proj",
            out="attention.output.dense",
            norm=None,
            exact=False,
        ),
        FamilyMap(
            # Llama-style decoders (Llama 2/3, Mistral, Qwen2): pre-RMSNorm, grouped-query attention with RoPE
            # applied after the projections, a gated FFN.
            name="llama",
            model_types=("llama", "mistral", "qwen2"),
            blocks=r"(.*\.)?layers",
            mha=("self_attn", "self_attn"),
            ffn=("mlp", "mlp"),
            query="self_attn.q_proj",
            key="self_attn.k_proj",
            value="self_attn.v_proj",
            out="self_attn.o_proj",
            norm="input_layernorm",
            final_norm=r"(.*\.)?norm",
            causal=True,
        ),
        FamilyMap(
            # GPT-2: transformers' Conv1D layers; `c_attn` is one fused projection whose output is [q; k; v].
            name="gpt2",
            model_types=("gpt2",),
            blocks=r"(.*\.)?h",
            mha=("attn", "attn"),
            ffn=("mlp", "mlp"),
            query="attn.c_attn",
            key="attn.c_attn",
            value="attn.c_attn",
            out="attn.c_proj",
            norm="ln_1",
            final_norm=r"(.*\.)?ln_f",
            causal=True,
        ),
        FamilyMap(
            # Swin: stages of several blocks, run one after another (blocks numbered globally); windowed attention
            # with a relative-position bias; a stage ends with a patch merging that changes the token count.
            name="swin",
            model_types=("swin",),
            blocks=r"(.*\.)?encoder\.layers\.\d+\.blocks",
            **_VISION_ATTENTION,
            norm="layernorm_before",
            chained=True,
            exact=False,
            final_norm=r"(.*\.)?layernorm",
        ),
        FamilyMap(
            name="convnext",
            model_types=("convnext", "convnextv2"),
            **CNN_OPS,
            **_HF_STAGES,
            final_norm=r"(.*\.)?layernorm",
            norm_after_pool=True,
        ),
        FamilyMap(
            name="resnet",
            model_types=("resnet",),
            **CNN_OPS,
            **_HF_STAGES,
        ),
        FamilyMap(
            # EfficientNet-Lite0 of the `efficientnet-lite-pytorch` package (no `config`): 16 MBConv blocks.
            name="efficientnet",
            model_types=(),
            class_names=("EfficientNet",),
            blocks=r"_blocks",
            **CNN_OPS,
        ),
    )
}


def register_family(family: FamilyMap) -> FamilyMap:
    """Make an op map known by name (`family=`) and for detection; backbone families outside the core (the
    diffusers UNet) register themselves."""
    if family.name in FAMILIES:
        raise ValueError(f"family {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


def family_for_model(model) -> FamilyMap | None:
    """The family map for `model`, by `config.model_type`, else by class name; None if unknown."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types or type(model).__name__ in family.class_names:
            return family
    return None


def token_layout(model) -> tuple[bool, bool]:
    """(grid, causal) of `model`'s tokens: whether they lie on an image's patch grid (or are a CNN's or UNet's
    feature maps) and whether they are a decoder's, which may not read ahead; from its family map and whether its
    forward takes pixels (`pixel_values`, `sample`) first."""
    import inspect

    family = family_for_model(model)
    params = [p for p in inspect.signature(model.forward).parameters if p != "self"]
    grid = (family is not None and family.layout == "map") or (bool(params) and params[0] in ("pixel_values", "sample"))
    return grid, bool(family is not None and family.causal)
