"""``cnalens debias``: CNA neurons of a paired bias (gender by default), zero-edited."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from cnalens.cli import (
    BatchOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    OutOpt,
    QuietOpt,
    app,
    command_line,
    console,
    load_view,
    print_table,
)
from cnalens.errors import CnaError


@app.command()
def debias(
    model: ModelOpt = "gemma3-270m",
    out: OutOpt = Path("results/debias"),
    n_neurons: Annotated[int, typer.Option(help="neurons to zero-edit")] = 18,
    top_k: Annotated[str, typer.Option(
        help="top-K neurons per pair (CNA ranking); several: the K whose neuron set gives "
             "the smallest gap on the selection pairs")] = "5,10,20,50",
    seeds: Annotated[int, typer.Option(help="random-neuron control draws")] = 3,
    pairs: Annotated[Path | None, typer.Option(
        help="JSONL of {prompt_a, prompt_b, targets[, template, split]}: edit any paired "
             "bias instead of gender")] = None,
    professions: Annotated[str | None, typer.Option(
        help="comma-separated professions instead of the model's own predictions")] = None,
    per_group: Annotated[int, typer.Option(
        help="professions per group (female-/male-leaning)")] = 16,
    candidates: Annotated[int, typer.Option(
        help="top next tokens per selection prompt searched for professions")] = 100,
    layers: Annotated[str | None, typer.Option(
        help="restrict the neurons to these layers, e.g. 7-17 (default: all)")] = None,
    screen: Annotated[int, typer.Option(
        help="approximate: score exactly only the N neurons per pair a first-order screen "
             "keeps (recorded in debias.json); 0 (default): the certified exact top-K")] = 0,
    inputs: Annotated[bool, typer.Option(
        help="also zero the neurons' gate/up rows (default: value vectors only)")] = False,
    cost_n: Annotated[int, typer.Option(
        help="1-digit arithmetic pairs per op for the accuracy cost")] = 25,
    seed: int = 0,
    save_model: Annotated[bool, typer.Option(help="write the edited model to DIR/model")] = True,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "cpu", dtype: DtypeOpt = "float32", device_map: DeviceMapOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Zero-edit the neurons that carry a paired bias (paper 6 c) and measure what it costs.

    Gender by default: professions from the model's own predictions after "A woman/man
    works as a" and two more selection templates; the gap |log p(prof | female) - log p(prof
    | male)| before and after, on the selection and held-out templates, beside random
    neurons; arithmetic accuracy and neutral-text perplexity before and after."""
    from cnalens.heads import parse_layers
    from cnalens.names import parse_ints, parse_list
    from cnalens.stages import record_stage
    from cnalens.stages.debias import run_debias

    if pairs is not None and professions is not None:
        raise CnaError("use --pairs or --professions, not both")
    prof = None
    if professions is not None:
        if not [w for w in professions.split(",") if w.strip()]:
            raise CnaError("--professions: empty profession list")
        prof = parse_list(professions, "professions")
    if screen < 0:
        raise CnaError(f"--screen must be >= 0 (0: certified exact), got {screen}")
    ll = parse_layers(layers) if layers else None
    ks = parse_ints(top_k, "top-k")
    if pairs is not None:
        from cnalens.apps.debias import load_pairs

        load_pairs(pairs)  # a bad file fails before the model loads
    view = load_view(model, device, dtype, device_map, quiet, layers=ll or ())
    t0 = time.perf_counter()
    summary = run_debias(view, out, n_neurons=n_neurons, top_k=ks, seeds=seeds,
                         pairs_file=pairs, professions=prof, per_group=per_group,
                         candidates=candidates, layers=ll, screen=screen or None,
                         inputs=inputs,
                         cost_n=cost_n, seed=seed, batch_size=batch_size,
                         progress=not quiet, save_model=save_model)
    import pandas as pd

    m = pd.DataFrame(summary["metric"])
    cols = [c for c in ("split", "by", "key", "n", "before", "cna", "cna_change",
                        "cna_change_lo", "cna_change_hi", "random_mean", "random_change",
                        "verdict") if c in m.columns]
    print_table(m[cols], "mean |log p(target | a) - log p(target | b)| before / after")
    c = summary["costs"]
    rnd = c["random"]
    console.print(
        f"costs: arithmetic acc {c['before']['acc']:.3f} -> {c['cna']['acc']:.3f} (CNA)"
        + (f", {sum(r['acc'] for r in rnd) / len(rnd):.3f} (random)" if rnd else "")
        + f"; perplexity {c['before']['ppl']:.2f} -> {c['cna']['ppl']:.2f} (CNA)"
        + (f", {sum(r['ppl'] for r in rnd) / len(rnd):.2f} (random)" if rnd else ""))
    report = record_stage(out, view, command_line(), "debias", time.perf_counter() - t0)
    console.print(f"neurons (K={summary['top_k']}): "
                  + ", ".join(n["name"] for n in summary["neurons"]))
    console.print(f"wrote {out}/debias.csv, {out}/debias.json"
                  + (f", {out}/model" if save_model else "") + f"; report: {report}")
