import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cnalens.models import ModelView  # noqa: E402
from tiny import FAMILY_NAMES, TinyTokenizer, tiny_model  # noqa: E402


@pytest.fixture(params=FAMILY_NAMES)
def tiny_view(request):
    return ModelView(tiny_model(request.param), TinyTokenizer(), {"spec": request.param})
