"""Head scan benchmark: the naive loop against cnalens's scan, on the same cases.

    python benchmarks/head_scan.py                     # all 72 heads of gemma3-270m (slow)
    python benchmarks/head_scan.py --heads-limit 8     # a subset of heads
    python benchmarks/head_scan.py --steps             # also time each speed-up step
    python benchmarks/head_scan.py --transformer-lens --tl-heads 2   # + TransformerLens
    python benchmarks/head_scan.py --llama7b --device cuda           # Llama-7B-shaped, GPU
    python benchmarks/head_scan.py --llama7b --llama-scale 0.02      # its CPU smoke run

Cases: the 1-digit dataset of all four operations, "eq" template, default few-shot
prefixes. (a) The naive loop: per head, one full forward pass of every batch under a
zeroing hook (``ZeroHeads``), logits at the last positions only. (b) ``scan_fast``, the
scan behind ``cnalens.heads.scan_heads``. Both must give the same per-case results
(design.md's near-tie rule: a case may differ only where a scored token's top-2 logit
margin is under 1e-4 in either run; such cases are counted). The last line is the ratio.

``--transformer-lens`` also times TransformerLens 4.3's loop (``pip install
'cnalens[bench]'``): the model booted by ``TransformerBridge.boot_transformers`` from
cnalens's cached safetensors folder, per head one ``run_with_hooks`` of every batch
zeroing the head at ``blocks.L.attn.o.hook_in`` (logits everywhere, as TL
computes them; TL 4.3 hands that hook the heads unflattened, (batch, pos, heads,
head_dim)), on ``--tl-heads`` heads, extrapolated to every scanned head; its
per-case results must match cnalens's on those heads.

``--llama7b``: a Llama-7B-shaped model with random weights (``llama_shaped.py``, bf16)
and 100 prompts of about 25 random tokens sharing a 20-token prefix: one forward pass,
the naive loop (timed on ``--naive-heads`` heads, extrapolated to all 1,024) and the full
scan, with CUDA synchronisation; ``--llama-scale`` shrinks it for a CPU smoke run.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time

import torch
from llama_shaped import describe, llama_view, shaped_cases, sync

from cnalens import load_model
from cnalens.data import arithmetic_cases, encode_all
from cnalens.evaluate import batches
from cnalens.heads import (
    FIELDS,
    Scan,
    answer_layout,
    head_table,
    scan_fast,
    scan_naive,
    score_answers,
    select_heads,
)

TIE = 1e-4
PREFIX = 20  # Llama: tokens of the shared few-shot prefix
TIE_LOW = 0.1  # bf16/fp16 logits: a few units in the last place at |logit| ~ 4-8


def compare(a, b, tie: float = TIE) -> tuple[int, int, float]:
    """(disagreeing cases, of which near ties, max |logp difference|) over all runs."""
    bad = ties = 0
    dl = 0.0
    for x, y in ((a.orig, b.orig), (a.ablated, b.ablated)):
        diff = (x["correct"] != y["correct"]) | (x["pred"] != y["pred"])
        near = torch.minimum(x["margin"], y["margin"]) < tie
        bad += int((diff & ~near).sum())
        ties += int((diff & near).sum())
        dl = max(dl, float((x["logp"] - y["logp"]).abs().max()))
    return bad, ties, dl


def timed(fn, *args, device="cpu", **kw):
    sync(device)
    t = time.perf_counter()
    out = fn(*args, **kw)
    sync(device)
    return out, time.perf_counter() - t


def subset(scan: Scan, heads) -> Scan:
    """The rows of ``scan`` for ``heads`` (a subset of its heads)."""
    rows = torch.as_tensor([scan.heads.index(h) for h in heads])
    return Scan(list(heads), scan.orig, {f: v[rows] for f, v in scan.ablated.items()})


def spread(heads, n: int):
    """``n`` heads spread evenly over ``heads`` (all of them if n >= len)."""
    if n >= len(heads):
        return list(heads)
    return [heads[round((i + 0.5) * len(heads) / n - 0.5)] for i in range(n)]


# ----------------------------------------------------------------- TransformerLens
class _LogitsIn:
    """A stand-in view for ``heads.score_answers`` when the logits are already computed."""

    @staticmethod
    def logits(x: torch.Tensor) -> torch.Tensor:
        return x


def tl_bridge(view):
    """TransformerLens 4.3's bridge over the same weights (cnalens's safetensors cache)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the "Loading weights" bar
    folder = view.info.get("cache_path") or view.info.get("path")
    if not folder:
        sys.exit("error: --transformer-lens needs a model loaded from a local folder")
    return TransformerBridge.boot_transformers(folder, tokenizer=view.tokenizer,
                                               dtype=view.dtype, device=str(view.device))


