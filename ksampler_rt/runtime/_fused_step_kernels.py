"""numba kernels of :mod:`.fused_steps` (imported only through it; see there).

Same float32 operations in the same order as the numpy expressions they replace, no fast-math (no
FMA contraction, no reassociation), so the results are bit-identical.
"""
import numba


@numba.njit(nogil=True, boundscheck=False, cache=True, error_model="numpy")
def ipndm_step(x, d, h1, h2, h3, k, w0, w1, w2, w3, s, div, out):
    """out = x + s * (w0 d + w1 h1 + ... (k history terms, left to right)) / div, per element."""
    for i in range(x.shape[0]):
        acc = w0 * d[i]
        if k >= 1:
            acc = acc + w1 * h1[i]
        if k >= 2:
            acc = acc + w2 * h2[i]
        if k >= 3:
            acc = acc + w3 * h3[i]
        out[i] = x[i] + (s * acc) / div


@numba.njit(nogil=True, boundscheck=False, cache=True, error_model="numpy")
def res_step(x, den, g, od, nz, pp, a, h, b1, b2, sn, su, noisy, out):
    """RES multistep update (CFG++ shift first if ``pp``) then, if ``noisy``, + (nz * sn) * su."""
    for i in range(x.shape[0]):
        xi = x[i]
        if pp:
            xi = xi + (den[i] - g[i])
        v = a * xi + h * (b1 * g[i] + b2 * od[i])
        if noisy:
            v = v + (nz[i] * sn) * su
        out[i] = v
