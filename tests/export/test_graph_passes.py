"""drop_zero_bias_adds: the all-zero attention masks of torch's SDPA export, bypassed exactly."""
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ksampler_rt.export.onnx_export import drop_zero_bias_adds


def _model():
    """scores = x @ y * 0.5; scores + Mul(ConstantOfShape(Shape(scores), 0), 0.125) -> softmax;
    plus an Add of a non-zero constant and a zero-mask Add that is itself a graph output."""
    nodes = [
        helper.make_node("MatMul", ["x", "y"], ["mm"]),
        helper.make_node("Mul", ["mm", "half"], ["scores"]),
        helper.make_node("Shape", ["scores"], ["shape"]),
        helper.make_node("ConstantOfShape", ["shape"], ["zeros"],
                         value=numpy_helper.from_array(np.zeros(1, np.float32))),
        helper.make_node("Mul", ["zeros", "eighth"], ["mask"]),
        helper.make_node("Add", ["scores", "mask"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("Add", ["probs", "ones"], ["out"]),        # a real bias: kept
        helper.make_node("Add", ["mask", "scores"], ["out2"]),      # a graph output: kept
    ]
    inits = [numpy_helper.from_array(np.array(0.5, np.float32), "half"),
             numpy_helper.from_array(np.array(0.125, np.float32), "eighth"),
             numpy_helper.from_array(np.ones((1, 3), np.float32), "ones")]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4, 5]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 5, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", 4, 3]),
         helper.make_tensor_value_info("out2", TensorProto.FLOAT, ["B", 4, 3])],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def test_zero_mask_add_bypassed_exactly():
    model = _model()
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 4, 5)).astype(np.float32),
             "y": np.random.default_rng(1).standard_normal((2, 5, 3)).astype(np.float32)}
    before = _run(model, feeds)
    assert drop_zero_bias_adds(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Add") == 2 and "ConstantOfShape" in ops  # the mask still feeds out2
    onnx.checker.check_model(model)
    after = _run(model, feeds)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert drop_zero_bias_adds(model) == 0


def test_mask_and_its_shape_maths_pruned():
    model = _model()
    model.graph.output.pop()  # without out2, nothing else reads the mask
    model.graph.node.pop()
    assert drop_zero_bias_adds(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert "ConstantOfShape" not in ops and "Shape" not in ops and ops.count("Mul") == 1


def test_nonzero_constant_of_shape_kept():
    model = _model()
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape":
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(np.full(1, 2.0, np.float32)))
    assert drop_zero_bias_adds(model) == 0


def test_default_constant_of_shape_value_is_zero():
    model = _model()
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape":
            del node.attribute[:]
    assert drop_zero_bias_adds(model) == 1


def test_mask_times_runtime_tensor_kept():
    """0 * x is not 0 when x may be inf/NaN at run time: only finite graph constants qualify."""
    model = _model()
    for node in model.graph.node:
        if node.op_type == "Mul" and node.output[0] == "mask":
            node.input[1] = "x"  # a runtime input instead of the constant 0.125
    assert drop_zero_bias_adds(model) == 0


def test_add_read_inside_a_subgraph_kept():
    model = _model()
    then = helper.make_graph([helper.make_node("Identity", ["masked"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["scores"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "flag"))
    model.graph.node.append(helper.make_node("If", ["flag"], ["branch"], then_branch=then, else_branch=other))
    assert drop_zero_bias_adds(model) == 0
    assert "masked" in {o for n in model.graph.node for o in n.output}
