"""Mean-ablation against a hand computation."""

import torch

from cnalens.ablation import dataset_means, mean_ablation
from cnalens.data import encode_all
from cnalens.data.cases import Case
from cnalens.models import ModelView
from tiny import TinyTokenizer, tiny_model


def test_means_and_replacement():
    view = ModelView(tiny_model("llama"), TinyTokenizer())
    cases = [Case("3+5=", "8"), Case("12+30=", "42"), Case("7=", "7")]
    enc = encode_all(view.tokenizer, cases)
    # by hand: every case alone, all its positions
    zs, coefs, last = [], [], []
    with torch.no_grad():
        for e in enc:
            with view.capture(["z", "coef"], [1]) as c:
                view.hidden(view.batch([list(e.prompt_ids)]))
            zs.append(c[("z", 1)][0])
            coefs.append(c[("coef", 1)][0])
            last.append(c[("coef", 1)][0, -1])
    z_mean = torch.cat(zs).mean(0)
    got = dataset_means(view, enc, "z", [1], batch_size=2)[1]
    assert torch.allclose(got, z_mean, atol=1e-10)
    got_last = dataset_means(view, enc, "coef", [1], last_only=True)[1]
    assert torch.allclose(got_last, torch.stack(last).mean(0), atol=1e-10)

    ivs = mean_ablation(view, enc, heads=[(1, 2)], neurons=[(1, 5), (1, 0)])
    with torch.no_grad(), view.intervene(*ivs), view.capture(["z", "coef"], [1]) as c:
        view.hidden(view.batch([list(enc[0].prompt_ids)]))
    d = view.head_dim
    assert torch.allclose(c[("z", 1)][0, :, 2 * d:3 * d], z_mean[2 * d:3 * d].expand(
        c[("z", 1)].shape[1], d))
    cmean = torch.cat(coefs).mean(0)
    assert torch.allclose(c[("coef", 1)][0, :, 5], cmean[5].expand(c[("coef", 1)].shape[1]))
    assert ivs[0].describe()["kind"] == "mean_heads"
