"""Tiny random-weight ControlNet and T2I-Adapter for the tiny SD fixtures (built offline, deterministic).

``make_tiny_controlnet(model_dir)`` writes ``model_dir/controlnet``: diffusers' ``ControlNetModel.from_unet`` on
the tiny UNet (so it shares the UNet's structure and, like a freshly initialised real ControlNet, its encoder
weights), then the ControlNet-only layers -- the hint encoder ``controlnet_cond_embedding`` and the "zero convs"
``controlnet_down_blocks`` / ``controlnet_mid_block`` -- are re-drawn with the recipe of :mod:`.tiny` (every
tensor from its own seeded generator). A real, untrained ControlNet has zero convs that are all zero, so its
residuals vanish and any test of "the residuals reach the UNet" would pass with them ignored; here they are
N(0, 1/fan_in), so every residual is of the order of the UNet's own activations.

``make_tiny_t2i_adapter(model_dir)`` writes ``model_dir/t2i_adapter``: a diffusers ``T2IAdapter`` whose feature
channels are the tiny UNet's ``block_out_channels`` (SD1.5 / SD2: ``full_adapter``, pixel-unshuffle 8; SDXL:
``full_adapter_xl``, pixel-unshuffle 16, as the real adapters), one feature per UNet down block, same recipe.

Same model folder + same seed -> byte-identical files.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

CONTROLNET_SUBFOLDER = "controlnet"
T2I_ADAPTER_SUBFOLDER = "t2i_adapter"
_CONTROL_PREFIXES = ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block")


def _write_atomically(build, target: Path) -> Path:
    """``build(tmp_dir)`` saves a diffusers model into a temp folder that is renamed to ``target``."""
    from .tiny import _normalize_modes

    target = Path(target).absolute()
    if target.exists():
        shutil.rmtree(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        _normalize_modes(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _reinit(module, seed: int, component: str, prefixes: tuple[str, ...] | None = None) -> None:
    """tiny.py's init for the parameters under ``prefixes`` (all when None), keyed by their full name."""
    import torch

    from .tiny import _derived_seed

    with torch.no_grad():
        for name, p in module.named_parameters():
            if prefixes is not None and not name.startswith(prefixes):
                continue
            if p.ndim == 1 and "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
                continue
            g = torch.Generator().manual_seed(_derived_seed(seed, component, name))
            std = p[0].numel() ** -0.5 if p.ndim >= 2 else 0.02
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)


def build_tiny_controlnet(model_dir: str | os.PathLike, seed: int = 0):
    """The tiny ControlNet module (eval, fp32) for the tiny checkpoint folder ``model_dir``."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(model_dir) / "unet", local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # construction-time init of the new layers is overwritten below
        cn = ControlNetModel.from_unet(unet)
    _reinit(cn, seed, "controlnet", _CONTROL_PREFIXES)
    return cn.eval()


def build_tiny_t2i_adapter(model_dir: str | os.PathLike, seed: int = 0):
    """The tiny T2I-Adapter module (eval, fp32) matching the tiny UNet of ``model_dir``."""
    import json

    import torch
    from diffusers import T2IAdapter

    with open(Path(model_dir) / "unet" / "config.json") as f:
        ucfg = json.load(f)
    xl = ucfg.get("addition_embed_type") == "text_time"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ad = T2IAdapter(in_channels=3, channels=list(ucfg["block_out_channels"]), num_res_blocks=2,
                        downscale_factor=16 if xl else 8, adapter_type="full_adapter_xl" if xl else "full_adapter")
    _reinit(ad, seed, "t2i_adapter")
    return ad.eval()


def make_tiny_controlnet(model_dir: str | os.PathLike, seed: int = 0, out: str | os.PathLike | None = None) -> Path:
    """Write ``out`` (default ``model_dir/controlnet``), a diffusers ControlNetModel folder, and return it."""
    cn = build_tiny_controlnet(model_dir, seed)
    return _write_atomically(lambda d: cn.save_pretrained(d, safe_serialization=True),
                             Path(out) if out is not None else Path(model_dir) / CONTROLNET_SUBFOLDER)


def make_tiny_t2i_adapter(model_dir: str | os.PathLike, seed: int = 0, out: str | os.PathLike | None = None) -> Path:
    """Write ``out`` (default ``model_dir/t2i_adapter``), a diffusers T2IAdapter folder, and return it."""
    ad = build_tiny_t2i_adapter(model_dir, seed)
    return _write_atomically(lambda d: ad.save_pretrained(d, safe_serialization=True),
                             Path(out) if out is not None else Path(model_dir) / T2I_ADAPTER_SUBFOLDER)
