"""export/layout.py: the CPU layout rewrites are exact and only fire where the pattern is safe."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeenc.export.layout import HIDDEN_PAD, cpu_layout, pad_conv_taps, pad_hidden

RNG = np.random.default_rng(0)


def _const(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _model(nodes, inits, x_shape, y_shape=None):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _mlp(hidden=1024, width=32, between=None):
    """x @ W1 + b1 -> exact erf GELU (x feeds two nodes: a DAG, not a chain) -> @ W2 + b2."""
    inits = [_const("w1", RNG.standard_normal((width, hidden)) * 0.1), _const("b1", RNG.standard_normal(hidden)),
             _const("w2", RNG.standard_normal((hidden, width)) * 0.1), _const("b2", RNG.standard_normal(width)),
             _const("sqrt2", np.sqrt(2.0)), _const("one", 1.0), _const("half", 0.5)]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["b1", "h0"], ["h"]),
             helper.make_node("Div", ["h", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["h", "e1"], ["m"]),
             helper.make_node("Mul", ["m", "half"], ["g"])]
    last = "g"
    if between is not None:
        nodes += between("g")
        last = nodes[-1].output[0]
    nodes += [helper.make_node("MatMul", [last, "w2"], ["y0"]), helper.make_node("Add", ["y0", "b2"], ["y"])]
    return _model(nodes, inits, [1, 7, width], [1, 7, width])


def test_pad_hidden_is_exact_on_a_gelu_mlp():
    model = _mlp()
    x = RNG.standard_normal((1, 7, 32)).astype(np.float32)
    before = _run(model, x)
    assert pad_hidden(model) == 1
    shapes = {i.name.split("__")[0]: tuple(i.dims) for i in model.graph.initializer}
    assert shapes["w1"] == (32, 1024 + HIDDEN_PAD) and shapes["w2"] == (1024 + HIDDEN_PAD, 32)
    assert shapes["b1"] == (1024 + HIDDEN_PAD,)
    onnx.checker.check_model(model, full_check=True)
    after = _run(model, x)
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-5)


def test_pad_hidden_leaves_unaliased_widths_and_unsafe_chains_alone():
    assert pad_hidden(_mlp(hidden=768)) == 0  # 3 KiB rows do not alias

    def reshape(src):  # a shape-changing op between the two MatMuls: columns no longer map one to one
        return [helper.make_node("Transpose", [src], ["t"], perm=[0, 2, 1]),
                helper.make_node("Transpose", ["t"], ["t2"], perm=[0, 2, 1])]

    model = _mlp(between=reshape)
    assert pad_hidden(model) == 0


def test_pad_hidden_skips_a_hidden_tensor_that_is_also_an_output():
    model = _mlp()
    model.graph.output.append(helper.make_tensor_value_info("g", TensorProto.FLOAT, [1, 7, 1024]))
    assert pad_hidden(model) == 0


@pytest.mark.parametrize("pads", [[64, 64], [3, 0]])
def test_pad_conv_taps_is_exact(pads):
    # 8 input channels per group x 128 taps = 1024 floats per im2col row: aliased
    w = RNG.standard_normal((16, 8, 128)).astype(np.float32) * 0.05
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], group=2, kernel_shape=[128], pads=pads)]
    model = _model(nodes, [_const("w", w), _const("b", RNG.standard_normal(16))], [1, 16, 300])
    x = RNG.standard_normal((1, 16, 300)).astype(np.float32)
    before = _run(model, x)
    assert pad_conv_taps(model) == 1
    conv = model.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    assert attrs["kernel_shape"] == [129] and attrs["pads"] == [pads[0], pads[1] + 1]
    after = _run(model, x)
    assert after.shape == before.shape
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-5)


def test_pad_conv_taps_leaves_other_convs_alone():
    w = RNG.standard_normal((16, 8, 100)).astype(np.float32)
    model = _model([helper.make_node("Conv", ["x", "w"], ["y"], group=2, kernel_shape=[100], pads=[50, 49])],
                   [_const("w", w)], [1, 16, 300])
    assert cpu_layout(model) == {"hidden_padded": 0, "conv_taps_padded": 0, "why": cpu_layout(model)["why"]}
