"""The prune stage: CNA-guided pruning of deep FFN neurons against random controls
(:mod:`cnalens.apps.prune`); DIR/prune.csv, prune_summary.csv, prune_neurons.csv,
prune_cases.csv, prune.json and the pruned model DIR/model."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch

from cnalens.apps.lora import evaluate_runs, load_adapter, lora_cases, train_lora, unload_lora
from cnalens.apps.prune import (
    DEFAULT_FRACTION,
    PRUNE_PROFILES,
    accuracy_row,
    adapter_settings,
    counts,
    ffn_params,
    find_adapter,
    fit_experts,
    keep_frame,
    lora_ranking,
    prune_ffn,
    pruned_fraction,
    random_keep,
    save_and_measure,
    selection_cases,
)
from cnalens.data.cases import encode_all
from cnalens.errors import CnaError
from cnalens.evaluate import evaluate
from cnalens.heads import top_heads
from cnalens.io import write_csv, write_json
from cnalens.models import load_model
from cnalens.progress import console
from cnalens.stages import StageContext, now
from cnalens.tables import prune_summary

if TYPE_CHECKING:
    from cnalens.models import ModelView


def run_prune(view: ModelView, fresh: Callable[[], ModelView], lora_dir: Path, out: Path, *,
              keep_top: int | None = None,
              prune_fraction: float | None = None, deep_from: int, seeds: Sequence[int] = (1, 2),
              train: bool = True, n_select: int | None = None, batch_size: int = 32,
              speed_repeats: int = 5, progress: bool = True,
              settings_extra: dict | None = None) -> pd.DataFrame:
    """The whole experiment; writes DIR/prune.csv (one row per variant and seed),
    prune_summary.csv, prune_neurons.csv, prune_cases.csv, prune.json and DIR/model/.

    ``view``: the original model, without an adapter (the one in ``lora_dir`` is attached
    for the evaluation and the selection, and removed again); ``fresh()``: a newly loaded
    original model (each variant prunes its own, in place).
    """
    t0 = time.perf_counter()
    out = Path(out)
    if (keep_top is None) == (prune_fraction is None):
        raise CnaError("give exactly one of keep_top and prune_fraction")
    if prune_fraction is not None and not 0 < prune_fraction < 1:
        raise CnaError(f"prune_fraction must lie strictly between 0 and 1, not "
                       f"{prune_fraction}")
    if keep_top is not None and keep_top < 1:
        raise CnaError(f"keep_top must be at least 1, not {keep_top}")
    view.check_layers([deep_from])
    n_deep = sum(view.ffn_widths[deep_from:])
    if keep_top is not None and keep_top > n_deep:
        raise CnaError(f"keep_top {keep_top} must lie in 1..{n_deep} (the number of deep "
                       f"FFN neurons, layers {deep_from}-{view.n_layers - 1})")
    settings, adapter_meta = adapter_settings(lora_dir)
    train_cases, test_cases = lora_cases(settings)
    deep = list(range(deep_from, view.n_layers))
    widths = list(view.ffn_widths)
    tok = view.tokenizer
    test_enc, train_enc = encode_all(tok, test_cases), encode_all(tok, train_cases)
    sel = selection_cases(settings.ops, n_select, settings.seed, settings.shots)
    times: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        times[name] = round(time.perf_counter() - since, 1)
        return time.perf_counter()

    console.print(f"[bold]prune[/]: evaluating the original and the LoRA model on "
                  f"{len(test_enc)} test cases")
    t = time.perf_counter()
    adapter = load_adapter(view, lora_dir)
    try:
        per = evaluate_runs(view, adapter, test_enc, batch_size=batch_size,
                            progress=progress)
        rows = [accuracy_row(per[per["run"] == "original"], "original", None, deep_pruned=0.0),
                accuracy_row(per[per["run"] == "lora"], "lora", None, deep_pruned=0.0)]
        cases = [per.assign(variant=per["run"].map({"original": "original", "lora": "lora"}),
                            seed=None)]
        t = lap("evaluate", t)
        console.print(f"[bold]prune[/]: CNA LoRA vs original on {len(sel)} 1-digit cases, "
                      f"layers {deep[0]}-{deep[-1]}")
        ranking = lora_ranking(view, adapter, sel, deep_from, batch_size=batch_size,
                               progress=progress)
    finally:
        unload_lora(adapter)
    n_top = keep_top if keep_top is not None else ranking.choose_n(prune_fraction)
    # the union of the cases' top-N; mixture-of-experts layers as their experts can hold it
    keep = fit_experts(view, ranking.keep(n_top), ranking.order)
    t = lap("select", t)
    per_layer = counts(keep)
    variants = [("cna", None, keep)] + [
        ("random", s, random_keep(per_layer, widths, s, view, keep)) for s in seeds]
    sizes: dict = {}
    histories: dict = {}

    def _write(rows, cases, variants, complete: bool) -> pd.DataFrame:
        """All files from what is done so far (after each variant: a long run that is
        stopped keeps its finished rows; ``complete`` says whether every variant ran)."""
        table = pd.DataFrame(rows)
        table.insert(0, "model", view.info.get("spec"))
        neurons = pd.concat([keep_frame(kp, kind, seed, view.shape)
                             for kind, seed, kp in variants], ignore_index=True)
        write_csv(out / "prune_neurons.csv", neurons)
        write_csv(out / "prune_cases.csv", pd.concat(cases, ignore_index=True))
        write_csv(out / "prune_summary.csv", prune_summary(table))
        write_csv(out / "prune.csv", table)
        write_json(out / "prune.json", {
            "stage": "prune", "complete": complete, "model": view.summary(),
            "settings": settings_extra or {}, "lora_adapter": str(lora_dir),
            "lora_settings": settings.to_dict(),
            "lora_base": adapter_meta.get("base", {}).get("spec"),
            "selection": {"cases": len(sel), "pairs_per_op": n_select,
                          "ops": list(settings.ops), "digits": [1], "shots": settings.shots,
                          "ranking": "imp_a - imp_b",
                          "scoring": "exhaustive (every deep neuron: the selection needs "
                                     "each neuron's best rank over the cases)",
                          "runs": {"a": "LoRA model", "b": "original (adapter disabled)"},
                          "target": "run A's prediction, A's frozen final-norm scale for both"},
            "deep_layers": [deep[0], deep[-1]], "deep_neurons": sum(widths[la] for la in deep),
            "keep_top": keep_top, "target_fraction": prune_fraction, "n_top": n_top,
            "pruned_fraction": pruned_fraction(keep, widths),
            "kept_per_layer": {str(k): v for k, v in per_layer.items()},
            "seeds": list(seeds), "trained": train, "n_test": len(test_enc),
            "n_train": len(train_enc), "sizes": sizes, "histories": histories,
            "timings": times, "threads": torch.get_num_threads(),
            "seconds": round(time.perf_counter() - t0, 1),
            "finished": now() if complete else None})
        return table

    for kind, seed, kp in variants:
        tag = "cna" if kind == "cna" else f"random seed {seed}"
        pv = fresh()
        ffn_before = ffn_params(pv)
        info = prune_ffn(pv, kp)
        frac = pruned_fraction(kp, widths)
        if kind == "cna":
            t = time.perf_counter()
            meta = {"selection": "cna", "n_top": n_top, "deep_from": deep_from,
                    "lora_adapter": str(lora_dir)}
            sizes = save_and_measure(view, pv, out / "model", kp, frac, ffn_before, info,
                                     test_enc, batch_size, speed_repeats, meta)
            t = lap("save_and_speed", t)
        t = time.perf_counter()
        res = evaluate(pv, test_enc, batch_size=batch_size, progress=progress,
                       description=f"evaluating {tag} pruned")
        rows.append(accuracy_row(res, f"{kind}_pruned", seed, deep_pruned=frac))
        cases.append(res.assign(variant=f"{kind}_pruned", seed=seed))
        if train:
            console.print(f"[bold]prune[/]: training a fresh LoRA on the {tag} pruned model")
            pruned_lora, hist = train_lora(pv, train_enc, settings, progress=progress)
            histories[f"{kind}:{seed}"] = {"loss_first": float(hist["loss"].iloc[0]),
                                           "loss_last": float(hist["loss"].iloc[-1]),
                                           "seconds": float(hist["seconds"].iloc[-1])}
            res = evaluate(pv, test_enc, batch_size=batch_size, progress=progress,
                           description=f"evaluating {tag} pruned + LoRA")
            rows.append(accuracy_row(res, f"{kind}_pruned_lora", seed, deep_pruned=frac))
            cases.append(res.assign(variant=f"{kind}_pruned_lora", seed=seed))
            del pruned_lora
        del pv
        lap(f"variant {tag}", t)
        _write(rows, cases, variants, False)
    return _write(rows, cases, variants, True)


def prune_stage(ctx: StageContext) -> None:
    """Main-job stage (``--stages ...,lora,prune``): prune 95% of the deep FFN neurons
    guided by the lora stage's adapter (found in DIR, DIR/adapter, DIR/lora or
    DIR/lora/adapter), deep layers from the top head's layer (head scan of this run)."""
    lora_dir = find_adapter(ctx.out)
    if lora_dir is None:
        raise CnaError(f"the prune stage needs the lora stage's adapter in {ctx.out} "
                       "(run with --stages ...,lora,prune)")
    if ctx.heads is None or ctx.heads.empty:
        raise CnaError("the prune stage needs the head scan (the top head's layer)")
    top = top_heads(ctx.heads, 1)
    deep_from = int(top[top["op"] == "all"]["layer"].iloc[0])
    prof = PRUNE_PROFILES["full" if ctx.profile.name == "full" else "quick"]
    v = ctx.view
    dtype = str(v.dtype).split(".")[-1]

    def fresh():
        return load_model(v.info.get("spec"), device=str(v.device), dtype=dtype,
                          progress=False)

    run_prune(fresh(), fresh, lora_dir, ctx.out, prune_fraction=DEFAULT_FRACTION,
              deep_from=deep_from, seeds=tuple(range(1, prof.seeds + 1)),
              n_select=prof.n_select, batch_size=min(ctx.batch_size, 32),
              progress=ctx.progress, settings_extra={**ctx.settings, "prune_profile": prof.name})


__all__ = ["prune_stage", "run_prune"]
