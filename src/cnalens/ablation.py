"""Mean-ablation: replace heads' outputs or neurons' coefficients by their dataset mean."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from cnalens.data.cases import Case, Encoded, as_encoded
from cnalens.evaluate import batches
from cnalens.interventions import ReplaceHeads, ReplaceNeurons

if TYPE_CHECKING:
    from cnalens.models import ModelView


@torch.inference_mode()
def dataset_means(view: ModelView, cases: Sequence[Case] | Sequence[Encoded], point: str,
                  layers: Sequence[int], last_only: bool = False,
                  batch_size: int = 64) -> dict[int, torch.Tensor]:
    """Mean of ``point`` (``z`` or ``coef``) per layer over the prompts' real tokens
    (padding excluded), or over their last positions only."""
    enc = as_encoded(view.tokenizer, cases)
    sums: dict[int, torch.Tensor] = {}
    count = 0
    for idx in batches(enc, batch_size):
        b = view.batch([list(enc[i].prompt_ids) for i in idx])
        with view.capture([point], layers, position=-1 if last_only else None) as c:
            view.hidden(b)
        mask = (b.attention_mask[:, -1:] if last_only else b.attention_mask).to(view.dtype)
        count += int(mask.sum())
        for layer in layers:
            part = (c[(point, layer)] * mask[..., None]).sum((0, 1))
            sums[layer] = sums.get(layer, 0) + part.double()
    return {layer: (s / count).to(view.dtype) for layer, s in sums.items()}


def mean_ablation(view: ModelView, cases: Sequence[Case] | Sequence[Encoded],
                  heads: Sequence[tuple[int, int]] = (),
                  neurons: Sequence[tuple[int, int]] = (), last_only: bool = False,
                  batch_size: int = 64) -> list:
    """Interventions that set the given heads / neurons to their mean over ``cases``."""
    out = []
    if heads:
        view.check_heads(heads)
        means = dataset_means(view, cases, "z", sorted({h[0] for h in heads}), last_only,
                              batch_size)
        d = view.head_dim
        vals = torch.stack([means[layer][h * d:(h + 1) * d] for layer, h in heads])
        out.append(ReplaceHeads(tuple(heads), vals, "mean_heads"))
    if neurons:
        view.check_neurons(neurons)
        means = dataset_means(view, cases, "coef", sorted({n[0] for n in neurons}),
                              last_only, batch_size)
        vals = torch.stack([means[layer][n] for layer, n in neurons])
        out.append(ReplaceNeurons(tuple(neurons), vals, "mean_neurons"))
    return out
