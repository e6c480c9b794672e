"""Latent previews as ComfyUI's "latent2rgb" previewer makes them, sent as binary WebSocket frames.

The denoised latent of the first batch item (in the sampler's space, i.e. after the family's
scale factor) is projected to RGB by a fixed 4x3 matrix (+ bias), mapped from [-1, 1] to [0, 255],
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


def latent_rgb_factors(family: str | None):
    """(factors [C,3], bias [3] or None) for a model family name (SD1.x's by default)."""
    if family and family.startswith("sdxl"):
        return _SDXL
    return _SD15


def latent_to_rgb(latent: np.ndarray, factors=_SD15) -> np.ndarray:
    """uint8 [h, w, 3] preview of the first item of a latent batch [B, C, h, w]."""
    x0 = np.asarray(latent, np.float32)
    while x0.ndim > 3:
        x0 = x0[0]
    matrix, bias = factors
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
