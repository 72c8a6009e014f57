"""Reading commands: ``cnalens neuron`` (top tokens of neurons and heads' OV circuits),
``cnalens shallow`` (the zero-shot locator) and ``cnalens explain`` (the four-stage chain)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Literal

import typer

from cnalens.cli import (
    BatchOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    QuietOpt,
    app,
    command_line,
    console,
    load_view,
    print_table,
)
from cnalens.errors import CnaError
from cnalens.names import parse_ints, parse_list, parse_neurons, parse_units


# ----------------------------------------------------------------- cnalens neuron
def _one_head(text: str | None, what: str = "head") -> tuple[int, int] | None:
    if text is None:
        return None
    units = parse_units(text, what)
    if len(units) != 1:
        raise CnaError(f"--{what} takes one head, e.g. 7.0")
    return units[0]


def _write_table(out: Path, stem: str, df, meta: dict) -> None:
    from cnalens.io import write_csv, write_json

    flat = df.copy()
    for col in ("tokens", "values"):
        if col in flat:
            flat[col] = [" | ".join(map(str, x)) for x in flat[col]]
    write_csv(out / f"{stem}.csv", flat)
    write_json(out / f"{stem}.json", {**meta, "rows": df.to_dict("records")})


@app.command()
def neuron(
    neurons: Annotated[list[str] | None, typer.Argument(
        help="FFN neurons L.N (0-based), e.g. 16.1234 5.77; L.E.N (expert E) or L.S.N "
             "(shared expert) in a mixture-of-experts layer")] = None,
    model: ModelOpt = "gemma3-270m",
    case: Annotated[str | None, typer.Option(
        help='a prompt, e.g. "3+5=": coefficient, importance and which side the sign '
             "selects; 'a op b =' prompts get the arithmetic few-shot prefix")] = None,
    target: Annotated[str | None, typer.Option(
        help="target token for the importance (default: the arithmetic answer, else the "
             "model's prediction)")] = None,
    shots: Annotated[int, typer.Option(help="few-shot examples for an arithmetic case")] = 3,
    position: Annotated[int, typer.Option(
        help="token position of the case whose input-norm scales the transform uses "
             "(negative: from the end)")] = -1,
    transform_layer: Annotated[str | None, typer.Option(
        "--transform-layer", help="attention layer(s) whose OV circuit transforms the "
        "neurons, e.g. 7 or 5,7 (summed over heads)")] = None,
    head: Annotated[str | None, typer.Option(
        help="L.H: also transform by this head alone; without neurons, print the head's "
             "OV circuit's top tokens")] = None,
    sign: Annotated[Literal["pos", "neg", "both"] | None, typer.Option(
        help="the side shown (default: the coefficient's sign with --case, else pos)")] = None,
    k: Annotated[int, typer.Option("--k", help="tokens shown per side")] = 10,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="folder for neuron.csv/.json (or head_ov.csv/.json)")] = None,
    device: DeviceOpt = "cpu", dtype: DtypeOpt = "float32", device_map: DeviceMapOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Top and bottom tokens of FFN neurons' value vectors (untransformed and through
    upper attention layers), or of a head's OV circuit (--head L.H alone)."""
    from cnalens.models.load import model_shape

    units = parse_neurons(",".join(neurons), "neurons", model_shape(model)) if neurons else []
    hd = _one_head(head)
    layers = parse_ints(transform_layer, "transform-layer") if transform_layer else []
    if not units and hd is None:
        raise CnaError("give FFN neurons (L.N) or --head L.H")
    if k < 1:
        raise CnaError("--k must be at least 1")
    view = load_view(model, device, dtype, device_map, quiet, layers=layers,
                     heads=[hd] if hd is not None else (), neurons=units)
    if not units:
        _head_ov(view, hd, k, out)
        return
    from cnalens.stages.shallow import shallow_cases
    from cnalens.vocab import mean_scales, read_neurons

    enc, tgt, scales, scale_note = None, None, None, "unit"
    if case is not None:
        from cnalens.data.arithmetic import case_from_prompt
        from cnalens.data.cases import encode_prompt
        from cnalens.explain import target_id

        enc = encode_prompt(view.tokenizer, case_from_prompt(case, shots))
        tgt = target_id(view, target)
        scale_note = f"the case's, input norms at position {position}"
    else:
        if target is not None:
            raise CnaError("--target needs --case")
        if layers or hd is not None:
            _, cs = shallow_cases(("+", "-"), "smoke", 0)
            scales = mean_scales(view, cs)
            scale_note = scales.source + " (1-digit + and -)"
    df = read_neurons(view, units, case=enc, target=tgt, transform_layers=layers, head=hd,
                      sign=sign, k=k, position=position, scales=scales)
    # neurons are L.E.N / L.S.N in a mixture-of-experts layer (``index`` is the flat one);
    # with a case, ``route`` is the expert's router weight (importance NaN: not routed)
    show = df.assign(tokens=[" | ".join(t) for t in df["tokens"]])
    cols = ["neuron", "view", "side", *(["coef", "importance"] if enc is not None else []),
            *(["route"] if "route" in df else []), "tokens"]
    title = "neuron top tokens" + (f" on {enc.case.question!r} (target "
                                   f"{df['target'].iloc[0]!r})" if enc is not None else "")
    print_table(show[cols], title)
    if out is not None:
        _write_table(out, "neuron", df, {"command": command_line(), "model": view.summary(),
                                         "case": case, "scales": scale_note, "k": k})
        console.print(f"wrote {out}/neuron.csv")


