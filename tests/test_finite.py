"""A broken model stops every command with one line saying where: NaN or inf in the weights
(checked once at load), the activations or the logits (checked once per batch)."""

from __future__ import annotations

import pytest
import torch

from cnalens.cli import main
from cnalens.errors import CnaError
from cnalens.models import ModelView, load_model
from tiny import TinyTokenizer, char_tokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CNALENS_CACHE", str(tmp_path / "cache"))


def _llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, eos_token_id=1, bos_token_id=None,
                      pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def _model_dir(path, edit):
    """A random 3-layer Llama (float32) plus a character tokenizer, ``edit(model)`` applied
    before ``save_pretrained``."""
    tok = char_tokenizer()
    model = _llama(len(tok))
    with torch.no_grad():
        edit(model)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _nan_down(model):
    model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")


def _huge_ffn(model):  # finite weights whose FFN products overflow float32
    model.model.layers[2].mlp.up_proj.weight.mul_(1e30)
    model.model.layers[2].mlp.gate_proj.weight.mul_(1e30)


def _one_line(capsys, argv):
    capsys.readouterr()  # save_pretrained's progress bar
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("command", [["eval"], ["heads", "--layers", "0-1"]])
def test_nan_weight_stops_at_load(capsys, tmp_path, command):
    d = _model_dir(tmp_path / "model", _nan_down)
    out = tmp_path / "out"
    line = _one_line(capsys, [*command, "--model", str(d), "--ops", "+", "--digits", "1",
                              "--n", "6", "--out", str(out), "-q"])
    assert "non-finite weights" in line
    assert "model.layers.1.mlp.down_proj.weight (layer 1 down_proj) holds 1 NaN" in line
    assert not out.exists() or not list(out.rglob("*.csv")), list(out.rglob("*"))


@pytest.mark.parametrize("command", [["eval"], ["heads", "--layers", "0-1"]])
def test_overflowing_activations_stop_the_command(capsys, tmp_path, command):
    d = _model_dir(tmp_path / "model", _huge_ffn)
    load_model(str(d), progress=False)  # the weights themselves are finite
    out = tmp_path / "out"
    line = _one_line(capsys, [*command, "--model", str(d), "--ops", "+", "--digits", "1",
                              "--n", "6", "--out", str(out), "-q"])
    assert line.startswith("cnalens: error: non-finite activations (")
    assert "first at model.layers.2.mlp" in line and "(layer 2 " in line
    assert not out.exists() or not list(out.rglob("*.csv")), list(out.rglob("*"))


def test_library_view_of_a_nan_model():
    model = tiny_model("llama")
    model.model.layers[1].mlp.down_proj.weight.data[0, 7] = float("inf")
    with pytest.raises(CnaError, match=r"layers\.1\.mlp\.down_proj\.weight \(layer 1 "
                                       r"down_proj\) holds 1 inf value"):
        ModelView(model, TinyTokenizer())
    view = ModelView(model, TinyTokenizer(), check_weights=False)  # then the first batch
    with pytest.raises(CnaError, match=r"non-finite activations .* first at "
                                       r"model\.layers\.1\.mlp\.down_proj \(layer 1 down_proj\)"):
        view.hidden(view.batch([[1, 5, 6], [1, 7]]))


@pytest.mark.parametrize("family", ["gpt2", "neox", "gemma3"])
def test_uniform_names_in_other_families(family):
    model = tiny_model(family)
    view = ModelView(model, TinyTokenizer())
    view.module(2, "o_proj").weight.data.view(-1)[3] = float("nan")
    with pytest.raises(CnaError, match=r"\(layer 2 o_proj\) holds 1 NaN"):
        ModelView(model, TinyTokenizer())


def test_intervention_with_inf_is_caught():
    from cnalens.data import Case
    from cnalens.evaluate import evaluate
    from cnalens.interventions import ReplaceNeurons

    view = ModelView(tiny_model("llama"), TinyTokenizer())
    cases = [Case("1+2=", "3"), Case("12+3=", "5")]
    evaluate(view, cases, progress=False)
    iv = ReplaceNeurons(((1, 4),), torch.tensor([float("inf")], dtype=torch.float64))
    with pytest.raises(CnaError, match=r"first at model\.layers\.1\.mlp\.down_proj "
                                       r"\(layer 1 down_proj\)"):
        evaluate(view, cases, iv, progress=False)


def test_float16_overflow_and_logits():
    m = tiny_model("llama", dtype=torch.float16)
    view = ModelView(m, TinyTokenizer())
    b = view.batch([[1, 5, 6, 7], [1, 8]])
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight.mul_(1e4)
        m.model.layers[1].mlp.gate_proj.weight.mul_(1e4)
    with pytest.raises(CnaError, match=r"2 of 2 rows .*\(layer 1 .*float16 overflows"):
        view.last_logits(b)
    m = tiny_model("llama", dtype=torch.float16)
    view = ModelView(m, TinyTokenizer())
    with torch.no_grad():
        m.lm_head.weight.mul_(3e4)  # finite, but the logits overflow
    assert torch.isfinite(view.hidden(b)).all()
    with pytest.raises(CnaError, match="non-finite logits"):
        view.last_logits(b)
    with pytest.raises(CnaError, match="non-finite logits"):
        list(view.logit_tiles(view.hidden(b)[:, -1], 16))


def test_head_scan_paths_report_the_layer():
    """The fast scan runs through run_cached (shared few-shot prefixes) and run_tree."""
    from cnalens.data import Case
    from cnalens.heads import scan_heads

    model = tiny_model("llama")
    model.model.layers[1].mlp.down_proj.weight.data[2, 2] = float("nan")
    view = ModelView(model, TinyTokenizer(), check_weights=False)
    cases = [Case("1+2=", "3", prefix="1+1=2\n"), Case("2+2=", "4", prefix="1+1=2\n")]
    with pytest.raises(CnaError, match=r"first at model\.layers\.1\.mlp\.down_proj"):
        scan_heads(view, cases, layers=[0], progress=False)
    with pytest.raises(CnaError, match=r"first at model\.layers\.1\.mlp\.down_proj"):
        view.run_cached(*(torch.tensor([[1, 5, 6]]), torch.ones(1, 3, dtype=torch.long),
                          torch.arange(3)[None]))


def test_pruned_model_loads_and_scores(tmp_path):
    """Pruned widths (narrower layers, NaN-padded score tables) are not an error."""
    from cnalens.data import Case
    from cnalens.evaluate import evaluate
    from cnalens.models.pruned import prune_ffn, save_pruned
    from cnalens.scores import score_neurons

    tok = char_tokenizer()
    view = ModelView(_llama(len(tok)).double(), tok)
    prune_ffn(view, {1: torch.arange(0, 48, 2), 2: torch.arange(10)})
    d = save_pruned(view, tmp_path / "pruned")
    back = load_model(str(d), dtype="float64", progress=False)
    assert back.ffn_widths == [48, 24, 10] and back.info["pruned"]
    cases = [Case("1+2=", "3"), Case("12+3=", "15")]
    assert len(evaluate(back, cases, progress=False)) == 2
    sc = score_neurons(back, cases[0])
    assert torch.isnan(sc.imp[0, 2, 10:]).all()  # cnalens's own padding, no error
    assert torch.isfinite(sc.imp[0, 2, :10]).all()
