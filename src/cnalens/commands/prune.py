"""``cnalens prune``: CNA-guided pruning of deep FFN neurons, a real smaller model, random
controls (see ``cnalens.apps.prune``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from cnalens.cli import (
    BatchOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    OutOpt,
    Profile,
    QuietOpt,
    app,
    command_line,
    console,
    load_view,
    print_table,
)
from cnalens.errors import CnaError


@app.command()
def prune(
    model: ModelOpt = "gemma3-270m",
    lora: Annotated[Path, typer.Option(
        help="a LoRA adapter saved by 'cnalens lora' (its folder or the results folder)")
    ] = Path("results/lora"),
    keep_top: Annotated[int | None, typer.Option(
        "--keep-top", help="keep the union of every case's top-N deep neurons")] = None,
    prune_fraction: Annotated[float | None, typer.Option(
        "--prune-fraction", help="choose N so that about this fraction of the deep FFN "
        "neurons goes (default 0.95 when --keep-top is not given)")] = None,
    deep_from: Annotated[int | None, typer.Option(
        "--deep-from", help="first deep layer; default: the top head's layer in "
        "OUT/heads.csv or LORA/heads.csv")] = None,
    profile: Annotated[Profile, typer.Option(
        help="quick: 10 operand pairs per op for the selection, 2 random seeds; full: every "
        "1-digit case, 5 seeds")] = "quick",
    n: Annotated[int | None, typer.Option(
        "--n", help="operand pairs per op for the CNA selection (overrides the profile)")
    ] = None,
    seeds: Annotated[int | None, typer.Option(
        help="random controls (seeds 1..S; overrides the profile)")] = None,
    train: Annotated[bool, typer.Option(
        "--train/--no-train", help="train a fresh LoRA on each pruned model")] = True,
    out: OutOpt = Path("results/prune"),
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "cpu", dtype: DtypeOpt = "float32",
    quiet: QuietOpt = False,
) -> None:
    """Prune the deep FFN neurons a LoRA does not rely on (CNA LoRA vs original), save the
    smaller model in OUT/model, retrain a LoRA on it; the same with random neurons."""
    from cnalens.apps.lora import read_adapter_meta
    from cnalens.apps.prune import (
        DEFAULT_FRACTION,
        PRUNE_PROFILES,
        find_adapter,
        heads_layer,
    )
    from cnalens.models import load_model
    from cnalens.stages import record_stage
    from cnalens.stages.prune import run_prune
    from cnalens.tables import prune_summary as summary

    if keep_top is not None and prune_fraction is not None:
        raise CnaError("give either --keep-top N or --prune-fraction F, not both")
    if keep_top is None and prune_fraction is None:
        prune_fraction = DEFAULT_FRACTION
    if prune_fraction is not None and not 0 < prune_fraction < 1:
        raise CnaError(f"--prune-fraction must lie strictly between 0 and 1, not "
                       f"{prune_fraction}")
    if keep_top is not None and keep_top < 1:
        raise CnaError(f"--keep-top must be at least 1, not {keep_top}")
    prof = PRUNE_PROFILES[profile]
    n_seeds = prof.seeds if seeds is None else seeds
    if n_seeds < 0:
        raise CnaError(f"--seeds must not be negative, not {n_seeds}")
    if n is not None and n < 1:
        raise CnaError(f"--n must be at least 1, not {n}")
    adapter = find_adapter(lora)
    if adapter is None:
        raise CnaError(f"no LoRA adapter in {lora} (expected adapter_config.json there or "
                       "in adapter/ or lora/ below it; train one with 'cnalens lora')")
    read_adapter_meta(adapter)  # cnalens.json present and readable
    if deep_from is None:
        deep_from = heads_layer(out, lora, adapter.parent)
        if deep_from is None:
            raise CnaError(f"no --deep-from and no heads.csv in {out} or {lora}: pass "
                           "--deep-from L (the arithmetic head's layer; 'cnalens heads' "
                           "finds it)")
    view = load_view(model, device, dtype, None, quiet, layers=[deep_from])

    def fresh():
        return load_model(model, device=str(view.device), dtype=dtype, progress=False)

    t0 = time.perf_counter()
    settings = {"profile": profile, "keep_top": keep_top, "prune_fraction": prune_fraction,
                "deep_from": deep_from, "n": n if n is not None else prof.n_select,
                "seeds": n_seeds, "train": train}
    table = run_prune(view, fresh, adapter, out, keep_top=keep_top,
                      prune_fraction=prune_fraction, deep_from=deep_from,
                      seeds=tuple(range(1, n_seeds + 1)), train=train,
                      n_select=n if n is not None else prof.n_select, batch_size=batch_size,
                      progress=not quiet, settings_extra=settings)
    summ = summary(table)
    print_table(summ[["label", "runs", "n", "acc", "acc_sd", "acc_lo", "acc_hi",
                      "acc_first", "logp", "deep_pruned"]],
                "accuracy on the LoRA test split (%; sd over seeds, Wilson 95% of the "
                "pooled cases)",
                pct=("acc", "acc_sd", "acc_lo", "acc_hi", "acc_first", "deep_pruned"))
    from cnalens.io import read_json

    meta = read_json(out / "prune.json")
    s = meta["sizes"]
    console.print(
        f"pruned {100 * meta['pruned_fraction']:.1f}% of the deep FFN neurons (layers "
        f"{meta['deep_layers'][0]}-{meta['deep_layers'][1]}, N = {meta['n_top']}); FFN "
        f"parameters removed {s['ffn_params_removed']:,} of {s['ffn_params_before']:,}; "
        f"weights file {s['weights_bytes_before'] / 2**20:.0f} MiB -> "
        f"{s['weights_bytes_after'] / 2**20:.0f} MiB (-{100 * s['file_reduction']:.1f}%); "
        f"forward {s['speed']['speedup']:.2f}x faster")
    report = record_stage(out, view, command_line(), "prune", time.perf_counter() - t0)
    console.print(f"wrote {out}/prune.csv and the pruned model {out}/model; report: {report}")
