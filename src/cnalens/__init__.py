"""cnalens: find where an ability lives inside a causal LM by Comparative Neuron Analysis.

Notebook use::

    view = cnalens.load_model("smollm2-135m")
    comp = cnalens.cna(view, "3+5=", intervention=cnalens.ZeroHeads([(7, 0)]), k=20)
    comp.frame()

``cnalens.cna`` and ``cnalens.evaluate`` are modules that, called, run their function
(``cnalens.cna.cna``, ``cnalens.evaluate.evaluate``). The names below load their modules
on first use.
"""

from cnalens.errors import CnaError
from cnalens.models import ModelView, load_model

__version__ = "0.1.0"

_LAZY = {  # name -> (module, attribute; None for the module itself)
    "cna": ("cnalens.cna", None),
    "Comparison": ("cnalens.cna", "Comparison"),
    "evaluate": ("cnalens.evaluate", "evaluate"),
    "accuracy_table": ("cnalens.evaluate", "accuracy_table"),
    "scan_heads": ("cnalens.heads", "scan_heads"),
    "plot": ("cnalens.plot", None),
    "Case": ("cnalens.data.cases", "Case"),
    "arithmetic_cases": ("cnalens.data.arithmetic", "arithmetic_cases"),
    **{name: ("cnalens.interventions", name) for name in (
        "ZeroHeads", "ScaleHeads", "ReplaceHeads", "ZeroNeurons", "ScaleNeurons",
        "KeepOnlyNeurons", "ReplaceNeurons")},
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'cnalens' has no attribute '{name}'")
    import importlib

    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    return value if attr is None else getattr(value, attr)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["CnaError", "ModelView", "load_model", "__version__", *_LAZY]
