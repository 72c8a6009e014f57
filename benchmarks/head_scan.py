"""Head scan benchmark: the naive loop against cnalens's scan, on the same cases.

    python benchmarks/head_scan.py                     # all 72 heads of gemma3-270m (slow)
    python benchmarks/head_scan.py --heads-limit 8     # a subset of heads
    python benchmarks/head_scan.py --steps             # also time each speed-up step

Cases: the 1-digit dataset of all four operations, "eq" template, default few-shot
prefixes. (a) The naive loop: per head, one full forward pass of every batch under a
zeroing hook (``ZeroHeads``), logits at the last positions only. (b) ``scan_fast``, the
scan behind ``cnalens.heads.scan_heads``. Both must give the same per-case results
(design.md's near-tie rule: a case may differ only where a scored token's top-2 logit
margin is under 1e-4 in either run; such cases are counted). The last line is the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from cnalens import load_model
from cnalens.data import arithmetic_cases, encode_all
from cnalens.heads import head_table, scan_fast, scan_naive, select_heads

TIE = 1e-4


def compare(a, b) -> tuple[int, int, float]:
    """(disagreeing cases, of which near ties, max |logp difference|) over all runs."""
    bad = ties = 0
    dl = 0.0
    for x, y in ((a.orig, b.orig), (a.ablated, b.ablated)):
        diff = (x["correct"] != y["correct"]) | (x["pred"] != y["pred"])
        tie = torch.minimum(x["margin"], y["margin"]) < TIE
        bad += int((diff & ~tie).sum())
        ties += int((diff & tie).sum())
        dl = max(dl, float((x["logp"] - y["logp"]).abs().max()))
    return bad, ties, dl


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


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
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

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

    naive, t_naive = timed(scan_naive, view, enc, heads, batch_size=args.naive_batch_size)
    print(f"naive loop:                      {t_naive:8.1f} s")
    steps = [("cnalens scan", {})]
    if args.steps:
        steps = [("(a) heads per pass", {"reuse": False, "share_prefix": False}),
                 ("(a)+(b) reuse lower layers", {"share_prefix": False}),
                 ("(a)+(b)+(c) prefix cache", {})]
    t_fast = None
    for name, kw in steps:
        fast, t = timed(scan_fast, view, enc, heads, batch_size=args.batch_size, **kw)
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
    print(f"speedup naive/cnalens: {t_naive / t_fast:.1f}x")


if __name__ == "__main__":
    main()
