"""The ``cnalens`` command line (typer). Errors become one line on stderr, exit code 2."""

from __future__ import annotations

import importlib
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table

from cnalens.commands import MODULES as COMMAND_MODULES
from cnalens.errors import CnaError
from cnalens.names import parse_experts, parse_ints, parse_list

if TYPE_CHECKING:
    import pandas as pd

console = Console()  # results on stdout; progress and errors on stderr
app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Find where an ability lives inside a causal LM (heads, FFN neurons).")
run_app = typer.Typer(no_args_is_help=True, help="Run a whole study and write its report.")
app.add_typer(run_app, name="run")

ModelOpt = Annotated[str, typer.Option("--model", "-m", help=(
    "alias (gemma3-270m, smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b), "
    "model directory, .gguf file, or hub id"))]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or auto")]
Dtype = Literal["float32", "bfloat16", "float16", "float64", "auto"]
DtypeOpt = Annotated[Dtype, typer.Option(help="weights' dtype")]
Profile = Literal["quick", "full"]
DeviceMapOpt = Annotated[str | None, typer.Option(
    "--device-map", help="'auto' shards a large model over GPUs (accelerate)")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="results folder")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]
BatchOpt = Annotated[int, typer.Option(help="prompts per forward pass")]
OpsOpt = Annotated[str, typer.Option(help="operations, e.g. +,-,*,/")]
DigitsOpt = Annotated[str, typer.Option(help="operand digits, e.g. 1,2")]
TemplatesOpt = Annotated[str, typer.Option(help="eq,nl,qa,verbal")]
CasesOpt = Annotated[Path | None, typer.Option(help="JSONL/CSV with prompt,target")]
NOpt = Annotated[int | None, typer.Option(
    "--n", "--n-pairs", help="at most N operand pairs per op x digits")]
GroupByOpt = Annotated[str | None, typer.Option(
    "--group-by", help="label column(s) the summaries are grouped by, e.g. region,lang "
    "(default: the arithmetic labels the cases have, else one pooled group)")]


def load_view(model: str, device: str, dtype: str, device_map: str | None,
              quiet: bool = False, *, layers: Iterable[int] = (),
              heads: Iterable[tuple[int, int]] = (), neurons: Iterable[tuple[int, int]] = ()):
    """The command's model, after checking the device and any layer, head or neuron
    numbers against the model's config (before a first-use conversion or a load)."""
    from cnalens.models import load_model
    from cnalens.models.load import model_shape, resolve_device

    device = resolve_device(device)
    layers, heads, neurons = list(layers), list(heads), list(neurons)
    if layers or heads or neurons:
        model_shape(model).check(layers=layers, heads=heads, neurons=neurons)
    return load_model(model, device=device, dtype=dtype, device_map=device_map,
                      progress=not quiet)


def command_line() -> str:
    """The command as typed (``cnalens ...``), as the stages record it."""
    return " ".join(["cnalens", *sys.argv[1:]])


def print_table(df: pd.DataFrame, title: str, pct: tuple[str, ...] = ()) -> None:
    """A DataFrame as a table on stdout: ``pct`` columns as percentages, floats to three
    decimals, ``digits`` 0 (the pooled row) as ``all``."""
    table = Table(title=title, show_lines=False)
    for col in df.columns:
        table.add_column(str(col), justify="right" if df[col].dtype.kind in "fiu" else "left")
    for row in df.itertuples(index=False):
        cells = []
        for col, val in zip(df.columns, row, strict=True):
            if col in pct:
                cells.append(f"{100 * val:.1f}")
            elif col == "digits" and val == 0:  # the pooled row
                cells.append("all")
            elif isinstance(val, float):
                cells.append(f"{val:.3f}")
            else:
                cells.append(str(val))
        table.add_row(*cells)
    console.print(table)


