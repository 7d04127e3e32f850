"""default_opset / require_opset."""

from __future__ import annotations

import pytest
from graphs import diamond
from onnx import helper

from segsentry.errors import CalibrationError, SegsentryError
from segsentry.graph import GraphError, default_opset, require_opset


def test_default_opset_reads_either_spelling_of_the_domain():
    model = diamond()
    assert default_opset(model) == 17
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("com.microsoft", 1), helper.make_opsetid("ai.onnx", 19)])
    assert default_opset(model) == 19
    del model.opset_import[1]
    assert default_opset(model) is None


def test_require_opset_raises_the_callers_error():
    model = diamond()
    assert require_opset(model, minimum=17, purpose="x") == 17
    with pytest.raises(GraphError, match="MC dropout needs ONNX opset >= 18, but the model imports opset 17"):
        require_opset(model, minimum=18, purpose="MC dropout")
    del model.opset_import[:]
    with pytest.raises(CalibrationError, match="the OOD head needs the default ONNX domain"):
        require_opset(model, purpose="the OOD head", error=CalibrationError)
    assert issubclass(GraphError, SegsentryError)
