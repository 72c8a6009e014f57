"""cnalens: find where an ability lives inside a causal LM by Comparative Neuron Analysis."""

from cnalens.errors import CnaError
from cnalens.models import ModelView, load_model

__version__ = "0.1.0"
__all__ = ["CnaError", "ModelView", "load_model", "__version__"]
