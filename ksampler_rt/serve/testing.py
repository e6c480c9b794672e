"""Stand-in models for exercising the workflow runner and the server without exported engines (tests,
benchmarks, client development: ``ksampler-rt serve --fake-checkpoint NAME``, ``ksampler-rt run
--fake-checkpoint NAME``).

The "UNet" is an analytic, deterministic numpy function; CLIP hashes the prompt into a fixed
random embedding; the VAE is a fixed linear latent<->RGB map. Images are meaningless but every
code path of the server (sampling steps, progress, previews, PNG output, caching) runs for real.

The flow families (SD3 / SD3.5, FLUX.1 dev and schnell) have their own stand-ins behind the same node
graph: :class:`FakeFlowNet` (16 latent channels; gets ``y`` and, FLUX.1 dev, ``guidance``), text towers
giving ComfyUI's shapes (clip_l [1, 77k, 768] + pooled 768, clip_g 1280 + pooled 1280, T5-XXL
[1, max(77, n + 1), 4096]) assembled by the real :class:`~ksampler_rt.workflow.flow_text.FlowClip`, and a
16-channel VAE. A checkpoint's family follows its name (``sd3`` / ``flux`` / ``schnell`` in it, see
:func:`fake_family`); the separate components (UNETLoader, DualCLIPLoader, TripleCLIPLoader, VAELoader) are
listed as :data:`FAKE_COMPONENTS`.
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


_W16 = np.tile(_W_T, 4)
_B16 = np.tile(_B_C, 4)


class FakeFlowNet:
    """The flow families' ``unet(x, timestep, context, y=, guidance=) -> velocity`` (16 channels): the
    network of :class:`FakeUNet` plus the pooled vector and (FLUX.1 dev) the guidance; SD3's timestep is
    sigma * 1000, FLUX.1's sigma."""

    def __init__(self, family: str, delay: float = 0.0):
        self.family, self.delay = family, delay
        self.t_divisor = F32(1000.0 if family == "sd3" else 1.0)
        self.takes_guidance = family == "flux"
        self.calls = 0

    def __call__(self, x, timestep, context=None, y=None, guidance=None, **kwargs):
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        x = np.asarray(x, F32)
        t = np.broadcast_to(np.asarray(timestep, F32).reshape(-1), (x.shape[0],))
        c = x.shape[1]
        out = F32(0.9) * x + F32(0.1) * np.tanh(x)
        out = out + (t / self.t_divisor)[:, None, None, None] * _W16[None, :c, None, None]
        out = out + F32(0.05) * np.asarray(context, F32).mean(axis=(1, 2), dtype=F32)[:, None, None, None]
        out = out + _B16[None, :c, None, None]
        if y is not None:
            out = out + F32(0.01) * np.asarray(y, F32).mean(axis=1, dtype=F32)[:, None, None, None]
        if self.takes_guidance and guidance is not None:
            out = out + F32(0.02) * np.asarray(guidance, F32).reshape(-1)[:, None, None, None]
        return out.astype(F32, copy=False)


