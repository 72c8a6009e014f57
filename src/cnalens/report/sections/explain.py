"""The ``explain`` section: the four-stage chain of each explained case, drawn as boxes.

Reads ``DIR/explain.csv`` (one row per chain element, see ``cnalens.explain``) and
``DIR/explain.json`` (per case: prompt tokens, the head's attention, enhancing links).
Per case: a strip of the question's tokens shaded by the head's attention, four columns
(feature enhancing -> feature transferring -> feature predicting -> prediction enhancing
-> the answer) with each element's name, top tokens and measured effect, then the table.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from cnalens.report import findings as F
from cnalens.report import html as h
from cnalens.report.sections import Section, read_csv, read_meta

STAGE = "explain"
REQUIRED = ("case", "stage", "kind", "name", "layer", "index", "position", "score", "effect")
TEXT = ("case", "prompt", "target", "stage", "kind", "name", "token", "tokens",
        "tokens_transformed", "detail")
SHOW = {"feature enhancing": 4, "feature transferring": 3, "feature predicting": 1,
        "prediction enhancing": 5}
TITLES = (("feature enhancing", "1 · Feature enhancing", "shallow FFN neurons"),
          ("feature transferring", "2 · Feature transferring", "shallow attention layers"),
          ("feature predicting", "3 · Feature predicting", "the arithmetic head"),
          ("prediction enhancing", "4 · Prediction enhancing", "deep FFN neurons (CNA)"))

STYLE = h.Html("""<style>
.ch-case{border:1px solid var(--line);border-radius:8px;padding:12px 14px;margin:14px 0}
.ch-title{font-weight:650;font-size:14.5px;margin-bottom:2px}
.ch-meta{color:var(--muted);font-size:12px;margin-bottom:8px}
.ch-strip{display:flex;flex-wrap:wrap;gap:2px;margin:4px 0 10px;align-items:center}
.ch-strip .lab{color:var(--muted);font-size:11.5px;margin-right:6px}
.ch-t{font:12px ui-monospace,Menlo,Consolas,monospace;padding:1px 5px;border-radius:4px;
border:1px solid var(--line)}
.ch-grid{display:grid;grid-template-columns:1fr 18px 1fr 18px 1fr 18px 1fr 18px 70px;
align-items:stretch}
.ch-col{background:var(--soft);border-radius:8px;padding:8px}
.ch-stage{font-weight:650;font-size:12.5px}
.ch-sub{color:var(--muted);font-size:11px;margin-bottom:6px}
.ch-arrow{display:flex;align-items:center;justify-content:center;color:#98a2b3;
font-size:18px}
.ch-node{background:#fff;border:1px solid var(--line);border-radius:6px;padding:5px 7px;
margin-bottom:6px}
.ch-name{font-weight:600;font-size:12.5px}
.ch-name .at{color:var(--muted);font-weight:400;font-size:11px}
.ch-tok{font-size:11.5px;color:#344054;word-break:break-word}
.ch-tok2{font-size:11.5px;color:#0b5cad;word-break:break-word}
.ch-eff{display:inline-block;font-size:11px;border-radius:4px;padding:0 5px;margin-top:2px}
.ch-eff.up{background:#dcfae6;color:#085d3a}.ch-eff.down{background:#fee4e2;color:#912018}
.ch-eff.flat{background:#eef1f5;color:#475467}
.ch-links{font-size:11px;color:#475467;margin-top:4px}
.ch-out{display:flex;flex-direction:column;align-items:center;justify-content:center;
background:#0b5cad;color:#fff;border-radius:8px;font-weight:700;font-size:18px}
.ch-out small{font-weight:400;font-size:10.5px;opacity:.85}
@media (max-width:900px){.ch-grid{grid-template-columns:1fr}.ch-arrow{transform:rotate(90deg)}}
</style>""")


def _f(x: Any, d: int = 2) -> str:
    return h.fmt_num(x, d)


def d_logp(effect: Any) -> str:
    """The change of log p(target) when the element is zeroed (the files' ``effect`` is
    the drop, so the change is ``-effect``): '−0.13'; missing: ''."""
    return "" if h.is_missing(effect) else F.signed(-float(effect))


def d_coef(coef_drop: Any) -> str:
    """The change of the deep neurons' Σ|m| when the element is zeroed, in percent (the
    files' ``coef_drop`` is the relative drop): '+2.9%'; missing: ''."""
    return "" if h.is_missing(coef_drop) else f"{F.signed(-100 * float(coef_drop), 1)}%"


def _effect_badge(effect: Any, coef_drop: Any = None) -> h.Html:
    """What zeroing the element changes, signed as in the element table."""
    if h.is_missing(effect):
        return h.Html("")
    e = float(effect)
    cls = "up" if e > 0.05 else "down" if e < -0.05 else "flat"
    text = f"zeroed: log p {d_logp(effect)}"
    if d_coef(coef_drop):
        text += f" · deep Σ|m| {d_coef(coef_drop)}"
    return h.tag("span", text, class_=f"ch-eff {cls}")


def token(text: Any) -> str:
    """One token as the files write it (``repr`` escapes, ``␣`` for spaces) with every
    invisible character shown (:func:`cnalens.report.html.visible`)."""
    return h.visible(h.unrepr(str(text)))


def _tokens(text: Any, n: int = 6) -> str:
    if not isinstance(text, str) or not text:
        return ""
    parts = text.split(" ")
    return " · ".join(token(p) for p in parts[:n] if p)


def _node(r, transformed: bool = False, extra: Any = "") -> h.Html:
    at = ""
    if not h.is_missing(r.position) and r.kind != "head":
        at = (f" at ‘{token(r.token)}’ ({int(r.position)})" if r.token
              else f" at {int(r.position)}")
    bits = [h.tag("div", h.join([r.name, h.tag("span", at, class_="at")]), class_="ch-name")]
    if r.tokens:
        bits.append(h.tag("div", _tokens(r.tokens), class_="ch-tok"))
    if transformed and r.tokens_transformed:
        bits.append(h.tag("div", "transformed: " + _tokens(r.tokens_transformed),
                           class_="ch-tok2"))
    if extra:
        bits.append(h.tag("div", extra, class_="ch-tok"))
    bits.append(_effect_badge(r.effect, r.coef_drop if "coef_drop" in r._fields else None))
    return h.tag("div", h.join(bits), class_="ch-node")


def _column(df: pd.DataFrame, stage: str, title: str, sub: str, case_meta: dict) -> h.Html:
    part = df[df["stage"] == stage]
    if stage == "feature transferring":
        part = part.sort_values("effect", ascending=False)
    else:
        part = part.sort_values("score", ascending=False, kind="stable")
    nodes = []
    for r in part.head(SHOW[stage]).itertuples():
        extra = ""
        if r.kind == "attn_layer":
            extra = f"route score {_f(r.score, 3)} (first-order Σ|m| gain it carries)"
        elif r.kind == "head":
            extra = r.detail.replace("attends ", "attends: ") if r.detail else ""
        elif stage == "prediction enhancing":
            extra = f"CNA Δimp {_f(r.score, 3)} · m {_f(r.coef)}"
        nodes.append(_node(r, transformed=stage == "feature enhancing", extra=extra))
    if not nodes:
        nodes.append(h.note("none found"))
    if stage == "prediction enhancing":
        links = sorted(case_meta.get("links") or [], key=lambda x: -(x.get("drop") or 0))[:3]
        if links:
            text = "; ".join(f"{x['src']} → {x['dst']} (|m| −{100 * x['drop']:.0f}%)"
                             for x in links if (x.get("drop") or 0) > 0)
            if text:
                nodes.append(h.tag("div", "enhancing links: " + text, class_="ch-links"))
    head = h.tag("div", title, class_="ch-stage") + h.tag("div", sub, class_="ch-sub")
    return h.tag("div", h.Html(head + h.join(nodes)), class_="ch-col")


def _strip(meta: dict) -> h.Html:
    toks, att = meta.get("tokens") or [], meta.get("head_attention") or []
    start = int(meta.get("question_start") or 0)
    if not toks or len(att) != len(toks):
        return h.Html("")
    cells = [h.tag("span", f"head {meta.get('head', '')} attention:", class_="lab")]
    if start > 0:
        rest = sum(att[:start])
        cells.append(h.tag("span", f"few-shot prefix {100 * rest:.0f}%", class_="ch-t",
                           style=f"background:rgba(11,92,173,{min(1.0, rest):.2f})"))
    for t, a in zip(toks[start:], att[start:], strict=True):
        a = max(0.0, min(1.0, float(a)))
        color = "#fff" if a > 0.5 else "#1d1f23"
        cells.append(h.tag("span", token(t), class_="ch-t",
                           title=f"{100 * a:.1f}%",
                           style=f"background:rgba(11,92,173,{a:.2f});color:{color}"))
    return h.tag("div", h.join(cells), class_="ch-strip")


def diagram(df: pd.DataFrame, meta: dict) -> h.Html:
    """One case's chain: attention strip, four stage columns, the answer."""
    p = math.exp(meta["logp"]) if "logp" in meta else float("nan")
    title = f"{meta.get('question', meta.get('case'))} → ‘{h.visible(meta.get('target', ''))}’"
    info = (f"head {meta.get('head')} · p(target) {p:.2f} · model predicts "
            f"‘{h.visible(meta.get('pred', ''))}’ · deep neurons: {meta.get('ranking', '')}")
    parts: list[Any] = []
    for i, (stage, t, sub) in enumerate(TITLES):
        if i:
            parts.append(h.tag("div", "→", class_="ch-arrow"))
        parts.append(_column(df, stage, t, sub, meta))
    parts.append(h.tag("div", "→", class_="ch-arrow"))
    parts.append(h.tag("div", h.join([h.visible(meta.get("target", "")),
                                      h.tag("small", f"p {p:.2f}")]), class_="ch-out"))
    return h.tag("div", h.join([h.tag("div", title, class_="ch-title"),
                                h.tag("div", info, class_="ch-meta"), _strip(meta),
                                h.tag("div", h.join(parts), class_="ch-grid")]),
                 class_="ch-case")


def element_table(df: pd.DataFrame) -> h.Html:
    head = ["stage", "element", "position", "top tokens", "transformed", "score",
            "zeroed: Δ log p", "zeroed: Δ deep Σ|m|", "detail"]
    rows = [[r.stage, r.name, f"{int(r.position)} ‘{token(r.token)}’"
             if not h.is_missing(r.position) else "",
             (_tokens(r.tokens, 8), {"class_": "mono"}),
             (_tokens(r.tokens_transformed, 8), {"class_": "mono"}), _f(r.score, 3),
             d_logp(r.effect), d_coef(r.coef_drop), token(r.detail)] for r in df.itertuples()]
    return h.tag("div", h.table(head, rows, num_cols=(5, 6, 7), caption=SIGNS),
                 class_="scroll")


SIGNS = ("Signs, here and on the cards: the change when the element alone is zeroed. "
         "log p −0.13: the answer became less likely, so the element helps it; deep Σ|m| "
         "+2.9%: the deep neurons' coefficient sum grew.")


def render(dir: Path, meta: dict[str, Any]) -> str | None:
    df = read_csv(dir, STAGE, required=REQUIRED, text=TEXT)
    if df is None:
        return None
    for c in ("layer", "index", "position", "score", "effect", "coef_drop", "coef"):
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    stage = read_meta(dir, STAGE)
    cases = {str(c.get("case")): c for c in stage.get("cases") or []}
    parts: list[Any] = [STYLE, h.what(
        "The paper's four-stage chain from input to prediction, for single cases: shallow "
        "FFN neurons enhance features, shallow attention layers move them, the arithmetic "
        "head reads them and activates deep FFN neurons, which enhance each other. Each "
        "element is zeroed alone and its effect measured: the change of the answer's "
        "log-probability (green: the element helps) and of the deep neurons' coefficient "
        "sum."),
        h.note("Scores: deep neurons by CNA (imp_a − imp_b, head zeroed in run B); the "
               "other stages by the first-order increase of the deep neurons' Σ|m| along "
               "their route (see cnalens.explain). An attention layer's 'route score' is "
               "that increase for the layer's output at the head's source position, read "
               "through the head: how much of the shallow features the layer carries to the "
               "head, to first order; its measured effect says whether that holds when the "
               "layer is zeroed. 'transformed' = a shallow neuron's vector through its best "
               "route: the attention layer that moves it to the head's source position, or "
               "the head itself when the head reads its position."),
        h.note(SIGNS)]
    if stage.get("seconds") is not None:
        parts.append(h.note(f"time: {h.fmt_seconds(stage['seconds'])}"))
    for case, sub in df.groupby("case", sort=False):
        cm = cases.get(str(case), {"case": case, "question": sub["prompt"].iloc[0],
                                   "target": sub["target"].iloc[0]})
        parts.append(diagram(sub, cm))
        parts.append(h.join(h.interp(x) for x in F.explain_findings(sub, {str(case): cm})))
        parts.append(h.details(f"all {len(sub)} elements of {cm.get('question', case)}",
                               element_table(sub)))
    chosen = (stage.get("settings") or {}).get("chosen") or {}
    if chosen:
        parts.append(h.note("Cases: " + "; ".join(f"{op}: {why}" for op, why in
                                                  chosen.items()) + "."))
    skipped = (stage.get("settings") or {}).get("skipped") or {}
    for op, why in skipped.items():
        parts.append(h.note(f"{op}: not explained ({why})"))
    return "".join(parts)


SECTION = Section(STAGE, "The four-stage chain of single cases", render)
