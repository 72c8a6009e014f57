"""Stages that write results folders, and the main job ``cnalens run arithmetic``.

Every stage writes ``DIR/<stage>.csv`` and ``DIR/<stage>.json`` (what was run, on what,
how long) atomically; ``DIR/run.json`` describes the whole run; the report reads files.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch

from cnalens import __version__
from cnalens.data.arithmetic import OPS, TEMPLATES, arithmetic_cases
from cnalens.data.cases import Case, encode_all
from cnalens.errors import CnaError
from cnalens.evaluate import accuracy_table, evaluate, group_keys
from cnalens.io import read_json, write_csv, write_json
from cnalens.progress import console


@dataclass(frozen=True)
class Profile:
    """Sizes of the main job. ``quick`` fits 15 minutes on a 2-core CPU."""

    name: str
    eval_digits: tuple[int, ...]
    eval_templates: tuple[str, ...]
    eval_n: dict[int, int | None] = field(default_factory=dict)  # pairs per (op, digits)
    heads_digits: tuple[int, ...] = (1,)
    heads_n: int | None = None  # operand pairs per op for the head scan (None: all)
    cna_ops: tuple[str, ...] = ("+", "-")
    cna_n: int = 20  # sampled cases per op (the correctly answered ones are kept)
    cna_ks: tuple[int, ...] = (10, 20, 50)
    cna_seeds: int = 2


PROFILES = {
    "quick": Profile("quick", (1, 2), tuple(TEMPLATES), {1: None, 2: 20}, cna_n=10),
    "full": Profile("full", (1, 2, 3), tuple(TEMPLATES), {1: None, 2: 500, 3: 500},
                    heads_digits=(1, 2), heads_n=None, cna_ops=OPS, cna_n=100,
                    cna_ks=(10, 20, 30, 50, 100), cna_seeds=5),
    # for tests: seconds, not minutes
    "smoke": Profile("smoke", (1,), ("eq",), {1: 8}, heads_n=6, cna_ops=("+",), cna_n=8,
                     cna_ks=(5,), cna_seeds=1),
}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def eval_stage(view, cases: list[Case], out: Path, settings: dict, batch_size: int = 64,
               progress: bool = True, group_by: str | list[str] | None = None
               ) -> pd.DataFrame:
    """Evaluate cases; write eval.csv (the table, grouped by ``group_keys(cases,
    group_by)``, recorded as settings ``group_by``), eval_cases.csv and eval.json."""
    t0 = time.perf_counter()
    keys = group_keys(cases, group_by)
    settings = {**settings, "group_by": keys}
    enc = encode_all(view.tokenizer, cases)
    per_case = evaluate(view, enc, batch_size=batch_size, progress=progress)
    table = accuracy_table(per_case, keys=keys)
    prefixes = {f"{c.labels.get('op')}|{c.labels.get('template')}|{c.labels.get('digits')}":
                c.prefix for c in cases if c.prefix}
    meta = {
        "stage": "eval", "model": view.summary(), "settings": settings,
        "n_cases": len(cases), "batch_size": batch_size, "prefixes": prefixes,
        "moved_space": int(per_case["moved_space"].sum()),
        "merged_boundary": int(per_case["merged"].sum()),
        "multi_token_answers": int((per_case["n_answer_tokens"] > 1).sum()),
        "metrics": {"acc": "every answer token greedy top-1 under teacher forcing",
                    "acc_first": "first answer token greedy top-1",
                    "logp": "mean log-probability of the first answer token",
                    "interval": "Wilson 95%"},
        "seconds": round(time.perf_counter() - t0, 2), "finished": now(),
    }
    write_csv(out / "eval_cases.csv", per_case)
    write_csv(out / "eval.csv", table)
    write_json(out / "eval.json", meta)
    return table


def heads_stage(view, cases: list[Case], out: Path, settings: dict, method: str = "zero",
                metric: str = "acc", heads=None, layers=None, batch_size: int = 64,
                progress: bool = True, resume: bool = False,
                group_by: str | list[str] | None = None) -> pd.DataFrame:
    """Zero (or mean-ablate) every head, measure the accuracy drop; heads.csv/.json.
    Rows per group of ``group_by`` (default: op and digits where the cases have them;
    recorded as settings ``group_by``).

    Partial results go to ``DIR/heads.partial`` as they are computed (``resume=True``
    picks them up) and are removed when the stage completes. Under ``torch.distributed``
    the scan is sharded over the processes and only rank 0 writes."""
    import shutil

    from cnalens.heads import (
        GROUP_BY,
        _dist,
        scan_heads,
        scan_heads_attribution,
        write_attribution,
        write_heads,
    )

    t0 = time.perf_counter()
    rank = _dist()[0]
    keys = group_keys(cases, group_by, GROUP_BY)
    settings = {**settings, "group_by": keys}
    enc = encode_all(view.tokenizer, cases)
    partial = Path(out) / "heads.partial"
    if method == "attribution":  # an estimate: its own files, an exact heads.csv is kept
        df = scan_heads_attribution(view, enc, batch_size=batch_size,
                                    progress=progress and rank == 0, heads=heads,
                                    layers=layers, keys=keys)
        if rank == 0:
            write_attribution(out, df, {
                "stage": "heads_attribution", "model": view.summary(), "settings": settings,
                "n_cases": len(enc), "method": method,
                "seconds": round(time.perf_counter() - t0, 2), "finished": now()})
        return df
    df = scan_heads(view, enc, heads=heads, layers=layers, method=method, metric=metric,
                    batch_size=batch_size, progress=progress, checkpoint=partial,
                    resume=resume, keys=keys)
    if rank == 0:
        write_heads(out, df, {"stage": "heads", "model": view.summary(), "settings": settings,
                              "n_cases": len(enc), "method": method, "metric": metric,
                              "seconds": round(time.perf_counter() - t0, 2),
                              "finished": now()})
        shutil.rmtree(partial, ignore_errors=True)
    return df


def top_head_per_op(heads: pd.DataFrame, ops, by: tuple[str, ...] = ("op",)) -> dict:
    """Each operation's head with the largest accuracy drop (digits pooled). ``by``: the
    group columns ``ops`` name, one value each (a tuple of values for several columns)."""
    from cnalens.heads import top_heads

    top = top_heads(heads, 1)
    if any(c not in top.columns for c in by):
        return {}
    out = {}
    for op in ops:
        vals = op if isinstance(op, tuple) else (op,)
        hit = pd.Series(True, index=top.index)
        for c, v in zip(by, vals, strict=True):
            hit &= top[c].astype(str) == str(v)
        row = top[hit]
        if len(row):
            out[op] = (int(row["layer"].iloc[0]), int(row["head"].iloc[0]))
    return out


def start_run(out: Path, view, command: str, profile: str, settings: dict,
              stages: list[str]) -> dict:
    run = {
        "cnalens_version": __version__, "command": command, "profile": profile,
        "started": now(), "finished": None, "seconds": None, "stages": stages,
        "model": view.summary(), "settings": settings,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "platform": sys.platform},
    }
    write_json(out / "run.json", run)
    return run


def record_stage(out: Path, view, command: str, stage: str, seconds: float) -> Path:
    """After a single-stage command: add the stage to DIR/run.json (made if missing),
    then re-render DIR/report.html."""
    from cnalens.report import render_report

    path = out / "run.json"
    run = read_json(path) if path.is_file() else {
        "cnalens_version": __version__, "command": command, "profile": "custom",
        "started": now(), "stages": [], "model": view.summary(), "settings": {}}
    run["stages"] = [*[s for s in run.get("stages", []) if s != stage], stage]
    run.update(finished=now(), seconds=round((run.get("seconds") or 0) + seconds, 1))
    run.setdefault("commands", []).append(command)
    write_json(path, run)
    return render_report(out)


def finish_run(out: Path, run: dict, t0: float) -> None:
    run.update(finished=now(), seconds=round(time.perf_counter() - t0, 1))
    write_json(out / "run.json", run)


@dataclass
class StageContext:
    """What a later stage of the main job gets: the model, the folder and earlier results."""

    view: object
    out: Path
    profile: Profile
    ops: tuple[str, ...]
    seed: int
    batch_size: int
    progress: bool
    settings: dict
    heads: pd.DataFrame | None  # heads.csv of this run (None without the head stage)
    top_heads: dict[str, tuple[int, int]]  # op -> (layer, head) with the largest drop


# stages after eval/heads/cna: name -> "module:function(ctx: StageContext) -> None"
EXTRA_STAGES: dict[str, str] = {
    "shallow": "cnalens.vocab:shallow_stage",
    "explain": "cnalens.explain:explain_stage",
    "lora": "cnalens.apps.lora:lora_stage",
    "prune": "cnalens.apps.prune:prune_stage",
    "debias": "cnalens.apps.debias:debias_stage",
}
CORE_STAGES = ("eval", "heads", "cna")
DEFAULT_STAGES = ("eval", "heads", "cna", "shallow", "explain")
ALL_STAGES = (*CORE_STAGES, *EXTRA_STAGES)


def check_stages(stages) -> tuple[str, ...]:
    bad = [s for s in stages if s not in ALL_STAGES]
    if bad or not stages:
        raise CnaError(f"unknown stage(s) {', '.join(bad) or '(none)'}: "
                       f"use {', '.join(ALL_STAGES)}")
    return tuple(s for s in ALL_STAGES if s in stages)  # canonical order


def run_extra_stage(name: str, ctx: StageContext) -> None:
    import importlib

    module, func = EXTRA_STAGES[name].split(":")
    getattr(importlib.import_module(module), func)(ctx)


def run_arithmetic(view, out: Path, profile: str = "quick", ops=OPS, seed: int = 0,
                   batch_size: int = 64, progress: bool = True,
                   command: str = "cnalens run arithmetic",
                   stages: tuple[str, ...] = DEFAULT_STAGES) -> Path:
    """The main job: every stage of the profile, then ``DIR/report.html``."""
    from cnalens.report import render_report

    stages = check_stages(stages)
    prof = PROFILES[profile]
    t0 = time.perf_counter()
    cases = [c for d in prof.eval_digits for c in arithmetic_cases(
        ops, (d,), prof.eval_templates if d == 1 else ("eq",), n=prof.eval_n.get(d),
        seed=seed)]
    head_cases = arithmetic_cases(ops, prof.heads_digits, ("eq",), n=prof.heads_n, seed=seed)
    encode_all(view.tokenizer, cases)  # fail on bad input before writing anything
    settings = {"ops": list(ops), "eval_digits": list(prof.eval_digits),
                "eval_templates": list(prof.eval_templates), "seed": seed,
                "eval_pairs_per_op_digits": {str(k): v for k, v in prof.eval_n.items()},
                "heads_digits": list(prof.heads_digits), "heads_template": "eq",
                "cna_ops": [o for o in prof.cna_ops if o in ops], "cna_cases_per_op": prof.cna_n,
                "cna_ks": list(prof.cna_ks), "cna_seeds": prof.cna_seeds}
    run = start_run(out, view, command, profile, settings, list(stages))
    if "eval" in stages:
        console.print(f"[bold]eval[/]: {len(cases)} cases")
        eval_stage(view, cases, out, settings, batch_size, progress)
    heads = None
    needs_heads = any(s not in ("eval", "debias") for s in stages)
    if needs_heads:
        console.print(f"[bold]heads[/]: {view.n_layers * view.n_heads} heads x "
                      f"{len(head_cases)} cases")
        heads = heads_stage(view, head_cases, out, settings, batch_size=batch_size,
                            progress=progress)
    if "cna" in stages:
        cna_ops = [o for o in prof.cna_ops if o in ops]
        by_op, heldout = cna_cases(cna_ops, prof.cna_n, seed)
        cna_stage(view, out, by_op, top_head_per_op(heads, cna_ops), list(prof.cna_ks),
                  prof.cna_seeds, batch_size=min(batch_size, 32), progress=progress,
                  settings=settings, require=False, heldout_by_op=heldout)
    ctx = StageContext(view, out, prof, tuple(ops), seed, batch_size, progress, settings, heads,
                       top_head_per_op(heads, ops) if heads is not None else {})
    for name in stages:
        if name in EXTRA_STAGES:
            console.print(f"[bold]{name}[/]")
            run_extra_stage(name, ctx)
    finish_run(out, run, t0)
    return render_report(out)


def read_stage(out: Path, stage: str) -> tuple[pd.DataFrame, dict]:
    return pd.read_csv(out / f"{stage}.csv"), read_json(out / f"{stage}.json")


def correct_cases(view, cases: list[Case], batch_size: int = 64, progress: bool = True):
    """The encoded cases the (unmodified) model answers correctly, and how many were not."""
    from cnalens.evaluate import evaluate

    enc = encode_all(view.tokenizer, cases)
    res = evaluate(view, enc, batch_size=batch_size, progress=progress,
                   description="selecting correct cases")
    keep = [e for e, ok in zip(enc, res["correct"], strict=True) if ok]
    return keep, len(enc) - len(keep)


def cases_by_group(cases: list[Case], keys: list[str]) -> dict:
    """Cases by their values of ``keys`` (a tuple of values for several keys); no keys:
    one group, ``"custom"``."""
    if not keys:
        return {"custom": list(cases)}
    out: dict = {}
    for c in cases:
        vals = tuple(c.labels.get(k) for k in keys)
        out.setdefault(vals if len(keys) > 1 else vals[0], []).append(c)
    return out


def group_name(key) -> str:
    """A group's name: its value, or its values joined by ``|``."""
    return "|".join(map(str, key)) if isinstance(key, tuple) else str(key)


