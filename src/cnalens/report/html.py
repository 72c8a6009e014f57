"""The report page: small HTML helpers for the sections, the header and the page shell.

Section modules build their HTML with the helpers here. Every helper escapes what it is given
unless the value is wrapped in :class:`Html` (already-safe markup), so data from CSV files can
never break the page. Nothing on the page loads anything from outside: CSS is inline, images
are data URIs, there is no script.
"""

from __future__ import annotations

import html as _html
import json
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any


class Html(str):
    """A string that is already HTML and must not be escaped again."""


def esc(value: Any) -> Html:
    """Escape ``value`` for HTML text or attributes (``Html`` passes through unchanged)."""
    if isinstance(value, Html):
        return value
    return Html(_html.escape("" if value is None else str(value), quote=True))


def join(parts: Iterable[Any], sep: str = "") -> Html:
    return Html(sep.join(esc(p) for p in parts))


def tag(name: str, content: Any = "", **attrs: Any) -> Html:
    """``<name attr="...">content</name>``; ``class_`` gives ``class``; None attrs are dropped."""
    at = "".join(
        f' {k.rstrip("_").replace("_", "-")}="{esc(v)}"' for k, v in attrs.items() if v is not None
    )
    return Html(f"<{name}{at}>{esc(content)}</{name}>")


# ---------------------------------------------------------------- number formatting


def is_missing(x: Any) -> bool:
    if x is None:
        return True
    try:
        return math.isnan(float(x))
    except (TypeError, ValueError):
        return False


def fmt_pct(x: Any, decimals: int = 1) -> str:
    """0.71 -> '71.0%'; missing -> '—'."""
    if is_missing(x):
        return "—"
    return f"{float(x) * 100:.{decimals}f}%"


def fmt_acc(acc: Any, lo: Any = None, hi: Any = None) -> str:
    """Accuracy with its 95% interval: '71.0% [62.1, 78.6]' (fractions in, percentages out)."""
    if is_missing(acc):
        return "—"
    s = fmt_pct(acc)
    if not is_missing(lo) and not is_missing(hi):
        s += f" [{float(lo) * 100:.1f}, {float(hi) * 100:.1f}]"
    return s


def fmt_num(x: Any, decimals: int = 2) -> str:
    if is_missing(x):
        return "—"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) >= 1000):
        return f"{int(x):,}"
    try:
        return f"{float(x):.{decimals}f}".replace("-", "−")
    except (TypeError, ValueError):
        return str(x)


def fmt_int(x: Any) -> str:
    if is_missing(x):
        return "—"
    try:
        return f"{int(x):,}"
    except (TypeError, ValueError):
        return str(x)


def fmt_seconds(s: Any) -> str:
    """4.2 -> '4.2 s', 185 -> '3 min 05 s', 3725 -> '1 h 02 min'."""
    if is_missing(s):
        return "—"
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def fmt_time(iso: Any) -> str:
    if not iso:
        return "—"
    try:
        return datetime.fromisoformat(str(iso)).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return str(iso)


# ---------------------------------------------------------------- tokens

