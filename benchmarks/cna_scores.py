"""Certified CNA top-K vs today's exhaustive CNA scoring, same cases, same run.

A head-zeroed model comparison on 1-digit "+" cases (few-shot prefix): run A the model,
run B the head zeroed, both scored on A's prediction with A's frozen final-norm scale over
the deep layers (the head's layer and above). Exhaustive: ``score_neurons`` on both runs in
one pass (as the CNA stage did before the certified top-K), then ``diff_frame``. Certified:
``scores.certified_cna``, timed cold (exact projection ranges computed for the candidate
neurons, included) and warm (ranges cached). Checks the same top-K (swaps only within
design.md's 1e-4 tie rule), prints how many neurons were scored exactly, and the speed-up
last.

    python benchmarks/cna_scores.py --model gemma3-270m --cases 3 --k 100
    python benchmarks/cna_scores.py --model qwen2.5-coder-0.5b --cases 3 --head 12.0

The other comparisons the CNA core makes go through the same entry points
(``cna.compare_runs``, ``cna.compare_inputs``), timed with and without ``k`` there, forwards
included; then the scoring alone (both runs' forwards, timed separately in the same run,
subtracted), as the head comparison is timed, ratio last:

    python benchmarks/cna_scores.py --comparison lora     # a LoRA on the head's attention
    python benchmarks/cna_scores.py --comparison inputs   # "a+b=" against "a*b=", one target
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cnalens import certified as CE
from cnalens import load_model
from cnalens import scores as S
from cnalens import states as ST
from cnalens.data.arithmetic import format_prefix
from cnalens.data.cases import Case
from cnalens.interventions import ZeroHeads

HEADS = {"gemma3-270m": "7.0", "qwen2.5-coder-0.5b": "12.0"}
PAIRS = [(3, 5), (1, 2), (4, 4), (2, 7), (6, 1), (5, 3), (0, 8), (7, 2), (3, 3), (1, 6)]


def cases(n: int) -> list[Case]:
    prefix = format_prefix("+", "eq", [(2, 4), (1, 6), (4, 3)])
    return [Case(f"{a}+{b}=", str(a + b), prefix, case_id=f"{a}+{b}") for a, b in PAIRS[:n]]


def mismatches(ex, got, d: np.ndarray, case_ids: list[str], tie: float = 1e-4) -> tuple[int, int]:
    """(cases whose top-K lists differ, of those how many differ beyond the tie rule)."""
    pos = {c: i for i, c in enumerate(case_ids)}
    differ = beyond = 0
    for c in case_ids:
        a = ex[ex.case == c]
        b = got[got.case == c]
        la = list(zip(a.layer, a.neuron, strict=True))
        lb = list(zip(b.layer, b.neuron, strict=True))
        if la == lb:
            continue
        differ += 1
        i = pos[c]
        if set(la) == set(lb):  # the same neurons: only near-ties may swap places
            if any(abs(d[i, x[0], x[1]] - d[i, y[0], y[1]]) >= tie
                   for x, y in zip(la, lb, strict=True) if x != y):
                beyond += 1
            continue
        vals = [d[i, x, y] for x, y in set(la) ^ set(lb)]
        if max(vals) - min(vals) >= tie:
            beyond += 1
    return differ, beyond


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--head", default=None, help="L.H zeroed in run B (default per model)")
    ap.add_argument("--layers", default=None, help="a-b (default: the head's layer and up)")
    ap.add_argument("--rank", default="decrease", choices=list(S.RANKINGS))
    ap.add_argument("--head-tokens", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--comparison", default="heads", choices=["heads", "lora", "inputs"],
                    help="heads: the head zeroed (states-level timing); lora: a seeded "
                         "random LoRA on the head's attention layer against the adapter "
                         "disabled; inputs: two prompts, one target (debias's kind)")
    args = ap.parse_args()
    if args.comparison != "heads":
        return entry_points(args)

    view = load_model(args.model, device=args.device, progress=False)
    hl, hh = (int(x) for x in (args.head or HEADS.get(args.model, "0.0")).split("."))
    if args.layers:
        a, b = args.layers.split("-")
        layers = list(range(int(a), int(b) + 1))
    else:
        layers = list(range(hl, view.n_layers))
    cs = cases(args.cases)
    n_units = sum(view.ffn_width(x) for x in layers)
    print(f"model {args.model}: head {hl}.{hh} zeroed in run B; layers {layers[0]}-"
          f"{layers[-1]}: {n_units} FFN neurons; vocab {view.vocab_size}; "
          f"{len(cs)} cases ({', '.join(c.case_id for c in cs)}); K={args.k}; "
          f"{torch.get_num_threads()} threads")

    t = time.perf_counter()
    sa = ST.case_states(view, cs)
    sb = ST.case_states(view, cs, ZeroHeads([(hl, hh)]))
    print(f"forwards (both runs, shared by both methods): {time.perf_counter() - t:.1f} s")

    t = time.perf_counter()
    both = S.score_neurons(view, None, states=ST.concat_states([sa, sb]),
                           target=torch.cat([sa.pred, sa.pred]),
                           scale=torch.cat([ST.frozen_scale(view, sa)] * 2), layers=layers,
                           progress=False)
    n = len(cs)
    ia, ib = both.imp[:n], both.imp[n:]
    ex, _ = S.ranked_rows(ia - ib, ia, ib, both.coef[:n], both.coef[n:], sa.case_ids, args.k,
                          args.rank, layers)
    t_ex = time.perf_counter() - t
    print(f"exhaustive (today's CNA stage, both runs in one pass): {t_ex:.1f} s, "
          f"{t_ex / n:.2f} s per case pair, {n_units} neurons x 2 runs per case")

    CE.clear_range_cache()
    t = time.perf_counter()
    got, st = CE.certified_cna(view, sa, sb, args.k, layers=layers, by=args.rank,
                              head_tokens=args.head_tokens)
    t_cold = time.perf_counter() - t
    t = time.perf_counter()
    got_w, st_w = CE.certified_cna(view, sa, sb, args.k, layers=layers, by=args.rank,
                                  head_tokens=args.head_tokens)
    t_warm = time.perf_counter() - t
    print(f"certified cold: {t_cold:.1f} s (exact projection ranges of "
          f"{st['n_ranges_computed']} candidate neurons, kept for later calls: "
          f"{st['seconds_range']:.1f} s); warm (ranges cached): {t_warm:.1f} s, "
          f"{t_warm / n:.2f} s per case pair")
    print(f"candidates per case (interval reaches the K-th lower bound): {st['n_candidates']}")
    print(f"scored exactly per case (both runs): {st['n_exact']} of {n_units} "
          f"({100 * st['n_exact_total'] / (n_units * n):.2f}%)")

    key = S.rank_key(ia - ib, args.rank).numpy()
    for name, g in (("cold", got), ("warm", got_w)):
        differ, beyond = mismatches(ex, g, key, sa.case_ids)
        gd = g.sort_values(["case", "layer", "neuron"])["diff"].to_numpy()
        ed = ex.sort_values(["case", "layer", "neuron"])["diff"].to_numpy()
        same = len(gd) == len(ed)
        err = float(np.abs(np.sort(gd) - np.sort(ed)).max()) if same else float("nan")
        print(f"same top-{args.k} as exhaustive ({name}): {differ == 0} ({differ} cases "
              f"differ, {beyond} beyond the 1e-4 tie rule); max |diff| deviation {err:.1e}")
        if beyond:
            raise SystemExit("certified top-K differs from exhaustive beyond the tie rule")
    print(f"per case pair, ranges cached: exhaustive {t_ex / n:.2f} s vs certified "
          f"{t_warm / n:.2f} s: {t_ex / t_warm:.1f}x")
    print(f"speed-up, same {n} cases, ranges computed in the run (cold): {t_ex / t_cold:.1f}x")


def entry_points(args: argparse.Namespace) -> None:
    """``compare_runs`` (LoRA vs adapter disabled) or ``compare_inputs`` (two prompts):
    exhaustive (no ``k``) against certified (``k``), forwards included in both."""
    import warnings

    from peft import LoraConfig, get_peft_model

    from cnalens.apps.lora import target_names
    from cnalens.cna import compare_inputs, compare_runs

    view = load_model(args.model, device=args.device, progress=False)
    hl = int((args.head or HEADS.get(args.model, "0.0")).split(".")[0])
    layers = list(range(hl, view.n_layers))
    cs = cases(args.cases)
    n_units = sum(view.ffn_width(x) for x in layers)
    print(f"model {args.model}: {args.comparison} comparison; layers {layers[0]}-"
          f"{layers[-1]}: {n_units} FFN neurons; {len(cs)} cases; K={args.k}; "
          f"{torch.get_num_threads()} threads")
    if args.comparison == "lora":
        config = LoraConfig(r=8, lora_alpha=16, target_modules=target_names(view, [hl],
                                                                             ["attn"]))
        torch.manual_seed(0)  # peft's LoRA A initialisation
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            other = get_peft_model(view.model, config)
        other.eval()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, prm in other.named_parameters():
                if "lora_B" in name:
                    prm.copy_(torch.randn(prm.shape, generator=gen) * 0.02)

        def run(k):
            return compare_runs(view, cs, other_model=other, k=k, layers=layers, by=args.rank)

        def forwards():
            ST.case_states(view, cs)
            with other.disable_adapter():
                ST.case_states(view, cs)
    else:
        b_cases = [Case(c.question.replace("+", "*"), c.target, c.prefix, case_id=c.case_id)
                   for c in cs]

        def run(k):
            return compare_inputs(view, cs, b_cases, k=k, layers=layers, by=args.rank)

        def forwards():
            ST.case_states(view, cs)
            ST.case_states(view, b_cases)

    forwards()  # warm-up: the first forward pays one-off costs
    t = time.perf_counter()
    forwards()
    t_fw = time.perf_counter() - t
    t = time.perf_counter()
    ex = run(None)
    t_ex = time.perf_counter() - t
    CE.clear_range_cache()
    t = time.perf_counter()
    cold = run(args.k)
    t_cold = time.perf_counter() - t
    t = time.perf_counter()
    warm = run(args.k)
    t_warm = time.perf_counter() - t
    st = warm.meta.get("stats", {})
    print(f"exhaustive: {t_ex:.1f} s; {warm.meta['scoring']}: cold {t_cold:.1f} s, warm "
          f"{t_warm:.1f} s; scored exactly per case (both runs): {st.get('n_exact')} of "
          f"{n_units}")
    key = S.rank_key(ex.diff, args.rank).numpy()
    for name, comp in (("cold", cold), ("warm", warm)):
        differ, beyond = mismatches(ex.frame(args.k), comp.frame(args.k), key, ex.case_ids)
        print(f"same top-{args.k} as exhaustive ({name}): {differ == 0} ({differ} cases "
              f"differ, {beyond} beyond the 1e-4 tie rule)")
        if beyond:
            raise SystemExit("certified top-K differs from exhaustive beyond the tie rule")
    print(f"speed-up, same {len(cs)} cases, forwards included: warm {t_ex / t_warm:.1f}x, "
          f"cold {t_ex / t_cold:.1f}x")
    # the scoring alone, as the head comparison times it: both runs' forwards (measured
    # separately in this run, {t_fw:.1f} s) subtracted from each
    sx, sw = t_ex - t_fw, max(t_warm - t_fw, 1e-9)
    print(f"per case pair, scoring only (forwards {t_fw:.1f} s subtracted), ranges cached: "
          f"exhaustive {sx / len(cs):.2f} s vs certified {sw / len(cs):.2f} s: {sx / sw:.1f}x")


if __name__ == "__main__":
    main()
