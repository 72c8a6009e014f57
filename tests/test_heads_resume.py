"""Head scan: an interrupted scan resumes to the same table; a scan sharded over two
processes (torch.distributed, gloo, CPU) merges to the single-process table."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import cnalens.heads as H
from cnalens.data import encode_all
from cnalens.pipeline import heads_stage
from test_heads import _cases, _view

TESTS = Path(__file__).parent
SCAN_FAST = H.scan_fast


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


class Boom(RuntimeError):
    pass


def _interrupting(monkeypatch, after: int) -> list:
    """Make scan_fast raise on its call number ``after + 1``; returns the heads scanned."""
    real, calls = SCAN_FAST, []

    def fake(view, enc, heads, *a, **k):
        if len(calls) == after:
            raise Boom
        calls.append(list(heads))
        return real(view, enc, heads, *a, **k)
    monkeypatch.setattr(H, "scan_fast", fake)
    return calls


@pytest.mark.parametrize("method", ["zero", "mean"])
def test_interrupted_scan_resumes_to_same_table(tmp_path, monkeypatch, method):
    v = _view("llama")
    enc = encode_all(v.tokenizer, _cases(v))
    full = H.scan_heads(v, enc, method=method, progress=False)
    monkeypatch.setattr(H, "CHECKPOINT_HEADS", v.n_heads)  # one layer per checkpoint file
    monkeypatch.setattr(H, "CHECKPOINT_FILES", 10**6)
    ck = tmp_path / "heads.partial"
    calls = _interrupting(monkeypatch, 1)
    with pytest.raises(Boom):
        H.scan_heads(v, enc, method=method, progress=False, checkpoint=ck)
    assert calls == [[(0, h) for h in range(v.n_heads)]]
    files = list(ck.glob("*/layers_*.pt"))
    assert [f.name for f in files] == ["layers_0.pt"]
    assert not list(ck.glob("*/.*.tmp"))  # no temp files left behind
    # resume: layer 0 is loaded, layers 1 and 2 scanned
    calls = _interrupting(monkeypatch, 99)
    df = H.scan_heads(v, enc, method=method, progress=False, checkpoint=ck, resume=True)
    assert calls == [[(layer, h) for h in range(v.n_heads)] for layer in (1, 2)]
    pd.testing.assert_frame_equal(df, full, check_exact=True)
    assert df.attrs["meta"]["resumed_heads"] == v.n_heads
    # everything done: nothing is recomputed
    calls = _interrupting(monkeypatch, 99)
    again = H.scan_heads(v, enc, method=method, progress=False, checkpoint=ck, resume=True)
    assert calls == []
    pd.testing.assert_frame_equal(again, full, check_exact=True)
    # without resume the old partial results are discarded
    calls = _interrupting(monkeypatch, 99)
    H.scan_heads(v, enc, method=method, progress=False, checkpoint=ck)
    assert len(calls) == v.n_layers
    # another metric (or cases, model, method) has another fingerprint: not reused
    calls = _interrupting(monkeypatch, 99)
    H.scan_heads(v, enc, method=method, metric="acc_first", progress=False, checkpoint=ck,
                 resume=True)
    assert len(calls) == v.n_layers


def test_resume_subset_and_naive(tmp_path, monkeypatch):
    v = _view("gpt2")
    enc = encode_all(v.tokenizer, _cases(v))
    monkeypatch.setattr(H, "CHECKPOINT_HEADS", 1)
    monkeypatch.setattr(H, "CHECKPOINT_FILES", 10**6)
    ck = tmp_path / "p"
    part = H.scan_heads(v, enc, layers=[1], progress=False, fast=False, checkpoint=ck)
    df = H.scan_heads(v, enc, progress=False, fast=False, checkpoint=ck, resume=True)
    assert df.attrs["meta"]["resumed_heads"] == v.n_heads  # layer 1 from the subset scan
    full = H.scan_heads(v, enc, progress=False)
    pd.testing.assert_frame_equal(df, full, atol=1e-6)
    pd.testing.assert_frame_equal(part, full[full.layer == 1].reset_index(drop=True),
                                  atol=1e-6)


def test_heads_stage_resume_removes_partial(tmp_path, monkeypatch):
    v = _view("llama")
    cases = _cases(v)
    monkeypatch.setattr(H, "CHECKPOINT_HEADS", v.n_heads)
    monkeypatch.setattr(H, "CHECKPOINT_FILES", 10**6)
    _interrupting(monkeypatch, 2)
    with pytest.raises(Boom):
        heads_stage(v, cases, tmp_path, {}, progress=False)
    assert len(list((tmp_path / "heads.partial").glob("*/layers_*.pt"))) == 2
    assert not (tmp_path / "heads.csv").exists()
    calls = _interrupting(monkeypatch, 99)
    df = heads_stage(v, cases, tmp_path, {}, progress=False, resume=True)
    assert len(calls) == 1
    assert not (tmp_path / "heads.partial").exists()
    written = pd.read_csv(tmp_path / "heads.csv", dtype={"op": str})
    assert len(written) == len(df) == v.n_layers * v.n_heads * 4


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from cnalens.heads import finish_distributed, init_distributed, scan_heads
from test_heads import _cases, _view

rank, world, _ = init_distributed()
assert world == 2, world
v = _view("llama")
df = scan_heads(v, _cases(v), method={method!r}, progress=False)
if rank == 0:
    df.to_pickle({out!r})
finish_distributed()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_scan_equals_single_process(tmp_path):
    v = _view("llama")
    full = H.scan_heads(v, _cases(v), method="mean", progress=False)
    out = tmp_path / "table.pkl"
    script = tmp_path / "scan.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), method="mean", out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    df = pd.read_pickle(out)
    pd.testing.assert_frame_equal(df, full, check_exact=True)
    assert df.attrs["meta"]["processes"] == 2
