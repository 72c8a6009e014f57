"""Neuron importance on gemma3-270m, one case ("3+5=" with a few-shot prefix).

Three ways to the same numbers: the per-neuron loop of the authors' notebooks (timed on a
random sample of neurons and extrapolated to all of them), exhaustive vectorised scoring
(``score_neurons``), and the certified top-100 (``certified_topk``). Checks that they agree
where they overlap; the last line is the certified top-100 vs loop speedup.

    python benchmarks/neuron_scores.py [--sample 48] [--layers 0-17] [--k 100] [--device cuda]
    python benchmarks/neuron_scores.py --llama7b --device cuda       # Llama-7B-shaped, GPU
    python benchmarks/neuron_scores.py --llama7b --llama-scale 0.02  # its CPU smoke run

``--llama7b``: exhaustive scoring of one case on a Llama-7B-shaped model with random
weights (``llama_shaped.py``, bf16 weights; the lens computes in float32, see
``cnalens.scores._cdtype``), timed with CUDA synchronisation, GFLOP/s printed, and the
loop timed on a random sample of neurons and extrapolated. Random weights give flat
distributions, so certified mode is timed on the real models only (the default path,
which also takes ``--device cuda``). ``--llama-scale`` shrinks the model for a CPU run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from llama_shaped import describe, llama_view, shaped_cases, sync

from cnalens import certified as CE
from cnalens import load_model
from cnalens import scores as S
from cnalens import states as ST
from cnalens.data.arithmetic import format_prefix
from cnalens.data.cases import Case


def _logits32(view):
    """The unembedding in float32 at least (bf16 logits are too coarse for exact scores)."""
    if view.dtype in (torch.float32, torch.float64):
        return view.logits
    W = view.unembed.weight.detach().float()

    def logits(h: torch.Tensor) -> torch.Tensor:
        out = h.float() @ W.T
        return torch.tanh(out / view.softcap) * view.softcap if view.softcap else out
    return logits


def loop_scores(view, st, units, target):
    """The notebooks' loop: one neuron at a time through the frozen final norm and W_U."""
    fn, final = view.final_norm, st.final[0]
    lg = _logits32(view)
    out, base = [], {}
    with torch.no_grad():
        for layer, k in units:
            s0 = st.resid_mid[0, layer]
            if layer not in base:  # the base log-probability once per layer
                base[layer] = torch.log_softmax(
                    lg(view.frozen_norm(fn, s0, final)), -1)[target]
            u = st.coef[0, layer, k] * view.value_vectors(layer)[k]
            post = view.norm(layer, "ln_ffn_post")
            if post is not None:
                raw = view.module(layer, "down_proj")(st.coef[0, layer, :view.ffn_width(layer)])
                u = view.frozen_norm(post, u, raw, bias=False)
            lp = torch.log_softmax(lg(view.frozen_norm(fn, s0 + u, final)), -1)
            out.append(float(lp[target] - base[layer]))
    return np.array(out)


