"""The CNA stage: each operation's top head zeroed (run B) against the model (run A) on the
correctly answered cases, then the paper's verification; DIR/cna_neurons.csv,
verification.csv, faithfulness.csv, cna.json, verification.json."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch

from cnalens.data.arithmetic import arithmetic_cases
from cnalens.data.cases import Case
from cnalens.errors import CnaError
from cnalens.io import write_csv, write_json
from cnalens.progress import console
from cnalens.stages import correct_cases, group_name, now

if TYPE_CHECKING:
    from cnalens.models import ModelView


HELDOUT_FRACTION = 0.5  # of each op's 1-digit operand pairs, kept for held-out verification


def cna_cases(ops: Sequence[str], n: int | None, seed: int = 0, split: str = "train",
              negative: bool = False, digits: int = 1
              ) -> tuple[dict[str, list[Case]], dict[str, list[Case]]]:
    """Per op: ``n`` sampled ``digits``-digit ``eq`` cases of ``split`` (CNA is run on
    them: "train", or "all" the pairs) and the held-out split ("test", the other half of
    the pairs: held-out verification chooses its neurons on the CNA cases outside it):
    every 1-digit case of it, or ``n`` sampled for more digits (4,050 2-digit pairs).
    ``negative``: subtraction pairs with negative differences too (100 pairs, not 55)."""
    train = {op: arithmetic_cases([op], (digits,), ("eq",), n=n, seed=seed, split=split,
                                  test_fraction=HELDOUT_FRACTION, negative=negative)
             for op in ops}
    test = {op: arithmetic_cases([op], (digits,), ("eq",), n=None if digits == 1 else n,
                                 seed=seed, split="test", test_fraction=HELDOUT_FRACTION,
                                 negative=negative)
            for op in ops}
    return train, test


def cna_stage(view: ModelView, out: Path, cases_by_op: dict[str, list[Case]],
              heads_by_op: dict[str, tuple[int, int]], ks: list[int], seeds: int = 3,
              by: str = "decrease", batch_size: int = 32, progress: bool = True,
              settings: dict | None = None, require: bool = True,
              heldout_by_op: dict[str, list[Case]] | None = None,
              group_cols: tuple[str, ...] = ("op",),
              label_cols: tuple[str, ...] = (), positions: Sequence[str] = ("all",),
              mediate: bool = True) -> pd.DataFrame | None:
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
    cna_neurons.csv (each case's top-K), verification.csv and cna.json, and on a mixture
    of experts cna_routing.csv (the experts whose routing differs between the runs). With
    ``heldout_by_op``, verification adds ``heldout_zero_topk``: the K neurons most frequent
    in the top-K of the CNA cases outside the held-out set, zeroed on the held-out cases
    the model answers correctly. ``positions``: where verification's neuron interventions
    act, "all" and/or "last" (the scored positions), each reported. ``mediate``: the
    mediation rows (``cna.mediation``: the share of the head's effect its top-K neurons
    restore and reproduce). Every row has a 95% interval, the unablated accuracy of the
    cases behind it and its verdict (``tables.add_verdicts``).
    """
    from scipy.stats import pearsonr, spearmanr

    from cnalens.certified import certified_topk
    from cnalens.cna import (
        POSITIONS,
        compare_runs,
        lens_faithfulness,
        mediation,
        verify,
        verify_heldout,
    )
    from cnalens.interventions import ZeroHeads
    from cnalens.tables import add_verdicts

    positions = tuple(positions)
    if not positions or len(set(positions)) != len(positions) or \
            any(p not in POSITIONS for p in positions):
        raise CnaError(f"positions take {' and/or '.join(POSITIONS)}, each once "
                       f"(got {', '.join(positions) or 'none'})")
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
    frames, vers, faiths, methods, routings = [], [], [], set(), []
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
            "seconds": round(stats["seconds"], 2),  # both runs' forwards included
            "seconds_cover": "both runs' forwards and the certified (or exhaustive) scoring"}
        labels = [{**group, "head": per_op[name]["head"], "prompt": e.case.question,
                   "target": e.case.target,
                   **{c: e.case.labels.get(c) for c in label_cols if c not in group}}
                  for e in enc]
        frames.append(comp.frame(top, by, deep, labels))
        if view.shape.is_moe:  # which experts each case routes to, in A and in B
            route = comp.routing()
            for c, v in reversed(group.items()):
                route.insert(0, c, v)
            routings.append(route)
        # run A's own top-10 (the layers from the shallowest head up), certified
        top_a, _ = certified_topk(view, enc, 10, layers=range(first, view.n_layers),
                                  batch_size=batch_size)
        imp_a = torch.full(comp.coef_a.shape, float("nan"), dtype=torch.float64)
        pos = {c: i for i, c in enumerate(comp.case_ids)}
        imp_a[torch.tensor(top_a["case"].map(pos).to_numpy()),
              torch.tensor(top_a.layer.to_numpy()), torch.tensor(top_a["neuron"].to_numpy())] = \
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
        accuracy = len(enc) / (len(enc) + per_op[name]["skipped_wrong"])
        parts = [verify(view, enc, comp, ks, deep, by, seeds=seeds, batch_size=batch_size,
                        progress=progress, positions=where, coef_head=i == 0)
                 for i, where in enumerate(positions)]
        if mediate:
            parts.append(mediation(view, enc, comp, ks, comp.interventions, by, deep,
                                   seeds=seeds, batch_size=batch_size, progress=progress))
        for part in parts:
            part["base_accuracy"] = accuracy
        if heldout_by_op and heldout_by_op.get(op):
            test_enc, test_wrong = correct_cases(view, heldout_by_op[op], batch_size, progress)
            held_ids = {c.case_id for c in heldout_by_op[op]}
            fit = [i for i, c in enumerate(comp.case_ids) if c not in held_ids]
            per_op[name]["heldout"] = {"n": len(test_enc), "skipped_wrong": test_wrong,
                                       "chosen_on": len(fit)}
            if test_enc and fit:
                for where in positions:
                    held = verify_heldout(view, test_enc, comp.subset(fit), ks, by,
                                          seeds=seeds, batch_size=batch_size,
                                          progress=progress, positions=where)
                    held["base_accuracy"] = len(test_enc) / len(heldout_by_op[op])
                    parts.append(held)
        ver = add_verdicts(pd.concat(parts, ignore_index=True))
        for c, v in reversed(group.items()):
            ver.insert(0, c, v)
        ver.insert(0, "head", per_op[name]["head"])
        ver.insert(0, "model", view.info.get("spec"))
        vers.append(ver)
    write_csv(out / "cna_neurons.csv", pd.concat(frames, ignore_index=True))
    if routings:
        write_csv(out / "cna_routing.csv", pd.concat(routings, ignore_index=True))
    write_csv(out / "faithfulness.csv", pd.concat(faiths, ignore_index=True))
    ver_df = pd.concat(vers, ignore_index=True)
    write_csv(out / "verification.csv", ver_df)
    meta = {"stage": "cna", "model": view.summary(), "settings": settings or {}, "ks": ks,
            "seeds": seeds, "ranking": by, "lens": "frozen", "positions": list(positions),
            "mediation": mediate,
            "scoring": "/".join(sorted(methods)),
            "target": "run A's prediction", "group_by": list(group_cols), "per_op": per_op,
            "runs": {"a": "original model", "b": "the op's head zeroed (o_proj input)"},
            "seconds": round(time.perf_counter() - t0, 2), "finished": now()}
    write_json(out / "cna.json", meta)
    write_json(out / "verification.json", {**meta, "stage": "verification"})
    return ver_df
