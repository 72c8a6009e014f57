"""The sizes a model's config fixes, and the range checks of layer, head and neuron numbers.

``ModelShape`` needs no weights: the command line reads it from the config (a GGUF's
metadata, a cached or saved folder's ``config.json``) and checks every ``L``, ``L.H`` and
``L.N`` it was given before a model is converted or loaded, so a bad argument fails in
seconds. ``ModelView.shape`` is the same object for a loaded model (after pruning, its
per-layer FFN widths).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cnalens.errors import CnaError


@dataclass(frozen=True)
class ModelShape:
    """Layer count, attention heads per layer and FFN width of each layer."""

    n_layers: int
    n_heads: int
    ffn_widths: tuple[int, ...]

    @classmethod
    def from_config(cls, config: Any, ffn_widths: Sequence[int] | None = None) -> ModelShape:
        """The shape a transformers config describes (``ffn_widths`` for pruned models)."""
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config

        def first(*names: str) -> int | None:
            for name in names:
                value = getattr(cfg, name, None)
                if isinstance(value, int):
                    return value
            return None

        n_layers = first("num_hidden_layers", "n_layer", "num_layers")
        n_heads = first("num_attention_heads", "n_head")
        if n_layers is None or n_heads is None:
            raise CnaError(f"cannot read layer and head counts from the {cfg.model_type} config")
        if ffn_widths is None:
            width = first("intermediate_size", "n_inner", "ffn_dim")
            if width is None:  # GPT-2 and GPT-J leave the FFN width at 4 x d_model
                width = 4 * (first("hidden_size", "n_embd", "d_model") or 0)
            ffn_widths = [width] * n_layers
        return cls(n_layers, n_heads, tuple(int(w) for w in ffn_widths))

    def check_layers(self, layers: Iterable[int]) -> None:
        """One line naming the valid range for the first layer out of range."""
        for layer in layers:
            if not 0 <= layer < self.n_layers:
                raise CnaError(f"layer {layer} out of range: the model has layers "
                               f"0..{self.n_layers - 1}")

    def check_heads(self, heads: Iterable[tuple[int, int]]) -> None:
        """One line naming the valid range for the first head ``(L, H)`` out of range."""
        for layer, h in heads:
            self.check_layers([layer])
            if not 0 <= h < self.n_heads:
                raise CnaError(f"head {layer}.{h} out of range: layer {layer} has heads "
                               f"0..{self.n_heads - 1}")

    def check_neurons(self, neurons: Iterable[tuple[int, int]]) -> None:
        """One line naming the valid range for the first FFN neuron ``(L, N)`` out of range."""
        for layer, n in neurons:
            self.check_layers([layer])
            if not 0 <= n < self.ffn_widths[layer]:
                raise CnaError(f"neuron {layer}.{n} out of range: layer {layer} has FFN "
                               f"neurons 0..{self.ffn_widths[layer] - 1}")

    def check(self, *, layers: Iterable[int] = (), heads: Iterable[tuple[int, int]] = (),
              neurons: Iterable[tuple[int, int]] = ()) -> None:
        """All three checks at once."""
        self.check_layers(layers)
        self.check_heads(heads)
        self.check_neurons(neurons)