class FakeTextTower:
    """One text encoder of the flow families (``name``: "l", "g" or "t5xxl") with ComfyUI's output shapes:
    CLIP towers make 77-token chunks (75 words each here) and a pooled vector, T5-XXL max(77, words + 1)
    tokens and no pooled vector. Values: a fixed random embedding hashed from the text (and the layer)."""

    WIDTHS = {"l": 768, "g": 1280, "t5xxl": 4096}

    def __init__(self, name: str):
        if name not in self.WIDTHS:
            raise ValueError(f"name: received {name!r}, expected one of {tuple(self.WIDTHS)}")
        self.name = name

    def chunks(self, text: str) -> int:
        return 1 if self.name == "t5xxl" else max(1, -(-len(text.split()) // 75))

    def _rng(self, *key) -> np.random.Generator:
        digest = hashlib.sha256(repr((self.name, *key)).encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))

    def encode(self, text: str | None, chunks: int | None = None, layer: int | None = None):
        width = self.WIDTHS[self.name]
        if self.name == "t5xxl":
            tokens = 1 if text is None else max(77, len(text.split()) + 1)  # no tokens: just the end token
            return self._rng(text, layer).standard_normal((1, tokens, width), dtype=F32) * F32(0.5), None
        text = "" if text is None else text
        n = max(self.chunks(text), chunks or 1)
        z = self._rng(text, layer).standard_normal((1, 77 * n, width), dtype=F32) * F32(0.5)
        return z, z[:, -1].copy()


def fake_family(name: str) -> str:
    """The family a stand-in checkpoint or diffusion model of this name has: "flux-schnell", "flux", "sd3"
    (SD3 and SD3.5) by the name, else "sd15"."""
    lower = name.lower()
    if "schnell" in lower:
        return "flux-schnell"
    if "flux" in lower:
        return "flux"
    if "sd3" in lower:
        return "sd3"
    return "sd15"


def fake_flow_clip(clip_type: str, towers=None):
    """The stand-in CLIP of an SD3 (clip_l, clip_g, t5xxl) or FLUX.1 (clip_l, t5xxl) checkpoint."""
    from ..workflow.flow_text import FlowClip

    names = towers or (("l", "t5xxl") if clip_type == "flux" else ("l", "g", "t5xxl"))
    return FlowClip(clip_type, {name: FakeTextTower(name) for name in names})


class FakeVAE16:
    """The 16-channel VAE of SD3 / FLUX.1: a fixed linear latent <-> RGB map (ComfyUI's latent2rgb factors
    of the family, so previews and decoded images agree)."""

    def __init__(self, family: str):
        from .preview import latent_rgb_factors

        matrix, bias = latent_rgb_factors(family)
        self.matrix = matrix * F32(4.0)
        self.bias = bias if bias is not None else np.zeros(3, F32)
        self.family = family

    def decode(self, latent):
        latent = np.asarray(latent, F32)
        if latent.shape[1] != 16:
            raise ValueError(f"samples: received a latent with {latent.shape[1]} channels, expected 16 "
                             f"(the {self.family} VAE)")
        rgb = np.einsum("bchw,cd->bhwd", latent, self.matrix) + self.bias
        rgb = np.clip((rgb + 1.0) / 2.0, 0.0, 1.0)
        return np.repeat(np.repeat(rgb, 8, axis=1), 8, axis=2).astype(F32)

    def encode(self, image):
        image = np.asarray(image, F32)[..., :3]
        b, h, w, _ = image.shape
        pooled = image[:, : h // 8 * 8, : w // 8 * 8].reshape(b, h // 8, 8, w // 8, 8, 3).mean(axis=(2, 4))
        lat = np.einsum("bhwd,dc->bchw", pooled * 2.0 - 1.0 - self.bias, np.linalg.pinv(self.matrix))
        return lat.astype(F32)


# what UNETLoader / DualCLIPLoader / TripleCLIPLoader / VAELoader list on the stand-ins (ComfyUI's file names)
FAKE_COMPONENTS = {
    "diffusion_models": ("flux1-dev.safetensors", "flux1-schnell.safetensors", "sd3.5_medium.safetensors"),
    "text_encoders": ("clip_g.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors"),
    "vae": ("ae.safetensors", "sd3.5_vae.safetensors"),
}
_TOWER_OF_FILE = (("clip_l", "l"), ("clip_g", "g"), ("t5", "t5xxl"))


def fake_component(folder: str, names: tuple, options: dict, delay: float = 0.0):
    """The stand-in a component loader node returns (``Pipeline.load_component`` on the stand-ins)."""
    from ..runtime import Model

    key = {"diffusion_models": "unet_name", "text_encoders": "clip_name", "vae": "vae_name"}[folder]
    for name in names:
        if name not in FAKE_COMPONENTS[folder]:
            raise ValueError(f"{key}: received {name!r}, expected one of {FAKE_COMPONENTS[folder]}")
    if folder == "diffusion_models":
        family = fake_family(names[0])
        return Model(FakeFlowNet(family, delay), family)
    if folder == "vae":
        return FakeVAE16("sd3" if "sd3" in names[0] else "flux")
    towers = [tower for name in names for part, tower in _TOWER_OF_FILE if part in name]
    return fake_flow_clip(options.get("type", "sd3"), towers)


class FakeCheckpoint:
    """What ``Pipeline.load_checkpoint`` returns: ``.model``, ``.clip``, ``.vae`` (and unpacks). A flow
    ``family`` (all-in-one SD3.5 / FLUX.1 export) gets the flow stand-ins."""

    def __init__(self, delay: float = 0.0, family: str = "sd15"):
        from ..runtime import Model

        if family in ("sd3", "flux", "flux-schnell"):
            self.unet = FakeFlowNet(family, delay)
            self.clip = fake_flow_clip("sd3" if family == "sd3" else "flux")
            self.vae = FakeVAE16(family)
        else:
            self.unet = FakeUNet(delay)
            self.clip = FakeClip()
            self.vae = FakeVAE()
        self.model = Model(self.unet, family)
        self.released = False

    def __iter__(self):
        return iter((self.model, self.clip, self.vae))

    def release(self) -> None:
        self.released = True


def fake_pipeline(names=("tiny-sd15",), *, delay: float = 0.0, **pipeline_kwargs):
    """A ``Pipeline`` whose checkpoints ``names`` are :class:`FakeCheckpoint` s (family by name:
    :func:`fake_family`) and whose component loaders serve :data:`FAKE_COMPONENTS` (no files needed)."""
    from ..workflow.nodes import build_node_specs
    from ..workflow.pipeline import Pipeline

    names = tuple(names)
    pipeline_kwargs.setdefault("log", None)
    pipe = Pipeline(**pipeline_kwargs)
    pipe.specs = build_node_specs(lambda: list(names), pipe._input_images,  # noqa: SLF001
                                  component_names=lambda folder: list(FAKE_COMPONENTS[folder]))
    checkpoints: dict[str, FakeCheckpoint] = {}
    components: dict[tuple, object] = {}

    def load_checkpoint(name: str):
        if name not in names:
            raise ValueError(f"ckpt_name: received {name!r}, expected one of {names}")
        with pipe._lock:  # noqa: SLF001
            if name not in checkpoints:
                checkpoints[name] = FakeCheckpoint(delay, fake_family(name))
            return checkpoints[name]

    def load_component(folder: str, component_names: tuple, options: dict):
        key = (folder, tuple(component_names), tuple(sorted(options.items())))
        with pipe._lock:  # noqa: SLF001
            if key not in components:
                components[key] = fake_component(folder, tuple(component_names), options, delay)
            return components[key]

    def release():
        checkpoints.clear()
        components.clear()

    pipe.load_checkpoint = load_checkpoint
    pipe.load_component = load_component
    pipe.release = release
    pipe.fake_checkpoints = checkpoints
    pipe.fake_components = components
    return pipe
