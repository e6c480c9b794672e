"""Which dim of which input is batch / height / width / tokens, and the shape profiles built from that.

Pure logic (no backend import), shared by the TensorRT builder, the ONNX Runtime CUDA-graph buckets,
validation messages and cache keys.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from .spec import EngineError, ShapeProfile, ShapeRange, TensorSpec

BATCH, LATENT_H, LATENT_W, PIXEL_H, PIXEL_W, TOKENS = "batch", "latent_h", "latent_w", "pixel_h", "pixel_w", "tokens"
#: The networks an export may hold. SD / SDXL: unet, clip, clip2; the flow families (SD3, FLUX.1):
#: transformer, clip_l, clip_g, t5xxl; ControlNet: unet_control (the UNet taking residuals), controlnet,
#: t2i_adapter. Every family: vae_decoder, vae_encoder.
MODELS = ("unet", "clip", "clip2", "vae_decoder", "vae_encoder", "transformer", "clip_l", "clip_g", "t5xxl",
          "unet_control", "controlnet", "t2i_adapter")
#: Networks whose first 4-D input is the latent (x / sample) and whose context has a token axis.
DENOISERS = ("unet", "transformer", "unet_control", "controlnet")
#: Text encoders fed 77-token CLIP chunks.
CLIP_MODELS = ("clip", "clip2", "clip_l", "clip_g")
#: Text encoders whose token count is the prompt's (T5: ComfyUI pads to a minimum, never truncates).
SEQUENCE_MODELS = ("t5xxl",)
CONTEXT_INPUTS = ("encoder_hidden_states", "context")
CLIP_TOKENS = 77
_SCALED_DIM = re.compile(r"^([hwHW])_(\d+)$")


def _span(span: dict, role: str) -> tuple[int, int, int]:
    """A role's (min, opt, max); ``latent_h/2`` is ``latent_h``'s divided by 2, rounded up (a strided conv)."""
    base, _, div = role.partition("/")
    if not div:
        return span[role]
    d = int(div)
    return tuple(-(-v // d) for v in span[base])


def dim_roles(model: str, inputs: Sequence[TensorSpec]) -> dict[str, list[str | None]]:
    """Role of each dim of each input, by position, then spread to dims that share a symbolic name."""
    roles: dict[str, list[str | None]] = {}
    for i, spec in enumerate(inputs):
        r: list[str | None] = [None] * spec.rank
        if spec.rank >= 1:
            r[0] = BATCH
        image_like = spec.rank == 4 and (spec.name in ("sample", "x") or i == 0)
        if model in DENOISERS and image_like or model == "vae_decoder" and i == 0 and spec.rank == 4:
            r[2], r[3] = LATENT_H, LATENT_W
        elif spec.rank == 4 and (model == "vae_encoder" and i == 0 or spec.name == "controlnet_cond"):
            r[2], r[3] = PIXEL_H, PIXEL_W
        elif model in DENOISERS and spec.name in CONTEXT_INPUTS and spec.rank == 3:
            r[1] = TOKENS
        elif model in CLIP_MODELS + SEQUENCE_MODELS and spec.rank == 2:
            r[1] = TOKENS
        roles[spec.name] = r
    for spec in inputs:  # ControlNet residuals / adapter features: "h_2" is the latent height / 2 (rounded up)
        for k, d in enumerate(spec.shape):
            m = _SCALED_DIM.match(d) if isinstance(d, str) and roles[spec.name][k] is None else None
            if m:
                base = {"h": LATENT_H, "w": LATENT_W, "H": PIXEL_H, "W": PIXEL_W}[m.group(1)]
                roles[spec.name][k] = f"{base}/{int(m.group(2))}"
    by_symbol: dict[str, str] = {}
    for spec in inputs:
        for d, role in zip(spec.shape, roles[spec.name]):
            if isinstance(d, str) and role is not None:
                by_symbol.setdefault(d, role)
    for spec in inputs:
        for k, d in enumerate(spec.shape):
            if roles[spec.name][k] is None and isinstance(d, str) and d in by_symbol:
                roles[spec.name][k] = by_symbol[d]
    return roles


@dataclass(frozen=True)
class ProfileRequest:
    """What the user asked for: image sizes (width, height), batch and token ranges, static or dynamic."""

    sizes: tuple = ((512, 512),)
    batch: tuple = (1, 4)
    tokens: tuple = (CLIP_TOKENS, CLIP_TOKENS)
    dynamic: bool = False
    latent_scale: int = 8
    text_tokens: tuple | None = None  # T5's input tokens (flow families); None = the same as ``tokens``

    def __post_init__(self):
        object.__setattr__(self, "sizes", tuple((int(w), int(h)) for w, h in self.sizes) or ((512, 512),))
        object.__setattr__(self, "batch", (int(self.batch[0]), int(self.batch[1])))
        object.__setattr__(self, "tokens", (int(self.tokens[0]), int(self.tokens[1])))
        text = self.text_tokens if self.text_tokens is not None else self.tokens
        object.__setattr__(self, "text_tokens", (int(text[0]), int(text[1])))
        for w, h in self.sizes:
            if w % self.latent_scale or h % self.latent_scale:
                raise EngineError(f"shapes: received {w}x{h}, expected a width and height that are multiples of "
                                  f"the latent scale {self.latent_scale}")

    def cli_args(self, sizes=None, batch=None, tokens=None) -> str:
        sizes = sizes or self.sizes
        batch = batch or self.batch
        tokens = tokens or self.tokens
        out = "--shapes " + ",".join(f"{w}x{h}" for w, h in sizes)
        out += f" --batch {batch[0]}-{batch[1]}" if batch[0] != batch[1] else f" --batch {batch[0]}"
        if tokens != (CLIP_TOKENS, CLIP_TOKENS):
            out += f" --tokens {tokens[0]}-{tokens[1]}"
        if self.dynamic:
            out += " --dynamic"
        return out


def _bucket_label(sizes, dynamic) -> str:
    if not dynamic:
        w, h = sizes[0]
        return f"{w}x{h} static"
    ws, hs = [w for w, _ in sizes], [h for _, h in sizes]
    return f"{min(ws)}x{min(hs)}..{max(ws)}x{max(hs)} dynamic"


def _model_tokens(model: str, req: ProfileRequest) -> tuple[int, int, int]:
    if model in CLIP_MODELS:  # CLIP encodes 77-token chunks; longer prompts are more chunks
        return CLIP_TOKENS, CLIP_TOKENS, CLIP_TOKENS
    if model in SEQUENCE_MODELS:
        return req.text_tokens[0], req.text_tokens[0], req.text_tokens[1]
    return req.tokens[0], req.tokens[0], req.tokens[1]


def compute_profiles(model: str, inputs: Sequence[TensorSpec], req: ProfileRequest) -> list[ShapeProfile]:
    """Static: one profile per image size (the shape buckets). Dynamic: one profile spanning them all.

    Static dims of the graph are kept as they are; a dynamic dim gets its range from its role, and a
    dynamic dim with no known role is an error (TensorRT needs a range for every dim).
    """
    roles = dim_roles(model, inputs)
    s = req.latent_scale
    b_lo, b_hi = req.batch
    b_opt = min(max(2, b_lo), b_hi)  # cond+uncond in one call is the common case
    t_lo, t_opt, t_hi = _model_tokens(model, req)
    groups = [[size] for size in req.sizes] if not req.dynamic else [list(req.sizes)]
    profiles = []
    for sizes in groups:
        ws, hs = [w for w, _ in sizes], [h for _, h in sizes]
        w0, h0 = sizes[0]
        span = {
            BATCH: (b_lo, b_opt, b_hi),
            LATENT_W: (min(ws) // s, w0 // s, max(ws) // s), LATENT_H: (min(hs) // s, h0 // s, max(hs) // s),
            PIXEL_W: (min(ws), w0, max(ws)), PIXEL_H: (min(hs), h0, max(hs)),
            TOKENS: (t_lo, t_opt, t_hi),
        }
        ranges = {}
        for spec in inputs:
            lo, opt, hi = [], [], []
            for k, (d, role) in enumerate(zip(spec.shape, roles[spec.name])):
                if isinstance(d, int):
                    if role is not None and role.partition("/")[0] in span and not (
                            _span(span, role)[0] <= d <= _span(span, role)[2]):
                        raise EngineError(
                            f"{model} input {spec.name!r} is exported with a static {role} of {d} "
                            f"(shape {spec.shape_str()}): re-export with dynamic axes or ask for a "
                            f"matching size")
                    lo.append(d), opt.append(d), hi.append(d)
                elif role is None:
                    raise EngineError(
                        f"{model} input {spec.name!r} dim {k} ({d or '?'}) is dynamic and its meaning is "
                        f"unknown, so no range can be chosen for it; export it with a static size")
                else:
                    a, o, z = _span(span, role)
                    lo.append(a), opt.append(o), hi.append(z)
            ranges[spec.name] = ShapeRange(tuple(lo), tuple(opt), tuple(hi))
        profiles.append(ShapeProfile(ranges, _bucket_label(sizes, req.dynamic)))
    return profiles


def build_hint(model: str, inputs: Sequence[TensorSpec], req: ProfileRequest | None,
               export_dir: str | None, backend: str | None):
    """A ``hint(spec, shape)`` for Validator: the build command that would accept ``shape``."""
    roles = dim_roles(model, inputs)
    target = export_dir or "EXPORT_DIR"
    s = req.latent_scale if req else 8

    def hint(spec: TensorSpec, shape: tuple) -> str | None:
        r = roles.get(spec.name, [])
        w = h = None
        batch = tokens = None
        for role, v in zip(r, shape):
            if role == LATENT_W:
                w = v * s
            elif role == LATENT_H:
                h = v * s
            elif role == PIXEL_W:
                w = v
            elif role == PIXEL_H:
                h = v
            elif role == BATCH:
                batch = v
            elif role == TOKENS:
                tokens = v
        base = req or ProfileRequest()
        sizes = list(base.sizes)
        if w and h and (w, h) not in sizes:
            sizes.append((w, h))
        b = base.batch
        if batch and not b[0] <= batch <= b[1]:
            b = (min(b[0], batch), max(b[1], batch))
        t = base.tokens
        if tokens and model not in CLIP_MODELS + SEQUENCE_MODELS and not t[0] <= tokens <= t[1]:
            t = (min(t[0], tokens), max(t[1], tokens))
        if sizes == list(base.sizes) and b == base.batch and t == base.tokens:
            return None
        be = f" --backend {backend}" if backend else ""
        return f"build a wider one with `ksampler-rt build {target}{be} {base.cli_args(sizes, b, t)}`"

    return hint
