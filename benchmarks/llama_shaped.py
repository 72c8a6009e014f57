"""A Llama-7B-shaped model with random weights and prompts shaped like the arithmetic ones.

Shared by ``head_scan.py --llama7b`` and ``neuron_scores.py --llama7b``. ``scale`` shrinks
the hidden size, FFN width and depth (32 heads are kept, so a layer's scan still batches
32 replicas) for a CPU smoke run of the same code path; ``scale=1`` is Llama-7B: hidden
4096, 32 layers x 32 heads, FFN 11008, vocabulary 32,000.
"""

from __future__ import annotations

import time

import torch

from cnalens.data.cases import Case, Encoded
from cnalens.models import ModelView

FULL = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
            intermediate_size=11008, vocab_size=32000)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "float64": torch.float64}


def llama_config(scale: float = 1.0):
    """LlamaConfig of Llama-7B, shrunk by ``scale`` (head_dim, FFN width, layers)."""
    from transformers import LlamaConfig

    if not 0 < scale <= 1:
        raise SystemExit(f"--llama-scale must be in (0, 1], got {scale}")
    heads = FULL["num_attention_heads"]
    head_dim = max(2, 2 * round(FULL["hidden_size"] // heads * scale / 2))
    return LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads,
                       num_key_value_heads=heads,
                       num_hidden_layers=max(2, round(FULL["num_hidden_layers"] * scale)),
                       intermediate_size=max(8, round(FULL["intermediate_size"] * scale)),
                       vocab_size=FULL["vocab_size"], max_position_embeddings=2048,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)


def llama_view(scale: float = 1.0, device: str = "cpu", dtype: str = "bfloat16",
               seed: int = 0) -> ModelView:
    """The random model, built directly on ``device`` in ``dtype`` (no CPU float32 copy)."""
    from transformers import AutoModelForCausalLM

    cfg = llama_config(scale)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[dtype])
    model.to(device).eval()  # a no-op unless from_config ignored the device context
    return ModelView(model, None, {"spec": f"llama7b-shaped(scale={scale:g}, random, {dtype})"})


def shaped_cases(vocab: int, n: int = 100, prefix_len: int = 20, suffix_len: tuple = (4, 6),
                 seed: int = 0) -> list[Encoded]:
    """``n`` encoded cases: one shared ``prefix_len``-token few-shot prefix (BOS first), a
    varying suffix of ``suffix_len`` tokens (inclusive range) and a one-token answer; random
    token ids (>= 3, so never BOS/EOS/pad), about 25 tokens a prompt."""
    g = torch.Generator().manual_seed(seed)

    def ids(k: int) -> list[int]:
        return torch.randint(3, vocab, (k,), generator=g).tolist()

    prefix = [1] + ids(prefix_len - 1)
    out = []
    for i in range(n):
        k = int(torch.randint(suffix_len[0], suffix_len[1] + 1, (1,), generator=g))
        case = Case(f"q{i}", "a", prefix="few-shot prefix",
                    labels={"op": "+", "digits": 1}, case_id=f"r{i}")
        out.append(Encoded(case, tuple(prefix + ids(k)), tuple(ids(1))))
    return out


def sync(device) -> None:
    """Wait for the GPU (timings must not stop at a kernel launch)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(device, fn, *args, **kw):
    """``(fn(*args, **kw), seconds)`` with synchronisation before and after."""
    sync(device)
    t = time.perf_counter()
    out = fn(*args, **kw)
    sync(device)
    return out, time.perf_counter() - t


def describe(view: ModelView) -> str:
    n = sum(p.numel() for p in view.model.parameters())
    return (f"{view.n_layers} layers x {view.n_heads} heads (head_dim {view.head_dim}), "
            f"hidden {view.d_model}, FFN {view.d_ffn}, vocab {view.vocab_size}, "
            f"{n / 1e6:,.1f} M parameters, {view.dtype} on {view.device}")
