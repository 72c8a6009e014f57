"""The command line: one error line and a non-zero exit on bad input; real runs."""

import pandas as pd
import pytest

from cnalens.cli import main


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
    (["eval", "--dtype", "int3"], "int3"),
    (["eval", "--no-such-option"], "No such option"),
    (["run", "arithmetic", "--profile", "huge"], "unknown profile 'huge'"),
    (["heads", "--model", "smollm2-135m", "--heads", "99.0"], "out of range"),
    (["heads", "--model", "smollm2-135m", "--layers", "3-40"], "out of range"),
    (["heads", "--method", "magic"], "unknown method"),
    (["cna", "--model", "smollm2-135m"], "no --head"),
    (["cna", "--model", "smollm2-135m", "--head", "3.99"], "out of range"),
    (["report", "/no/such/results"], "run.json missing"),
])
def test_bad_input_one_line(capsys, tmp_path, argv, msg):
    out = tmp_path / "out"
    rc, _, err = run(capsys, *argv, *(["--out", str(out)] if argv[0] != "report" else []))
    assert rc != 0
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in err
    assert not out.exists()  # nothing half-written


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
    if (res / "verification.csv").exists():  # only if some case is answered correctly
        ver = pd.read_csv(res / "verification.csv")
        assert set(ver.experiment) == {"zero_topk", "keep_topk", "coef_drop_head",
                                       "coef_drop_lowest", "heldout_zero_topk"}
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
