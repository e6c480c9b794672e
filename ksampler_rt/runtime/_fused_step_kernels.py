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


@numba.njit(nogil=True, boundscheck=False, cache=True, error_model="numpy")
def eps_of(x, den, sigma, out):
    """out = (x - den) / sigma: the eps (or to_d slope) of a denoiser value."""
    for i in range(x.shape[0]):
        out[i] = (x[i] - den[i]) / sigma


@numba.njit(nogil=True, boundscheck=False, cache=True, error_model="numpy")
def lin_step(x, e, f, a, b, two, out):
    """out = x - a * e, then (if ``two``) - b * (f - e): every DPM-Solver stage and step."""
    for i in range(x.shape[0]):
        v = x[i] - a * e[i]
        if two:
            v = v - b * (f[i] - e[i])
        out[i] = v


@numba.njit(nogil=True, boundscheck=False, cache=True, error_model="numpy")
def lms_step(x, den, sigma, h1, h2, h3, k, zero, c0, c1, c2, c3, d_out, out):
    """d = (x - den) / sigma (kept as the newest slope), out = x + (0 + c0 d + c1 h1 + ...)."""
    for i in range(x.shape[0]):
        d = (x[i] - den[i]) / sigma
        d_out[i] = d
        acc = zero + c0 * d
        if k >= 1:
            acc = acc + c1 * h1[i]
        if k >= 2:
            acc = acc + c2 * h2[i]
        if k >= 3:
            acc = acc + c3 * h3[i]
        out[i] = x[i] + acc


@numba.njit(nogil=True, boundscheck=False, cache=True, error_model="numpy")
def rms_scaled(lo, hi, prev, atol, rtol, out):
    """out (float64) = (lo - hi) / max(atol, rtol * max(|lo|, |prev|)), the quotient in float32;
    max as numpy's (a NaN operand wins)."""
    for i in range(lo.shape[0]):
        a, p = abs(lo[i]), abs(prev[i])
        m = a if (a >= p or a != a) else p
        s = rtol * m
        delta = atol if (atol >= s or atol != atol) else s
        out[i] = (lo[i] - hi[i]) / delta


@numba.njit(nogil=True, boundscheck=False, cache=True, error_model="numpy")
def seeds_stage(x, u, v, sde, nz, mode, a, c, p, q, lw, from_start, noise_mode, e, qn, sig, sn, keep, out, sde_out):
    """One SEEDS stage: out = a x - c z with z = u (mode 0), torch.lerp(u, v) (mode 1: weight ``lw``
    taken from u if ``from_start`` else from v, the fma emulated in float64 as the numpy path does) or
    p u + q v (mode 2); then the SDE noise s = qn nz (noise_mode 1) or sde e + qn nz (2), kept in
    ``sde_out`` if ``keep``, added as (s sig) sn."""
    for i in range(x.shape[0]):
        if mode == 0:
            z = u[i]
        elif mode == 1:
            diff = v[i] - u[i]
            base = u[i] if from_start else v[i]
            z = numba.float32(numba.float64(lw) * numba.float64(diff) + numba.float64(base))
        else:
            z = p * u[i] + q * v[i]
        y = a * x[i] - c * z
        if noise_mode != 0:
            s = qn * nz[i]
            if noise_mode == 2:
                s = sde[i] * e + s
            if keep:
                sde_out[i] = s
            y = y + (s * sig) * sn
        out[i] = y


@numba.njit(nogil=True, boundscheck=False, cache=True, error_model="numpy")
def er_sde_step(x, den, old, old_dd, nz, stage, xw, dw, d2, w2, d3, w3, noisy, f1, f2, f3, dd_out, out):
    """One ER-SDE step: (xw x + dw den), + w2 dd with dd = (den - old) / d2 (stage >= 2, kept in
    ``dd_out``), + w3 (dd - old_dd) / d3 (stage 3), then + ((nz f1) f2) f3 if ``noisy``."""
    for i in range(x.shape[0]):
        y = xw * x[i] + dw * den[i]
        if stage >= 2:
            dd = (den[i] - old[i]) / d2
            dd_out[i] = dd
            y = y + w2 * dd
            if stage >= 3:
                y = y + w3 * ((dd - old_dd[i]) / d3)
        if noisy:
            y = y + ((nz[i] * f1) * f2) * f3
        out[i] = y


@numba.njit(nogil=True, boundscheck=False, cache=True, error_model="numpy")
def sa_step(x, p0, p1, p2, p3, k, b0, b1, b2, b3, sc, nz, noise_mode, f1, f2, f3, noise_out, out):
    """One SA-Solver predictor or corrector: sc x + (p0 b0 + p1 b1 + ... (k more terms)), then + the
    kept step noise ``nz`` (noise_mode 1) or + a new one ((nz f1) f2) f3, kept in ``noise_out`` (2)."""
    for i in range(x.shape[0]):
        acc = p0[i] * b0
        if k >= 1:
            acc = acc + p1[i] * b1
        if k >= 2:
            acc = acc + p2[i] * b2
        if k >= 3:
            acc = acc + p3[i] * b3
        y = sc * x[i] + acc
        if noise_mode == 1:
            y = y + nz[i]
        elif noise_mode == 2:
            s = ((nz[i] * f1) * f2) * f3
            noise_out[i] = s
            y = y + s
        out[i] = y


@numba.njit(nogil=True, boundscheck=False, cache=True, error_model="numpy")
def ge_step(x, den, g, od, pp, corr, sigma, sn, dt, gm, d_out, out):
    """Gradient estimation: d = (x - g) / sigma (kept), den + d sn (CFG++) or x + d dt, then (if ``corr``)
    + (gm (d - od)) dt."""
    for i in range(x.shape[0]):
        d = (x[i] - g[i]) / sigma
        d_out[i] = d
        if pp:
            y = den[i] + d * sn
        else:
            y = x[i] + d * dt
        if corr:
            y = y + (gm * (d - od[i])) * dt
        out[i] = y
