"""The debias stage: the CNA neurons of a paired bias (gender by default) zero-edited,
beside random controls, with the edit's costs (:mod:`cnalens.apps.debias`);
DIR/debias.csv, debias_neurons.csv, debias.json and the edited model DIR/model."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from cnalens.apps.debias import (
    GENDER,
    HELDOUT_TEMPLATES,
    SELECT_TEMPLATES,
    arithmetic_cost,
    check_n,
    choose_professions,
    encode_pairs,
    gaps,
    gender_pairs,
    input_runs,
    input_topk,
    load_pairs,
    metric_summary,
    neutral_text,
    pair_frame,
    perplexity,
    professions_from,
    random_neurons,
    save_edited,
    select_neurons,
    zero_edited,
)
from cnalens.data.arithmetic import OPS, arithmetic_cases
from cnalens.data.cases import encode_all
from cnalens.errors import CnaError
from cnalens.interventions import ZeroNeurons
from cnalens.io import write_csv, write_json
from cnalens.progress import track
from cnalens.stages import StageContext

if TYPE_CHECKING:
    from cnalens.models import ModelView


def run_debias(view: ModelView, out: Path, *, n_neurons: int = 18,
               top_k: Sequence[int] | int = (5, 10, 20, 50),
               seeds: int = 3,
               pairs_file: str | Path | None = None, professions: Sequence[str] | None = None,
               per_group: int = 16, candidates: int = 100, layers: Sequence[int] | None = None,
               screen: int | None = None, inputs: bool = False, cost_n: int = 25, seed: int = 0,
               batch_size: int = 32, progress: bool = True, save_model: bool = True,
               texts: Sequence[str] | None = None, settings: dict | None = None) -> dict:
    """The whole debias stage: pairs, CNA neurons, controls, costs, the edit; writes
    DIR/debias.csv, DIR/debias.json, DIR/debias_neurons.csv and DIR/model/.

    ``screen``: None or 0 (default) ranks each pair's top-K certified exact; N scores only
    the N neurons per pair a first-order screen keeps (approximate); ``debias.json``
    records which (``scoring``)."""
    t0 = time.perf_counter()
    times: dict[str, float] = {}
    if layers is not None:
        layers = sorted({int(x) for x in layers})
        if not layers:
            raise CnaError("layers: names no layer")
        view.check_layers(layers)
    check_n(view, n_neurons, layers)
    if screen is not None and screen < 0:
        raise CnaError(f"screen must be >= 0 (0: certified exact), got {screen}")
    screen = screen or None
    ks = sorted({int(k) for k in ([top_k] if isinstance(top_k, int) else top_k)})
    if not ks or ks[0] < 1:
        raise CnaError(f"top_k must be >= 1, got {top_k}")
    if seeds < 0:
        raise CnaError(f"seeds must be >= 0, got {seeds}")
    prof = None
    if pairs_file is not None:
        pairs, names = load_pairs(pairs_file), ("a", "b")
    else:
        if professions is None and per_group < 1:  # (choose_professions' n_per_group)
            raise CnaError(f"per_group must be >= 1, got {per_group}")
        prof = (professions_from(view, professions, batch_size) if professions is not None
                else choose_professions(view, per_group, candidates, batch_size))
        words = prof["word"].tolist()
        pairs, names = gender_pairs(words, "select") + gender_pairs(words, "heldout"), GENDER
    ea, eb = encode_pairs(view.tokenizer, pairs)
    arith = encode_all(view.tokenizer, arithmetic_cases(OPS, (1,), ("eq",), n=cost_n, seed=seed))
    texts = list(neutral_text() if texts is None else texts)
    times["professions"] = time.perf_counter() - t0

    t = time.perf_counter()
    df = pair_frame(pairs, gaps(view, ea, eb, batch_size=batch_size), names)
    sel = np.nonzero((df["split"] == "select").to_numpy())[0]
    lean_a = torch.from_numpy(df["lean"].to_numpy()[sel] >= 0)
    run_a, run_b = input_runs([ea[i] for i in sel], [eb[i] for i in sel], lean_a)
    frame = input_topk(view, run_a, run_b, ks[-1], layers, screen, batch_size, progress)
    times["cna"] = time.perf_counter() - t
    t = time.perf_counter()
    sa, sb = [ea[i] for i in sel], [eb[i] for i in sel]
    search = []
    for k in ks:
        ch = select_neurons(frame[frame["rank"] <= k], n_neurons)
        units = [(int(a), int(b)) for a, b in zip(ch["layer"], ch["neuron"], strict=True)]
        value = float(gaps(view, sa, sb, ZeroNeurons(units), batch_size=batch_size).abs().mean())
        search.append({"k": k, "select_metric": value, "chosen": ch, "neurons": units})
    best = min(search, key=lambda r: (r["select_metric"], r["k"]))
    chosen, neurons = best["chosen"], best["neurons"]
    times["k_search"] = time.perf_counter() - t

    def measure(*ivs) -> tuple[pd.Series, dict]:
        g = pd.Series(gaps(view, ea, eb, *ivs, batch_size=batch_size).numpy())
        return g, {**arithmetic_cost(view, arith, *ivs, batch_size=batch_size),
                   **perplexity(view, texts, *ivs, batch_size=max(1, batch_size // 2))}

    t = time.perf_counter()
    _, cost_before = measure()
    after: dict[str, pd.Series] = {}
    costs = {"before": cost_before, "random": []}
    random_sets = {}
    for s in track(range(seeds), "random controls", show=progress):
        rn = random_neurons(view, neurons, seed + 1 + s)
        random_sets[s] = rn
        after[f"random_{s}"], c = measure(ZeroNeurons(rn))
        costs["random"].append({"seed": seed + 1 + s, **c})
    times["controls"] = time.perf_counter() - t

    t = time.perf_counter()
    model_dir = None
    with zero_edited(view, neurons, inputs):
        after["cna"], costs["cna"] = measure()
        times["edit_eval"] = time.perf_counter() - t
        if save_model:
            t = time.perf_counter()
            model_dir = save_edited(view, out / "model")
            times["save"] = time.perf_counter() - t
    rows = []
    for name, gap in after.items():
        kind, s = ("cna", None) if name == "cna" else ("random", seed + 1 + int(name[7:]))
        rows.append(df.assign(edit=kind, seed=s, gap_after=gap.to_numpy(),
                              abs_before=df["gap_before"].abs(), abs_after=gap.abs().to_numpy()))
    table = pd.concat([rows[-1], *rows[:-1]], ignore_index=True)
    table = table[["target", "group", "template", "split", "edit", "seed", "gap_before",
                   "gap_after", "abs_before", "abs_after", "lean"]]
    times["total"] = time.perf_counter() - t0
    unit_name = view.shape.neuron_name  # L.N, or L.E.N / L.S.N in an experts layer
    top = frame.assign(name=[unit_name(int(a), int(b))
                             for a, b in zip(frame["layer"], frame["neuron"], strict=True)])
    summary = {
        "task": "pairs" if pairs_file is not None else "gender",
        "groups": [f"{n}-leaning" for n in names],
        "paper": {"model": "Llama-7B", "n_neurons": 18, "before": 1.26, "after": 0.81,
                  "change": -0.357},
        "metric": metric_summary(df, after),
        "top_k": best["k"],
        "scoring": _scoring(frame.attrs.get("meta", {}), screen),
        "k_search": [{"k": r["k"], "select_metric": r["select_metric"],
                      "neurons": [unit_name(a, b) for a, b in r["neurons"]]} for r in search],
        "neurons": [{"name": unit_name(a, b), "layer": a, "neuron": b, "count": int(c),
                     "sum_diff": float(d)} for a, b, c, d in
                    zip(chosen["layer"], chosen["neuron"], chosen["count"], chosen["sum_diff"],
                        strict=True)],
        "random_neurons": {str(seed + 1 + s): [unit_name(a, b) for a, b in v]
                           for s, v in random_sets.items()},
        "costs": costs,
        "professions": None if prof is None else prof.to_dict("records"),
        "templates": {"select": [list(x) for x in SELECT_TEMPLATES],
                      "heldout": [list(x) for x in HELDOUT_TEMPLATES]}
        if pairs_file is None else None,
        "n_pairs": {"select": int(len(sel)), "heldout": int(len(df) - len(sel))},
        "model_dir": None if model_dir is None else str(model_dir),
        "settings": {"n_neurons": n_neurons, "top_k": ks, "seeds": seeds, "seed": seed,
                     "pairs": None if pairs_file is None else str(pairs_file),
                     "professions": None if professions is None else list(professions),
                     "per_group": per_group, "candidates": candidates,
                     "layers": layers, "screen": screen, "inputs": inputs, "cost_n": cost_n,
                     "cost_cases": len(arith), "neutral_sentences": len(texts),
                     "edit": "value vectors (down-projection columns) set to zero"
                     + (", gate/up rows too" if inputs else ""),
                     "random": "same number of neurons per layer as the CNA set",
                     **(settings or {})},
        "seconds": round(times["total"], 2),
        "timings": {k: round(v, 2) for k, v in times.items()},
    }
    write_csv(out / "debias_neurons.csv", top[["case", "rank", "layer", "neuron", "name",
                                                "imp_a", "imp_b", "coef_a", "coef_b", "diff"]])
    write_csv(out / "debias.csv", table)
    write_json(out / "debias.json", summary)
    return summary


def _scoring(meta: dict, screen: int | None) -> dict:
    """How the per-pair top-K was scored (``compare_inputs``' metadata), for debias.json."""
    stats = meta.get("stats") or {}
    method = meta.get("scoring") or ("screened" if screen else "certified")
    what = {"certified": "certified exact top-K (bounds, exact scores of the candidates)",
            "screened": f"approximate: exact scores of the {screen} neurons per pair a "
                        "first-order screen keeps",
            "exhaustive": "exact: every neuron scored"}
    out = {"method": method, "screen": screen, "exact": method != "screened",
           "what": what.get(method, method)}
    for key in ("method", "why", "n_units", "n_exact_total", "seconds"):
        if key in stats:
            value = stats[key]
            out["stats_" + key] = round(value, 2) if isinstance(value, float) else value
    return out


def debias_stage(ctx: StageContext) -> None:
    """The main job's debias stage (off by default): the gender task with its defaults."""
    run_debias(ctx.view, ctx.out, seed=ctx.seed, batch_size=ctx.batch_size,
               progress=ctx.progress, settings={"profile": getattr(ctx.profile, "name", None)})


__all__ = ["debias_stage", "run_debias"]
