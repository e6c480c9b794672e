"""A stand-in checkpoint for exercising the server without exported engines (tests, benchmarks,
client development: ``ksampler-rt serve --fake-checkpoint NAME``).

The "UNet" is an analytic, deterministic numpy function; CLIP hashes the prompt into a fixed
random embedding; the VAE is a fixed linear latent<->RGB map. Images are meaningless but every
code path of the server (sampling steps, progress, previews, PNG output, caching) runs for real.
"""
from __future__ import annotations

import hashlib
import time

import numpy as np

F32 = np.float32
_W_T = np.array([0.05, -0.04, 0.03, -0.02], F32)
_B_C = np.array([0.01, -0.02, 0.015, -0.005], F32)
_RGB = np.array([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350],
                 [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]], F32)  # latent -> RGB


class FakeUNet:
    """``unet(x, timestep, context) -> eps``: cheap, deterministic, depends on all three inputs.
    ``delay`` seconds per call make sampling slow enough to interrupt in tests."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.calls = 0

    def __call__(self, x, timestep, context=None, **kwargs):
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        x = np.asarray(x, F32)
        t = np.asarray(timestep, F32).reshape(-1)
        if t.shape[0] == 1 and x.shape[0] != 1:
            t = np.broadcast_to(t, (x.shape[0],))
        ctx = np.asarray(context, F32)
        c = x.shape[1]
        out = F32(0.9) * x + F32(0.1) * np.tanh(x)
        out = out + (t / F32(999.0))[:, None, None, None] * _W_T[None, :c, None, None]
        out = out + F32(0.05) * ctx.mean(axis=(1, 2), dtype=F32)[:, None, None, None]
        return (out + _B_C[None, :c, None, None]).astype(F32)


class FakeClip:
    def __init__(self, width: int = 768, layer: int = -1):
        self.width = width
        self.layer = layer

    def encode(self, text: str):
        if "__raise__" in text:
            raise RuntimeError("FakeClip: the prompt asked for a failure (__raise__)")
        seed = int.from_bytes(hashlib.sha256(f"{self.layer}:{text}".encode()).digest()[:8], "little")
        rng = np.random.default_rng(seed)
        cond = rng.standard_normal((1, 77, self.width), dtype=F32) * F32(0.5)
        return [[cond, {"pooled_output": cond[:, -1].copy()}]]

    def clip_layer(self, layer: int) -> "FakeClip":
        return FakeClip(self.width, layer)


class FakeVAE:
    def decode(self, latent):
        latent = np.asarray(latent, F32)
        rgb = np.einsum("bchw,cd->bhwd", latent, _RGB)
        rgb = np.clip((rgb + 1.0) / 2.0, 0.0, 1.0)
        return np.repeat(np.repeat(rgb, 8, axis=1), 8, axis=2).astype(F32)

    def encode(self, image):
        image = np.asarray(image, F32)[..., :3]
        b, h, w, _ = image.shape
        pooled = image[:, : h // 8 * 8, : w // 8 * 8].reshape(b, h // 8, 8, w // 8, 8, 3).mean(axis=(2, 4))
        lat = np.einsum("bhwd,dc->bchw", pooled * 2.0 - 1.0, np.linalg.pinv(_RGB))
        return lat.astype(F32)


class FakeCheckpoint:
    """What ``Pipeline.load_checkpoint`` returns: ``.model``, ``.clip``, ``.vae`` (and unpacks)."""

    def __init__(self, delay: float = 0.0, family: str = "sd15"):
        from ..runtime import Model

        self.unet = FakeUNet(delay)
        self.model = Model(self.unet, family)
        self.clip = FakeClip()
        self.vae = FakeVAE()
        self.released = False

    def __iter__(self):
        return iter((self.model, self.clip, self.vae))

    def release(self) -> None:
        self.released = True


def fake_pipeline(names=("tiny-sd15",), *, delay: float = 0.0, **pipeline_kwargs):
    """A ``Pipeline`` whose checkpoints ``names`` are :class:`FakeCheckpoint` s (no files needed)."""
    from ..workflow.nodes import build_node_specs
    from ..workflow.pipeline import Pipeline

    names = tuple(names)
    pipeline_kwargs.setdefault("log", None)
    pipe = Pipeline(**pipeline_kwargs)
    pipe.specs = build_node_specs(lambda: list(names), pipe._input_images)  # noqa: SLF001
    checkpoints: dict[str, FakeCheckpoint] = {}

    def load_checkpoint(name: str):
        if name not in names:
            raise ValueError(f"ckpt_name: received {name!r}, expected one of {names}")
        with pipe._lock:  # noqa: SLF001
            if name not in checkpoints:
                checkpoints[name] = FakeCheckpoint(delay)
            return checkpoints[name]

    def release():
        checkpoints.clear()

    pipe.load_checkpoint = load_checkpoint
    pipe.release = release
    pipe.fake_checkpoints = checkpoints
    return pipe
