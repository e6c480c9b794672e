"""Latent previews as ComfyUI's "latent2rgb" previewer makes them, sent as binary WebSocket frames.

The denoised latent of the first batch item (in the sampler's space, i.e. after the family's
scale factor) is projected to RGB by the family's fixed Cx3 matrix (+ bias; C = 4, or 16 for SD3 /
FLUX.1), mapped from [-1, 1] to [0, 255],
and encoded as a JPEG at latent resolution (shrunk to fit ``max_size``).

Frame layout (ComfyUI's ``PREVIEW_IMAGE``): a big-endian uint32 event type (1), a big-endian uint32
image format (1 = JPEG, 2 = PNG), then the image bytes.
"""
from __future__ import annotations

import io
import struct

import numpy as np

PREVIEW_IMAGE = 1      # binary event type
FORMAT_JPEG = 1

# The public latent->RGB projections of the SD1.x and SDXL latent spaces (rows: latent channels).
_SD15 = (np.array([[0.3512, 0.2297, 0.3227],
                   [0.3250, 0.4974, 0.2350],
                   [-0.2829, 0.1762, 0.2721],
                   [-0.2120, -0.2616, -0.7177]], np.float32), None)
_SDXL = (np.array([[0.3651, 0.4232, 0.4341],
                   [-0.2533, -0.0042, 0.1068],
                   [0.1076, 0.1111, -0.0362],
                   [-0.3165, -0.2492, -0.2188]], np.float32), np.array([0.1084, -0.0175, -0.0011], np.float32))
# The 16-channel latents of SD3 / SD3.5 and FLUX.1 (ComfyUI 0.3.64 comfy/latent_formats.py SD3, Flux).
_SD3 = (np.array([[-0.0922, -0.0175, 0.0749], [0.0311, 0.0633, 0.0954], [0.1994, 0.0927, 0.0458],
                  [0.0856, 0.0339, 0.0902], [0.0587, 0.0272, -0.0496], [-0.0006, 0.1104, 0.0309],
                  [0.0978, 0.0306, 0.0427], [-0.0042, 0.1038, 0.1358], [-0.0194, 0.0020, 0.0669],
                  [-0.0488, 0.0130, -0.0268], [0.0922, 0.0988, 0.0951], [-0.0278, 0.0524, -0.0542],
                  [0.0332, 0.0456, 0.0895], [-0.0069, -0.0030, -0.0810], [-0.0596, -0.0465, -0.0293],
                  [-0.1448, -0.1463, -0.1189]], np.float32), np.array([0.2394, 0.2135, 0.1925], np.float32))
_FLUX = (np.array([[-0.0346, 0.0244, 0.0681], [0.0034, 0.0210, 0.0687], [0.0275, -0.0668, -0.0433],
                   [-0.0174, 0.0160, 0.0617], [0.0859, 0.0721, 0.0329], [0.0004, 0.0383, 0.0115],
                   [0.0405, 0.0861, 0.0915], [-0.0236, -0.0185, -0.0259], [-0.0245, 0.0250, 0.1180],
                   [0.1008, 0.0755, -0.0421], [-0.0515, 0.0201, 0.0011], [0.0428, -0.0012, -0.0036],
                   [0.0817, 0.0765, 0.0749], [-0.1264, -0.0522, -0.1103], [-0.0280, -0.0881, -0.0499],
                   [-0.1262, -0.0982, -0.0778]], np.float32), np.array([-0.0329, -0.0718, -0.0851], np.float32))


def latent_rgb_factors(family: str | None):
    """(factors [C,3], bias [3] or None) for a model family name (SD1.x's by default; SD3's for "sd3",
    FLUX.1's for "flux" and "flux-schnell")."""
    if family and family.startswith("sdxl"):
        return _SDXL
    if family == "sd3":
        return _SD3
    if family and family.startswith("flux"):
        return _FLUX
    return _SD15


def _fit(factors, channels: int):
    """Factors for a latent of ``channels``: a 16-channel latent whose family is unknown (a MODEL from
    UNETLoader, which names no checkpoint) gets FLUX.1's, a 4-channel one SD1.x's."""
    if factors[0].shape[0] == channels:
        return factors
    return _FLUX if channels == 16 else factors


def latent_to_rgb(latent: np.ndarray, factors=_SD15) -> np.ndarray:
    """uint8 [h, w, 3] preview of the first item of a latent batch [B, C, h, w]."""
    x0 = np.asarray(latent, np.float32)
    while x0.ndim > 3:
        x0 = x0[0]
    matrix, bias = _fit(factors, x0.shape[0])
    c = min(x0.shape[0], matrix.shape[0])
    rgb = np.tensordot(np.moveaxis(x0[:c], 0, -1), matrix[:c], axes=1)
    if bias is not None:
        rgb = rgb + bias
    return (np.clip((rgb + 1.0) / 2.0, 0.0, 1.0) * 255.0).astype(np.uint8)


def encode_preview_frame(latent: np.ndarray, factors=_SD15, max_size: int = 512, quality: int = 95) -> bytes:
    """A complete binary WebSocket frame carrying the JPEG preview of ``latent``."""
    from PIL import Image

    image = Image.fromarray(latent_to_rgb(latent, factors))
    if max_size and max(image.size) > max_size:
        image.thumbnail((max_size, max_size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    buffer.write(struct.pack(">II", PREVIEW_IMAGE, FORMAT_JPEG))
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def decode_preview_frame(frame: bytes):
    """(event type, image format, PIL image) of a binary frame (for clients and tests)."""
    from PIL import Image

    event, fmt = struct.unpack(">II", frame[:8])
    return event, fmt, Image.open(io.BytesIO(frame[8:]))