_REPR_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[ntr\\'\"])")
_SIMPLE = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"'}
# categories shown by code point: controls, format (zero-width joiners, marks), separators
# other than the plain space, private use, unassigned
_HIDDEN = {"Cc", "Cf", "Co", "Cn", "Zl", "Zp"}


def unrepr(text: str) -> str:
    """Undo Python ``repr`` escapes (``\\u200d`` -> the character), as files that list
    tokens escaped with ``repr`` hold them."""
    def sub(m: re.Match) -> str:
        e = m.group(1)
        return _SIMPLE[e] if e in _SIMPLE else chr(int(e[1:], 16))
    return _REPR_ESCAPE.sub(sub, text)


def visible(token: Any) -> str:
    """A token with every invisible character shown: line ends as ↵, tabs as →, other
    control, format and separator characters as ⟨U+XXXX⟩ (spaces stay spaces)."""
    out = []
    for ch in "" if token is None else str(token):
        if ch == "\n":
            out.append("↵")
        elif ch == "\t":
            out.append("→")
        elif unicodedata.category(ch) in _HIDDEN or (ch.isspace() and ch != " "):
            out.append(f"⟨U+{ord(ch):04X}⟩")
        else:
            out.append(ch)
    return "".join(out)


# ---------------------------------------------------------------- blocks


def p(text: Any, class_: str | None = None) -> Html:
    return tag("p", text, class_=class_)


def what(text: Any) -> Html:
    """The one-sentence 'what this shows' line under a section title."""
    return tag("p", text, class_="what")


def note(text: Any) -> Html:
    return tag("p", text, class_="note")


def interp(text: Any) -> Html:
    """One line of interpretation under a table or a figure: what its numbers mean."""
    return tag("p", text, class_="interp") if text else Html("")


def findings_box(groups: Sequence[tuple[str, Sequence[str]]], notes: Sequence[str] = ()
                 ) -> Html:
    """The report's opening summary: (heading, sentences) groups as lists, then notes."""
    body = "".join(tag("h3", t) + tag("ul", join(tag("li", x) for x in lines))
                   for t, lines in groups if lines)
    return Html(f'<section id="findings" class="findings">{tag("h2", "Findings")}'
                f'{join(note(n) for n in notes)}{body}</section>')


def table(
    head: Sequence[Any],
    rows: Iterable[Sequence[Any]],
    *,
    num_cols: Iterable[int] = (),
    caption: Any = None,
    class_: str | None = None,
) -> Html:
    """A table; a cell (or header) may be a plain value or a ``(value, {attr: ...})`` pair
    (title, style, rowspan, class_). Columns in ``num_cols`` (indices into each row as given)
    are right-aligned with tabular digits."""
    num = set(num_cols)
    out = [f'<table class="{esc(class_ or "")}">' if class_ else "<table>"]
    if caption is not None:
        out.append(tag("caption", caption))
    out.append("<thead><tr>")
    for i, h in enumerate(head):
        attrs = {}
        if isinstance(h, tuple):
            h, attrs = h
            attrs = dict(attrs)
        cls = " ".join(c for c in ("num" if i in num else "", attrs.pop("class_", "")) if c)
        out.append(tag("th", h, class_=cls or None, **attrs))
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>")
        for i, cell in enumerate(row):
            attrs: dict[str, Any] = {}
            if isinstance(cell, tuple):
                cell, attrs = cell
                attrs = dict(attrs)
            cls = " ".join(c for c in ("num" if i in num else "", attrs.pop("class_", "")) if c)
            out.append(tag(attrs.pop("tag", "td"), cell, class_=cls or None, **attrs))
        out.append("</tr>")
    out.append("</tbody></table>")
    return Html("".join(out))


def kv_table(pairs: Iterable[tuple[Any, Any]], class_: str = "kv") -> Html:
    """A two-column key/value table (keys as row headers)."""
    rows = "".join(f"<tr>{tag('th', k)}{tag('td', v)}</tr>" for k, v in pairs)
    return Html(f'<table class="{esc(class_)}"><tbody>{rows}</tbody></table>')


def pre_visible(text: str, title: Any = None) -> Html:
    """A ``<pre>`` block where line ends (↵) and trailing spaces (·) are visible."""
    lines = str(text).split("\n")
    out = []
    for i, line in enumerate(lines):
        body = line.rstrip(" ")
        trail = len(line) - len(body)
        s = str(esc(body).replace("\t", '<span class="ws">→</span>\t'))
        if trail:
            s += f'<span class="ws">{"·" * trail}</span>'
        if i < len(lines) - 1:
            s += '<span class="ws">↵</span>\n'
        out.append(s)
    head = tag("div", title, class_="pre-title") if title is not None else ""
    return Html(f'<div class="pre-box">{head}<pre>{"".join(out)}</pre></div>')


def figure(uri: str, alt: str, caption: Any = None) -> Html:
    """An embedded image (``uri`` a data URI from :func:`cnalens.report.plots.embed`)."""
    if not uri.startswith("data:image/"):
        raise ValueError("report images must be data URIs")
    cap = tag("figcaption", caption) if caption is not None else ""
    return Html(f'<figure><img src="{esc(uri)}" alt="{esc(alt)}">{cap}</figure>')


def details(summary: Any, body: Any, open_: bool = False) -> Html:
    o = " open" if open_ else ""
    return Html(f"<details{o}>{tag('summary', summary)}{esc(body)}</details>")


def error_box(title: str, message: Any) -> Html:
    return Html(f'<div class="error">{tag("strong", title)} {tag("code", message)}</div>')


def shade(frac: Any) -> str | None:
    """A soft background for an accuracy cell (white at 0%, light green at 100%)."""
    if is_missing(frac):
        return None
    f = min(1.0, max(0.0, float(frac)))
    return f"background:hsl(145,55%,{97 - 22 * f:.0f}%)"


# ---------------------------------------------------------------- page

CSS = """
:root{--fg:#1d1f23;--muted:#667085;--line:#e4e7ec;--bg:#fff;--soft:#f7f8fa;--accent:#0b5cad}
*{box-sizing:border-box}
body{margin:0;background:var(--soft);color:var(--fg);font:14px/1.5 system-ui,-apple-system,
"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1180px;margin:0 auto;padding:28px 28px 60px}
header.top{background:var(--bg);border:1px solid var(--line);border-radius:10px;padding:20px 24px}
h1{font-size:21px;margin:0 0 2px;font-weight:650}
h2{font-size:17px;margin:0 0 4px;font-weight:650}
h3{font-size:14px;margin:22px 0 8px;font-weight:600}
.sub{color:var(--muted);margin:0 0 14px}
.facts{display:flex;flex-wrap:wrap;gap:8px 28px;margin:12px 0 16px}
.fact .k{display:block;color:var(--muted);font-size:11.5px;text-transform:uppercase;
letter-spacing:.04em}
.fact .v{font-weight:600}
.cols{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:18px}
@media (max-width:900px){.cols{grid-template-columns:1fr}}
section{background:var(--bg);border:1px solid var(--line);border-radius:10px;
padding:18px 24px 20px;margin-top:18px}
.what{color:var(--muted);margin:0 0 12px;max-width:85ch}
.interp{margin:6px 0 14px;padding:6px 10px;border-left:3px solid var(--accent);
background:#f3f7fc;max-width:95ch}
.interp::before{content:"What it means: ";font-weight:600;color:var(--accent)}
.interp+.interp{margin-top:-8px;border-top:none}
section.findings{border-color:#b2ccea;border-width:2px}
section.findings ul{margin:4px 0 10px;padding-left:20px}
section.findings li{margin:3px 0;max-width:110ch}
section.findings h3{margin:12px 0 2px}
.note{color:var(--muted);font-size:12.5px;margin:6px 0}
nav.toc{margin-top:14px;padding-top:10px;border-top:1px solid var(--line);font-size:13px}
nav.toc::before{content:"Sections";color:var(--muted);margin-right:14px;font-size:11.5px;
text-transform:uppercase;letter-spacing:.04em}
nav.toc a{color:var(--accent);text-decoration:none;margin-right:16px}
code,pre{font:12.5px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
code.cmd{display:block;background:var(--soft);border:1px solid var(--line);border-radius:6px;
padding:8px 10px;white-space:pre-wrap;word-break:break-all}
table{border-collapse:collapse;font-size:12.5px;margin:4px 0 8px}
caption{caption-side:bottom;text-align:left;color:var(--muted);font-size:12px;padding-top:6px}
th,td{padding:4px 9px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
thead th{border-bottom:2px solid #cfd4dc;font-weight:600;white-space:nowrap}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.grp{font-weight:600;white-space:nowrap}
td.pooled,th.pooled{border-left:2px solid #cfd4dc}
td.aux,th.aux{color:#475467}
td.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px;
white-space:pre-wrap;word-break:break-word}
td.bad{color:#b42318}
td.exp{min-width:230px}
.rand{color:var(--muted);font-size:11.5px}
tr.total td{border-top:2px solid #cfd4dc;font-weight:600}
table.kv th{color:var(--muted);font-weight:500;white-space:nowrap;padding-left:0}
table.kv td{font-variant-numeric:tabular-nums}
.scroll{overflow-x:auto}
figure{margin:10px 0 4px}
figure img{max-width:100%;height:auto;display:block}
figcaption{color:var(--muted);font-size:12px;margin-top:4px}
.pre-grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:12px}
.pre-box{border:1px solid var(--line);border-radius:6px;background:var(--soft);overflow:hidden}
.pre-title{font-size:12px;font-weight:600;padding:5px 10px;border-bottom:1px solid var(--line);
background:#eef1f5}
.pre-box pre{margin:0;padding:8px 10px;max-height:260px;overflow:auto;white-space:pre-wrap;
word-break:break-word}
.ws{color:#b0b7c3;user-select:none}
details summary{cursor:pointer;color:var(--accent);margin:8px 0}
.badge{display:inline-block;border-radius:99px;padding:1px 9px;font-size:12px;font-weight:600;
background:#eef1f5;color:#344054;vertical-align:2px;margin-left:6px}
.badge.warn{background:#fef0c7;color:#93370d}
.error{background:#fef3f2;border:1px solid #fecdca;color:#912018;border-radius:6px;
padding:8px 12px}
footer{color:var(--muted);font-size:12px;margin-top:22px;text-align:center}
@media print{body{background:#fff}section,header.top{border:none;padding:0}
.pre-box pre{max-height:none}}
"""


def _model_rows(model: Mapping[str, Any]) -> list[tuple[Any, Any]]:
    def g(k: str) -> Any:
        return model.get(k)

    heads = fmt_int(g("n_heads"))
    if not is_missing(g("n_kv_heads")) and g("n_kv_heads") != g("n_heads"):
        heads += f" (KV {fmt_int(g('n_kv_heads'))})"
    rows: list[tuple[Any, Any]] = [
        ("model", g("spec") or "—"),
        ("family / type", " / ".join(str(x) for x in (g("family"), g("model_type")) if x) or "—"),
        ("layers", fmt_int(g("n_layers"))),
        ("heads", heads),
        ("head dim", fmt_int(g("head_dim"))),
        ("d_model / d_ffn", f"{fmt_int(g('d_model'))} / {fmt_int(g('d_ffn'))}"),
        ("vocab", fmt_int(g("vocab_size"))),
        ("dtype / device", " / ".join(str(x) for x in (g("dtype"), g("device")) if x) or "—"),
        ("source", g("source") or "—"),
    ]
    sha = g("gguf_sha256")
    if sha:
        rows.append(("GGUF sha256", tag("code", f"{str(sha)[:16]}…", title=sha)))
    return rows


def _setting_value(v: Any) -> Any:
    if isinstance(v, (dict, list, tuple)):
        return tag("code", json.dumps(v, default=str))
    if v is None:
        return "—"
    return v


def header(
    run: Mapping[str, Any], dir_label: str, stage_seconds: Mapping[str, Any], toc: Any = "",
    details_after: bool = False,
) -> Html | tuple[Html, Html]:
    """The top of the page: what was run, how, how long, and on which model.

    ``details_after``: return (top, run details) apart, so that the findings can come
    between the command and the model and stage tables."""
    model = run.get("model") or {}
    finished = run.get("finished")
    status = (
        tag("span", "finished", class_="badge")
        if finished
        else tag(
            "span",
            "not finished",
            class_="badge warn",
            title="run.json has no finish time: the run was interrupted or is still going",
        )
    )
    title = Html(f"{esc(model.get('spec') or 'cnalens run')} {status}")
    facts = [
        ("profile", run.get("profile") or "—"),
        ("total time", fmt_seconds(run.get("seconds"))),
        ("started", fmt_time(run.get("started"))),
        ("finished", fmt_time(finished)),
        ("cnalens", run.get("cnalens_version") or "—"),
    ]
    facts_html = join(
        tag("div", Html(tag("span", k, class_="k") + tag("span", v, class_="v")), class_="fact")
        for k, v in facts
    )
    stages = list(run.get("stages") or [])
    stage_rows = [
        (st, fmt_seconds(stage_seconds.get(st)) if st in stage_seconds else "—") for st in stages
    ]
    settings = run.get("settings") or {}
    right = Html(
        tag("h3", "Stages")
        + (
            table(["stage", "time"], stage_rows, num_cols=[1])
            if stage_rows
            else note("none listed")
        )
    )
    if settings:
        right = Html(
            right
            + details(
                f"Settings ({len(settings)})",
                kv_table((k, _setting_value(v)) for k, v in sorted(settings.items())),
            )
        )
    top = (tag("h1", title) + p(f"cnalens report · {dir_label}", class_="sub")
           + tag("code", run.get("command") or "—", class_="cmd")
           + tag("div", facts_html, class_="facts"))
    cols = ('<div class="cols"><div>' + tag("h3", "Model") + kv_table(_model_rows(model))
            + f"</div><div>{right}</div></div>")
    if details_after:
        return (Html(f'<header class="top">{top}{esc(toc)}</header>'),
                Html(f'<section id="run">{tag("h2", "Model and stages")}{cols}</section>'))
    return Html(f'<header class="top">{top}{cols}{esc(toc)}</header>')


def section(stage: str, title: str, body: Any) -> Html:
    return Html(f'<section id="{esc(stage)}">{tag("h2", title)}{esc(body)}</section>')


def _unique_ids(stages: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for st in stages:
        seen[st] = seen.get(st, 0) + 1
        out.append(st if seen[st] == 1 else f"{st}-{seen[st]}")
    return out


def page(
    run: Mapping[str, Any],
    dir_label: str,
    sections: Sequence[tuple[str, str, str]],
    stage_seconds: Mapping[str, Any],
    generated: str,
    findings: str = "",
) -> str:
    """The whole document; ``sections`` are (stage, title, body html) in display order,
    after ``findings`` (the opening summary, :func:`findings_box`)."""
    model = (run.get("model") or {}).get("spec") or "run"
    ids = _unique_ids([s for s, _, _ in sections])
    titled = list(zip(ids, [t for _, t, _ in sections], [b for _, _, b in sections], strict=True))
    links = [tag("a", t, href=f"#{i}") for i, t, _ in titled]
    if findings:
        links[:0] = [tag("a", "Findings", href="#findings"),
                     tag("a", "Model and stages", href="#run")]
    toc = tag("nav", join(links), class_="toc")
    body = join(section(i, t, Html(b)) for i, t, b in titled)
    if not sections:
        toc = ""
        body = tag("section", note("No stage results found in this folder yet."))
    foot = tag("footer", f"generated by cnalens {run.get('cnalens_version') or ''} · {generated}")
    if findings:  # the command, then what was found, then the model and stage tables
        head, details = header(run, dir_label, stage_seconds, toc, details_after=True)
        top = Html(head + findings + details)
    else:
        top = header(run, dir_label, stage_seconds, toc)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(f'cnalens report — {model}')}</title><style>{CSS}</style></head>"
        f"<body><main>{top}{body}{foot}</main>"
        "</body></html>\n"
    )