@torch.inference_mode()
def scan_tl(bridge, view, enc, heads, batch_size: int = 32) -> Scan:
    """TransformerLens's loop: per head, ``run_with_hooks`` of every (left-padded) batch
    with the head's part of ``blocks.L.attn.o.hook_in`` (the o_proj input) zeroed; logits
    at every position (TL's forward), scored at the answer positions like ``scan_naive``."""
    hd = view.head_dim
    runs = [None, *heads]
    res = [{f: torch.zeros(len(enc), dtype=t) for f, t in
            (("correct", torch.bool), ("correct_first", torch.bool), ("logp", torch.float32),
             ("pred", torch.long), ("margin", torch.float32))} for _ in runs]
    for j, head in enumerate(runs):
        hooks = []
        if head is not None:
            def zero(x, hook, h=head[1]):  # TL 4.3 gives (batch, pos, heads, head_dim)
                if x.dim() == 4:
                    x[:, :, h] = 0
                else:  # the heads concatenated: (batch, pos, heads * head_dim)
                    x[..., h * hd:(h + 1) * hd] = 0
                return x
            hooks = [(f"blocks.{head[0]}.attn.o.hook_in", zero)]
        for idx in batches(enc, batch_size):
            items = [enc[i] for i in idx]
            b = view.batch([e.input_ids for e in items])
            logits = bridge.run_with_hooks(b.input_ids, fwd_hooks=hooks,
                                           attention_mask=b.attention_mask,
                                           position_ids=b.position_ids)
            k = max(len(e.answer_ids) for e in items)
            lay = answer_layout(items, k, [k - len(e.answer_ids) for e in items])
            out = score_answers(_LogitsIn, logits[:, -k:], lay)
            for f in FIELDS:
                res[j][f][torch.as_tensor(idx)] = out[f][0]
    return Scan(list(heads), res[0], {f: torch.stack([r[f] for r in res[1:]]) for f in FIELDS})


def run_tl(args, view, enc, heads, fast, t_fast: float) -> None:
    """Time TL's loop on ``--tl-heads`` heads, check it against cnalens, print the ratio."""
    bridge, t_boot = timed(tl_bridge, view, device=args.device)
    tl_heads = spread(heads, args.tl_heads)
    tl, t = timed(scan_tl, bridge, view, enc, tl_heads, batch_size=args.tl_batch_size,
                  device=args.device)
    per = t / (len(tl_heads) + 1)  # + the unablated pass, as in the other two scans
    t_tl = per * (len(heads) + 1)
    print(f"TransformerLens loop (booted in {t_boot:.1f} s): {per:.1f} s a head for "
          f"{len(enc)} cases ({per * 100 / len(enc):.1f} s per 100), timed on "
          f"{len(tl_heads)} head(s) ({', '.join(f'{a}.{b}' for a, b in tl_heads)}) + the "
          f"unablated pass, EXTRAPOLATED to {len(heads)} heads: {t_tl:8.1f} s")
    bad, ties, dl = compare(subset(fast, tl_heads), tl)
    print(f"  TransformerLens vs cnalens on those heads: disagreements {bad} "
          f"(near ties {ties}), max |dlogp| {dl:.1e}")
    for metric in ("acc", "acc_first"):
        ta = head_table(subset(fast, tl_heads), enc, metric, n_boot=10)
        tb = head_table(tl, enc, metric, n_boot=10)
        gap = float((ta["acc_ablated"] - tb["acc_ablated"]).abs().max())
        print(f"  table {metric}: max |acc_ablated difference| {gap:.4f}")
    if bad:
        raise SystemExit(f"TransformerLens and cnalens disagree on {bad} case(s)")
    print(f"speedup TransformerLens/cnalens: {t_tl / t_fast:.1f}x (TL extrapolated)")


