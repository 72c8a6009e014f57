"""Neuron importance on gemma3-270m, one case ("3+5=" with a few-shot prefix).

Three ways to the same numbers: the per-neuron loop of the authors' notebooks (timed on a
random sample of neurons and extrapolated to all of them), exhaustive vectorised scoring
(``score_neurons``), and the certified top-100 (``certified_topk``). Checks that they agree
where they overlap; the last line is the certified top-100 vs loop speedup.

    python benchmarks/neuron_scores.py [--sample 48] [--layers 0-17] [--k 100]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cnalens import load_model
from cnalens import scores as S
from cnalens.data.arithmetic import format_prefix
from cnalens.data.cases import Case


def loop_scores(view, st, units, target):
    """The notebooks' loop: one neuron at a time through the frozen final norm and W_U."""
    fn, final = view.final_norm, st.final[0]
    out, base = [], {}
    with torch.no_grad():
        for layer, k in units:
            s0 = st.resid_mid[0, layer]
            if layer not in base:  # the base log-probability once per layer
                base[layer] = torch.log_softmax(
                    view.logits(view.frozen_norm(fn, s0, final)), -1)[target]
            u = st.coef[0, layer, k] * view.value_vectors(layer)[k]
            post = view.norm(layer, "ln_ffn_post")
            if post is not None:
                raw = view.module(layer, "down_proj")(st.coef[0, layer, :view.ffn_width(layer)])
                u = view.frozen_norm(post, u, raw, bias=False)
            lp = torch.log_softmax(view.logits(view.frozen_norm(fn, s0 + u, final)), -1)
            out.append(float(lp[target] - base[layer]))
    return np.array(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--sample", type=int, default=48, help="neurons timed in the loop")
    ap.add_argument("--layers", default=None, help="e.g. 0-17 or 15,16,17 (default: all)")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--max-memory", type=float, default=2.0)
    args = ap.parse_args()

    view = load_model(args.model, progress=False)
    if args.layers is None:
        layers = list(range(view.n_layers))
    elif "-" in args.layers:
        a, b = args.layers.split("-")
        layers = list(range(int(a), int(b) + 1))
    else:
        layers = [int(x) for x in args.layers.split(",")]
    case = Case("3+5=", "8", format_prefix("+", "eq", [(2, 4), (1, 6), (4, 3)]), case_id="3+5")
    n_units = sum(view.ffn_width(x) for x in layers)
    print(f"model {args.model}: {n_units} FFN neurons in {len(layers)} layers, "
          f"vocab {view.vocab_size}, {torch.get_num_threads()} threads")
    print(f"prompt {case.prompt!r}")

    t = time.perf_counter()
    st = S.case_states(view, [case])
    t_fwd = time.perf_counter() - t
    target = int(st.pred[0])
    print(f"forward with captures: {t_fwd:.2f} s; prediction "
          f"{view.tokenizer.decode([target])!r}")

    rng = np.random.default_rng(0)
    flat = rng.choice(n_units, size=min(args.sample, n_units), replace=False)
    offsets = np.cumsum([0] + [view.ffn_width(x) for x in layers])
    units = []
    for f in flat:
        li = int(np.searchsorted(offsets, f, side="right") - 1)
        units.append((layers[li], int(f - offsets[li])))
    loop_scores(view, st, units[:2], target)  # warm-up
    t = time.perf_counter()
    loop = loop_scores(view, st, units, target)
    per = (time.perf_counter() - t) / len(units)
    t_loop = per * n_units
    print(f"loop (notebooks): {per * 1e3:.1f} ms a neuron, timed on a random sample of "
          f"{len(units)} neurons, EXTRAPOLATED to {n_units}: {t_loop:.0f} s")

    t = time.perf_counter()
    sc = S.score_neurons(view, [case], layers=layers, max_memory_gb=args.max_memory,
                         progress=False, states=st)
    t_ex = time.perf_counter() - t
    flops = 2.0 * n_units * view.d_model * view.vocab_size
    print(f"exhaustive vectorised: {t_ex:.1f} s, {flops / t_ex / 1e9:.1f} GFLOP/s "
          f"(projection products only: {flops / 1e12:.2f} TFLOP)")
    ex_vals = np.array([float(sc.imp[0, la, k]) for la, k in units])
    d_loop = float(np.abs(ex_vals - loop).max())
    print(f"  loop vs exhaustive on the {len(units)} sampled neurons: max |diff| {d_loop:.2e}")

    t = time.perf_counter()
    got, stats = S.certified_topk(view, [case], args.k, layers=layers)
    t_cert = time.perf_counter() - t
    ref = sc.frame(top=args.k)
    same = (list(zip(ref.layer, ref["index"], strict=True))
            == list(zip(got.layer, got["index"], strict=True)))
    d_cert = float(np.abs(ref.importance.values - got.importance.values).max())
    print(f"certified top-{args.k}: {t_cert:.1f} s (forward included), "
          f"{stats['n_exact'][0]} of {n_units} neurons scored exactly; "
          f"same top-{args.k} as exhaustive: {same}; max |diff| {d_cert:.2e}")
    print(f"top 5: {', '.join(f'{a}.{b} {c:+.3f}' for a, b, c in zip(got.layer[:5], got['index'][:5], got.importance[:5], strict=True))}")  # noqa: E501
    print(f"exhaustive vs loop speedup: {t_loop / t_ex:.1f}x")
    print(f"certified top-{args.k} vs exhaustive speedup: {t_ex / t_cert:.1f}x")
    print(f"certified top-{args.k} vs loop speedup: {t_loop / t_cert:.1f}x")


if __name__ == "__main__":
    main()
