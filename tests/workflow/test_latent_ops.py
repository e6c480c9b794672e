"""LatentUpscale against torch.nn.functional.interpolate (what ComfyUI calls)."""
import numpy as np
import pytest

from ksampler_rt.workflow.latent_ops import common_upscale

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("method", ["nearest-exact", "bilinear", "area", "bicubic"])
@pytest.mark.parametrize("size", [(16, 24), (5, 7), (8, 8), (3, 11)])
def test_matches_torch_interpolate(method, size):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    h, w = size
    ours = common_upscale(x, w, h, method, "disabled")
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(h, w), mode=method).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=2e-6)


def test_center_crop_then_resize():
    x = np.arange(2 * 1 * 8 * 12, dtype=np.float32).reshape(2, 1, 8, 12)
    out = common_upscale(x, 8, 8, "nearest-exact", "center")
    # aspect 12/8 -> 1: crop round((12 - 8) / 2) = 2 columns each side, then identity resize
    np.testing.assert_array_equal(out, x[..., 2:10])


def test_bad_method_lists_valid_ones():
    with pytest.raises(ValueError, match="upscale_method: received 'lanczos'"):
        common_upscale(np.zeros((1, 4, 8, 8), np.float32), 4, 4, "lanczos", "disabled")
