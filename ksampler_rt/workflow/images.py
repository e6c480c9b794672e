"""IMAGE / MASK handling as ComfyUI's LoadImage and SaveImage nodes (nodes.py, 0.3.64).

IMAGE is float32 NHWC in [0, 1]. Saving multiplies by 255, clips and *truncates* to uint8, and
embeds the API prompt and the UI workflow as PNG text chunks so the file drags back into ComfyUI.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def load_image(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(IMAGE [F,H,W,3], MASK [F,H,W]) like ComfyUI's LoadImage: EXIF transpose, RGB/255, mask = 1 - alpha."""
    path = Path(path)
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise
    except Exception as exc:  # Pillow raises several types for unreadable files
        raise ValueError(f"image: cannot read {path} as an image ({exc}); expected PNG, JPEG, WebP, ...") from None
    images, masks, size = [], [], None
    for frame in ImageSequence.Iterator(img):
        frame = ImageOps.exif_transpose(frame)
        if frame.mode == "I":
            frame = frame.point(lambda v: v * (1 / 255))
        rgb = frame.convert("RGB")
        if size is None:
            size = rgb.size
        if rgb.size != size:
            continue
        images.append(np.asarray(rgb).astype(np.float32) / 255.0)
        if "A" in frame.getbands():
            masks.append(1.0 - np.asarray(frame.getchannel("A")).astype(np.float32) / 255.0)
        elif frame.mode == "P" and "transparency" in frame.info:
            masks.append(1.0 - np.asarray(frame.convert("RGBA").getchannel("A")).astype(np.float32) / 255.0)
        else:
            masks.append(np.zeros((64, 64), np.float32))
    if len(images) > 1 and img.format != "MPO":
        return np.stack(images), np.stack(masks)
    return images[0][None], masks[0][None]


def check_image(path: str | Path) -> None:
    """Raise ValueError when ``path`` does not decode as an image (LoadImage's file, checked before running)."""
    try:
        with Image.open(path) as img:
            img.load()
    except FileNotFoundError:
        raise
    except Exception as exc:  # Pillow raises several types for unreadable files
        raise ValueError(f"cannot read {Path(path).name} as an image ({exc}); expected PNG, JPEG, WebP, ...") from None


def to_uint8(image: np.ndarray) -> np.ndarray:
    """ComfyUI's conversion for saving: clip(255 * x, 0, 255) truncated to uint8."""
    return np.clip(255.0 * image, 0, 255).astype(np.uint8)


def _next_counter(folder: Path, prefix: str) -> int:
    """folder_paths.get_save_image_path: one past the largest counter already used for the prefix."""
    pattern = re.compile(re.escape(prefix) + r"_(\d+)_?\.png$")
    counters = [int(m.group(1)) for f in folder.glob(f"{glob_escape(prefix)}_*") if (m := pattern.match(f.name))]
    return max(counters, default=0) + 1


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def save_images(images: np.ndarray, output_dir: str | Path, filename_prefix: str = "ComfyUI",
                prompt: dict | None = None, extra_pnginfo: dict | None = None,
                image_type: str = "output", compress_level: int = 4) -> list[dict]:
    """Write each image as ``{prefix}_{counter:05}_.png``; return ComfyUI's ``ui.images`` entries."""
    output_dir = Path(output_dir).resolve()
    subfolder, _, name = filename_prefix.replace("\\", "/").rpartition("/")
    folder = (output_dir / subfolder).resolve()
    if os.path.commonpath([folder, output_dir]) != str(output_dir):
        raise ValueError(f"filename_prefix: received {filename_prefix!r}, which leaves the output folder; "
                         "expected a name or a subfolder path inside it")
    folder.mkdir(parents=True, exist_ok=True)
    counter = _next_counter(folder, name)
    results = []
    for batch_number, image in enumerate(np.asarray(images)):
        metadata = PngInfo()
        if prompt is not None:
            metadata.add_text("prompt", json.dumps(prompt))
        for key, value in (extra_pnginfo or {}).items():
            metadata.add_text(key, json.dumps(value))
        file = f"{name.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
        tmp = folder / f".{file}.tmp"
        Image.fromarray(to_uint8(image)).save(tmp, format="PNG", pnginfo=metadata, compress_level=compress_level)
        os.replace(tmp, folder / file)
        results.append({"filename": file, "subfolder": subfolder, "type": image_type})
        counter += 1
    return results


def read_png_metadata(path: str | Path) -> dict:
    """The JSON text chunks of a PNG written by SaveImage (``prompt``, ``workflow``, ...)."""
    with Image.open(path) as img:
        return {k: json.loads(v) for k, v in img.text.items()}
