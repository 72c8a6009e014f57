"""Tiny random models of every supported family, built from a config (no download)."""

from __future__ import annotations

import string

import torch
import transformers as tf

VOCAB = 61


def _configs() -> dict:
    common_llama = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2)
    return {
        "llama": tf.LlamaConfig(**common_llama),
        "mistral": tf.MistralConfig(**common_llama),
        "qwen2": tf.Qwen2Config(**common_llama),
        "qwen3": tf.Qwen3Config(**common_llama, head_dim=12),
        "gemma": tf.GemmaConfig(**common_llama, head_dim=8),
        "gemma2": tf.Gemma2Config(**common_llama, head_dim=8, final_logit_softcapping=5.0,
                                  attn_logit_softcapping=None, sliding_window=4),
        "gemma3": tf.Gemma3TextConfig(**common_llama, head_dim=16, sliding_window=4),
        "gpt2": tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                              bos_token_id=1, eos_token_id=2),
        "gptj": tf.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                              rotary_dim=4, bos_token_id=1, eos_token_id=2),
        "neox": tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40,
                                 num_hidden_layers=3, num_attention_heads=4,
                                 max_position_embeddings=64, bos_token_id=1, eos_token_id=2),
        "neox_seq": tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40,
                                     num_hidden_layers=3, num_attention_heads=4,
                                     max_position_embeddings=64, use_parallel_residual=False,
                                     bos_token_id=1, eos_token_id=2),
        # fused q|k|v (grouped-query sizes) and gate|up; partial rotary as in Phi-4-mini
        "phi3": tf.Phi3Config(**common_llama, partial_rotary_factor=0.5),
        # norms after the sublayers only, q/k norms over all heads together
        "olmo2": tf.Olmo2Config(**common_llama),
        # mixtures of 6 experts, 2 per token: renormalised top-2 (Mixtral, Qwen3-MoE with
        # norm_topk_prob) or raw softmax weights (Qwen2-MoE, OLMoE); Qwen2-MoE adds a gated
        # shared expert and has a dense layer 1 (mlp_only_layers)
        "mixtral": tf.MixtralConfig(**{**common_llama, "intermediate_size": 12},
                                    num_local_experts=6, num_experts_per_tok=2),
        "qwen2_moe": tf.Qwen2MoeConfig(**common_llama, num_experts=6, num_experts_per_tok=2,
                                       moe_intermediate_size=12,
                                       shared_expert_intermediate_size=20,
                                       mlp_only_layers=[1]),
        "qwen3_moe": tf.Qwen3MoeConfig(**common_llama, head_dim=12, num_experts=6,
                                       num_experts_per_tok=2, moe_intermediate_size=12,
                                       norm_topk_prob=True),
        "olmoe": tf.OlmoeConfig(**{**common_llama, "intermediate_size": 12}, num_experts=6,
                                num_experts_per_tok=2),
    }


MOE_NAMES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
FAMILY_NAMES = [n for n in _configs() if n not in MOE_NAMES]


def tiny_model(name: str, dtype=torch.float64, seed: int = 0, vocab: int = VOCAB):
    """A random causal LM with every weight, norms included, perturbed away from init
    (``vocab``: another vocabulary size, e.g. a real tokenizer's)."""
    torch.manual_seed(seed)
    cfg = _configs()[name]
    cfg.vocab_size = vocab
    model = tf.AutoModelForCausalLM.from_config(cfg)
    model = model.to(dtype).eval()
    if name in MOE_NAMES and dtype == torch.float64:  # grouped_mm has no float64 kernel
        model.set_experts_implementation("eager")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3 if "emb" not in pname and "wte" not in pname else 1.0)
    return model


class TinyTokenizer:
    """Just enough of a tokenizer for the view and the evaluator: one char, one token."""

    pad_token_id = 0
    eos_token_id = 2
    bos_token_id = 1
    padding_side = "left"

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + (ord(c) % (VOCAB - 3)) for c in text]
        return type("Enc", (), {"input_ids": ([1] if add_special_tokens else []) + ids})()

    def decode(self, ids):
        return "".join(chr(i - 3) if 3 <= i < VOCAB else "?" for i in ids)


def char_tokenizer():
    """A real (fast) tokenizer, one token per printable character (BPE without merges),
    enough for arithmetic prompts; for models saved to a folder and run by the CLI."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = ["<unk>", "</s>", *string.printable]
    tk = Tokenizer(models.BPE({c: i for i, c in enumerate(chars)}, [], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>")


def zero_value_vectors(v, layer, neurons, factor: float = 0.0):
    """Zero (or scale by ``factor``) flat neurons' value vectors in the weights themselves (a
    dense down projection's columns, or an expert's ``down_proj[e][:, n]`` and the shared
    expert's columns); returns a function that restores them."""
    lay = v.layout(layer)
    if lay is None:
        w = v.module(layer, "down_proj").weight
        saved = w.detach().clone()
        with torch.no_grad():
            if v.family.conv1d:
                w[neurons, :] *= factor
            else:
                w[:, neurons] *= factor
        return lambda: w.data.copy_(saved)
    down = v.moe_module(layer, "experts").down_proj
    shared = v.moe_module(layer, "shared_expert")
    ws = None if shared is None else shared.down_proj.weight
    saved = [down.detach().clone(), None if ws is None else ws.detach().clone()]
    with torch.no_grad():
        for j in neurons:
            e, n = lay.split(int(j))
            if e == "S":
                ws[:, n] *= factor
            else:
                down[e, :, n] *= factor

    def restore():
        down.data.copy_(saved[0])
        if ws is not None:
            ws.data.copy_(saved[1])
    return restore
