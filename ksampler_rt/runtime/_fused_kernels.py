"""numba kernels of :mod:`.fused_jit` (imported only through it; see there).

Each kernel evaluates, per element, exactly the float32 operations of the numpy expressions it
replaces, in their order (no fast-math flags: LLVM may neither contract a multiply-add into an FMA
nor reassociate), so the results are bit-identical; what it saves is the array passes (one loop
instead of one numpy call, temporary and memory sweep per operation). Defined at module level so
numba's on-disk cache (``cache=True``) finds them in the next process.
"""
import numba
import numpy as np
from numba import types
from numba.core.extending import intrinsic

_BLOCK = 2048  # elements summed per block: the accumulator stays in L1 while the k inputs stream past


@intrinsic
def _f32_ptr(typingctx, addr):
    """The float32 pointer at integer address ``addr`` (a numpy array's data pointer)."""
    sig = types.CPointer(types.float32)(addr)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@numba.njit(nogil=True, boundscheck=False, cache=True, error_model="numpy")
def sum_scaled(addrs, n, negate, divisor, out):
    """out = (+-(a_0 + a_1 + ... + a_{k-1})) / divisor: the arrays at ``addrs`` (n float32 each)
    summed left to right per element, negated if ``negate``, then divided. One pass, blockwise
    through a local accumulator (each block's inputs are views of just that block: LLVM then
    vectorises the loops, which it did not over whole-array views indexed from the block start)."""
    k = addrs.shape[0]
    acc = np.empty(_BLOCK, np.float32)
    for b0 in range(0, n, _BLOCK):
        m = min(n, b0 + _BLOCK) - b0
        a = numba.carray(_f32_ptr(addrs[0] + 4 * b0), m)
        for i in range(m):
            acc[i] = a[i]
        for j in range(1, k):
            a = numba.carray(_f32_ptr(addrs[j] + 4 * b0), m)
            for i in range(m):
                acc[i] = acc[i] + a[i]
        o = out[b0:b0 + m]
        if negate:
            for i in range(m):
                o[i] = (-acc[i]) / divisor
        else:
            for i in range(m):
                o[i] = acc[i] / divisor


# The UniPC loops are written out once per number of older points (nd = 0, 1, 2): a branch on nd
# inside the loop body kept LLVM from vectorising it (about 5x slower).
@numba.njit(nogil=True, boundscheck=False, cache=True, error_model="numpy")
def unipc_predict(x, m0, h1, h2, nd, r1, r2, xs, ms, bs, p1, p2, c_in, out):
    """UniPC predictor: base = xs x - ms m0, d_j = (h_j - m0) / r_j, x_new = base - bs (d_1 p1 [+ d_2 p2])
    (base itself when nd = 0); out = x_new * c_in (the model input), or x_new when ``c_in`` is 0 (the
    last step, no model call)."""
    n = x.shape[0]
    if c_in == 0:
        if nd == 0:
            for i in range(n):
                out[i] = xs * x[i] - ms * m0[i]
        elif nd == 1:
            for i in range(n):
                out[i] = (xs * x[i] - ms * m0[i]) - bs * (((h1[i] - m0[i]) / r1) * p1)
        else:
            for i in range(n):
                out[i] = (xs * x[i] - ms * m0[i]) - bs * (((h1[i] - m0[i]) / r1) * p1 + ((h2[i] - m0[i]) / r2) * p2)
    elif nd == 0:
        for i in range(n):
            out[i] = (xs * x[i] - ms * m0[i]) * c_in
    elif nd == 1:
        for i in range(n):
            out[i] = ((xs * x[i] - ms * m0[i]) - bs * (((h1[i] - m0[i]) / r1) * p1)) * c_in
    else:
        for i in range(n):
            out[i] = ((xs * x[i] - ms * m0[i])
                      - bs * (((h1[i] - m0[i]) / r1) * p1 + ((h2[i] - m0[i]) / r2) * p2)) * c_in