def _head_ov(view, hd: tuple[int, int], k: int, out: Path | None) -> None:
    import pandas as pd

    from cnalens.vocab import head_ov, ids_to_strings

    res = head_ov(view, hd[0], hd[1], k=k)
    inputs = ids_to_strings(view.tokenizer, res["input_ids"][:, None])
    rows = [{"input": src[0], "kind": "token", "tokens": toks}
            for src, toks in zip(inputs, res["inputs"].tokens(view.tokenizer), strict=True)]
    for i, sv in enumerate(res["singular_values"].tolist()):
        for which, sgn in (("top", "+"), ("bottom", "-")):
            rows.append({"input": f"{sgn}u{i + 1} (s={sv:.2f})", "kind": "singular",
                         "tokens": res["directions"].tokens(view.tokenizer, which)[i]})
    df = pd.DataFrame(rows)
    print_table(df.assign(tokens=[" | ".join(t) for t in df["tokens"]]),
                 f"head {hd[0]}.{hd[1]} OV circuit: what it writes when attending to a token; "
                 "its top singular output directions")
    if out is not None:
        _write_table(out, "head_ov", df, {"command": command_line(), "model": view.summary(),
                                          "head": f"{hd[0]}.{hd[1]}", "k": k})
        console.print(f"wrote {out}/head_ov.csv")


# ----------------------------------------------------------------- cnalens shallow
def _shallow_head(out: Path, head: str | None, deep_from: int | None, ops: list[str]):
    """(head or None, deep-from layer) from the options, else DIR/heads.csv."""
    if head is not None and deep_from is not None:
        raise CnaError("give --head or --deep-from, not both")
    if head is not None:
        hd = _one_head(head)
        return hd, hd[0]
    if deep_from is not None:
        return None, deep_from
    if (out / "heads.csv").is_file():
        import pandas as pd

        from cnalens.pipeline import top_head_per_op

        tops = top_head_per_op(pd.read_csv(out / "heads.csv", dtype={"op": str}),
                               [o for o in ("+", *ops) if o])
        if tops:
            hd = tops.get("+") or next(iter(tops.values()))
            return hd, hd[0]
    raise CnaError(f"no --head, no --deep-from and no {out}/heads.csv: run 'cnalens heads "
                   f"--out {out}' first or pass --head L.H / --deep-from L")


