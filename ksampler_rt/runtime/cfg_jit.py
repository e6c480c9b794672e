"""The compiled CFG head of an eps model (numba, extra ``[jit]``), used by :mod:`.cfg`.

One pass over the UNet output of a ``[uncond rows, cond rows]`` call (or cond first): both rows'
denoised values ``x - eps * sigma`` (ComfyUI 0.3.64 ``calculate_denoised``), the guidance
``uncond + (cond - uncond) * cfg`` (``cfg_function``) and the finiteness check of the output. Same
float32 operations in the same order as the numpy path of :mod:`.cfg`, so bit-identical; checked
against it on first use.

It follows the compiled kernels' switch (:func:`.jit.available`: numba present, ``KSAMPLER_RT_JIT``
not 0) and adds its own self-check. Importing this module never imports numba.
"""
from __future__ import annotations


import numpy as np

from . import jit

__all__ = ["NonFiniteOutput", "available", "cfg_eps"]

_K: dict = {}


class NonFiniteOutput(ValueError):
    """The UNet output handed to :func:`cfg_eps` holds ``count`` NaN or inf values."""

    def __init__(self, count: int):
        super().__init__(f"{count} non-finite values (NaN or inf)")
        self.count = count


def available() -> bool:
    """True when the compiled kernels are on (:func:`.jit.available`) and the head passed its check."""
    return _KERNELS.available()


def _head(x, out, sigma, cfg, uncond_first, guided, uncond, keep_uncond):
    """One pass of: d_u = x - out_u * sigma, d_c = x - out_c * sigma, guided = d_u + (d_c - d_u) * cfg,
    and uncond = d_u if ``keep_uncond`` (a sampler that reads only the guided result saves one array's
    worth of memory writes per model call). Returns False if out holds a NaN or inf (v - v != 0 exactly
    then; an AND reduction keeps the loop vectorised, a count would not). Compiled by numba (module
    level, so its cache finds it)."""
    n = x.shape[0]
    ou = 0 if uncond_first else n
    oc = n - ou
    eus = out[ou:ou + n]
    ecs = out[oc:oc + n]
    finite = True
    for i in range(n):
        eu = eus[i]
        ec = ecs[i]
        finite &= (eu - eu == 0) & (ec - ec == 0)
        du = x[i] - eu * sigma
        dc = x[i] - ec * sigma
        if keep_uncond:
            uncond[i] = du
        guided[i] = du + (dc - du) * cfg
    return finite


def _compile() -> None:
    if not _K:
        import numba

        _K["head"] = numba.njit(nogil=True, boundscheck=False, cache=True)(_head)


def _self_check() -> None:
    """The head against the numpy expressions of model_sampling / cfg, and its NaN/inf report."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 1, 32, 32)).astype(np.float32)
    out = rng.standard_normal((4, 1, 32, 32)).astype(np.float32)
    sigma, cfg = np.float32(2.5), np.float32(7.5)
    res, unc = cfg_eps(x, out, sigma, cfg, uncond_first=True)
    d = x[None] - out.reshape(2, 2, 1, 32, 32) * sigma
    if not (np.array_equal(unc, d[0]) and np.array_equal(res, d[0] + (d[1] - d[0]) * cfg)
            and np.array_equal(cfg_eps(x, out, sigma, cfg, uncond_first=True, keep_uncond=False)[0], res)):
        raise RuntimeError("self-check failed: CFG head values")
    out[3, 0, 5, 7] = np.inf
    for keep in (True, False):
        try:
            cfg_eps(x, out, sigma, cfg, uncond_first=False, keep_uncond=keep)
        except NonFiniteOutput as e:
            if e.count == 1:
                continue
        raise RuntimeError("self-check failed: CFG head non-finite report")


def cfg_eps(x: np.ndarray, out: np.ndarray, sigma, cfg, uncond_first: bool, keep_uncond: bool = True):
    """CFG of an eps model from one UNet call over [uncond rows, cond rows] (or cond first).

    For each row pair: ``d = x - out * sigma`` (ComfyUI's ``calculate_denoised``), then
    ``uncond + (cond - uncond) * cfg``. Returns (guided, uncond denoised), fresh float32 arrays of
    x's shape (uncond None with ``keep_uncond=False``); raises :class:`NonFiniteOutput` if ``out``
    holds NaN or inf. x: [B, ...] float32, out: [2B, ...] float32, both C-contiguous. Callers check
    :func:`available` first."""
    if not (x.flags.c_contiguous and out.flags.c_contiguous and x.dtype == np.float32
            and out.dtype == np.float32 and out.size == 2 * x.size):
        raise ValueError(f"x, out: received {x.dtype} {x.shape} and {out.dtype} {out.shape}, expected "
                         "C-contiguous float32 arrays, out with twice x's rows")
    guided = np.empty_like(x)
    uncond = np.empty_like(x) if keep_uncond else None
    finite = _K["head"](x.reshape(-1), out.reshape(-1), np.float32(sigma), np.float32(cfg), bool(uncond_first),
                        guided.reshape(-1), (guided if uncond is None else uncond).reshape(-1), bool(keep_uncond))
    if not finite:
        raise NonFiniteOutput(int(out.size - np.count_nonzero(np.isfinite(out))))
    return guided, uncond


jit.register_warm_up(available)  # jit.warm_up_in_background() loads the head too


_KERNELS = jit.CheckedKernels("CFG head", _compile, _self_check)