def print_findings(out: Path) -> None:
    """The folder's findings (``cnalens.report.findings``), one line each."""
    from cnalens.report.findings import findings

    lines = findings(out)
    if lines:
        console.print("[bold]findings[/]")
        for line in lines:
            console.print(f"- {line}", highlight=False, markup=False)  # labels may hold [..]


def print_accuracy(table: pd.DataFrame) -> None:
    from cnalens.evaluate import SUMMARY_COLUMNS

    cols = [*[c for c in table.columns if c not in SUMMARY_COLUMNS],
            "n", "acc", "acc_lo", "acc_hi", "acc_first", "logp"]
    print_table(table[cols], "accuracy (%; acc_lo/acc_hi: Wilson 95%)",
                 pct=("acc", "acc_lo", "acc_hi", "acc_first"))


@app.command()
def info(model: ModelOpt = "gemma3-270m", device: DeviceOpt = "cpu",
         dtype: DtypeOpt = "float32", device_map: DeviceMapOpt = None) -> None:
    """Architecture summary of a model, as the model view sees it."""
    view = load_view(model, device, dtype, device_map)
    table = Table(title=f"{model}", show_header=False)
    for k, v in view.summary().items():
        table.add_row(k, str(v))
    console.print(table)


@app.command("eval")
def eval_cmd(
    model: ModelOpt = "gemma3-270m",
    ops: OpsOpt = "+,-,*,/",
    digits: DigitsOpt = "1",
    templates: TemplatesOpt = "eq",
    cases: CasesOpt = None,
    group_by: GroupByOpt = None,
    n: NOpt = None,
    seed: int = 0,
    split: Annotated[Literal["all", "train", "test"], typer.Option(
        help="operand pairs: all, or the train or test half")] = "all",
    words: Annotated[bool, typer.Option(help="operands as English words")] = False,
    negative: Annotated[bool, typer.Option(help="allow negative differences")] = False,
    shots: Annotated[int, typer.Option(help="few-shot examples in the prefix")] = 3,
    zero_experts: Annotated[str | None, typer.Option(
        "--zero-experts", help="mixtures of experts: experts zeroed on every forward, "
        "L.E or L.S (shared), e.g. 3.5,3.S")] = None,
    reroute: Annotated[bool, typer.Option(help=(
        "with --zero-experts: the router never picks them and each token goes to its next "
        "best experts (as a model built without them); default: their output is dropped "
        "and the other experts keep their weights"))] = False,
    out: OutOpt = Path("results/eval"),
    batch_size: BatchOpt = 64,
    device: DeviceOpt = "cpu", dtype: DtypeOpt = "float32", device_map: DeviceMapOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Accuracy (acc, acc_first, logp with 95% intervals) on arithmetic or a case file."""
    from cnalens.data import arithmetic_cases, encode_all
    from cnalens.evaluate import group_keys
    from cnalens.pipeline import eval_stage, record_stage

    if cases is not None:
        data, settings = _cases(cases, ops, digits, templates, n, seed)
    else:
        op_list, dig = parse_list(ops, "ops"), parse_ints(digits, "digits")
        tmpl = parse_list(templates, "templates")
        data = arithmetic_cases(op_list, dig, tmpl, n=n, seed=seed, split=split,
                                negative=negative, words=words, shots=shots)
        settings = {"ops": op_list, "digits": dig, "templates": tmpl, "n": n, "seed": seed,
                    "split": split, "words": words, "negative": negative, "shots": shots}
    keys = group_keys(data, group_by)  # bad columns before loading the model
    if reroute and zero_experts is None:
        raise CnaError("--reroute needs --zero-experts")
    experts = parse_experts(zero_experts, "zero-experts") if zero_experts is not None else []
    view = load_view(model, device, dtype, device_map, quiet)
    interventions = []
    if experts:
        from cnalens.interventions import ZeroExperts

        interventions = [ZeroExperts(experts, reroute=reroute)]
        view.check_experts(experts)
        interventions[0].edits(view)  # re-routing that cannot work: one line, now
        settings = {**settings, "zero_experts": zero_experts, "reroute": reroute}
    encode_all(view.tokenizer, data)
    t0 = time.perf_counter()
    table = eval_stage(view, data, out, settings, batch_size, progress=not quiet,
                       group_by=keys, interventions=interventions)
    print_accuracy(table)
    report = record_stage(out, view, command_line(), "eval", time.perf_counter() - t0)
    console.print(f"wrote {out}/eval.csv; report: {report}")


def _cases(cases: Path | None, ops: str, digits: str, templates: str, n: int | None,
           seed: int):
    from cnalens.data import arithmetic_cases, load_cases

    if cases is not None:
        return load_cases(cases), {"cases": str(cases)}
    op_list, dig = parse_list(ops, "ops"), parse_ints(digits, "digits")
    tmpl = parse_list(templates, "templates")
    return (arithmetic_cases(op_list, dig, tmpl, n=n, seed=seed),
            {"ops": op_list, "digits": dig, "templates": tmpl, "n": n, "seed": seed})


@app.command()
def heads(
    model: ModelOpt = "gemma3-270m",
    ops: OpsOpt = "+,-,*,/",
    digits: DigitsOpt = "1",
    templates: TemplatesOpt = "eq",
    cases: CasesOpt = None,
    group_by: GroupByOpt = None,
    n: NOpt = None,
    seed: int = 0,
    layers: Annotated[str | None, typer.Option(help="layers to scan, e.g. 10-17")] = None,
    heads_: Annotated[str | None, typer.Option("--heads", help="heads, e.g. 17.22,15.9")] = None,
    method: Annotated[Literal["zero", "mean", "attribution"], typer.Option(
        help="zero or mean ablation, or the first-order attribution pre-scan")] = "zero",
    metric: Annotated[Literal["acc", "acc_first"], typer.Option(
        help="the accuracy whose drop ranks the heads")] = "acc",
    top: Annotated[int, typer.Option(help="top heads printed per op")] = 5,
    robustness: Annotated[bool, typer.Option(
        help="also: Spearman of the head drops across templates (eq, verbal) and two "
             "few-shot prefixes, on 25 pairs per op")] = False,
    out: OutOpt = Path("results/heads"),
    batch_size: BatchOpt = 128,
    resume: Annotated[bool, typer.Option(
        help="reuse the partial results of an interrupted scan in DIR/heads.partial")] = False,
    device: DeviceOpt = "cpu", dtype: DtypeOpt = "float32", device_map: DeviceMapOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Zero each attention head and measure the accuracy drop (the arithmetic heads).

    Under torchrun or accelerate launch the layers are shared out over the processes
    (one GPU each with --device cuda) and rank 0 writes the merged table."""
    from cnalens.evaluate import group_keys
    from cnalens.heads import (
        GROUP_BY,
        finish_distributed,
        init_distributed,
        panel_columns,
        parse_heads,
        parse_layers,
        top_heads,
    )
    from cnalens.pipeline import heads_stage, record_stage

    data, settings = _cases(cases, ops, digits, templates, n, seed)
    keys = group_keys(data, group_by, GROUP_BY)  # bad columns before loading the model
    hl = parse_heads(heads_) if heads_ else None
    ll = parse_layers(layers) if layers else None
    rank, world, local = init_distributed()
    if world > 1 and device.strip().lower() in ("cuda", "auto"):
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{local}"
    quiet = quiet or rank != 0
    view = load_view(model, device, dtype, device_map, quiet, layers=ll or (),
                     heads=hl or ())
    t0 = time.perf_counter()
    try:
        df = heads_stage(view, data, out, {**settings, "layers": layers, "heads": heads_},
                         method, metric, hl, ll, batch_size, progress=not quiet, resume=resume,
                         group_by=keys)
    finally:
        finish_distributed()
    if rank != 0:
        return
    stage = "heads"
    if method == "attribution":
        import pandas as pd

        from cnalens.io import read_json

        stage = "heads_attribution"
        summ = read_json(out / "heads_attribution.json")
        top_df = pd.DataFrame(summ["top"])
        print_table(top_df[top_df["rank"] <= top][[*panel_columns(top_df), "rank", "name",
                                                     "dlogp_est"]],
                     "top heads by estimated Δ log p (attribution)")
        if summ["vs_exact"]:
            print_table(pd.DataFrame(summ["vs_exact"]),
                         f"attribution vs the exact scan in {out}/heads.csv (Spearman)")
    else:
        print_table(top_heads(df, top)[[*panel_columns(df), "rank", "name", "n", "acc_orig",
                                          "acc_ablated", "drop", "dlogp"]],
                     "top heads by accuracy drop (%)", pct=("acc_orig", "acc_ablated", "drop"))
    if robustness:
        from cnalens.io import write_csv
        from cnalens.robustness import head_robustness

        rob = head_robustness(view, parse_list(ops, "ops"), n=25, seed=seed,
                              progress=not quiet, layers=ll)
        write_csv(out / "heads_robustness.csv", rob)
        print_table(rob[["op", "a", "b", "spearman_drop", "spearman_dlogp", "top_a",
                          "top_b"]], "head ranking across prompt formats (Spearman)")
    if stage == "heads":
        print_findings(out)
    report = record_stage(out, view, command_line(), stage, time.perf_counter() - t0)
    console.print(f"wrote {out}/{stage}.csv; report: {report}")


@app.command()
def cna(
    model: ModelOpt = "gemma3-270m",
    head: Annotated[str | None, typer.Option(
        help="head to zero (L.H); default: each op's top head in DIR/heads.csv")] = None,
    ops: Annotated[str, typer.Option(help="operations")] = "+,-",
    cases: CasesOpt = None,
    group_by: GroupByOpt = None,
    n: Annotated[int, typer.Option(help=(
        "sampled 1-digit cases per op (of the pairs --split names; the held-out half of "
        "the pairs feeds held-out verification)"))] = 20,
    top_k: Annotated[str, typer.Option("--top-k", help="K values")] = "10,20,30,50,100",
    seeds: Annotated[int, typer.Option(help="random baselines")] = 3,
    by: Annotated[Literal["decrease", "increase", "abs"], typer.Option(
        help="rank neurons by the decrease, increase or absolute change of importance")
    ] = "decrease",
    positions: Annotated[str, typer.Option(help=(
        "where verification's neuron interventions act: all (every position), last (the "
        "scored positions only: the prompt's last and, for multi-token answers, each answer "
        "position scored), or all,last (both reported)"))] = "all",
    mediation: Annotated[bool, typer.Option(help=(
        "mediation rows: the share of the head's effect each case's top-K neurons restore "
        "(run B with their run-A values) and reproduce (run A with their run-B values)"))
    ] = True,
    split: Annotated[Literal["train", "all"], typer.Option(help=(
        "the 1-digit pairs CNA runs on: train (half; the other half is held out) or all "
        "(held-out verification then chooses its neurons on the cases outside the held-out "
        "half); not with --cases"))] = "train",
    negative: Annotated[bool, typer.Option(help=(
        "subtraction pairs with negative differences too (100 pairs instead of 55); not "
        "with --cases"))] = False,
    digits: Annotated[int, typer.Option(help=(
        "operand digits of the CNA cases (1: the paper's; 2: where a head found on 2-digit "
        "cases matters); not with --cases"))] = 1,
    seed: int = 0,
    out: OutOpt = Path("results/cna"),
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "cpu", dtype: DtypeOpt = "float32", device_map: DeviceMapOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """CNA: original model (A) vs the head zeroed (B), and the verification experiments."""
    import pandas as pd

    from cnalens.heads import parse_heads
    from cnalens.pipeline import (
        cases_by_group,
        cna_cases,
        cna_stage,
        group_name,
        record_stage,
        top_head_per_op,
    )

    op_list, ks = parse_list(ops, "ops"), parse_ints(top_k, "top-k")
    from cnalens.cna import POSITIONS

    where = parse_list(positions, "positions")
    if any(w not in POSITIONS for w in where) or len(set(where)) != len(where):
        raise CnaError(f"--positions takes {', '.join(POSITIONS)} or {','.join(POSITIONS)} "
                       f"(got {positions})")
    cols, labels = ("op",), ()
    if not 1 <= digits <= 3:
        raise CnaError(f"--digits takes 1, 2 or 3 (got {digits})")
    settings = {"ops": op_list, "n": n, "seed": seed, "split": split, "negative": negative,
                "digits": digits}
    if cases is not None:
        from cnalens.data import load_cases
        from cnalens.evaluate import group_keys, label_columns

        if split != "train" or negative or digits != 1:
            raise CnaError("--split, --negative and --digits choose arithmetic pairs: not "
                           "with --cases")
        custom = load_cases(cases)
        keys = group_keys(custom, group_by, ("op",))  # bad columns before loading the model
        labels = tuple(label_columns(custom))
        by_group = cases_by_group(custom, keys)
        cols, op_list = tuple(keys) or ("op",), list(by_group)
        settings = {"cases": str(cases), "group_by": keys}
    elif group_by is not None and parse_list(group_by, "group-by") != ["op"]:
        raise CnaError("--group-by: CNA on arithmetic compares operations (op); "
                       "group other labels with --cases FILE")
    if head:
        hs = parse_heads(head)
        if len(hs) != 1:
            raise CnaError("--head takes one head, e.g. 17.22")
        heads_by_op = {op: hs[0] for op in op_list}
    elif (out / "heads.csv").is_file():
        heads_by_op = top_head_per_op(pd.read_csv(out / "heads.csv", dtype={"op": str}),
                                      op_list, cols)
        missing = [group_name(op) for op in op_list if op not in heads_by_op]
        if missing:
            raise CnaError(f"{out}/heads.csv has no head scan for {','.join(cols)} = "
                           f"{', '.join(missing)}")
    else:
        raise CnaError(f"no --head and no {out}/heads.csv: run 'cnalens heads --out {out}' "
                       "first or pass --head L.H")
    view = load_view(model, device, dtype, device_map, quiet, heads=heads_by_op.values())
    t0 = time.perf_counter()
    by_op, heldout = (by_group, None) if cases is not None else cna_cases(
        op_list, n, seed, split, negative, digits)
    ver = cna_stage(view, out, by_op, heads_by_op, ks, seeds, by, batch_size,
                    progress=not quiet, settings=settings, heldout_by_op=heldout,
                    group_cols=cols, label_cols=labels, positions=where, mediate=mediation)
    print_table(ver[[*cols, "head", "experiment", "positions", "k", "value", "lo", "hi",
                     "random_mean", "n", "verdict"]],
                "verification (drops and shares as fractions)")
    print_findings(out)
    report = record_stage(out, view, command_line(), "cna", time.perf_counter() - t0)
    console.print(f"wrote {out}/cna_neurons.csv, {out}/verification.csv; report: {report}")


@run_app.command("arithmetic")
def run_arithmetic_cmd(
    model: ModelOpt = "gemma3-270m",
    out: OutOpt = Path("results/arithmetic"),
    profile: Annotated[Literal["quick", "full", "smoke"], typer.Option(
        help="quick (15 min on 2 CPU cores), full (the paper's scale) or smoke "
             "(seconds, for tests)")] = "quick",
    ops: Annotated[str, typer.Option(help="operations")] = "+,-,*,/",
    stages: Annotated[str | None, typer.Option(help=(
        "comma-separated stages (default: the profile's); eval,heads,cna,shallow,explain,"
        "lora,prune,debias"))] = None,
    seed: int = 0,
    batch_size: BatchOpt = 64,
    device: DeviceOpt = "cpu", dtype: DtypeOpt = "float32", device_map: DeviceMapOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """The main job: every stage on arithmetic, then DIR/report.html."""
    from cnalens.pipeline import DEFAULT_STAGES, check_stages, read_stage, run_arithmetic

    chosen = check_stages(parse_list(stages, "stages") if stages else DEFAULT_STAGES)
    t0 = time.perf_counter()
    view = load_view(model, device, dtype, device_map, quiet)
    report = run_arithmetic(view, out, profile, parse_list(ops, "ops"), seed, batch_size,
                            progress=not quiet, command=command_line(), stages=chosen)
    if "eval" in chosen:
        table, _ = read_stage(out, "eval")
        print_accuracy(table[table["template"] == "all"])
    print_findings(out)
    console.print(f"report: {report}  ({time.perf_counter() - t0:.0f} s)")


@app.command()
def report(dir: Annotated[Path, typer.Argument(help="results folder")]) -> None:
    """Re-render DIR/report.html from the files in DIR (no recomputation)."""
    from cnalens.report import render_report

    console.print(f"report: {render_report(dir)}")


# commands in cnalens/commands/*.py register themselves on ``app``
for _name in COMMAND_MODULES:
    importlib.import_module(f"cnalens.commands.{_name}")


def command_options(argv: Sequence[str]) -> dict[str, str]:
    """The options of the command ``argv`` invokes: each Python parameter name (and each
    flag spelled as one: ``top-k`` -> ``top_k``) -> its long flag. Empty if ``argv``
    names no command."""
    cmd, args = typer.main.get_command(app), list(argv)
    while hasattr(cmd, "get_command"):  # a group: follow the subcommand's name
        name = next((a for a in args if not a.startswith("-")), None)
        cmd = cmd.get_command(cmd.context_class(cmd), name) if name else None
        if cmd is None:
            return {}
        args = args[args.index(name) + 1:]
    out = {}
    for p in cmd.params:
        flags = [o for o in p.opts if o.startswith("--")]
        if p.param_type_name == "option" and flags:
            out.update({f[2:].replace("-", "_"): f for f in reversed(flags)})
            out[p.name] = flags[0]
    return out


_LEADING = re.compile(r"^([a-z][a-z0-9_]*)(?=:| must\b)")
_SNAKE = re.compile(r"(?<![\w./-])([a-z][a-z0-9]*(?:_[a-z0-9]+)+)(?![\w/-])(?!\.\w)")


def flag_message(message: str, argv: Sequence[str]) -> str:
    """A library error in the words of the command line: the library names its Python
    parameters (``top must be at least 1``, ``give keep_top or prune_fraction``), the CLI
    shows the flags of the command ``argv`` invokes (``--top must be at least 1``). A
    name is translated where it opens the message (before ``:`` or `` must``) or has an
    underscore (anywhere); words that are no option of the command stay as they are."""
    options = command_options(argv)
    if not options:
        return message

    def flag(m: re.Match) -> str:
        return options.get(m.group(1), m.group(1))
    return _SNAKE.sub(flag, _LEADING.sub(flag, message))


def main(argv: list[str] | None = None) -> int:
    """Entry point: one error line and a non-zero exit instead of a traceback."""
    try:
        app(args=argv, standalone_mode=False)
    except CnaError as exc:
        message = flag_message(str(exc), sys.argv[1:] if argv is None else argv)
        print(f"cnalens: error: {message}", file=sys.stderr)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        print("cnalens: aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("cnalens: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - unexpected: one line unless debugging
        if hasattr(exc, "format_message"):  # usage errors of typer's click
            print(f"cnalens: error: {exc.format_message()}", file=sys.stderr)
            return int(getattr(exc, "exit_code", 2) or 2)
        if os.environ.get("CNALENS_DEBUG"):
            raise
        print(f"cnalens: error: {type(exc).__name__}: {exc} (CNALENS_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