@app.command()
def shallow(
    model: ModelOpt = "gemma3-270m",
    out: Annotated[Path, typer.Option("--out", "-o", help="results folder")] = Path(
        "results/shallow"),
    head: Annotated[str | None, typer.Option(
        help="the arithmetic head L.H (shallow = layers below L); default: the + head "
             "of DIR/heads.csv")] = None,
    deep_from: Annotated[int | None, typer.Option(
        "--deep-from", help="first deep layer (instead of --head)")] = None,
    top_tokens: Annotated[int, typer.Option("--top-tokens", help="top tokens matched")] = 50,
    m: Annotated[str, typer.Option("--m", help="thresholds M, e.g. 1,2,3")] = "1,2,3",
    seeds: Annotated[int, typer.Option(help="random same-size sets per M")] = 3,
    transforms: Annotated[Literal["all", "head"], typer.Option(
        help="all: every attention layer above the neuron up to the head's; head: the "
             "head's layer only (faster)")] = "all",
    sign: Annotated[Literal["pos", "neg", "both"], typer.Option(
        help="coefficient sign of the located neurons")] = "pos",
    null: Annotated[int, typer.Option(help="random directions per shallow layer")] = 512,
    ops: Annotated[str, typer.Option(help="operations of the sweep's cases")] = "+,-",
    n: Annotated[int | None, typer.Option(
        "--n", help="1-digit cases per op for the sweep (default: all)")] = None,
    seed: int = 0,
    batch_size: BatchOpt = 64,
    device: DeviceOpt = "cpu", dtype: DtypeOpt = "float32", device_map: DeviceMapOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Zero-shot locator: shallow FFN neurons whose attention-transformed projection hits
    number and operator tokens; the accuracy drop of each M-set vs random sets."""
    from cnalens.data.arithmetic import arithmetic_cases
    from cnalens.locator import LocatorSettings
    from cnalens.pipeline import record_stage
    from cnalens.stages.shallow import run_shallow

    op_list = parse_list(ops, "ops")
    settings = LocatorSettings(top_tokens=top_tokens, ms=tuple(parse_ints(m, "m")),
                               transforms=transforms, sign=sign, seeds=seeds,
                               null_per_layer=null, seed=seed).check()
    if null < 1:
        raise CnaError("--null must be at least 1")
    hd, deep = _shallow_head(out, head, deep_from, op_list)
    cases = arithmetic_cases(op_list, (1,), ("eq",), n=n, seed=seed)
    view = load_view(model, device, dtype, device_map, quiet, layers=[deep],
                     heads=[hd] if hd is not None else ())
    if deep == 0:
        raise CnaError("the deep layers start at layer 0: there are no shallow layers")
    t0 = time.perf_counter()
    meta = run_shallow(view, out, hd, deep, settings, cases, batch_size, not quiet,
                       extra={"cases": {"ops": op_list, "digits": [1], "template": "eq",
                                        "per_op": n, "seed": seed}})
    import pandas as pd

    sw = pd.DataFrame(meta["sweep"])
    null_df = pd.DataFrame(meta["null"])
    sw = sw.merge(null_df[["m", "null_expected"]], on="m")
    print_table(sw[["m", "n_neurons", "null_expected", "acc_orig", "acc_zeroed", "drop",
                     "random_mean", "n_cases"]],
                 f"shallow neurons (layers 0-{deep - 1}) with >= M concept tokens in their "
                 f"top {top_tokens}: accuracy drop when zeroed (%)",
                 pct=("acc_orig", "acc_zeroed", "drop", "random_mean"))
    report = record_stage(out, view, command_line(), "shallow", time.perf_counter() - t0)
    console.print(f"wrote {out}/shallow.csv, {out}/shallow.json; report: {report}")


# ----------------------------------------------------------------- cnalens explain
from cnalens.cli import OutOpt  # noqa: E402


def _explain_head(head: str | None, out: Path, op: str) -> tuple[int, int]:
    """--head L.H, else the top head of ``op`` (or of all ops) in DIR/heads.csv."""
    import pandas as pd

    from cnalens.pipeline import top_head_per_op

    if head:
        return _one_head(head)
    path = out / "heads.csv"
    if not path.is_file():
        raise CnaError(f"no --head and no {path}: run 'cnalens heads --out {out}' first "
                       "or pass --head L.H")
    key = op if op in ("+", "-", "*", "/") else "all"
    found = top_head_per_op(pd.read_csv(path, dtype={"op": str}), [key])
    if key not in found:
        raise CnaError(f"{path} has no head scan for '{key}': pass --head L.H")
    return found[key]


@app.command()
def explain(
    prompt: Annotated[str, typer.Argument(help='the case, e.g. "3+5=" ("a op b =" gets the '
                                          "arithmetic few-shot prefix)")],
    model: ModelOpt = "gemma3-270m",
    target: Annotated[str | None, typer.Option(
        help="target token (default: the model's own prediction)")] = None,
    head: Annotated[str | None, typer.Option(
        help="arithmetic head L.H (default: the top head for the prompt's operation in "
             "DIR/heads.csv)")] = None,
    top: Annotated[int, typer.Option(help="deep and shallow neurons in the chain")] = 10,
    shots: Annotated[int, typer.Option(
        help="few-shot examples before an arithmetic prompt")] = 3,
    out: OutOpt = Path("results/explain"),
    device: DeviceOpt = "cpu", dtype: DtypeOpt = "float32", device_map: DeviceMapOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """The four-stage chain of one case: shallow FFN neurons -> shallow attention -> the
    arithmetic head -> deep FFN neurons, each element with its measured effect."""
    from cnalens.data.arithmetic import case_from_prompt
    from cnalens.explain import STAGES, explain_case, target_id
    from cnalens.pipeline import record_stage
    from cnalens.stages.explain import write_explain

    if top < 1:
        raise CnaError("--top must be at least 1")
    case = case_from_prompt(prompt, shots)
    hd = _explain_head(head, out, case.labels.get("op", "custom"))
    view = load_view(model, device, dtype, device_map, quiet, heads=[hd])
    target_id(view, target)  # a bad target fails before any work
    t0 = time.perf_counter()
    chain = explain_case(view, case, hd, target=target, top=top)
    m = chain.meta
    console.print(f"[bold]{m['question']!r}[/] -> target {m['target']!r} (log p "
                  f"{m['logp']:.3f}; the model predicts {m['pred']!r}), head {m['head']}")
    cols = {STAGES[0]: ["name", "position", "token", "tokens", "tokens_transformed", "score",
                        "effect", "coef_drop"],
            STAGES[1]: ["name", "position", "token", "score", "effect", "coef_drop"],
            STAGES[2]: ["name", "position", "token", "score", "effect", "coef_drop", "detail"],
            STAGES[3]: ["name", "tokens", "score", "coef", "effect", "coef_drop"]}
    for stage in reversed(STAGES):
        print_table(chain.stage(stage)[cols[stage]], f"{stage} (effect: drop of log p when "
                     "zeroed; coef_drop: of the deep neurons' sum |m|)")
    seconds = time.perf_counter() - t0
    write_explain(out, [chain], view, {"prompt": prompt, "head": m["head"], "target": target,
                                       "top": top, "shots": shots},
                  seconds, merge=True)
    report = record_stage(out, view, command_line(), "explain", seconds)
    console.print(f"wrote {out}/explain.csv; report: {report}")
