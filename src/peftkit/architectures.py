"""The role map: which module of an architecture plays which part, per transformers ``model_type``.

One table that every method's defaults read, in the spirit of AdapterHub's model interface:
LoRA's default targets are the attention query and value (or the fused projection), (IA)³'s
the keys, values and feed-forward output, bottleneck adapters go after the attention output
and the feed-forward output of every layer, LayerNorm tuning trains the norms. A method never
keeps an architecture table of its own; a model type missing here gets a clear error asking
for explicit ``target_modules`` (or ``AdapterConfig(insertion=...)``).

Names are relative to one transformer layer (``attention.self.query``), except ``layers``
(the list of layers, from the model's top: ``encoder.layer``) and ``norms`` (leaf names of the
norm layers anywhere in the model). A method matches leaf names or dotted suffixes, as
``target_modules`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Roles:
    layers: str | None = None  # the ModuleList of transformer layers
    q: str | None = None  # attention projections (separate)
    k: str | None = None
    v: str | None = None
    qkv: str | None = None  # one fused query/key/value projection (GPT-2's c_attn)
    o: str | None = None  # the attention output projection
    ffn_out: str | None = None  # the feed-forward output (down) projection
    ffn: str | None = None  # the feed-forward block (what a parallel adapter runs beside)
    ffn_residual_arg: int | None = None  # positional argument of ``ffn`` carrying the residual (BERT)
    norms: tuple[str, ...] = ()  # the norm layers (leaf names)
    lora: tuple[str, ...] | None = None  # LoRA's defaults where they are not the query and value


def leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


_BERT = Roles(layers="encoder.layer", q="attention.self.query", k="attention.self.key", v="attention.self.value",
              o="attention.output.dense", ffn_out="output.dense", ffn="output", ffn_residual_arg=1,
              norms=("LayerNorm",))
_LLAMA = Roles(layers="layers", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
               o="self_attn.o_proj", ffn_out="mlp.down_proj", ffn="mlp",
               norms=("input_layernorm", "post_attention_layernorm", "norm"))
_FUSED = Roles(qkv="query_key_value", norms=("input_layernorm", "post_attention_layernorm", "ln_f"))
# ConvNeXt has no attention: its pointwise layers (Linear, most of its weights) and the dense
# Conv2d between stages. The depthwise 7x7 convs are left out: HF PEFT's layout for a grouped
# conv needs r divisible by groups (= channels), which peftkit does not implement.
_CONVNEXT = Roles(lora=("pwconv1", "pwconv2", "downsampling_layer.1"), norms=("layernorm",))

ROLES: dict[str, Roles] = {
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT, "electra": _BERT, "camembert": _BERT,
    # ViT's attention is named query/value before transformers 5, q_proj/v_proj from 5 on; a
    # name that matches nothing is skipped.
    "vit": Roles(k="attention.attention.key", v="attention.attention.value", ffn_out="output.dense",
                 lora=("query", "value", "q_proj", "v_proj"), norms=("layernorm_before", "layernorm_after")),
    "convnext": _CONVNEXT, "convnextv2": _CONVNEXT,
    "deberta-v2": Roles(q="attention.self.query_proj", v="attention.self.value_proj", norms=("LayerNorm",)),
    "distilbert": Roles(q="attention.q_lin", v="attention.v_lin"),
    "mpnet": Roles(q="attention.attn.q", v="attention.attn.v"),
    "t5": Roles(q="SelfAttention.q", k="SelfAttention.k", v="SelfAttention.v", ffn_out="DenseReluDense.wo",
                norms=("layer_norm", "final_layer_norm")),
    "gpt2": Roles(layers="h", qkv="attn.c_attn", o="attn.c_proj", ffn_out="mlp.c_proj", ffn="mlp",
                  norms=("ln_1", "ln_2", "ln_f")),
    "gpt_neox": Roles(qkv="query_key_value"), "bloom": _FUSED, "falcon": _FUSED,
    "llama": _LLAMA, "mistral": _LLAMA, "mixtral": Roles(q="self_attn.q_proj", v="self_attn.v_proj"),
    # Qwen2/3: every norm (HF PEFT's LayerNorm-tuning default takes post_attention_layernorm only)
    "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA,
    "gemma2": replace(_LLAMA, norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                                     "post_feedforward_layernorm", "norm")),
    "phi": Roles(q="self_attn.q_proj", v="self_attn.v_proj", norms=("input_layernorm", "final_layernorm")), "phi3": Roles(qkv="self_attn.qkv_proj"),
    "opt": Roles(q="self_attn.q_proj", v="self_attn.v_proj"),
}


def lora_targets(roles: Roles) -> list[str] | None:
    """The attention query and value projections (the LoRA paper's choice), or the fused one."""
    if roles.lora is not None:
        return list(roles.lora)
    if roles.q and roles.v:
        return [leaf(roles.q), leaf(roles.v)]
    return [leaf(roles.qkv)] if roles.qkv else None


def ia3_targets(roles: Roles) -> tuple[list[str], list[str]] | None:
    """(targets, feed-forward modules): keys, values and the feed-forward output (HF PEFT's choice)."""
    if not roles.ffn_out:
        return None
    attention = [leaf(roles.k), leaf(roles.v)] if roles.k and roles.v else [leaf(roles.qkv)] if roles.qkv else None
    return (attention + [roles.ffn_out], [roles.ffn_out]) if attention else None


def insertion(roles: Roles) -> dict | None:
    """Where bottleneck adapters go in each layer (``AdapterConfig.insertion``)."""
    if not (roles.layers and roles.o and roles.ffn_out and roles.ffn):
        return None
    return {"layers": roles.layers, "attn_out": roles.o, "ffn_out": roles.ffn_out, "ffn": roles.ffn,
            "ffn_residual_arg": roles.ffn_residual_arg}


def table(derive) -> dict:
    """``{model_type: derive(roles)}`` for the model types where ``derive`` gives something."""
    return {kind: value for kind, roles in ROLES.items() if (value := derive(roles)) is not None}