# ----------------------------------------------------------------- Llama-7B-shaped
def run_llama(args) -> None:
    """The full head scan of a random Llama-7B-shaped model (module docstring)."""
    dev = args.device
    view, t_build = timed(llama_view, args.llama_scale, dev, args.llama_dtype, device=dev)
    enc = shaped_cases(view.vocab_size, n=args.llama_cases, prefix_len=PREFIX)
    heads = select_heads(view)
    n_tok = sum(len(e.input_ids) for e in enc)
    print(f"Llama-7B-shaped random model (scale {args.llama_scale:g}, built in {t_build:.1f} "
          f"s): {describe(view)}")
    print(f"{len(enc)} prompts, {n_tok / len(enc):.1f} tokens each on average (a shared "
          f"prefix of {PREFIX} tokens), {len(heads)} heads, "
          f"{torch.get_num_threads()} CPU threads")
    b = view.batch([e.input_ids for e in enc])

    def forward():
        with torch.inference_mode():
            return view.logits(view.hidden(b)[:, -1])
    forward()  # warm-up (kernels, allocator)
    _, t_fwd = timed(forward, device=dev)
    print(f"one forward pass ({len(enc)} prompts, logits at the last position): "
          f"{t_fwd * 1e3:.0f} ms")
    sample = spread(heads, args.naive_heads) if args.naive_heads else heads
    naive, t = timed(scan_naive, view, enc, sample, batch_size=len(enc), device=dev)
    per = t / (len(sample) + 1)
    t_naive = per * (len(heads) + 1)
    said = ("" if len(sample) == len(heads) else
            f", timed on {len(sample)} heads spread over the depth, EXTRAPOLATED")
    print(f"naive loop: {per * 1e3:.0f} ms a head{said}: {t_naive:.1f} s for {len(heads)} heads")
    scan_fast(view, enc, heads[-view.n_heads:], batch_size=args.batch_size,
              heads_per_pass=args.heads_per_pass)  # warm-up: the last layer only
    fast, t_fast = timed(scan_fast, view, enc, heads, batch_size=args.batch_size,
                         heads_per_pass=args.heads_per_pass, device=dev)
    tie = TIE if view.dtype in (torch.float32, torch.float64) else TIE_LOW
    bad, ties, dl = compare(naive, subset(fast, sample), tie)
    print(f"cnalens scan (all {len(heads)} heads): {t_fast:.2f} s; vs the naive loop on the "
          f"{len(sample)} heads both ran: disagreements {bad} (near ties, margin < {tie:g}: "
          f"{ties}), max |dlogp| {dl:.1e}")
    if bad:
        raise SystemExit(f"scan and naive loop disagree on {bad} case(s)")
    print("target: under 10 s" + ("" if args.llama_scale == 1 else
                                  " (for the full-size model; this run is scaled down)"))
    print(f"speedup naive/cnalens: {t_naive / t_fast:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--heads-limit", type=int, default=None,
                    help="time about N heads: all heads of N/n_heads layers spread over depth")
    ap.add_argument("--batch-size", type=int, default=128, help="cases per chunk (scan)")
    ap.add_argument("--naive-batch-size", type=int, default=64)
    ap.add_argument("--steps", action="store_true", help="also time each speed-up step")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--transformer-lens", action="store_true",
                    help="also time TransformerLens's loop (pip install 'cnalens[bench]')")
    ap.add_argument("--tl-heads", type=int, default=2, help="heads TL is timed on")
    ap.add_argument("--tl-batch-size", type=int, default=32,
                    help="cases per TL pass (TL's logits everywhere: ~1 GB at 32 on gemma)")
    ap.add_argument("--llama7b", action="store_true",
                    help="scan a random Llama-7B-shaped model instead (use --device cuda)")
    ap.add_argument("--llama-scale", type=float, default=1.0,
                    help="shrink its hidden size, FFN width and depth (CPU smoke run)")
    ap.add_argument("--llama-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--llama-cases", type=int, default=100)
    ap.add_argument("--heads-per-pass", type=int, default=None,
                    help="scan replicas per pass (default: all heads of a layer; lower it "
                         "if the GPU runs out of memory)")
    ap.add_argument("--naive-heads", type=int, default=64,
                    help="Llama: heads the naive loop is timed on (0: all)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.transformer_lens and args.llama7b:
        print("error: --transformer-lens times gemma3-270m (a real model), not --llama7b",
              file=sys.stderr)
        sys.exit(2)
    if args.transformer_lens and importlib.util.find_spec("transformer_lens") is None:
        print("error: --transformer-lens needs TransformerLens 4.3: "
              "pip install 'cnalens[bench]' (transformer-lens==4.3.0)", file=sys.stderr)
        sys.exit(2)
    if args.llama7b:
        return run_llama(args)

    view = load_model(args.model, device=args.device, progress=False)
    enc = encode_all(view.tokenizer, arithmetic_cases(digits=(1,), templates=("eq",)))
    layers = None
    if args.heads_limit:  # whole layers, spread over the depth (the scan batches a layer)
        n = min(view.n_layers, max(1, -(-args.heads_limit // view.n_heads)))
        layers = sorted({round((i + 0.5) * view.n_layers / n - 0.5) for i in range(n)})
    heads = select_heads(view, layers=layers)
    print(f"heads: {', '.join(f'{a}.{b}' for a, b in heads)}")
    print(f"model {args.model} on {args.device} ({torch.get_num_threads()} threads): "
          f"{len(enc)} cases, {len(heads)} of {view.n_layers * view.n_heads} heads")

    naive, t_naive = timed(scan_naive, view, enc, heads, batch_size=args.naive_batch_size,
                           device=args.device)
    print(f"naive loop:                      {t_naive:8.1f} s")
    steps = [("cnalens scan", {})]
    if args.steps:
        steps = [("(a) heads per pass", {"reuse": False, "share_prefix": False}),
                 ("(a)+(b) reuse lower layers", {"share_prefix": False}),
                 ("(a)+(b)+(c) prefix cache", {"tree": False}),
                 ("(a)-(d) token tree", {})]
    t_fast = None
    for name, kw in steps:
        fast, t = timed(scan_fast, view, enc, heads, batch_size=args.batch_size,
                        device=args.device, **kw)
        bad, ties, dl = compare(naive, fast)
        print(f"{name:32s} {t:8.1f} s  x{t_naive / t:5.2f}  disagreements {bad} "
              f"(near ties {ties}), max |dlogp| {dl:.1e}")
        if not kw:
            t_fast = t
            if bad:
                raise SystemExit(f"scan and naive loop disagree on {bad} case(s)")
    for metric in ("acc", "acc_first"):
        ta, tb = head_table(naive, enc, metric), head_table(fast, enc, metric)
        gap = float((ta["acc_ablated"] - tb["acc_ablated"]).abs().max())
        print(f"table {metric}: max |acc_ablated difference| {gap:.4f}")
    if args.transformer_lens:
        run_tl(args, view, enc, heads, fast, t_fast)
    print(f"speedup naive/cnalens: {t_naive / t_fast:.1f}x")


if __name__ == "__main__":
    main()
