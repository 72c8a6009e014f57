"""A case file's own labels: kept per case, grouping the summaries (``--group-by``) of eval,
heads and cna, and described as what they are in the report (not as arithmetic)."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from cnalens.cli import main
from cnalens.data import Case, arithmetic_cases, load_cases
from cnalens.errors import CnaError
from cnalens.evaluate import accuracy_table, evaluate, group_keys
from cnalens.heads import top_heads
from cnalens.io import read_json
from cnalens.models import ModelView
from cnalens.pipeline import cases_by_group, cna_stage, eval_stage, heads_stage
from cnalens.report import render_report
from tiny import TinyTokenizer, tiny_model

PROMPTS = ["3+5=", "2+2=", "7-1=", "9-4=", "1+1=", "6+2=", "8-3=", "4+4=", "5-5=", "2+7=",
           "9+0=", "3-2="]


def _write_cases(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _rows(targets: list[str] | None = None) -> list[dict]:
    return [{"prompt": p, "target": (targets or ["8"] * len(PROMPTS))[i],
             "region": "north" if i % 3 else "south", "lang": "en" if i % 2 else "fr"}
            for i, p in enumerate(PROMPTS)]


def _view() -> ModelView:
    return ModelView(tiny_model("llama"), TinyTokenizer())


def _section(page: str, stage: str) -> str:
    """The visible text of one report section."""
    body = page[page.index(f'id="{stage}"'):]
    body = body[:body.index("</section>")] if "</section>" in body else body
    body = re.sub(r"<details.*?</details>", " ", body, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body))


def _run_json(out: Path) -> None:
    (out / "run.json").write_text(json.dumps({"model": {"spec": "tiny-llama"},
                                              "stages": ["eval", "heads", "cna"]}),
                                  encoding="utf-8")


def test_case_file_labels_and_group_keys(tmp_path):
    path = _write_cases(tmp_path / "c.jsonl", _rows())
    cases = load_cases(path)
    assert cases[0].labels == {"region": "south", "lang": "fr"}  # no op/digits/template
    assert group_keys(cases) == []  # no arithmetic keys: one pooled row
    assert group_keys(cases, "region") == ["region"]
    assert group_keys(cases, "lang, region") == ["lang", "region"]
    with pytest.raises(CnaError, match="no label column 'regio'.*region, lang"):
        group_keys(cases, "regio")
    assert group_keys(arithmetic_cases(["+"], [1], n=3)) == ["op", "digits", "template"]
    assert group_keys([Case("3+5=", "8")]) == []
    clash = _write_cases(tmp_path / "clash.jsonl", [{"prompt": "a", "target": "b", "pred": 1}])
    with pytest.raises(CnaError, match="pred clash with result columns"):
        group_keys(load_cases(clash))


def test_eval_keeps_labels_and_groups_the_summary(tmp_path):
    view = _view()
    path = _write_cases(tmp_path / "c.jsonl", _rows())
    cases = load_cases(path)
    out = tmp_path / "ev"
    eval_stage(view, cases, out, {"cases": str(path)}, progress=False, group_by="region")
    per_case = pd.read_csv(out / "eval_cases.csv", lineterminator="\n")  # preds: any char
    assert list(per_case.columns[:3]) == ["case_id", "region", "lang"]
    assert not {"op", "digits", "template"} & set(per_case.columns)
    assert list(per_case.region) == [r["region"] for r in _rows()]
    table = pd.read_csv(out / "eval.csv")
    assert list(table.columns[:2]) == ["region", "n"]
    assert list(table.region) == ["north", "south", "all"] and list(table.n) == [8, 4, 12]
    north = per_case[per_case.region == "north"]
    assert table.acc.iloc[0] == north.correct.mean()
    assert read_json(out / "eval.json")["settings"]["group_by"] == ["region"]

    # no group-by and no arithmetic labels: one pooled row; two keys: the last pooled too
    res = evaluate(view, cases, progress=False)
    pooled = accuracy_table(res)
    assert len(pooled) == 1 and pooled.n.iloc[0] == 12 and "region" not in pooled
    two = accuracy_table(res, keys=["region", "lang"])
    assert list(zip(two.region, two.lang, strict=True)) == [
        ("north", "en"), ("north", "fr"), ("south", "en"), ("south", "fr"),
        ("north", "all"), ("south", "all"), ("all", "all")]


def test_arithmetic_outputs_unchanged(tmp_path):
    view = _view()
    out = tmp_path / "ar"
    cases = arithmetic_cases(["+", "-"], [1], ["eq", "nl"], n=3, shots=1)
    table = eval_stage(view, cases, out, {"ops": ["+", "-"]}, progress=False)
    per_case = pd.read_csv(out / "eval_cases.csv", lineterminator="\n")
    assert list(per_case.columns[:4]) == ["case_id", "op", "digits", "template"]
    assert not {"a", "b", "answer", "words"} & set(per_case.columns)
    assert list(table.columns[:4]) == ["op", "digits", "template", "n"]
    assert table.iloc[-1][["op", "digits", "template"]].tolist() == ["all", 0, "all"]
    _run_json(out)
    text = _section(render_report(out, strict=True).read_text(), "eval")
    assert "Arithmetic accuracy (eval)" in text
    assert "on arithmetic prompts, by operation, operand digits and prompt template" in text


def test_custom_report_describes_its_data(tmp_path):
    view = _view()
    path = _write_cases(tmp_path / "regions.jsonl", _rows())
    out = tmp_path / "ev"
    eval_stage(view, load_cases(path), out, {"cases": str(path)}, progress=False,
               group_by="region")
    _run_json(out)
    for _ in range(2):  # and again from the files alone (cnalens report DIR)
        page = render_report(out, strict=True).read_text()
        text = _section(page, "eval")
        assert "Accuracy (eval)" in text and "Arithmetic" not in text
        assert "arithmetic" not in text and "operand digits" not in text
        assert "on the cases of regions.jsonl, by region" in text
        assert "north" in text and "all (pooled)" in text and "custom" not in text
        assert (out / "plots" / "eval_acc.png").is_file()  # one bar per region
        (out / "report.html").unlink()

    # no label to group by: one pooled row, no chart of one bar
    out2 = tmp_path / "pooled"
    eval_stage(view, load_cases(path), out2, {"cases": str(path)}, progress=False)
    _run_json(out2)
    text = _section(render_report(out2, strict=True).read_text(), "eval")
    assert "all cases pooled" in text and "—" not in text
    assert not (out2 / "plots" / "eval_acc.png").exists()


def test_heads_and_cna_group_by_labels(tmp_path):
    view = _view()
    # targets the tiny model predicts, so that CNA has correctly answered cases
    probe = evaluate(view, [Case(p, "8") for p in PROMPTS], progress=False)
    targets = [p if p.isprintable() and p.strip() else "8" for p in probe.pred]
    path = _write_cases(tmp_path / "c.jsonl", _rows(targets))
    cases = load_cases(path)
    out = tmp_path / "run"
    df = heads_stage(view, cases, out, {"cases": str(path)}, progress=False,
                     group_by="region")
    assert list(df.columns[:3]) == ["layer", "head", "region"]
    assert not {"op", "digits"} & set(df.columns) and set(df.region) == {"north", "south"}
    assert set(top_heads(df, 1).region) == {"north", "south", "all"}
    assert read_json(out / "heads.json")["settings"]["group_by"] == ["region"]
    # no label given: the one group keeps op "custom" (and no arithmetic digits)
    plain = heads_stage(view, cases, tmp_path / "plain", {"cases": str(path)}, progress=False)
    assert set(plain.op) == {"custom"} and "digits" not in plain

    by_region = cases_by_group(cases, ["region"])
    assert sorted(by_region) == ["north", "south"]
    ver = cna_stage(view, out, by_region, dict.fromkeys(by_region, (1, 0)), [2], seeds=1,
                    progress=False, settings={"cases": str(path), "group_by": ["region"]},
                    group_cols=("region",), label_cols=("region", "lang"))
    neurons = pd.read_csv(out / "cna_neurons.csv")
    assert {"region", "lang"} <= set(neurons.columns) and "op" not in neurons
    faith = pd.read_csv(out / "faithfulness.csv")  # per case and neuron: its labels too
    assert {"region", "lang"} <= set(faith.columns) and len(faith)
    cases_lang = {c.case_id: c.labels["lang"] for c in cases}
    assert (faith["lang"] == faith["case"].map(cases_lang)).all()
    assert set(ver.region) <= {"north", "south"} and "op" not in ver
    assert read_json(out / "cna.json")["group_by"] == ["region"]
    _run_json(out)
    page = render_report(out, strict=True).read_text()
    heads_text, cna_text = _section(page, "heads"), _section(page, "cna")
    assert "per region" in heads_text and "arithmetic" not in heads_text
    assert "region = " in cna_text and "arithmetic" not in cna_text
    assert "arithmetic" not in _section(page, "verification")


def test_group_by_checked_before_the_model_loads(capsys, tmp_path):
    path = _write_cases(tmp_path / "c.jsonl", _rows())
    out = tmp_path / "out"
    base = ["--model", "no-such-model", "--cases", str(path), "--group-by", "regio",
            "--out", str(out)]
    for argv in (["eval", *base], ["heads", *base], ["cna", *base, "--head", "0.0"]):
        rc = main(argv)
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if x.strip()]
        assert rc == 2 and len(lines) == 1, err
        assert lines[0].startswith("cnalens: error: --group-by: no label column 'regio'")
    assert not out.exists()


def test_pooled_digits_read_all_outside_arithmetic(tmp_path):
    """A case file labelled op and digits (no template) pools to "all", never digits 0."""
    view = _view()
    rows = [{"prompt": p, "target": "8", "op": p[1], "digits": 1 + i % 2}
            for i, p in enumerate(PROMPTS)]
    cases = load_cases(_write_cases(tmp_path / "c.jsonl", rows))
    assert group_keys(cases) == ["op", "digits"]
    table = accuracy_table(evaluate(view, cases, progress=False))
    pooled = table[table.digits.astype(str) == "all"]
    assert list(pooled.op) == ["+", "-", "all"] and 0 not in set(table.digits)
    assert pooled.n.tolist() == [7, 5, 12]
    arith = accuracy_table(evaluate(view, arithmetic_cases(["+"], [1], n=4), progress=False))
    assert arith.digits.iloc[-1] == 0  # eval.csv's arithmetic rows keep digits 0 = pooled


def test_write_csv_round_trips_a_lone_carriage_return(tmp_path):
    """A predicted token "\r" (text or categorical column) keeps its row; other tables are
    written unquoted, as before; types read back the same."""
    from cnalens.io import write_csv

    df = pd.DataFrame({"pred": ["7", "\r", "a\nb"], "n": [1, 2, 3], "ok": [True, False, True],
                       "x": [0.5, float("nan"), 2.0]})
    for frame in (df, df.assign(pred=df["pred"].astype("category"))):
        write_csv(tmp_path / "t.csv", frame)
        back = pd.read_csv(tmp_path / "t.csv")
        assert len(back) == 3 and list(back["pred"]) == ["7", "\r", "a\nb"]
        assert list(back["n"]) == [1, 2, 3] and back["ok"].dtype == bool
    write_csv(tmp_path / "plain.csv", df.iloc[[0]])
    assert (tmp_path / "plain.csv").read_text() == "pred,n,ok,x\n7,1,True,0.5\n"
