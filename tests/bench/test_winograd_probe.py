"""The Winograd probe's rewrite computes the same convolution as a direct 3x3 Conv."""
import numpy as np
import pytest

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from ksampler_rt.bench import winograd_probe as wp  # noqa: E402


def _direct_numpy(x, w, b):
    """3x3, stride 1, zero padding 1, in float64: an independent reference."""
    n, c, h, wd = x.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    y = np.zeros((n, w.shape[0], h, wd))
    for i in range(3):
        for j in range(3):
            y += np.einsum("nchw,oc->nohw", xp[:, :, i:i + h, j:j + wd], w[:, :, i, j].astype(np.float64))
    return y + b[None, :, None, None]


@pytest.mark.parametrize("tile,shape,cout", [(2, (2, 3, 6, 8), 5), (4, (1, 4, 8, 12), 3)])
def test_rewrite_matches_direct_convolution(tile, shape, cout):
    rng = np.random.default_rng(tile)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((cout, shape[1], 3, 3)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    model = wp.conv_model(w, b, shape, tile)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref = _direct_numpy(x, w, b)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_matrices_reproduce_a_1d_correlation():
    """F(m,3) in one dimension: A^T [(G g) * (B^T d)] == the valid correlation of d with g."""
    rng = np.random.default_rng(0)
    for m in wp.TILES:
        bt, g, at = wp.winograd_matrices(m)
        d, k = rng.standard_normal(m + 2), rng.standard_normal(3)
        np.testing.assert_allclose(at @ ((g @ k) * (bt @ d)), np.correlate(d, k, "valid"), atol=1e-12)


def test_bad_tile_and_shape():
    with pytest.raises(ValueError, match="tile: received 3, expected one of"):
        wp.winograd_matrices(3)
    with pytest.raises(ValueError, match="received 6x7, expected sides divisible by the tile 2"):
        wp.winograd_nodes("x", "y", np.zeros((2, 2, 3, 3), np.float32), None, (1, 2, 6, 7), 2, "p_")


def test_probe_unet_rewrites_the_eligible_convolutions(tmp_path, monkeypatch):
    """probe_unet's graph surgery on a small UNet-shaped graph: the stride-1 3x3 convolutions are
    rewritten (the one without bias too), the strided one is kept, the rewritten model computes the
    same output, and the replaced weights are not carried along."""
    import types

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ksampler_rt.bench import models

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    b1 = rng.standard_normal(8).astype(np.float32)
    w2 = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
    w3 = rng.standard_normal((4, 8, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["sample", "w1", "b1"], ["h1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Conv", ["h1", "w2"], ["h2"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Conv", ["h2", "w3"], ["out"], pads=[1, 1, 1, 1], kernel_shape=[3, 3], strides=[2, 2])]
    graph = helper.make_graph(
        nodes, "unet",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["B", 4, "h", "w"]),
         helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["B"]),
         helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT, ["B", "T", 768])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (w3, "w3"))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(tmp_path / "unet.onnx"))
    monkeypatch.setattr(models, "resolve_model", lambda *a, **k: types.SimpleNamespace(export_dir=tmp_path))
    saved = []
    real_session = wp._ort_session
    monkeypatch.setattr(wp, "_ort_session", lambda b, threads: saved.append(b) or real_session(b, threads))
    res = wp.probe_unet(8, 2, 0, threads=1, repeats=1)
    assert res["eligible"] == 2 and res["rewritten"] == 2
    assert res["rel_error_vs_unoptimised"]["F(2,3)"] < 1e-5
    rewritten = onnx.load_from_string(saved[1])
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops.count("ConvTranspose") == 2 and ops.count("MatMul") == 2
    names = {i.name for i in rewritten.graph.initializer}
    assert "w3" in names and "b1" in names and not {"w1", "w2"} & names
