"""A cheap, deterministic, mildly nonlinear stand-in for a diffusion UNet.

Used by the ComfyUI parity test (tests/runtime/test_comfyui_parity.py). The golden data in
tests/runtime/golden/ was produced by running real ComfyUI 0.3.64 with the *identical*
formula written in torch (tests/runtime/golden/make_comfyui_golden.py, class
``AnalyticUNetTorch``) plugged in as the ``diffusion_model`` of a real
``comfy.model_base.BaseModel`` / ``SDXL``. Keep the two in sync.

    out = 0.9*x + 0.1*tanh(x)
          + (t/999) * W_T[c]                    # timestep matters (and its integer rounding)
          + 0.05 * mean(context over T and D)   # cond vs uncond differ -> CFG matters
          + B_C[c]                              # per-channel bias
          [+ 0.01 * mean(y)]                    # SDXL only: the ADM vector

x is the c_in-scaled latent [N, C, H, W] (C = 4), t the integer-valued timestep [N],
context [N, T, D]. All float32. The output is the model's raw prediction (eps or v).
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
W_T = np.array([0.05, -0.04, 0.03, -0.02], dtype=F32)
B_C = np.array([0.01, -0.02, 0.015, -0.005], dtype=F32)


class AnalyticUNet:
    """Callable ``unet(x, timestep, context, **kwargs) -> np.ndarray``.

    If ``record`` is true every call appends (x, timestep, context, y) copies to ``calls``.
    """

    def __init__(self, record: bool = False):
        self.record = record
        self.calls: list[dict] = []

    def __call__(self, x, timestep, context=None, y=None, **kwargs):
        x = np.asarray(x, dtype=F32)
        t = np.asarray(timestep, dtype=F32).reshape(-1)
        if t.shape[0] == 1 and x.shape[0] != 1:
            t = np.broadcast_to(t, (x.shape[0],))
        ctx = np.asarray(context, dtype=F32)
        if self.record:
            self.calls.append({
                "x": x.copy(), "timestep": t.copy(), "context": ctx.copy(),
                "y": None if y is None else np.asarray(y, dtype=F32).copy(),
            })
        c = x.shape[1]
        out = F32(0.9) * x + F32(0.1) * np.tanh(x)
        out = out + (t / F32(999.0))[:, None, None, None] * W_T[None, :c, None, None]
        out = out + F32(0.05) * ctx.mean(axis=(1, 2), dtype=F32)[:, None, None, None]
        out = out + B_C[None, :c, None, None]
        if y is not None:
            yy = np.asarray(y, dtype=F32)
            out = out + F32(0.01) * yy.mean(axis=1, dtype=F32)[:, None, None, None]
        return out.astype(F32, copy=False)


def analytic_unet(x, timestep, context=None, y=None, **kwargs):
    """Stateless functional form of :class:`AnalyticUNet`."""
    return AnalyticUNet()(x, timestep, context, y=y, **kwargs)


W16 = np.tile(W_T, 4)
B16 = np.tile(B_C, 4)


class AnalyticFlowNet:
    """The flow families' stand-in (16 latent channels), twin of ``AnalyticFlowNetTorch`` in
    tests/runtime/golden/make_comfyui_flow_golden.py::

        out = 0.9*x + 0.1*tanh(x) + (t / t_divisor) * W16[c] + 0.05 * mean(context) + B16[c]
              [+ 0.01 * mean(y)] [+ 0.02 * guidance]          # guidance: FLUX.1 dev only

    ``t_divisor``: 1000 for SD3 (its timestep is sigma * 1000), 1 for FLUX.1. The output is the
    flow's velocity (ComfyUI's CONST: denoised = x - out * sigma).
    """

    def __init__(self, t_divisor: float, takes_guidance: bool):
        self.t_divisor, self.takes_guidance = F32(t_divisor), takes_guidance
        self.calls: list[dict] = []

    def __call__(self, x, timestep, context=None, y=None, guidance=None, **kwargs):
        x = np.asarray(x, dtype=F32)
        t = np.broadcast_to(np.asarray(timestep, dtype=F32).reshape(-1), (x.shape[0],))
        ctx = np.asarray(context, dtype=F32)
        self.calls.append({"timestep": t.copy(), "y": None if y is None else np.asarray(y).copy(),
                           "guidance": None if guidance is None else np.asarray(guidance).copy()})
        c = x.shape[1]
        out = F32(0.9) * x + F32(0.1) * np.tanh(x)
        out = out + (t / self.t_divisor)[:, None, None, None] * W16[None, :c, None, None]
        out = out + F32(0.05) * ctx.mean(axis=(1, 2), dtype=F32)[:, None, None, None]
        out = out + B16[None, :c, None, None]
        if y is not None:
            out = out + F32(0.01) * np.asarray(y, dtype=F32).mean(axis=1, dtype=F32)[:, None, None, None]
        if self.takes_guidance and guidance is not None:
            out = out + F32(0.02) * np.asarray(guidance, dtype=F32).reshape(-1)[:, None, None, None]
        return out.astype(F32, copy=False)