HELDOUT_FRACTION = 0.5  # of each op's 1-digit operand pairs, kept for held-out verification


def cna_cases(ops, n: int | None, seed: int = 0
              ) -> tuple[dict[str, list[Case]], dict[str, list[Case]]]:
    """Per op: ``n`` sampled 1-digit ``eq`` cases of the training split (CNA is run on them)
    and every case of the disjoint held-out split (held-out verification)."""
    train = {op: arithmetic_cases([op], (1,), ("eq",), n=n, seed=seed, split="train",
                                  test_fraction=HELDOUT_FRACTION) for op in ops}
    test = {op: arithmetic_cases([op], (1,), ("eq",), split="test",
                                 test_fraction=HELDOUT_FRACTION) for op in ops}
    return train, test


def cna_stage(view, out: Path, cases_by_op: dict[str, list[Case]],
              heads_by_op: dict[str, tuple[int, int]], ks: list[int], seeds: int = 3,
              by: str = "decrease", batch_size: int = 32, progress: bool = True,
              settings: dict | None = None, require: bool = True,
              heldout_by_op: dict[str, list[Case]] | None = None,
              group_cols: tuple[str, ...] = ("op",),
              label_cols: tuple[str, ...] = ()) -> pd.DataFrame | None:
    """CNA of the original model (A) against each op's head zeroed (B), then verification.

    Groups other than operations: the keys of ``cases_by_op`` are values of the
    ``group_cols`` (a tuple for several), written as those columns of every table;
    ``label_cols``: case labels cna_neurons.csv carries besides.

    With no correctly answered case at all: CnaError, or (``require=False``) a warning and
    None, with nothing written.

    Each operation's comparison is ``cna.compare_runs`` with K = max(ks) (the certified
    top-K over its deep layers, run B with run A's target (A's prediction) and frozen
    scale; exhaustive on soft-capped models): only the neurons whose bounds can reach the
    top-K are scored exactly; coefficients stay complete for verification. Lens
    faithfulness takes run A's own certified top-10 (``certified.certified_topk``, layers
    from the shallowest head up). Writes
    cna_neurons.csv (each case's top-K), verification.csv and cna.json. With
    ``heldout_by_op``, verification adds ``heldout_zero_topk``: the K neurons most frequent
    in the cases' top-K, zeroed on the held-out cases the model answers correctly.
    """
    from scipy.stats import pearsonr, spearmanr

    from cnalens.certified import certified_topk
    from cnalens.cna import compare_runs, lens_faithfulness, verify, verify_heldout
    from cnalens.interventions import ZeroHeads

    t0 = time.perf_counter()
    group_cols = tuple(group_cols)
    per_op: dict[str, dict] = {}
    encs = {}
    for op, cases in cases_by_op.items():
        head = heads_by_op[op]
        view.check_heads([head])
        enc, skipped = correct_cases(view, cases, batch_size, progress)
        per_op[group_name(op)] = {"head": f"{head[0]}.{head[1]}", "n": len(enc),
                                  "skipped_wrong": skipped,
                                  "deep_layers": [head[0], view.n_layers - 1]}
        if not enc:
            console.print(f"[yellow]cna {group_name(op)}: no correctly answered case; "
                          "skipped[/]")
            continue
        encs[op] = enc
    if not encs:
        msg = "CNA: the model answers none of the selected cases correctly"
        if require:
            raise CnaError(msg)
        console.print(f"[yellow]{msg}; stage skipped[/]")
        return None
    n = sum(len(enc) for enc in encs.values())
    first = min(heads_by_op[op][0] for op in encs)
    top = max(ks)
    console.print(f"[bold]cna[/]: certified top-{top} of {n} cases x 2 runs (deep layers)")
    frames, vers, faiths, methods = [], [], [], set()
    for op, enc in encs.items():
        head = heads_by_op[op]
        name = group_name(op)
        group = dict(zip(group_cols, op if isinstance(op, tuple) else (op,), strict=True))
        deep = list(range(head[0], view.n_layers))
        t1 = time.perf_counter()
        comp = compare_runs(view, enc, [ZeroHeads([head])], k=top, layers=deep, by=by,
                            batch_size=batch_size, progress=progress)
        stats = comp.meta.get("stats") or {"method": "exhaustive", "n_units": int(sum(
            view.ffn_width(x) for x in deep))}
        stats["seconds"] = time.perf_counter() - t1  # both runs' forwards included
        stats.setdefault("n_exact", [stats["n_units"]] * len(enc))
        methods.add(stats["method"])
        per_op[name]["scoring"] = {
            "method": stats["method"], "neurons": stats["n_units"],
            "scored_exactly_mean": sum(stats["n_exact"]) / len(stats["n_exact"]),
            "seconds": round(stats["seconds"], 2)}
        labels = [{**group, "head": per_op[name]["head"], "prompt": e.case.question,
                   "target": e.case.target,
                   **{c: e.case.labels.get(c) for c in label_cols if c not in group}}
                  for e in enc]
        frames.append(comp.frame(top, by, deep, labels))
        # run A's own top-10 (the layers from the shallowest head up), certified
        top_a, _ = certified_topk(view, enc, 10, layers=range(first, view.n_layers),
                                  batch_size=batch_size)
        imp_a = torch.full(comp.coef_a.shape, float("nan"), dtype=torch.float64)
        pos = {c: i for i, c in enumerate(comp.case_ids)}
        imp_a[torch.tensor(top_a["case"].map(pos).to_numpy()),
              torch.tensor(top_a.layer.to_numpy()), torch.tensor(top_a["index"].to_numpy())] = \
            torch.tensor(top_a.importance.to_numpy(), dtype=torch.float64)
        faith = lens_faithfulness(view, enc, imp_a, top=10, batch_size=batch_size)
        own = [c for c in label_cols if c not in group]  # each case's other labels
        if own:
            lab = pd.DataFrame([{"case": e.case.case_id, **{c: e.case.labels.get(c)
                                                            for c in own}} for e in enc])
            faith = faith.merge(lab, on="case", how="left")
        for c, v in reversed(group.items()):
            faith.insert(0, c, v)
        faiths.append(faith)
        per_op[name]["faithfulness"] = {
            "n": len(faith), "what": "run A's top-10 neurons per case: lens importance vs "
            "the real log-prob drop when each is zeroed alone",
            "spearman": float(spearmanr(faith["importance"], faith["real"]).statistic),
            "pearson": float(pearsonr(faith["importance"], faith["real"]).statistic)}
        ver = verify(view, enc, comp, ks, deep, by, seeds=seeds, batch_size=batch_size,
                     progress=progress)
        if heldout_by_op and heldout_by_op.get(op):
            test_enc, test_wrong = correct_cases(view, heldout_by_op[op], batch_size, progress)
            per_op[name]["heldout"] = {"n": len(test_enc), "skipped_wrong": test_wrong}
            if test_enc:
                ver = pd.concat([ver, verify_heldout(view, test_enc, comp, ks, by, seeds=seeds,
                                                     batch_size=batch_size, progress=progress)],
                                ignore_index=True)
        for c, v in reversed(group.items()):
            ver.insert(0, c, v)
        ver.insert(0, "head", per_op[name]["head"])
        ver.insert(0, "model", view.info.get("spec"))
        vers.append(ver)
    write_csv(out / "cna_neurons.csv", pd.concat(frames, ignore_index=True))
    write_csv(out / "faithfulness.csv", pd.concat(faiths, ignore_index=True))
    ver_df = pd.concat(vers, ignore_index=True)
    write_csv(out / "verification.csv", ver_df)
    meta = {"stage": "cna", "model": view.summary(), "settings": settings or {}, "ks": ks,
            "seeds": seeds, "ranking": by, "lens": "frozen",
            "scoring": "/".join(sorted(methods)),
            "target": "run A's prediction", "group_by": list(group_cols), "per_op": per_op,
            "runs": {"a": "original model", "b": "the op's head zeroed (o_proj input)"},
            "seconds": round(time.perf_counter() - t0, 2), "finished": now()}
    write_json(out / "cna.json", meta)
    write_json(out / "verification.json", {**meta, "stage": "verification"})
    return ver_df
