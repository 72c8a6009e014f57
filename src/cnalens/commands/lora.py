"""``cnalens lora``: train a LoRA on one attention layer, evaluate it against the original,
save the adapter, and compare the two models by CNA (see ``cnalens.apps.lora``; the stage
``cnalens.stages.lora`` writes the files)."""

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
    OpsOpt,
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
from cnalens.names import parse_ints, parse_list


def _deep_from(out: Path, given: int | None) -> int | None:
    """--deep-from, else the top '+' head's layer in DIR/heads.csv, else None (quartiles)."""
    if given is not None:
        return given
    if (out / "heads.csv").is_file():
        import pandas as pd

        from cnalens.pipeline import top_head_per_op

        tops = top_head_per_op(pd.read_csv(out / "heads.csv", dtype={"op": str}),
                               ["+", "-", "*", "/"])
        head = tops.get("+") or next(iter(tops.values()), None)
        return head[0] if head else None
    return None


@app.command()
def lora(
    model: ModelOpt = "gemma3-270m",
    layer: Annotated[int | None, typer.Option(
        help="attention layer to train (default: a quarter of the depth)")] = None,
    out: OutOpt = Path("results/lora"),
    target_modules: Annotated[str, typer.Option(
        "--target-modules", help="attn (q,k,v,o), qkv, o_proj, down_proj or module names")
    ] = "attn",
    rank: Annotated[int | None, typer.Option(help="LoRA rank (default 8)")] = None,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default 16)")] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate")] = None,
    epochs: Annotated[int | None, typer.Option(help="epochs (quick 1, full 4)")] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", help="training examples per step (default 16)")] = None,
    n_train: Annotated[int | None, typer.Option(
        "--n-train", help="training cases, all ops together")] = None,
    n_test: Annotated[int | None, typer.Option(
        "--n-test", help="test cases, all ops together")] = None,
    shots: Annotated[int | None, typer.Option(
        help="few-shot examples before each prompt (default 0)")] = None,
    ops: OpsOpt = "+,-,*,/",
    profile: Annotated[Profile, typer.Option(
        help="quick (minutes on a CPU) or full (18,000/2,000 cases, 4 epochs)")] = "quick",
    seed: int = 0,
    sweep_layers: Annotated[str | None, typer.Option(
        "--sweep-layers", help="also train one LoRA per layer: auto (a spread of four; "
        "every layer under --profile full), all, or a list such as 2,4,8")] = None,
    top_k: Annotated[str, typer.Option("--top-k", help="K values for the CNA")] = "10,20,50",
    deep_from: Annotated[int | None, typer.Option(
        "--deep-from", help="first deep layer (default: the top + head's layer in "
        "DIR/heads.csv; without one, depth quartiles)")] = None,
    seeds: Annotated[int, typer.Option(help="random-neuron baselines")] = 3,
    n_cna: Annotated[int, typer.Option(
        "--n-cna", help="CNA cases per op (0: no CNA, e.g. for a layer sweep); the top-K "
        "is certified exact where the LoRA leaves the down projections alone, else every "
        "neuron is scored (minutes per case on a 262k vocabulary)")] = 2,
    adapter: Annotated[Path | None, typer.Option(
        help="evaluate and compare a saved adapter (DIR or DIR/adapter) instead of "
             "training the main layer")] = None,
    eval_batch: BatchOpt = 64,
    device: DeviceOpt = "cpu", dtype: DtypeOpt = "float32",
    quiet: QuietOpt = False,
) -> None:
    """Train a LoRA on one attention layer; accuracy original vs LoRA; CNA of the two."""
    from cnalens.apps.lora import LoraSettings, default_layer, read_adapter_meta
    from cnalens.apps.lora import sweep_layers as sweep
    from cnalens.stages import record_stage
    from cnalens.stages.lora import run_lora

    given = {"rank": rank, "alpha": alpha, "lr": lr, "epochs": epochs,
             "batch_size": batch_size, "n_train": n_train, "n_test": n_test, "shots": shots}
    overrides = {k: v for k, v in given.items() if v is not None}
    overrides.update(ops=tuple(parse_list(ops, "ops")), seed=seed,
                     target_modules=tuple(parse_list(target_modules, "target-modules")))
    preset = LoraSettings.full if profile == "full" else LoraSettings.quick
    settings = preset(**overrides)
    settings.check()
    ks = parse_ints(top_k, "top-k")
    if any(k < 1 for k in ks):
        raise CnaError("--top-k values must be at least 1")
    if adapter is not None:
        read_adapter_meta(adapter)  # a missing or foreign adapter fails before loading
    deep = _deep_from(out, deep_from)
    listed = (parse_ints(sweep_layers, "sweep-layers")
              if sweep_layers and sweep_layers not in ("auto", "all") else [])
    view = load_view(model, device, dtype, None, quiet,
                     layers=[*(x for x in (layer, deep) if x is not None), *listed])
    main_layer = default_layer(view) if layer is None else layer
    layers = sweep(view, sweep_layers, profile)
    t0 = time.perf_counter()
    meta = run_lora(view, out, settings.replace(layers=(main_layer,)), main_layer, layers,
                    ks, deep, seeds, n_cna, eval_batch,
                    progress=not quiet, adapter=adapter)
    _report(out, meta)
    report = record_stage(out, view, command_line(), "lora", time.perf_counter() - t0)
    console.print(f"wrote {out}/lora.csv, {out}/lora_cna.csv, adapter {out}/adapter; "
                  f"report: {report}")


def _report(out: Path, meta: dict) -> None:
    import pandas as pd

    acc = pd.read_csv(out / "lora.csv", dtype={"op": str})
    cols = ["run", "layer", "op", "n", "acc", "acc_lo", "acc_hi", "acc_first"]
    print_table(acc[cols], "accuracy on the test split (%; Wilson 95%)",
                pct=("acc", "acc_lo", "acc_hi", "acc_first"))
    if (out / "lora_cna.csv").is_file():
        cna = pd.read_csv(out / "lora_cna.csv")
        print_table(cna[["band", "layers", "k", "n_neurons", "change", "random_mean",
                         "up_frac", "pct_b"]],
                    "CNA LoRA (A) vs original (B): coefficient-sum change of the top-K "
                    "neurons (k=0: all neurons of the band)")
    t = meta["timings"]
    train = "reloaded" if t["train_seconds"] is None else f"{t['train_seconds']:.0f} s"
    console.print(f"training {train} ({meta['n_train']} cases), evaluation "
                  f"{t['eval_original_seconds'] + t['eval_lora_seconds']:.0f} s, "
                  f"CNA {t['cna_seconds']:.0f} s")
