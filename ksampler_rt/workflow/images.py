"""IMAGE / MASK handling as ComfyUI's LoadImage and SaveImage nodes (nodes.py, 0.3.64).

IMAGE is float32 NHWC in [0, 1]. Saving multiplies by 255, clips and *truncates* to uint8, and
embeds the API prompt and the UI workflow as PNG text chunks so the file drags back into ComfyUI.
"""
from __future__ import annotations

import errno
import io
import json
import os
import re
import struct
import uuid
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# The largest image (width x height x frames) LoadImage and uploads accept: 8192 x 8192. A PNG of a few
# hundred KB can declare 12000 x 12000 pixels; decoding it costs gigabytes (float32 IMAGE, previews).
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192


def check_pixels(img: Image.Image, name: str, max_pixels: int | None) -> None:
    """Raise ValueError when ``img`` declares more than ``max_pixels`` pixels (read from the header only)."""
    if not max_pixels:
        return
    frames = max(1, int(getattr(img, "n_frames", 1) or 1))
    pixels = img.size[0] * img.size[1] * frames
    if pixels > max_pixels:
        raise ValueError(f"image: received {name!r} with {img.size[0]}x{img.size[1]} pixels"
                         f"{f' x {frames} frames' if frames > 1 else ''} ({pixels}), expected at most "
                         f"{max_pixels} pixels (--max-image-pixels)")


def load_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[np.ndarray, np.ndarray]:
    """(IMAGE [F,H,W,3], MASK [F,H,W]) like ComfyUI's LoadImage: EXIF transpose, RGB/255, mask = 1 - alpha."""
    path = Path(path)
    try:
        img = Image.open(path)
    except FileNotFoundError:
        raise
    except Exception as exc:  # Pillow raises several types for unreadable files
        raise ValueError(f"image: cannot read {path.name} as an image ({exc}); expected PNG, JPEG, WebP, ...") from None
    check_pixels(img, path.name, max_pixels)  # before decoding anything
    try:
        img.load()
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"image: cannot read {path.name} as an image ({exc}); expected PNG, JPEG, WebP, ...") from None
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


def check_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
    """Raise ValueError when ``path`` does not decode as an image or is larger than ``max_pixels`` (LoadImage's
    file, checked before running)."""
    try:
        with Image.open(path) as img:
            check_pixels(img, Path(path).name, max_pixels)
            img.load()
    except FileNotFoundError:
        raise
    except ValueError as exc:
        if "--max-image-pixels" in str(exc):
            raise
        raise ValueError(f"cannot read {Path(path).name} as an image ({exc}); expected PNG, JPEG, WebP, ...") from None
    except Exception as exc:  # Pillow raises several types for unreadable files
        raise ValueError(f"cannot read {Path(path).name} as an image ({exc}); expected PNG, JPEG, WebP, ...") from None


def encode_png_frame(image: np.ndarray) -> bytes:
    """A binary WebSocket frame of ComfyUI's ``send_image``: uint32 event 1 (PREVIEW_IMAGE), uint32 format 2
    (PNG), both big-endian, then the PNG (compress_level 1, as ComfyUI)."""
    buffer = io.BytesIO()
    buffer.write(struct.pack(">II", 1, 2))
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


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


def check_filename_prefix(filename_prefix) -> tuple[str, str]:
    """(subfolder, name) of a SaveImage ``filename_prefix``, or ValueError: a relative path inside the output
    folder, without NUL, ``..``, hidden (``.``) parts or an empty name -- what ``/view`` can serve back."""
    if not isinstance(filename_prefix, str):
        raise ValueError(f"filename_prefix: received {filename_prefix!r}, expected a string")
    text = filename_prefix.replace("\\", "/")
    problem = None
    if "\x00" in text:
        problem = "a NUL byte"
    elif text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        problem = "an absolute path"
    elif len(text.encode("utf-8", "surrogatepass")) > 200:
        problem = "more than 200 bytes"
    else:
        parts = [p for p in PurePosixPath(text).parts if p not in ("", ".")]
        if not parts or text.endswith("/"):
            problem = "no file name"
        elif any(p == ".." for p in parts):
            problem = "a '..' part"
        elif any(p.startswith(".") for p in parts):
            problem = "a hidden ('.') part"
    if problem:
        raise ValueError(f"filename_prefix: received {filename_prefix!r} ({problem}), expected a file name or a "
                         "relative subfolder/name inside the output folder")
    subfolder, _, name = "/".join(p for p in PurePosixPath(text).parts if p != ".").rpartition("/")
    return subfolder, name


_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _create_exclusive(folder: Path, data: bytes, name_for) -> tuple[str, int]:
    """Write ``data`` under the first name ``name_for(i)`` (i = 0, 1, ...) that does not exist yet, atomically:
    the bytes go to a fresh temporary file (O_EXCL|O_NOFOLLOW: never a planted file or link), then a hard link
    claims the final name, which fails instead of replacing anything (two processes writing one folder each
    get their own name). Where hard links are not supported, the final name is created with O_EXCL directly."""
    tmp = folder / f".ksampler-rt-{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        for attempt in range(100000):
            name = name_for(attempt)
            try:
                os.link(tmp, folder / name, follow_symlinks=False)
                return name, attempt
            except FileExistsError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                try:  # no hard links on this file system
                    fd2 = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o644)
                except FileExistsError:
                    continue
                with os.fdopen(fd2, "wb") as f:
                    f.write(data)
                return name, attempt
        raise FileExistsError("SaveImage: no free file name after 100000 tries")
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def save_images(images: np.ndarray, output_dir: str | Path, filename_prefix: str = "ComfyUI",
                prompt: dict | None = None, extra_pnginfo: dict | None = None,
                image_type: str = "output", compress_level: int = 4) -> list[dict]:
    """Write each image as ``{prefix}_{counter:05}_.png``; return ComfyUI's ``ui.images`` entries.

    The counter starts one past the largest one in the folder (folder_paths.get_save_image_path) and moves on
    when another writer took that name meanwhile; files are never overwritten and links are never followed."""
    subfolder, name = check_filename_prefix(filename_prefix)
    output_dir = Path(output_dir).resolve()
    folder = output_dir.joinpath(*subfolder.split("/")) if subfolder else output_dir
    folder.mkdir(parents=True, exist_ok=True)
    real = folder.resolve()
    if real != output_dir and output_dir not in real.parents:
        raise ValueError(f"filename_prefix: received {filename_prefix!r}, which leaves the output folder (a linked "
                         "subfolder); expected a subfolder inside it")
    folder = real
    counter = _next_counter(folder, name)
    results = []
    for batch_number, image in enumerate(np.asarray(images)):
        metadata = PngInfo()
        if prompt is not None:
            metadata.add_text("prompt", json.dumps(prompt))
        for key, value in (extra_pnginfo or {}).items():
            metadata.add_text(key, json.dumps(value))
        stem = name.replace("%batch_num%", str(batch_number))
        buffer = io.BytesIO()
        Image.fromarray(to_uint8(image)).save(buffer, format="PNG", pnginfo=metadata, compress_level=compress_level)
        start = counter
        file, taken = _create_exclusive(folder, buffer.getvalue(), lambda i: f"{stem}_{start + i:05}_.png")
        counter = start + taken + 1
        results.append({"filename": file, "subfolder": subfolder, "type": image_type})
    return results


def read_png_metadata(path: str | Path) -> dict:
    """The JSON text chunks of a PNG written by SaveImage (``prompt``, ``workflow``, ...)."""
    with Image.open(path) as img:
        return {k: json.loads(v) for k, v in img.text.items()}