@numba.njit(nogil=True, boundscheck=False, cache=True, error_model="numpy")
def data_prediction(x_vp, x_in, d, sigma, std, alpha, out):
    """UniPC's data prediction from a denoiser value d at x_in: (x_vp - std ((x_in - d) / sigma)) / alpha."""
    for i in range(x_vp.shape[0]):
        out[i] = (x_vp[i] - std * ((x_in[i] - d[i]) / sigma)) / alpha


@numba.njit(nogil=True, boundscheck=False, cache=True, error_model="numpy")
def unipc_correct(x, m0, h1, h2, d, nd, r1, r2, xs, ms, bs, p1, p2, c_in, c1, c2, c_last, sigma, std, alpha,
                  model_t, x_out):
    """UniPC corrector from the denoiser value d at the predictor's model input: x_new and the model
    input x_new * c_in are recomputed (the values :func:`unipc_predict` gave; cheaper than reading
    them back), model_t = (x_new - std ((x_in - d) / sigma)) / alpha is the data prediction,
    corr = c_last (model_t - m0) [preceded by + (d_1 c1 [+ d_2 c2])], x_out = base - bs corr."""
    n = x.shape[0]
    if nd == 0:
        for i in range(n):
            base = xs * x[i] - ms * m0[i]
            mt = (base - std * ((base * c_in - d[i]) / sigma)) / alpha
            model_t[i] = mt
            x_out[i] = base - bs * (c_last * (mt - m0[i]))
    elif nd == 1:
        for i in range(n):
            base = xs * x[i] - ms * m0[i]
            d1 = (h1[i] - m0[i]) / r1
            x_new = base - bs * (d1 * p1)
            mt = (x_new - std * ((x_new * c_in - d[i]) / sigma)) / alpha
            model_t[i] = mt
            x_out[i] = base - bs * (d1 * c1 + c_last * (mt - m0[i]))
    else:
        for i in range(n):
            base = xs * x[i] - ms * m0[i]
            d1 = (h1[i] - m0[i]) / r1
            d2 = (h2[i] - m0[i]) / r2
            x_new = base - bs * (d1 * p1 + d2 * p2)
            mt = (x_new - std * ((x_new * c_in - d[i]) / sigma)) / alpha
            model_t[i] = mt
            x_out[i] = base - bs * ((d1 * c1 + d2 * c2) + c_last * (mt - m0[i]))


@numba.njit(nogil=True, boundscheck=False, cache=True, error_model="numpy")
def rf_renoise(x, d, nz, ratio, omr, ar, s, c, out):
    """The ancestral rectified-flow step: out = ar (ratio x + omr d) + (nz s) c, numpy's order."""
    for i in range(x.shape[0]):
        out[i] = ar * (ratio * x[i] + omr * d[i]) + (nz[i] * s) * c


@numba.njit(nogil=True, boundscheck=False, cache=True, error_model="numpy")
def cfg_pp_renoise(x, d, u, nz, sigma, a_s, a_t, sd, s, su, out):
    """Ancestral CFG++ step: out = (a_t d + sd ((x - a_s u) / sigma)) + ((nz a_t) s) su, numpy's order."""
    for i in range(x.shape[0]):
        out[i] = (a_t * d[i] + sd * ((x[i] - a_s * u[i]) / sigma)) + ((nz[i] * a_t) * s) * su


@numba.njit(nogil=True, boundscheck=False, cache=True, error_model="numpy")
def ddpm(x, d, nz, q, sigma, oma, k1, k2, k3, k4, out):
    """DDPM step: out = (k1 ((x / q) - (oma ((x - d) / sigma)) / k2) + k3 nz) k4, numpy's order."""
    for i in range(x.shape[0]):
        out[i] = (k1 * (x[i] / q - (oma * ((x[i] - d[i]) / sigma)) / k2) + k3 * nz[i]) * k4


@numba.njit(nogil=True, boundscheck=False, cache=True, error_model="numpy")
def dpmpp_2m_cfg_pp(x, d, u, o, ne, mc, e, out):
    """CFG++ DPM-Solver++(2M) step: out = (d + (ne u - mc (d - o))) + e x, numpy's order."""
    for i in range(x.shape[0]):
        out[i] = (d[i] + (ne * u[i] - mc * (d[i] - o[i]))) + e * x[i]
