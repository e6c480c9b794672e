"""Analytic stand-ins for a ControlNet and a UNet that consumes its residuals (numpy).

Twins of ``AnalyticControlNetTorch`` / ``AnalyticControlledUNetTorch`` in
tests/runtime/golden/make_comfyui_controlnet_golden.py (same formulas, same op order); the golden data
was made by running ComfyUI 0.3.64's own ControlNet code around the torch twins. Keep them in sync.

ControlNet ``name`` with parameters (a, b, c[4])::

    hp   = avg_pool(hint, 8)                      # [N, 3, h, w]: the hint at latent resolution
    g    = mean(hp over channels)                 # [N, 1, h, w]
    base = tanh(a * x) + b * g + (t / 999) * c + 0.1 * mean(context) [+ 0.01 * mean(y)]
    down = [base, 0.5 * base - hp[:, :1], avg_pool(base, 2)],   mid = -0.3 * mean(base over h, w)

T2I-Adapter ``name`` (unshuffle_amount, channels_in)::

    hp = avg_pool(hint, 8);  f0 = tanh(sum(hp over channels) * W_AD[c]);  features = [f0, None, avg_pool(f0, 2)]

UNet: the analytic UNet of analytic_unet.py, plus, when it receives ``control``::

    + 0.1 * down[0] + 0.07 * down[1] + 0.05 * mean(down[2] over h, w) + 0.03 * mid      (ControlNets)
    + 0.2 * mean(adapter[0] over h, w) + 0.1 * mean(adapter[2] over h, w)                (T2I-Adapters)
"""
from __future__ import annotations


import numpy as np

from tests.runtime.analytic_unet import AnalyticUNet

F32 = np.float32

CONTROLNETS = {  # name -> (a, b, c)
    "A": (0.7, 0.4, (0.02, -0.01, 0.03, 0.01)),
    "B": (1.3, -0.6, (-0.03, 0.02, 0.01, -0.02)),
}

ADAPTERS = {"T": (8, 3), "TX": (16, 3), "TG": (8, 1)}  # name -> (unshuffle_amount, channels_in)
W_AD = (0.3, -0.2, 0.5, 0.1)


def avg_pool(a: np.ndarray, k: int) -> np.ndarray:
    n, c, h, w = a.shape
    return a.reshape(n, c, h // k, k, w // k, k).mean(axis=(3, 5), dtype=F32)


class AnalyticControlNet:
    """``net(x, timestep, context, hint, y=None) -> {"down": [...], "mid": m}``; records its calls in ``log``."""

    kind = "controlnet"

    def __init__(self, name: str, family: str = "sd15", log: list | None = None):
        a, b, c = CONTROLNETS[name]
        self.name, self.family = name, family
        self.a, self.b, self.c = F32(a), F32(b), np.asarray(c, F32)
        self.log = log
        self.hints: list[np.ndarray] = []

    def __call__(self, x, timestep, context, hint, y=None):
        x, hint, ctx = (np.asarray(v, F32) for v in (x, hint, context))
        t = np.broadcast_to(np.asarray(timestep, F32).reshape(-1), (x.shape[0],))
        if self.log is not None:
            self.log.append(("cn", self.name, float(t[0]), x.shape[0]))
        self.hints.append(hint.copy())
        hp = avg_pool(hint, 8)
        g = hp.mean(axis=1, keepdims=True, dtype=F32)
        base = np.tanh(self.a * x) + self.b * g
        base = base + (t / F32(999.0))[:, None, None, None] * self.c[None, :, None, None]
        base = base + F32(0.1) * ctx.mean(axis=(1, 2), dtype=F32)[:, None, None, None]
        if y is not None:
            base = base + F32(0.01) * np.asarray(y, F32).mean(axis=1, dtype=F32)[:, None, None, None]
        down = [base.copy(), F32(0.5) * base - hp[:, :1], avg_pool(base, 2)]
        mid = F32(-0.3) * base.mean(axis=(2, 3), keepdims=True, dtype=F32)
        return {"down": down, "mid": mid}


class AnalyticAdapter:
    """``adapter(hint) -> [f0, None, f1]`` (down-block order); records its calls in ``log``."""

    kind = "t2i_adapter"

    def __init__(self, name: str, family: str = "sd15", log: list | None = None):
        self.name, self.family, self.log = name, family, log
        self.unshuffle_amount, self.channels_in = ADAPTERS[name]
        self.hints: list[np.ndarray] = []

    def __call__(self, hint):
        hint = np.asarray(hint, F32)
        if self.log is not None:
            self.log.append(("adapter", self.name, hint.shape[0]))
        self.hints.append(hint.copy())
        s = avg_pool(hint, 8).sum(axis=1, keepdims=True, dtype=F32)
        f0 = np.tanh(s * np.asarray(W_AD, F32)[None, :, None, None])
        return [f0, None, avg_pool(f0, 2)]


class AnalyticControlledUNet:
    """The analytic UNet plus the residual terms; ``log`` gets ("unet", t, rows, has_control) per call and
    ``controls`` every control dict received."""

    def __init__(self, log: list | None = None):
        self.inner = AnalyticUNet()
        self.log = log
        self.controls: list[dict] = []

    def __call__(self, x, timestep, context=None, y=None, control=None, **kwargs):
        out = self.inner(x, timestep, context, y=y)
        if self.log is not None:
            t = np.asarray(timestep, F32).reshape(-1)
            self.log.append(("unet", float(t[0]), int(np.shape(x)[0]), control is not None))
        if control is None:
            return out
        self.controls.append(control)
        if "down" in control:
            d, m = control["down"], control["mid"]
            out = out + F32(0.1) * d[0] + F32(0.07) * d[1]
            out = out + F32(0.05) * d[2].mean(axis=(2, 3), keepdims=True, dtype=F32) + F32(0.03) * m
        if "adapter" in control:
            a = control["adapter"]
            out = out + F32(0.2) * a[0].mean(axis=(2, 3), keepdims=True, dtype=F32)
            out = out + F32(0.1) * a[2].mean(axis=(2, 3), keepdims=True, dtype=F32)
        return out.astype(F32, copy=False)
