"""The ``eval`` section: how well the model does the task, before anything is changed.

Arithmetic (eval.csv grouped by op, digits and template): a table op x digits with one
column per template, and bars per op and template. Any other grouping (``--group-by``, a
case file's labels, or none): one row per group, and bars per group.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from cnalens.errors import CnaError
from cnalens.report import findings as F
from cnalens.report import html as h
from cnalens.report import plots
from cnalens.report.sections import Section, case_file, iter_csv, read_csv, read_meta

STAGE = "eval"
KEYS = ("op", "digits", "template")  # the arithmetic grouping
MAX_FAILURES = 12
POOLED = "all"
CUSTOM = "custom"
CSV_COLUMNS = ("op", "digits", "template", "n", "acc", "acc_lo", "acc_hi")
RESULT_COLUMNS = ("n", "acc", "acc_lo", "acc_hi")
NUMERIC = (
    "digits",
    "n",
    "acc",
    "acc_lo",
    "acc_hi",
    "acc_first",
    "acc_first_lo",
    "acc_first_hi",
    "logp",
)
CASE_COLUMNS = ("op", "digits", "template", "prompt", "target", "pred", "correct", "correct_first")


def _digits_label(d: Any) -> str:
    if h.is_missing(d) or int(d) == 0:
        return "—"
    return str(int(d))


def _ops(df: pd.DataFrame) -> list[str]:
    ops = plots.ordered([o for o in df["op"] if o != POOLED], plots.OP_ORDER)
    return ops + ([POOLED] if (df["op"] == POOLED).any() else [])


def _wmean(rows: pd.DataFrame, col: str) -> float | None:
    if col not in rows:
        return None
    sub = rows[rows[col].notna()]
    w = sub["n"].fillna(0) if "n" in sub else pd.Series(1.0, index=sub.index)
    return float((sub[col] * w).sum() / w.sum()) if len(sub) and w.sum() > 0 else None


def _first_logp(rows: pd.DataFrame, pooled: pd.DataFrame) -> dict[str, Any]:
    """acc_first (+ interval) and logp for one (op, digits) row of the table.

    Each is the file's pooled (template "all") value when there is one; else the single
    template row's; else the n-weighted mean over template rows (exact for a fraction or a
    per-case mean; no interval then).
    """
    p = pooled.iloc[0] if len(pooled) else None
    out: dict[str, Any] = {"acc_first": None, "acc_first_lo": None, "acc_first_hi": None}
    for src in ([p] if p is not None else []) + ([rows.iloc[0]] if len(rows) == 1 else []):
        if not h.is_missing(src.get("acc_first")):
            out = {k: src.get(k) for k in out}
            break
    else:
        out["acc_first"] = _wmean(rows, "acc_first")
    logp = p.get("logp") if p is not None else None
    out["logp"] = _wmean(rows, "logp") if h.is_missing(logp) else logp
    return out


def accuracy_table(df: pd.DataFrame) -> str:
    """Rows op x digits, one column per template (acc [95% CI]), then first-token acc, log p."""
    # Template columns: every template except those only custom cases use (e.g. "custom");
    # a row with none of the column templates shows its own in one wide cell instead.
    regular = df[~df["op"].isin([CUSTOM, POOLED])]
    source = regular if len(regular) else df
    templates = plots.ordered(
        [t for t in source["template"] if t != POOLED]
        + [t for t in df.loc[df["op"] == CUSTOM, "template"] if t != POOLED and t != CUSTOM],
        plots.TEMPLATE_ORDER,
    )
    has_pooled = (df["template"] == POOLED).any()
    has_first = "acc_first" in df and df["acc_first"].notna().any()
    has_logp = "logp" in df and df["logp"].notna().any()

    head: list[Any] = ["op", ("digits", {"class_": "num"})]
    head += [(t, {"class_": "num"}) for t in templates]
    if has_pooled:
        head.append(
            (
                "all templates",
                {"class_": "num pooled", "title": "pooled row as written in eval.csv"},
            )
        )
    if has_first:
        head.append(
            ("first token", {"class_": "num aux", "title": "accuracy of the first answer token"})
        )
    if has_logp:
        head.append(
            (
                "log p",
                {
                    "class_": "num aux",
                    "title": "log-probability of the target answer (eval.csv logp)",
                },
            )
        )

    body = []
    for op in _ops(df):
        sub = df[df["op"] == op]
        digits = sorted(sub["digits"].dropna().unique().tolist()) or [None]
        for i, d in enumerate(digits):
            rows = sub if d is None else sub[sub["digits"] == d]
            row: list[Any] = []
            if i == 0:
                label = "all (pooled)" if op == POOLED else plots.op_label(op)
                row.append((label, {"class_": "grp", "rowspan": len(digits)}))
            row.append((_digits_label(d), {"class_": "num"}))

            def cell(r: pd.DataFrame, cls: str = "num") -> tuple[str, dict[str, Any]]:
                if r.empty:
                    return "", {"class_": cls}
                x = r.iloc[0]
                title = f"n = {h.fmt_int(x.get('n'))}"
                return (
                    h.fmt_acc(x["acc"], x.get("acc_lo"), x.get("acc_hi")),
                    {"class_": cls, "title": title, "style": h.shade(x["acc"])},
                )

            tpl_rows = rows[rows["template"] != POOLED]
            if templates and not tpl_rows["template"].isin(templates).any() and len(tpl_rows):
                own = "; ".join(
                    f"{r['template']}: {h.fmt_acc(r['acc'], r.get('acc_lo'), r.get('acc_hi'))}"
                    for _, r in tpl_rows.iterrows()
                )
                n = tpl_rows["n"].sum() if "n" in tpl_rows else None
                style = h.shade(tpl_rows["acc"].iloc[0]) if len(tpl_rows) == 1 else None
                row.append(
                    (
                        own,
                        {
                            "colspan": len(templates),
                            "class_": "num",
                            "title": f"n = {h.fmt_int(n)}",
                            "style": style,
                        },
                    )
                )
            else:
                for t in templates:
                    row.append(cell(tpl_rows[tpl_rows["template"] == t]))
            pooled = rows[rows["template"] == POOLED]
            if has_pooled:
                row.append(cell(pooled, "num pooled"))
            if has_first or has_logp:
                fl = _first_logp(tpl_rows, pooled)
            if has_first:
                ci = h.fmt_acc(fl["acc_first"], fl["acc_first_lo"], fl["acc_first_hi"])
                row.append((h.fmt_pct(fl["acc_first"]), {"class_": "num aux", "title": ci}))
            if has_logp:
                row.append((h.fmt_num(fl["logp"]), {"class_": "num aux"}))
            body.append(row)

    ns = df.loc[df["template"] != POOLED, "n"].dropna() if "n" in df else pd.Series(dtype=float)
    if ns.empty:
        cap = "Cells: accuracy [95% interval]."
    elif ns.min() == ns.max():
        cap = f"Cells: accuracy [95% interval], n = {h.fmt_int(ns.iloc[0])} cases per cell."
    else:
        cap = (
            f"Cells: accuracy [95% interval], n = {h.fmt_int(ns.min())}–"
            f"{h.fmt_int(ns.max())} cases per cell (hover a cell for its n)."
        )
    if has_first or has_logp:
        cap += (
            " First token and log p are for all templates together: the file's pooled row,"
            " or the n-weighted mean of the template rows."
        )
    return h.tag("div", h.table(head, body, caption=cap), class_="scroll")


def _is_true(s: pd.Series) -> pd.Series:
    return s.astype(str).str.strip().str.lower().isin({"true", "1", "1.0", "yes"})


def _short_prompt(prompt: str, prefix: str | None) -> h.Html:
    """The prompt without its few-shot prefix (shown once below), or its tail if long."""
    if prefix and prompt.startswith(prefix) and len(prompt) > len(prefix):
        return h.Html(
            f'<span class="ws" title="few-shot prefix omitted">…</span>'
            f"{h.esc(prompt[len(prefix) :])}"
        )
    if len(prompt) > 160:
        return h.Html(f'<span class="ws">…</span>{h.esc(prompt[-160:])}')
    return h.esc(prompt)


def _spread(groups: dict[tuple[str, str, str], list[Any]], limit: int) -> list[Any]:
    """Pick up to ``limit`` items from (op, digits, template) groups, varied on every axis.

    Passes go op by op (one group per op per pass); within an op, groups are walked along
    diagonals of the digits x template grid so consecutive picks differ in both.
    """

    def num(d: str) -> float:
        try:
            return float(d)
        except ValueError:
            return 0.0

    by_op: dict[str, list[list[Any]]] = {}
    for op in plots.ordered([k[0] for k in groups], plots.OP_ORDER):
        keys = [k for k in groups if k[0] == op]
        digits = sorted({k[1] for k in keys}, key=num)
        tpls = plots.ordered([k[2] for k in keys], plots.TEMPLATE_ORDER)

        def rank(k: tuple[str, str, str], digits=digits, tpls=tpls) -> tuple[int, int]:
            di, ti = digits.index(k[1]), tpls.index(k[2])
            return (ti - di) % len(tpls), di

        by_op[op] = [list(groups[k]) for k in sorted(keys, key=rank)]
    queues = [list(q) for q in by_op.values()]
    picked: list[Any] = []
    while len(picked) < limit and any(queues):
        for q in queues:
            while q and not q[0]:
                q.pop(0)
            if q and len(picked) < limit:
                picked.append(q[0].pop(0))
                q.append(q.pop(0))  # next time, this op's next group
    return picked


def _round_robin(groups: dict[tuple, list[Any]], limit: int) -> list[Any]:
    """Up to ``limit`` items, one group after the other."""
    queues = [list(q) for q in groups.values()]
    picked: list[Any] = []
    while len(picked) < limit and any(queues):
        for q in queues:
            if q and len(picked) < limit:
                picked.append(q.pop(0))
    return picked


def failures(dir: Path, prefixes: dict[str, str],
             keys: tuple[str, ...] | list[str] = KEYS) -> str | None:
    """Up to 12 failed cases, spread round-robin over the groups of ``keys`` (arithmetic:
    over op, digits and template)."""
    keys = tuple(keys)
    arithmetic = keys == KEYS
    total, n_bad, has_first = 0, 0, False
    kept: dict[tuple, list[pd.Series]] = {}
    text = ("op", "template") if arithmetic else keys
    for chunk in iter_csv(
        dir,
        "eval_cases",
        required=("prompt", "target", "pred", "correct"),
        text=(*text, "prompt", "target", "pred", "correct", "correct_first"),
        usecols=CASE_COLUMNS if arithmetic else (*keys, *CASE_COLUMNS[3:]),
    ):
        total += len(chunk)
        has_first = "correct_first" in chunk.columns
        bad = chunk[~_is_true(chunk["correct"])]
        n_bad += len(bad)
        gkeys = [c for c in keys if c in bad.columns]
        head = bad.groupby(gkeys, sort=False, dropna=False).head(MAX_FAILURES) if gkeys else bad
        for _, r in head.head(MAX_FAILURES * 200).iterrows():
            k = tuple(str(r.get(c, "")) for c in keys)
            lst = kept.setdefault(k, [])
            if len(lst) < MAX_FAILURES:
                lst.append(r)
    if total == 0:
        return None
    summary = f"{h.fmt_int(n_bad)} of {h.fmt_int(total)} cases failed ({h.fmt_pct(n_bad / total)})."
    if n_bad == 0:
        return h.tag("h3", "Example failures") + h.note(summary)

    picked = _spread(kept, MAX_FAILURES) if arithmetic else _round_robin(kept, MAX_FAILURES)

    if arithmetic:
        head: list[Any] = ["op", ("digits", {"class_": "num"}), "template"]
    else:
        head = list(keys)
    head += ["prompt", "target", "prediction"]
    if has_first:
        head.append(("first token", {"title": "was the first answer token right?"}))
    rows = []
    for r in picked:
        op, tpl = str(r.get("op", "")), str(r.get("template", ""))
        if arithmetic:
            row: list[Any] = [op, (_digits_label(r.get("digits")), {"class_": "num"}), tpl]
            prefix = prefixes.get(f"{op}|{tpl}")
        else:
            row, prefix = [str(r.get(k, "")) for k in keys], None
        row += [
            (_short_prompt(r["prompt"], prefix), {"class_": "mono"}),
            (r["target"], {"class_": "mono"}),
            (r["pred"] if r["pred"] != "" else "(empty)", {"class_": "mono bad"}),
        ]
        if has_first:
            row.append("✓" if _is_true(pd.Series([r["correct_first"]])).iloc[0] else "✗")
        rows.append(row)
    spread = "op, digits and template" if arithmetic else _and(keys)
    cap = summary + (
        f" Showing {len(picked)}, spread over {spread}."
        if n_bad > len(picked) and keys
        else f" Showing {len(picked)}."
        if n_bad > len(picked)
        else ""
    )
    return h.tag("h3", "Example failures") + h.tag(
        "div", h.table(head, rows, caption=cap), class_="scroll"
    )


def _prefix_blocks(prefixes: dict[str, str]) -> str | None:
    if not prefixes:
        return None

    def key(k: str) -> tuple[int, str, int, str]:
        op, _, tpl = k.partition("|")
        oi = plots.OP_ORDER.index(op) if op in plots.OP_ORDER else len(plots.OP_ORDER)
        ti = (
            plots.TEMPLATE_ORDER.index(tpl)
            if tpl in plots.TEMPLATE_ORDER
            else len(plots.TEMPLATE_ORDER)
        )
        return oi, op, ti, tpl

    blocks = []
    for k in sorted(prefixes, key=key):
        op, _, tpl = k.partition("|")
        title = f"{plots.op_label(op)} · {tpl}" if tpl else k
        text = prefixes[k]
        blocks.append(
            h.pre_visible(text, title) if text else h.pre_visible("(zero-shot: no prefix)", title)
        )
    return h.details(
        f"Few-shot prefixes ({len(blocks)})",
        h.join([h.note("Prepended to every prompt of that op and template. "
                       "↵ marks a line end, · a trailing space."),
                h.tag("div", h.join(blocks), class_="pre-grid")]),
    )


def _meta_line(meta: dict[str, Any]) -> str:
    bits = []
    if "n_cases" in meta:
        bits.append(f"{h.fmt_int(meta['n_cases'])} cases")
    if "batch_size" in meta:
        bits.append(f"batch size {h.fmt_int(meta['batch_size'])}")
    if "seconds" in meta:
        bits.append(h.fmt_seconds(meta["seconds"]))
    out = h.note(" · ".join(bits)) if bits else ""
    rest = {
        k: v for k, v in meta.items() if k not in ("n_cases", "batch_size", "seconds", "prefixes")
    }
    if rest:
        pairs = [
            (
                k,
                h.tag("code", json.dumps(v, default=str))
                if isinstance(v, (dict, list))
                else ("—" if v is None else v),
            )
            for k, v in sorted(rest.items())
        ]
        out += h.details(f"Stage settings ({len(rest)})", h.kv_table(pairs))
    return out


def _and(names: tuple[str, ...] | list[str]) -> str:
    names = list(names)
    return " and ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else "".join(names)


def eval_keys(dir: Path, stage_meta: dict[str, Any]) -> list[str]:
    """eval.csv's group columns: the stage's settings ``group_by``; for older files the
    arithmetic keys when eval.csv has them, else the columns before ``n``."""
    keys = (stage_meta.get("settings") or {}).get("group_by")
    header = list(pd.read_csv(dir / f"{STAGE}.csv", nrows=0).columns)
    if keys is None and set(KEYS) <= set(header):
        keys = list(KEYS)
    elif keys is None:
        keys = header[: header.index("n")] if "n" in header else []
    return [str(k) for k in keys if k in header]


def group_table(df: pd.DataFrame, keys: list[str]) -> str:
    """One row per group as eval.csv has it (pooled rows: a key "all"): n, accuracy
    [95% interval], first-token accuracy and log p."""
    has_first = "acc_first" in df and df["acc_first"].notna().any()
    has_logp = "logp" in df and df["logp"].notna().any()
    head: list[Any] = list(keys) or ["cases"]
    head += [("n", {"class_": "num"}), ("accuracy [95%]", {"class_": "num"})]
    if has_first:
        head.append(("first token", {"class_": "num aux",
                                     "title": "accuracy of the first answer token"}))
    if has_logp:
        head.append(("log p", {"class_": "num aux",
                               "title": "log-probability of the answer's first token"}))
    body = []
    for _, r in df.iterrows():
        pooled = not keys or any(str(r[k]) == POOLED for k in keys)
        cells: list[Any] = ([("all (pooled)" if str(r[k]) == POOLED else str(r[k]),
                              {"class_": "grp"}) for k in keys] or ["all (pooled)"])
        cls = "num pooled" if pooled and keys else "num"
        cells += [
            (h.fmt_int(r.get("n")), {"class_": "num"}),
            (h.fmt_acc(r["acc"], r.get("acc_lo"), r.get("acc_hi")),
             {"class_": cls, "style": h.shade(r["acc"])}),
        ]
        if has_first:
            ci = h.fmt_acc(r.get("acc_first"), r.get("acc_first_lo"), r.get("acc_first_hi"))
            cells.append((h.fmt_pct(r.get("acc_first")), {"class_": "num aux", "title": ci}))
        if has_logp:
            cells.append((h.fmt_num(r.get("logp")), {"class_": "num aux"}))
        body.append(cells)
    cap = ("Accuracy [95% interval] per " + _and(keys) + "; rows with \"all\" pool over "
           "that column." if keys else "Accuracy [95% interval] over all cases.")
    return h.tag("div", h.table(head, body, caption=cap), class_="scroll")


def _what(keys: list[str], source: str | None) -> str:
    if source is None and keys == list(KEYS):
        return ("Exact-match accuracy of the model's greedy answer on arithmetic prompts, by "
                "operation, operand digits and prompt template, with 95% intervals: the "
                "baseline every later intervention is measured against.")
    data = f"the cases of {Path(source).name}" if source else "arithmetic prompts"
    by = f"by {_and(keys)}" if keys else "all cases pooled"
    return (f"Exact-match accuracy of the model's greedy answer on {data}, {by}, with 95% "
            "intervals: the baseline every later intervention is measured against.")


def render(dir: Path, meta: dict[str, Any]) -> str | None:
    if not (dir / f"{STAGE}.csv").is_file():
        return None
    stage_meta = read_meta(dir, STAGE)
    keys = eval_keys(dir, stage_meta)
    arithmetic = keys == list(KEYS)
    df = read_csv(dir, STAGE, required=CSV_COLUMNS if arithmetic else RESULT_COLUMNS,
                  text=("op", "template") if arithmetic else tuple(keys))
    if df is None:
        return None
    for c in NUMERIC:
        if c in df and (arithmetic or c not in keys):
            df[c] = pd.to_numeric(df[c], errors="coerce")
    if arithmetic:
        df["digits"] = df["digits"].fillna(0)
    prefixes = {str(k): str(v) for k, v in (stage_meta.get("prefixes") or {}).items()}

    parts = [h.what(_what(keys, case_file(dir, STAGE))), _meta_line(stage_meta)]
    if df.empty:
        parts.append(h.note("eval.csv has no rows."))
        return "".join(parts)
    lines = F.eval_findings(df, keys)
    if arithmetic:
        parts.append(accuracy_table(df))
        parts.append(h.join(h.interp(x) for x in lines))
        lines = [_template_line(df)]
        fig = plots.eval_accuracy_chart(df)
        alt, cap = ("accuracy by op, digits and template",
                    "Accuracy by operation (panels), operand digits (x) and template "
                    "(colour); whiskers are 95% intervals.")
    else:
        parts.append(group_table(df, keys))
        parts.append(h.join(h.interp(x) for x in lines[:1]))
        lines = lines[1:]
        fig = plots.group_accuracy_chart(df, keys)
        alt = f"accuracy by {_and(keys)}"
        cap = f"Accuracy by {_and(keys)}; whiskers are 95% intervals."
    if fig is not None:
        uri = plots.embed(fig, dir, "eval_acc")
        parts.append(h.figure(uri, alt, cap))
        parts.append(h.join(h.interp(x) for x in lines if x))
    parts.append(failures(dir, prefixes, keys) or "")
    parts.append(_prefix_blocks(prefixes) or "")
    return "".join(parts)


def _template_line(df: pd.DataFrame) -> str:
    """The widest accuracy gap between templates within one op and digits."""
    cells = df[(df["op"] != POOLED) & (df["template"] != POOLED) & df["acc"].notna()]
    best = None
    for (op, d), g in cells.groupby(["op", "digits"], sort=False):
        if len(g) < 2:
            continue
        hi, lo = g.loc[g["acc"].idxmax()], g.loc[g["acc"].idxmin()]
        gap = hi["acc"] - lo["acc"]
        if best is None or gap > best[0]:
            best = (gap, op, d, hi, lo)
    if best is None:
        return ""
    gap, op, d, hi, lo = best
    clear = hi.get("acc_lo", float("nan")) > lo.get("acc_hi", float("nan"))
    return (f"The prompt template matters {'a lot' if gap >= 0.2 else 'little'}: the widest "
            f"gap is {op} {_digits_label(d)}-digit, {hi['template']} {h.fmt_pct(hi['acc'])} vs "
            f"{lo['template']} {h.fmt_pct(lo['acc'])}"
            + (" (intervals apart)." if clear else " (intervals overlap)."))


def title(dir: Path) -> str:
    """"Arithmetic accuracy" on arithmetic, "Accuracy" on a case file."""
    try:
        source = case_file(dir, STAGE)
    except CnaError:
        source = None
    return "Accuracy (eval)" if source else "Arithmetic accuracy (eval)"


SECTION = Section(STAGE, title, render)
