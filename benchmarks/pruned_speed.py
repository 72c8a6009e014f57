"""Forward-pass speed of a pruned model against its original (same prompts, same run).

With ``--pruned DIR`` (a folder written by ``cnalens prune``: DIR/model) that model is
timed; without it the original is pruned here, keeping a random ``1 - fraction`` of the
FFN neurons of layers ``--deep-from``..last (speed does not depend on which neurons).
The two models take turns, so the machine's load affects both alike; the last line is
the speed ratio (original seconds / pruned seconds).

    python benchmarks/pruned_speed.py --model gemma3-270m --deep-from 7 [--pruned DIR]
"""

from __future__ import annotations

import argparse

import torch

from cnalens import load_model
from cnalens.apps.prune import (
    ffn_params,
    forward_seconds,
    prune_ffn,
    random_keep,
    save_pruned,
    selection_cases,
    weights_bytes,
)
from cnalens.data.cases import encode_all


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--pruned", default=None, help="a pruned model folder")
    ap.add_argument("--deep-from", type=int, default=7)
    ap.add_argument("--fraction", type=float, default=0.95)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--save", default=None, help="save the pruned model here, report the "
                    "weights file sizes, reload it with load_model and time the reloaded one")
    args = ap.parse_args()

    orig = load_model(args.model, progress=False)
    if args.pruned:
        pruned = load_model(args.pruned, progress=False)
    else:
        pruned = load_model(args.model, progress=False)
        deep = range(args.deep_from, pruned.n_layers)
        k = {la: max(1, round((1 - args.fraction) * pruned.ffn_width(la))) for la in deep}
        prune_ffn(pruned, random_keep(k, pruned.ffn_widths, seed=0))
    if args.save and not args.pruned:
        path = save_pruned(pruned, args.save, {"selection": "random", "seed": 0})
        before = weights_bytes(orig.info["cache_path"] or orig.info["path"])
        after = weights_bytes(path)
        print(f"weights file {before / 2**20:,.0f} MiB -> {after / 2**20:,.0f} MiB "
              f"(-{100 * (1 - after / before):.1f}%)")
        back = load_model(str(path), progress=False)
        ids = [e.prompt_ids for e in encode_all(orig.tokenizer, selection_cases(n=2))]
        with torch.inference_mode():
            b = pruned.batch(ids)
            diff = (pruned.last_logits(b) - back.last_logits(b)).abs().max()
        print(f"reloaded with load_model: widths equal {back.ffn_widths == pruned.ffn_widths}, "
              f"max |logit difference| {float(diff):.1e}")
        pruned = back
    enc = encode_all(orig.tokenizer, selection_cases(shots=3))
    print(f"{args.model}: FFN widths {pruned.ffn_widths}")
    print(f"FFN parameters {ffn_params(orig):,} -> {ffn_params(pruned):,}; all parameters "
          f"{sum(p.numel() for p in orig.model.parameters()):,} -> "
          f"{sum(p.numel() for p in pruned.model.parameters()):,}")
    t_orig, t_pruned = forward_seconds([orig, pruned], enc, args.batch, args.repeats)
    print(f"{min(args.batch, len(enc))} prompts, {torch.get_num_threads()} thread(s), median "
          f"of {args.repeats}: original {t_orig:.3f} s, pruned {t_pruned:.3f} s")
    print(f"speed ratio (original / pruned): {t_orig / t_pruned:.2f}x")


if __name__ == "__main__":
    main()
