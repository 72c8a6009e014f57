"""ModelShape: the config's sizes equal the loaded view's, for every tiny family."""

import pytest

from cnalens.errors import CnaError
from cnalens.models import ModelView
from cnalens.models.shape import ModelShape
from tiny import FAMILY_NAMES, tiny_model


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_config_shape_equals_the_views(name):
    model = tiny_model(name)
    view = ModelView(model)
    assert ModelShape.from_config(model.config) == view.shape
    assert view.shape.ffn_widths == tuple(view.ffn_widths)


def test_checks_name_the_range():
    shape = ModelShape(3, 4, (8, 8, 5))
    shape.check(layers=[0, 2], heads=[(2, 3)], neurons=[(2, 4)])
    for kw, msg in [({"layers": [3]}, "layer 3 out of range: the model has layers 0..2"),
                    ({"heads": [(0, 4)]}, "head 0.4 out of range: layer 0 has heads 0..3"),
                    ({"heads": [(5, 0)]}, "layer 5 out of range: the model has layers 0..2"),
                    ({"neurons": [(2, 5)]}, "neuron 2.5 out of range: layer 2 has FFN neurons "
                                            "0..4")]:
        with pytest.raises(CnaError) as err:
            shape.check(**kw)
        assert str(err.value) == msg
