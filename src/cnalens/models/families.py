"""Architecture families as small tables from uniform names to Hugging Face module paths.

A family is data, not code: adding one means adding a table here and its invariant test.
Paths of per-layer modules are relative to one decoder layer; the others are relative to
the ``*ForCausalLM`` model.

Uniform names:
  ``attn``        the attention module (its output, first element if a tuple, is the
                  attention output unless ``attn_out`` names a post-attention norm)
  ``o_proj``      attention output projection; its INPUT is the concatenation of the
                  heads' outputs (``z``), split by head
  ``v_proj``      the projection holding the value weights W_V; ``qkv`` says how: "split"
                  (its own module, KV heads stacked), "fused" (q | k | v blocks of
                  n_heads, n_kv_heads and n_kv_heads heads: GPT-2, Phi-3) or "neox"
                  (fused, per head q|k|v)
  ``down_proj``   FFN down projection; its INPUT holds the FFN coefficients ``m``, its
                  weight the value vectors
  ``ffn_in``      the FFN's input projections (gate and up, or the single up
                  projection): one output row per neuron (what pruning shrinks), or
                  ``ffn_in_blocks`` stacked blocks of one row per neuron (Phi-3's fused
                  gate | up projection: neuron i owns rows i and d_ffn + i)
  ``attn_out``    module whose output is what attention adds to the residual stream
  ``mlp_out``     module whose output is what the FFN adds to the residual stream
  ``ln_attn``     norm before attention (``None``: no norm before either sublayer, as in
                  OLMo-2; ``ModelView.norm`` then gives the identity for ``ln_attn`` and
                  ``ln_ffn``)
  ``ln_attn_post`` norm applied to the attention output before it is added (Gemma 2/3,
                  OLMo-2)
  ``ln_ffn``      norm before the FFN (``None`` for parallel blocks sharing ``ln_attn``)
  ``ln_ffn_post`` norm applied to the FFN output before it is added (Gemma 2/3, OLMo-2)

Mixture-of-experts families (transformers >= 5) add, relative to one decoder layer:
  ``experts``     the experts module: fused 3-D weights ``gate_up_proj`` (E, 2F, d) and
                  ``down_proj`` (E, d, F), called as ``experts(x, top_k_index,
                  top_k_weights)`` on the (tokens, d) FFN input. A layer whose module at
                  this path is missing is dense (Qwen MoE's ``mlp_only_layers``) and uses
                  ``down_proj``/``ffn_in`` as in Llama.
  ``router``      the top-k router: returns ``(logits, top_k_weights, top_k_index)``
  ``shared_expert`` a dense FFN every token goes through (Qwen2-MoE), its output scaled by
  ``shared_gate``  ``sigmoid(shared_gate(x))`` (d -> 1)
The FFN module (``down_proj``'s parent) is then the sparse MoE block; its output is what the
FFN adds to the residual stream (the sum of the routed experts' weighted outputs, plus the
gated shared expert's).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from cnalens.errors import CnaError

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class Family:
    """How one architecture family maps onto the uniform names."""

    name: str
    model_types: tuple[str, ...]
    layers: str
    embed: str
    final_norm: str
    attn: str
    o_proj: str
    down_proj: str
    attn_out: str
    mlp_out: str
    ln_attn: str | None  # None: no pre-sublayer norms at all (OLMo-2)
    ln_ffn: str | None
    ffn_in: tuple[str, ...] = ()  # FFN input projections, one output per neuron
    ffn_in_blocks: int = 1  # stacked per-neuron blocks in each ffn_in (Phi-3 gate|up: 2)
    ln_attn_post: str | None = None
    ln_ffn_post: str | None = None
    pos_embed: str | None = None
    v_proj: str | None = None
    qkv: str = "split"  # how v_proj holds W_V: "split", "fused" (q|k|v), "neox" (per head)
    norm_kind: str = "rms"  # "rms": x/rms*w, "rms1p": x/rms*(1+w) (Gemma), "layer": LayerNorm
    conv1d: bool = False  # GPT-2's Conv1D stores weights as (in, out)
    parallel: bool = False  # attention and FFN both read the block input (GPT-J, NeoX)
    experts: str | None = None  # mixture of experts: the fused experts module
    router: str | None = None  # its top-k router
    shared_expert: str | None = None  # a dense expert every token uses (Qwen2-MoE)
    shared_gate: str | None = None  # the shared expert's sigmoid gate (d -> 1)


LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "smollm3"),
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    attn="self_attn",
    o_proj="self_attn.o_proj",
    v_proj="self_attn.v_proj",
    down_proj="mlp.down_proj",
    ffn_in=("mlp.gate_proj", "mlp.up_proj"),
    attn_out="self_attn",
    mlp_out="mlp",
    ln_attn="input_layernorm",
    ln_ffn="post_attention_layernorm",  # in Llama this norm comes BEFORE the FFN
)

GEMMA = Family(
    name="gemma",
    model_types=("gemma",),
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    attn="self_attn",
    o_proj="self_attn.o_proj",
    v_proj="self_attn.v_proj",
    down_proj="mlp.down_proj",
    ffn_in=("mlp.gate_proj", "mlp.up_proj"),
    attn_out="self_attn",
    mlp_out="mlp",
    ln_attn="input_layernorm",
    ln_ffn="post_attention_layernorm",
    norm_kind="rms1p",
)

GEMMA2 = Family(
    name="gemma2/3",
    model_types=("gemma2", "gemma3_text"),
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    attn="self_attn",
    o_proj="self_attn.o_proj",
    v_proj="self_attn.v_proj",
    down_proj="mlp.down_proj",
    ffn_in=("mlp.gate_proj", "mlp.up_proj"),
    attn_out="post_attention_layernorm",
    mlp_out="post_feedforward_layernorm",
    ln_attn="input_layernorm",
    ln_ffn="pre_feedforward_layernorm",
    ln_attn_post="post_attention_layernorm",
    ln_ffn_post="post_feedforward_layernorm",
    norm_kind="rms1p",
)

GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    layers="transformer.h",
    embed="transformer.wte",
    pos_embed="transformer.wpe",
    final_norm="transformer.ln_f",
    attn="attn",
    o_proj="attn.c_proj",
    v_proj="attn.c_attn",
    qkv="fused",
    down_proj="mlp.c_proj",
    ffn_in=("mlp.c_fc",),
    attn_out="attn",
    mlp_out="mlp",
    ln_attn="ln_1",
    ln_ffn="ln_2",
    norm_kind="layer",
    conv1d=True,
)

GPTJ = Family(
    name="gptj",
    model_types=("gptj",),
    layers="transformer.h",
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    attn="attn",
    o_proj="attn.out_proj",
    v_proj="attn.v_proj",
    down_proj="mlp.fc_out",
    ffn_in=("mlp.fc_in",),
    attn_out="attn",
    mlp_out="mlp",
    ln_attn="ln_1",
    ln_ffn=None,
    norm_kind="layer",
    parallel=True,
)

NEOX = Family(
    name="gpt_neox",
    model_types=("gpt_neox",),
    layers="gpt_neox.layers",
    embed="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm",
    attn="attention",
    o_proj="attention.dense",
    v_proj="attention.query_key_value",
    qkv="neox",
    down_proj="mlp.dense_4h_to_h",
    ffn_in=("mlp.dense_h_to_4h",),
    attn_out="attention",
    mlp_out="mlp",
    ln_attn="input_layernorm",
    ln_ffn="post_attention_layernorm",
    norm_kind="layer",
    parallel=True,  # overridden by config.use_parallel_residual
)

PHI3 = Family(
    name="phi3",
    model_types=("phi3",),  # Phi-3, Phi-3.5 and Phi-4 (dense)
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    attn="self_attn",
    o_proj="self_attn.o_proj",
    v_proj="self_attn.qkv_proj",
    qkv="fused",  # q | k | v with grouped-query sizes
    down_proj="mlp.down_proj",
    ffn_in=("mlp.gate_up_proj",),
    ffn_in_blocks=2,  # gate | up halves
    attn_out="self_attn",
    mlp_out="mlp",
    ln_attn="input_layernorm",
    ln_ffn="post_attention_layernorm",  # as in Llama: the norm BEFORE the FFN
)

OLMO2 = Family(
    name="olmo2",
    model_types=("olmo2",),
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    attn="self_attn",
    o_proj="self_attn.o_proj",
    v_proj="self_attn.v_proj",
    down_proj="mlp.down_proj",
    ffn_in=("mlp.gate_proj", "mlp.up_proj"),
    attn_out="post_attention_layernorm",
    mlp_out="post_feedforward_layernorm",
    ln_attn=None,  # no norm before the sublayers: only after (and q/k norms inside)
    ln_ffn=None,
    ln_attn_post="post_attention_layernorm",  # here applied to the attention OUTPUT
    ln_ffn_post="post_feedforward_layernorm",
)

# Mixture of experts: Llama's attention, norms and (for Qwen's dense layers) FFN paths, and
# a sparse MoE block at ``mlp``. Router: softmax over all experts (in float32), top-k, the
# k weights renormalised to sum 1 (Mixtral always; the others if ``norm_topk_prob``).
MIXTRAL = replace(LLAMA, name="mixtral", model_types=("mixtral",), experts="mlp.experts",
                  router="mlp.gate")
QWEN3_MOE = replace(MIXTRAL, name="qwen3_moe", model_types=("qwen3_moe",))
OLMOE = replace(MIXTRAL, name="olmoe", model_types=("olmoe",))  # q/k norms over all heads
QWEN2_MOE = replace(MIXTRAL, name="qwen2_moe", model_types=("qwen2_moe",),
                    shared_expert="mlp.shared_expert", shared_gate="mlp.shared_expert_gate")

FAMILIES: tuple[Family, ...] = (LLAMA, GEMMA, GEMMA2, GPT2, GPTJ, NEOX, PHI3, OLMO2, MIXTRAL,
                                QWEN2_MOE, QWEN3_MOE, OLMOE)


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_for(config: PretrainedConfig) -> Family:
    """The family table for a transformers config; CnaError for an unsupported one."""
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            if fam is NEOX and not getattr(config, "use_parallel_residual", True):
                return replace(fam, parallel=False)
            return fam
    raise CnaError(
        f"unsupported model family '{model_type}': supported are "
        + ", ".join(supported_model_types())
    )