def sample_units(view, layers, n: int, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` random (layer, neuron) pairs, uniform over every neuron of ``layers``."""
    n_units = sum(view.ffn_width(x) for x in layers)
    flat = np.random.default_rng(seed).choice(n_units, size=min(n, n_units), replace=False)
    offsets = np.cumsum([0] + [view.ffn_width(x) for x in layers])
    units = []
    for f in flat:
        li = int(np.searchsorted(offsets, f, side="right") - 1)
        units.append((layers[li], int(f - offsets[li])))
    return units


def time_loop(view, st, units, target, n_units: int, device) -> tuple[np.ndarray, float]:
    """The loop on ``units`` (after a warm-up): (scores, seconds EXTRAPOLATED to n_units)."""
    loop_scores(view, st, units[:2], target)
    sync(device)
    t = time.perf_counter()
    loop = loop_scores(view, st, units, target)
    sync(device)
    per = (time.perf_counter() - t) / len(units)
    print(f"loop (notebooks): {per * 1e3:.2f} ms a neuron, timed on a random sample of "
          f"{len(units)} neurons, EXTRAPOLATED to {n_units}: {per * n_units:.1f} s")
    return loop, per * n_units


def time_exhaustive(view, enc, st, layers, n_units: int, max_memory: float, device):
    """``score_neurons`` timed with synchronisation; prints seconds and GFLOP/s."""
    if torch.device(device).type == "cuda":  # warm-up: kernels and allocator, one layer
        S.score_neurons(view, enc, layers=layers[:1], max_memory_gb=max_memory,
                        progress=False, states=st)
    sync(device)
    t = time.perf_counter()
    sc = S.score_neurons(view, enc, layers=layers, max_memory_gb=max_memory,
                         progress=False, states=st)
    sync(device)
    t_ex = time.perf_counter() - t
    flops = 2.0 * n_units * view.d_model * view.vocab_size
    print(f"exhaustive vectorised: {t_ex:.3f} s, {flops / t_ex / 1e9:.1f} GFLOP/s "
          f"(projection products only: {flops / 1e12:.3g} TFLOP; computed in "
          f"{view.compute_dtype}, float32 matmul precision "
          f"'{torch.get_float32_matmul_precision()}')")
    return sc, t_ex


def run_llama(args) -> None:
    """Exhaustive scoring of one case on a random Llama-7B-shaped model (module docstring)."""
    dev = args.device
    if args.matmul_precision:
        torch.set_float32_matmul_precision(args.matmul_precision)
    sync(dev)
    t = time.perf_counter()
    view = llama_view(args.llama_scale, dev, args.llama_dtype)
    print(f"Llama-7B-shaped random model (scale {args.llama_scale:g}, built in "
          f"{time.perf_counter() - t:.1f} s): {describe(view)}")
    enc = shaped_cases(view.vocab_size, n=1)
    layers = list(range(view.n_layers))
    n_units = sum(view.ffn_width(x) for x in layers)
    print(f"one case of {len(enc[0].prompt_ids)} random tokens; {n_units} FFN neurons")
    ST.case_states(view, enc)  # warm-up
    sync(dev)
    t = time.perf_counter()
    st = ST.case_states(view, enc)
    sync(dev)
    print(f"forward with captures: {time.perf_counter() - t:.3f} s")
    target = int(st.pred[0])
    units = sample_units(view, layers, args.sample)
    loop, t_loop = time_loop(view, st, units, target, n_units, dev)
    sc, t_ex = time_exhaustive(view, enc, st, layers, n_units, args.max_memory, dev)
    ex_vals = np.array([float(sc.imp[0, la, k]) for la, k in units])
    d_loop = float(np.abs(ex_vals - loop).max())
    print(f"  loop vs exhaustive on the {len(units)} sampled neurons: max |diff| {d_loop:.2e}")
    if not d_loop < args.tol:
        raise SystemExit(f"exhaustive scores differ from the loop by {d_loop:.2e}")
    print("target: under 0.2 s" + ("" if args.llama_scale == 1 else
                                   " (for the full-size model; this run is scaled down)"))
    print(f"exhaustive vs loop speedup: {t_loop / t_ex:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--sample", type=int, default=48, help="neurons timed in the loop")
    ap.add_argument("--layers", default=None, help="e.g. 0-17 or 15,16,17 (default: all)")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--max-memory", type=float, default=2.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--llama7b", action="store_true",
                    help="exhaustive scoring of a random Llama-7B-shaped model (--device cuda)")
    ap.add_argument("--llama-scale", type=float, default=1.0,
                    help="shrink its hidden size, FFN width and depth (CPU smoke run)")
    ap.add_argument("--llama-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--matmul-precision", default=None, choices=["highest", "high", "medium"],
                    help="torch.set_float32_matmul_precision for the Llama run (default: "
                         "torch's, 'highest' = true float32 products)")
    ap.add_argument("--tol", type=float, default=1e-3,
                    help="Llama: largest |loop - exhaustive| allowed on the sampled neurons")
    args = ap.parse_args()
    if args.llama7b:
        return run_llama(args)

    dev = args.device
    view = load_model(args.model, device=dev, progress=False)
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
    cuda = torch.device(dev).type == "cuda"
    if cuda:  # warm-up: CUDA context, kernels, allocator
        ST.case_states(view, [case])

    sync(dev)
    t = time.perf_counter()
    st = ST.case_states(view, [case])
    sync(dev)
    t_fwd = time.perf_counter() - t
    target = int(st.pred[0])
    print(f"forward with captures: {t_fwd:.2f} s; prediction "
          f"{view.tokenizer.decode([target])!r}")

    units = sample_units(view, layers, args.sample)
    loop, t_loop = time_loop(view, st, units, target, n_units, dev)
    sc, t_ex = time_exhaustive(view, [case], st, layers, n_units, args.max_memory, dev)
    ex_vals = np.array([float(sc.imp[0, la, k]) for la, k in units])
    d_loop = float(np.abs(ex_vals - loop).max())
    print(f"  loop vs exhaustive on the {len(units)} sampled neurons: max |diff| {d_loop:.2e}")

    if cuda:
        CE.certified_topk(view, [case], min(args.k, view.ffn_width(layers[-1])),
                         layers=layers[-1:])
    sync(dev)
    t = time.perf_counter()
    got, stats = CE.certified_topk(view, [case], args.k, layers=layers)
    sync(dev)
    t_cert = time.perf_counter() - t
    ref = sc.frame(top=args.k)
    same = (list(zip(ref.layer, ref["neuron"], strict=True))
            == list(zip(got.layer, got["neuron"], strict=True)))
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
