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
