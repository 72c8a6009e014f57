"""The command line: one error line and a non-zero exit on bad input; real runs."""

import json

import pandas as pd
import pytest

from cnalens import cli
from cnalens.cli import flag_message, main
from cnalens.errors import CnaError


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("argv, msg", [
    (["eval", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["eval", "--model", "/no/such/dir"], "does not exist"),
    (["eval", "--ops", ",", "--model", "smollm2-135m"], "--ops: empty list"),
    (["eval", "--digits", "x"], "--digits: 'x' is not an integer"),
    (["eval", "--cases", "/no/such.jsonl"], "case file not found"),
    (["eval", "--device", "tpu"], "tpu"),
    (["eval", "--dtype", "int3"], "'int3' is not one of"),
    (["eval", "--no-such-option"], "No such option"),
    (["run", "arithmetic", "--profile", "huge"], "'huge' is not one of 'quick', 'full'"),
    (["heads", "--model", "smollm2-135m", "--heads", "99.0"], "out of range"),
    (["heads", "--model", "smollm2-135m", "--layers", "3-40"], "out of range"),
    (["heads", "--method", "magic"], "'magic' is not one of 'zero', 'mean', 'attribution'"),
    (["heads", "--metric", "f1"], "--metric"),
    (["heads", "--model", "gemma3-270m", "--layers", "3-40"], "layer 18 out of range"),
    (["cna", "--by", "foo", "--head", "1.1"], "'foo' is not one of 'decrease', 'increase'"),
    (["neuron", "--model", "smollm2-135m", "3.99999"], "neuron 3.99999 out of range"),
    (["neuron", "--model", "smollm2-135m", "3.1", "--sign", "up"], "--sign"),
    (["shallow", "--model", "smollm2-135m", "--head", "40.1"], "layer 40 out of range"),
    (["shallow", "--transforms", "some"], "--transforms"),
    (["explain", "--model", "smollm2-135m", "3+5=", "--head", "3.9"], "head 3.9 out of range"),
    (["lora", "--model", "smollm2-135m", "--layer", "30"], "layer 30 out of range"),
    (["lora", "--profile", "huge"], "--profile"),
    (["lora", "--model", "smollm2-135m", "--sweep-layers", "2,40"], "layer 40 out of range"),
    (["debias", "--model", "smollm2-135m", "--layers", "0-30"], "layer 30 out of range"),
    (["cna", "--model", "smollm2-135m"], "no --head"),
    (["cna", "--model", "smollm2-135m", "--head", "3.99"], "out of range"),
    (["cna", "--head", "1.1", "--digits", "5"], "--digits takes 1, 2 or 3"),
    (["cna", "--head", "1.1", "--positions", "all,all"], "--positions takes"),
    (["cna", "--head", "1.1", "--positions", "first"], "--positions takes"),
    (["cna", "--head", "1.1", "--cases", "x.jsonl", "--negative"], "not with --cases"),
    (["report", "/no/such/results"], "run.json missing"),
])
def test_bad_input_one_line(capsys, tmp_path, monkeypatch, argv, msg):
    """From a cold model cache: one error line, found before any model is converted."""
    monkeypatch.setenv("CNALENS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    rc, _, err = run(capsys, *argv, *(["--out", str(out)] if argv[0] != "report" else []))
    assert rc != 0
    lines = [x for x in err.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("cnalens: error: ")]
    assert len(errors) == 1 and msg in errors[0] and "Traceback" not in err
    assert all(x.startswith("cnalens: ") for x in lines)  # the rest: one-line notices
    assert not out.exists()  # nothing half-written
    assert not (tmp_path / "cache" / "models").exists()  # nothing converted


@pytest.mark.parametrize("message, argv, shown", [
    ("top must be at least 1", ["explain", "3+5="], "--top must be at least 1"),
    ("give exactly one of keep_top and prune_fraction", ["prune"],
     "give exactly one of --keep-top and --prune-fraction"),
    ("ops: empty list", ["eval"], "--ops: empty list"),
    ("heads: 'x' is not of the form L.H", ["heads"], "--heads: 'x' is not of the form L.H"),
    ("seeds must be at least 1", ["run", "arithmetic"], "seeds must be at least 1"),  # no flag
    ("layer 40 out of range", ["lora", "--sweep-layers", "2,40"], "layer 40 out of range"),
    ("no heads_attribution.csv in x", ["heads"], "no heads_attribution.csv in x"),
    ("top must be at least 1", ["no-such-command"], "top must be at least 1"),
])
def test_flag_message(message, argv, shown):
    """Library errors name Python parameters; the CLI shows the command's flags."""
    assert flag_message(message, argv) == shown


def test_library_error_shows_the_flag(capsys, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise CnaError("batch_size must be at least 1, not 0")

    monkeypatch.setattr(cli, "load_view", fail)
    rc, _, err = run(capsys, "eval", "--model", "smollm2-135m", "--out", str(tmp_path / "o"))
    assert (rc, err) == (2, "cnalens: error: --batch-size must be at least 1, not 0\n")


@pytest.mark.real
def test_first_use_notices_then_one_error_line(capsys, tmp_path, monkeypatch):
    """A conversion on first use prints ``cnalens:`` notices, each on one line; an error
    after the load is still exactly one ``cnalens: error:`` line."""
    monkeypatch.setenv("CNALENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "40")  # long notices must not wrap
    rc, _, err = run(capsys, "explain", "--model", "smollm2-135m", "3+5=", "--head", "3.1",
                     "--target", " eight hundred", "--out", str(tmp_path / "out"))
    lines = [x for x in err.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("cnalens: error: ")]
    notices = [x for x in lines if not x.startswith("cnalens: error: ")]
    assert rc == 2 and len(errors) == 1 and "target" in errors[0], err
    assert [x.split(":")[1].split()[0] for x in notices] == ["first", "converted"], err
    assert all(x.startswith("cnalens: ") for x in notices)
    assert not (tmp_path / "out").exists()
    rc, _, err = run(capsys, "explain", "--model", "smollm2-135m", "3+5=", "--head", "3.1",
                     "--target", " eight hundred", "--out", str(tmp_path / "out"))
    assert rc == 2 and len(err.strip().splitlines()) == 1  # warm cache: no notices


def test_corrupt_gguf(capsys, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    rc, _, err = run(capsys, "info", "--model", str(bad))
    assert rc == 2 and "cannot read GGUF" in err and len(err.strip().splitlines()) == 1


def test_multi_token_answers_are_flagged(capsys, tmp_path):
    cases = tmp_path / "c.jsonl"
    cases.write_text('{"prompt": "The capital of France is", "target": " Paris, France"}\n')
    rc, out, err = run(capsys, "eval", "--model", "smollm2-135m", "--cases", str(cases),
                       "--out", str(tmp_path / "o"), "-q")
    assert rc == 0, err
    per_case = pd.read_csv(tmp_path / "o" / "eval_cases.csv")
    assert per_case.n_answer_tokens.iloc[0] > 1


@pytest.mark.real
def test_eval_and_run_real(capsys, tmp_path):
    out = tmp_path / "ev"
    rc, stdout, err = run(capsys, "eval", "--model", "smollm2-135m", "--ops", "+,-",
                          "--digits", "1", "--n", "12", "--out", str(out), "-q")
    assert rc == 0, err
    table = pd.read_csv(out / "eval.csv")
    for col in ["op", "digits", "template", "n", "acc", "acc_lo", "acc_hi", "acc_first",
                "logp"]:
        assert col in table.columns
    assert set(table.op) == {"+", "-", "all"} and (table.n > 0).all()
    assert "Arithmetic accuracy" in (out / "report.html").read_text()
    assert "accuracy" in stdout or "accuracy" in err

    res = tmp_path / "run"
    rc, _, err = run(capsys, "run", "arithmetic", "--model", "smollm2-135m", "--profile",
                     "smoke", "--out", str(res), "-q")
    assert rc == 0, err
    html = (res / "report.html").read_text()
    assert "smollm2-135m" in html and "data:image/png;base64," in html
    heads = pd.read_csv(res / "heads.csv")
    assert len(heads) == 30 * 9 * 4
    assert ((heads["drop"] - (heads.acc_orig - heads.acc_ablated)).abs() < 1e-9).all()
    assert heads.groupby("op").acc_orig.nunique().eq(1).all()  # one baseline per op
    # smollm2 answers some of the smoke profile's 8 CNA additions (3 with seed 0): the CNA
    # stage runs on those and verifies its neurons
    plus = json.loads((res / "cna.json").read_text())["per_op"]["+"]
    assert plus["n"] >= 1 and plus["n"] + plus["skipped_wrong"] == 8
    ver = pd.read_csv(res / "verification.csv", dtype={"op": str})
    assert set(ver.experiment) == {"zero_topk", "keep_topk", "coef_drop_head",
                                   "coef_drop_lowest", "heldout_zero_topk",
                                   "mediation_restore_acc", "mediation_restore_logp",
                                   "mediation_reproduce_acc", "mediation_reproduce_logp"}
    assert set(ver.op) == {"+"} and (ver.n > 0).all() and ver.value.notna().any()
    # the smoke profile verifies at every position and at the scored ones; too few cases
    # for a verdict
    assert set(ver.positions) == {"all", "last"}
    assert set(ver.verdict) == {"cannot be judged"}
    assert "Verification of the CNA neurons" in html
    (res / "report.html").unlink()
    rc, _, err = run(capsys, "report", str(res))
    assert rc == 0 and (res / "report.html").exists()


@pytest.mark.real
def test_info_real(capsys):
    rc, out, err = run(capsys, "info", "--model", "smollm2-135m")
    assert rc == 0, err
    assert "n_kv_heads" in out and "30" in out


@pytest.mark.real
def test_cna_on_a_case_file(capsys, tmp_path):
    cases = tmp_path / "c.jsonl"
    cases.write_text('{"prompt": "1+1=2\\n4+2=6\\n3+5=", "target": "8"}\n'
                     '{"prompt": "2+5=7\\n3+9=12\\n4+4=", "target": "8"}\n')
    out = tmp_path / "cna"
    rc, _, err = run(capsys, "cna", "--model", "smollm2-135m", "--cases", str(cases),
                     "--head", "28.1", "--top-k", "3", "--seeds", "1", "--out", str(out), "-q")
    assert rc == 0, err
    neurons = pd.read_csv(out / "cna_neurons.csv")
    assert "Verification of the CNA neurons" in (out / "report.html").read_text()
    assert set(neurons.op) == {"custom"} and (neurons.layer >= 28).all()
    # ranks follow imp_a - imp_b within each case
    for _, g in neurons.groupby("case"):
        d = (g.sort_values("rank").imp_a - g.sort_values("rank").imp_b).to_numpy()
        assert (d[:-1] >= d[1:] - 1e-6).all()


@pytest.mark.real
def test_heads_with_robustness(capsys, tmp_path):
    out = tmp_path / "h"
    rc, stdout, err = run(capsys, "heads", "--model", "smollm2-135m", "--ops", "+",
                          "--layers", "29", "--n", "10", "--robustness", "--out", str(out),
                          "-q")
    assert rc == 0, err
    rob = pd.read_csv(out / "heads_robustness.csv")
    assert len(rob) == 3 and rob.n_heads.eq(9).all()
    assert rob.spearman_dlogp.between(-1, 1).all()
    page = (out / "report.html").read_text()
    assert "Robustness across prompt formats" in page and "top heads" in stdout


@pytest.mark.real
def test_heads_attribution_beside_an_exact_scan(capsys, tmp_path):
    out = tmp_path / "h"
    rc, _, err = run(capsys, "heads", "--model", "smollm2-135m", "--ops", "+", "--layers",
                     "1", "--n", "8", "--out", str(out), "-q")
    assert rc == 0, err
    exact = (out / "heads.csv").read_bytes()
    rc, stdout, err = run(capsys, "heads", "--model", "smollm2-135m", "--ops", "+", "--n", "8",
                          "--method", "attribution", "--out", str(out), "-q")
    assert rc == 0, err
    assert (out / "heads.csv").read_bytes() == exact  # the estimate never replaces it
    att = pd.read_csv(out / "heads_attribution.csv")
    assert len(att) == 30 * 9 and att.dlogp_est.notna().all()
    summ = pd.read_json(out / "heads_attribution.json", typ="series")
    assert summ["vs_exact"][0]["n_heads"] == 9
    assert "attribution vs the exact scan" in stdout
    page = (out / "report.html").read_text()
    assert "attribution pre-scan" in page and "Agreement with the exact scan" in page
