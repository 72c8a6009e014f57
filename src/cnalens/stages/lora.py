"""The lora stage: a LoRA on one attention layer (:mod:`cnalens.apps.lora`) against the
original model, accuracy and CNA of the two (:mod:`cnalens.apps.lora_cna`); DIR/lora.csv,
lora_cna.csv, lora_neurons.csv, lora_cases.csv, lora.json and the adapter DIR/adapter."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch

from cnalens.apps.lora import (
    LoraSettings,
    accuracy_by_run,
    default_layer,
    load_adapter,
    lora_cases,
    read_adapter_meta,
    sample_per_op,
    save_adapter,
    train_lora,
    unload_lora,
)
from cnalens.apps.lora_cna import bands, lora_comparison, summarize
from cnalens.data.cases import encode_all
from cnalens.evaluate import evaluate
from cnalens.io import write_csv, write_json
from cnalens.stages import StageContext, now

if TYPE_CHECKING:
    from cnalens.models import ModelView


def run_lora(view: ModelView, out: Path, settings: LoraSettings, layer: int,
             sweep: Sequence[int] = (), ks: Sequence[int] = (10, 20, 50),
             deep_from: int | None = None, seeds: int = 3, n_cna: int = 2,
             batch_size: int = 64, progress: bool = True,
             adapter: str | Path | None = None) -> dict:
    """Train a LoRA on ``layer`` (and on each ``sweep`` layer), evaluate original vs LoRA
    on the test split, save the main adapter to ``out/adapter``, and compare the main
    LoRA model with the original by CNA on ``n_cna`` test cases per op (0: no CNA).

    Writes lora.csv (accuracy per run, layer and op), lora_cna.csv (coefficient change),
    lora_neurons.csv (each CNA case's top neurons), lora_cases.csv (per case, main layer)
    and lora.json; ``view.model`` is the original again on return (also on errors).
    ``adapter``: a saved adapter to evaluate and compare instead of training the main
    layer (its settings and layer are taken from its ``cnalens.json``).
    """
    t0 = time.perf_counter()
    if adapter is not None:
        saved = read_adapter_meta(adapter)["settings"]
        settings = LoraSettings.from_dict(saved)
        layer = settings.layers[0]
    settings.check()
    layers = [layer, *[x for x in sweep if x != layer]]
    view.check_layers(layers)
    if deep_from is not None:
        view.check_layers([deep_from])
    train, test = lora_cases(settings)
    enc_tr, enc_te = encode_all(view.tokenizer, train), encode_all(view.tokenizer, test)
    te = time.perf_counter()
    orig = evaluate(view, enc_te, batch_size=batch_size, progress=progress,
                    description="evaluating original").assign(run="original")
    eval_seconds = time.perf_counter() - te
    tables = [accuracy_by_run(orig).assign(layer=-1)]
    per_layer, main = {}, {}
    for L in layers:
        if adapter is not None and L == layer:
            lora = load_adapter(view, adapter)
            history = pd.DataFrame(lora.meta.get("history") or
                                   {"step": [], "loss": [], "lr": [], "seconds": []})
        else:
            lora, history = train_lora(view, enc_tr, settings.replace(layers=(L,)),
                                       progress=progress)
        try:
            t1 = time.perf_counter()
            res = evaluate(view, enc_te, batch_size=batch_size, progress=progress,
                           description=f"evaluating LoRA {L}").assign(run="lora")
            tables.append(accuracy_by_run(res).assign(layer=L))
            per_layer[L] = {"train_seconds": lora.meta.get("train_seconds"),
                            "train_cpu_seconds": lora.meta.get("train_cpu_seconds"),
                            "eval_seconds": round(time.perf_counter() - t1, 2),
                            "loss": [round(x, 4) for x in history["loss"]],
                            "acc": float(res["correct"].mean())}
            if L == layer:
                save_adapter(lora, out / "adapter")
                t2 = time.perf_counter()
                band_layers = bands(view.n_layers, L, deep_from)
                main = {"table": None, "neurons": None, "n_cna": 0,
                        "cases": pd.concat([orig, res], ignore_index=True),
                        "history": history, "bands": band_layers,
                        "meta": lora.meta, "scoring": None}
                if n_cna > 0:
                    enc_cna = sample_per_op(enc_te, n_cna, settings.seed)
                    # only each case's top-max(ks) is ranked: certified exact top-K where
                    # the LoRA leaves the down projections alone, exhaustive elsewhere
                    comp = lora_comparison(view, lora, enc_cna, L, k=max(ks),
                                           batch_size=min(batch_size, 32), progress=progress)
                    main.update(
                        table=summarize(comp, ks, band_layers, seeds, settings.seed),
                        neurons=comp.frame(max(ks), "decrease", range(L, view.n_layers),
                                           [{"op": e.case.labels.get("op"),
                                             "prompt": e.case.question,
                                             "target": e.case.target} for e in enc_cna]),
                        n_cna=len(enc_cna), scoring=comp.meta["scoring"])
                main["cna_seconds"] = round(time.perf_counter() - t2, 2)
        finally:
            unload_lora(lora)
    acc = pd.concat(tables, ignore_index=True)
    acc = acc[["run", "layer", *[c for c in acc.columns if c not in ("run", "layer")]]]
    summary = _summary(main["table"]) if main["table"] is not None else None
    meta = {
        "stage": "lora", "model": view.summary(), "settings": settings.to_dict(),
        "layer": layer, "sweep_layers": layers if len(layers) > 1 else [],
        "targets": main["meta"]["targets"], "n_train": len(enc_tr), "n_test": len(enc_te),
        "train_ops": {op: sum(1 for c in train if c.labels["op"] == op) for op in settings.ops},
        "adapter": str(out / "adapter"), "deep_from": deep_from,
        "bands": {k: [min(v), max(v)] for k, v in main["bands"].items()},
        "cna": {"n_cases": main["n_cna"], "ks": list(ks), "seeds": seeds,
                "runs": {"a": "LoRA model", "b": "original (adapter disabled)"},
                "target": "run A's prediction", "lens": "frozen, run A's final-norm scale",
                "ranking": "imp_a - imp_b, layers from the LoRA layer up",
                "scoring": main["scoring"],
                "change": "sum|coef_a| / sum|coef_b| - 1 over each case's top-K neurons "
                          "in the band", "summary": summary,
                "seconds": main["cna_seconds"]},
        "per_layer": {str(k): v for k, v in per_layer.items()},
        "history": main["history"][["step", "loss", "lr", "seconds"]].round(5)
        .to_dict("list"),
        "timings": {"train_seconds": per_layer[layer]["train_seconds"],
                    "train_cpu_seconds": per_layer[layer]["train_cpu_seconds"],
                    "eval_original_seconds": round(eval_seconds, 2),
                    "eval_lora_seconds": per_layer[layer]["eval_seconds"],
                    "cna_seconds": main["cna_seconds"],
                    "threads": torch.get_num_threads()},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_csv(out / "lora_cases.csv", main["cases"])
    if main["table"] is not None:
        write_csv(out / "lora_neurons.csv", main["neurons"])
        write_csv(out / "lora_cna.csv", main["table"])
    else:  # no stale comparison from an earlier run
        for name in ("lora_neurons.csv", "lora_cna.csv"):
            (out / name).unlink(missing_ok=True)
    write_csv(out / "lora.csv", acc)
    write_json(out / "lora.json", meta)
    return meta


def _summary(table: pd.DataFrame) -> dict:
    """Headline numbers: the coefficient change of the top-K vs random, per band."""
    out = {}
    for r in table[table["k"] > 0].itertuples():
        out[f"{r.band}@{r.k}"] = {"change": r.change, "random_mean": r.random_mean,
                                  "n_neurons": r.n_neurons, "up_frac": r.up_frac,
                                  "pct_b": r.pct_b}
    return out


def lora_stage(ctx: StageContext) -> None:
    """Main-job stage (off by default): the quick LoRA (200 test cases; smoke: a few dozen
    cases) on ``default_layer`` (a quarter of the depth), CNA on 2 test cases per op with
    bands around the top ``+`` head's layer from the head scan (depth quartiles without
    one), no layer sweep; the full profile trains at the paper's scale, compares 5 cases
    per op and sweeps every layer."""
    view = ctx.view
    name = ctx.profile.name
    ops = tuple(ctx.ops)
    if name == "full":
        settings = LoraSettings.full(ops=ops, seed=ctx.seed)
    elif name == "smoke":
        settings = LoraSettings.quick(ops=ops, seed=ctx.seed, n_train=32, n_test=16,
                                      batch_size=8)
    else:  # the measured real-model runs (docs/results.md section 6)
        settings = LoraSettings.quick(ops=ops, seed=ctx.seed, n_test=200)
    head = ctx.top_heads.get("+") or next(iter(ctx.top_heads.values()), None)
    deep_from = head[0] if head else None
    sweep = list(range(view.n_layers)) if name == "full" else []
    meta = run_lora(view, ctx.out, settings, default_layer(view), sweep,
                    ks=tuple(k for k in ctx.profile.cna_ks if k > 0) or (10,),
                    deep_from=deep_from, seeds=ctx.profile.cna_seeds,
                    n_cna=5 if name == "full" else 2, batch_size=ctx.batch_size,
                    progress=ctx.progress)
    meta["finished"] = now()
    write_json(ctx.out / "lora.json", meta)


__all__ = ["lora_stage", "run_lora"]
