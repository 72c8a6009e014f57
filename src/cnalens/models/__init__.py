"""Model loading and the architecture-neutral model view."""

from cnalens.models.view import ActivationCache, ModelView

__all__ = ["ActivationCache", "ModelView", "load_model"]


def load_model(spec: str | None = None, device: str = "cpu", dtype: str = "float32",
               device_map: str | None = None, progress: bool = True) -> ModelView:
    """Load a causal LM (alias, directory, .gguf file or hub id) as a ModelView."""
    from cnalens.models.load import DEFAULT_MODEL, load_pretrained

    model, tokenizer, info = load_pretrained(spec or DEFAULT_MODEL, device=device, dtype=dtype,
                                             device_map=device_map, progress=progress)
    return ModelView(model, tokenizer, info)
