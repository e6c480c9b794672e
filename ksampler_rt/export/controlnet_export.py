"""Export a ControlNet or T2I-Adapter to ONNX + manifest.json, and the residual-taking UNet (``unet_control``).

ONNX contract (the engines and the runtime use these names):

* ``controlnet.onnx``: ``sample`` [B,4,h,w], ``timestep`` [B] float32, ``encoder_hidden_states`` [B,T,D],
  ``controlnet_cond`` [B,3,8h,8w] (the hint image in [0,1], channels first, as ComfyUI feeds it), and for SDXL
  ``y`` [B,adm] (ComfyUI's adm vector, exactly the SDXL UNet export's ``y``) -> ``down_0``..``down_{N-1}``
  (diffusers ``down_block_res_samples`` order) and ``mid``, at ``conditioning_scale`` 1 (the runtime applies the
  strength).
* ``t2i_adapter.onnx``: ``controlnet_cond`` [B,3,H,W] -> ``feature_0``..``feature_{k-1}``.
* ``unet_control`` (in the SD export, ``--control-inputs``): the UNet's inputs plus ``down_*``, ``mid``,
  ``adapter_*`` and ``adapter_mid`` (see :class:`.wrappers.UNetControlWrapper`).

The export is atomic and validated at two shapes exactly like the SD export (it runs inside
:func:`.onnx_export.export_model`).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .controlnet_single_file import CONTROLNET, control_layout, load_controlnet, load_t2i_adapter
from .errors import ExportError
from .manifest import EXPORTER_REVISION, FORMAT, FORMAT_VERSION, versions, write_manifest
from .onnx_export import CLIP_LENGTH, ModelSpec, _effective_opset, _rng, export_specs, log, pair
from .wrappers import UNetControlWrapper, control_residual_layout, use_classic_attention


class ControlNetWrapper(nn.Module):
    """controlnet(sample, timestep, encoder_hidden_states, controlnet_cond[, y]) -> down_0.., mid (float32)."""

    def __init__(self, controlnet, dtype=torch.float32):
        super().__init__()
        self.controlnet = controlnet
        self.dtype = dtype
        self.has_y = controlnet.config.get("addition_embed_type") == "text_time"
        if self.has_y:
            # ComfyUI's y = cat(pooled, timestep_embedding(time ids)) is diffusers' add_embeds =
            # cat(text_embeds, add_time_proj(time_ids)): pass y's tail as "time_ids" through an identity
            # add_time_proj, so add_embeds == y (the UNet wrapper feeds y to add_embedding the same way).
            controlnet.add_time_proj = nn.Identity()
            self.pooled = max(1, int(controlnet.config.projection_class_embeddings_input_dim) - 6 * int(
                controlnet.config.addition_time_embed_dim))  # any split gives add_embeds == y

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, y=None):
        kw = {}
        if self.has_y:
            y = y.to(self.dtype)
            kw["added_cond_kwargs"] = {"text_embeds": y[:, :self.pooled], "time_ids": y[:, self.pooled:]}
        down, mid = self.controlnet(sample.to(self.dtype), timestep, encoder_hidden_states.to(self.dtype),
                                    controlnet_cond.to(self.dtype), conditioning_scale=1.0, return_dict=False, **kw)
        return tuple(d.float() for d in down) + (mid.float(),)


class AdapterWrapper(nn.Module):
    """t2i_adapter(controlnet_cond) -> feature_0.. (float32)."""

    def __init__(self, adapter, dtype=torch.float32):
        super().__init__()
        self.adapter = adapter
        self.dtype = dtype

    def forward(self, controlnet_cond):
        return tuple(f.float() for f in self.adapter(controlnet_cond.to(self.dtype)))


def _dims(scale: int, big: bool = False) -> list:
    h, w = ("H", "W") if big else ("h", "w")
    return [h, w] if scale == 1 else [f"{h}_{scale}", f"{w}_{scale}"]


def _io(name: str, shape: list) -> dict:
    return {"name": name, "dtype": "float32", "shape": shape}


def residual_io(layout: dict) -> tuple[list, list]:
    """(ControlNet residual IO entries down_* + mid, T2I feature entries adapter_* + adapter_mid)."""
    res = [_io(f"down_{i}", ["B", c] + _dims(s)) for i, (c, s) in enumerate(layout["down"])]
    res.append(_io("mid", ["B", layout["mid"][0]] + _dims(layout["mid"][1])))
    ad = [_io(f"adapter_{i}", ["B", c] + _dims(s)) for i, (c, s) in enumerate(layout["adapter"])]
    ad.append(_io("adapter_mid", ["B", layout["adapter_mid"][0]] + _dims(layout["adapter_mid"][1])))
    return res, ad


def unet_control_spec(unet, dt, precision: str, upcast_attention: bool, uin: list, out: list, unet_inputs) -> ModelSpec:
    """The ``unet_control`` spec: ``unet``'s inputs plus the residual inputs, validated with random residuals."""
    uexp, uref = pair(unet, lambda m, d: UNetControlWrapper(m, d), dt)
    if dt == torch.float16:
        use_classic_attention(uexp.unet, upcast=upcast_attention)
    layout = control_residual_layout(unet.config)
    res, ad = residual_io(layout)
    sizes = layout["down"] + [layout["mid"]] + layout["adapter"] + [layout["adapter_mid"]]

    def inputs(i):
        d = unet_inputs(i)
        b, h, w = d["sample"].shape[0], d["sample"].shape[2], d["sample"].shape[3]
        g = _rng(i, 7)
        for io, (c, s) in zip(res + ad, sizes):
            d[io["name"]] = torch.randn(b, c, -(-h // s), -(-w // s), generator=g)
        return d
    return ModelSpec("unet_control", "unet_control.onnx", uexp, uref, "unet.", uin + res + ad, out, inputs, precision)


def _controlnet_spec(cn, family: str, precision: str) -> tuple[ModelSpec, dict]:
    dt = torch.float16 if precision == "fp16" else torch.float32
    use_classic_attention(cn, upcast=False)
    cfg = cn.config
    n = len(cfg.block_out_channels)
    f = 2 ** (n - 1)
    hint = 2 ** (len(cfg.conditioning_embedding_out_channels) - 1)
    ctx = int(cfg.cross_attention_dim)
    adm = int(cfg.projection_class_embeddings_input_dim or 0) if cfg.get("addition_embed_type") == "text_time" else 0
    exp, ref = pair(cn, lambda m, d: ControlNetWrapper(m, d), dt)
    if dt == torch.float16:
        use_classic_attention(exp.controlnet, upcast=family == "sd2")
    shapes = [(1, 2 * f, 2 * f, 1), (2, 3 * f, 4 * f, 2)]

    def inputs(i):
        b, h, w, t = shapes[i]
        g = _rng(i, 5)
        d = {"sample": torch.randn(b, cfg.in_channels, h, w, generator=g),
             "timestep": torch.rand(b, generator=g) * 999.0,
             "encoder_hidden_states": torch.randn(b, CLIP_LENGTH * t, ctx, generator=g),
             "controlnet_cond": torch.rand(b, int(cfg.conditioning_channels), h * hint, w * hint, generator=g)}
        if adm:
            d["y"] = torch.randn(b, adm, generator=g)
        return d
    ins = [_io("sample", ["B", cfg.in_channels, "h", "w"]), _io("timestep", ["B"]),
           _io("encoder_hidden_states", ["B", "T", ctx]),
           _io("controlnet_cond", ["B", int(cfg.conditioning_channels), "H", "W"])]
    if adm:
        ins.append(_io("y", ["B", adm]))
    res, _ = residual_io(control_residual_layout(cfg))
    info = {"adm_channels": adm, "context_dim": ctx, "hint_downscale": hint, "latent_channels": int(cfg.in_channels),
            "control_outputs": {"down": [o["name"] for o in res[:-1]], "mid": "mid"},
            "global_pool_conditions": bool(cfg.get("global_pool_conditions", False))}
    return ModelSpec(CONTROLNET, "controlnet.onnx", exp, ref, "controlnet.", ins, res, inputs, precision), info


def _adapter_spec(ad, precision: str) -> tuple[ModelSpec, dict]:
    dt = torch.float16 if precision == "fp16" else torch.float32
    exp, ref = pair(ad, lambda m, d: AdapterWrapper(m, d), dt)
    total = int(ad.total_downscale_factor)
    cin = int(ad.config.in_channels)
    sizes = [(1, 2 * total, 2 * total), (2, 3 * total, 4 * total)]

    def inputs(i):
        b, h, w = sizes[i]
        return {"controlnet_cond": torch.rand(b, cin, h, w, generator=_rng(i, 6))}
    with torch.no_grad():
        feats = ref(inputs(0)["controlnet_cond"])
    hin = sizes[0][1]
    latent = 8  # features are listed against the latent (image / 8)
    outs, scales = [], []
    for i, f in enumerate(feats):
        s = hin // int(f.shape[2])
        scales.append(s // latent)
        outs.append(_io(f"feature_{i}", ["B", int(f.shape[1])] + _dims(s, big=True)))
    info = {"adm_channels": 0, "context_dim": None, "hint_downscale": total, "latent_channels": None,
            "control_outputs": {"features": [o["name"] for o in outs]},
            "feature_latent_downscale": scales, "adapter_type": ad.config.adapter_type}
    spec = ModelSpec("t2i_adapter", "t2i_adapter.onnx", exp, ref, "adapter.",
                     [_io("controlnet_cond", ["B", cin, "H", "W"])], outs, inputs, precision)
    return spec, info


def export_control_into(tmp: str, scratch: str, source: str, kind_layout: tuple[str, str], family: str | None,
                        precision: str, opset: int, exporter: str, tol: float, config: str | None) -> dict:
    """Load the ControlNet / T2I-Adapter ``source``, export + validate it into ``tmp``, write the manifest."""
    from .source import weights_hash

    kind, layout = kind_layout
    log(f"loading the {kind} ({layout} layout) {os.path.abspath(source)} ...")
    torch.manual_seed(0)
    if kind == CONTROLNET:
        module, fam, files = load_controlnet(source, layout, config, family)
        spec, info = _controlnet_spec(module, fam, precision)
    else:
        if config:
            raise ExportError(f"--config: received {config}, expected none for a T2I-Adapter (its structure is "
                              f"fully in its weights)")
        module, fam, files = load_t2i_adapter(source, layout, family)
        spec, info = _adapter_spec(module, precision)
    log(f"{kind} {source}: fits {fam} UNets, precision {precision}")
    models, init_map, timings = export_specs([spec], tmp, scratch, opset, exporter, tol, precision)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "exporter_revision": EXPORTER_REVISION,
        "kind": kind, "family": fam, "prediction": None,
        "latent_channels": info.pop("latent_channels"), "latent_scale": None, "schedule": None,
        "text_encoders": [], "adm_channels": info.pop("adm_channels"),
        "models": models, "precision": precision, "opset": _effective_opset(opset, exporter), "exporter": exporter,
        "versions": versions(), "weights_hash": weights_hash(files),
        "source": os.path.abspath(source), "source_kind": "diffusers" if layout == "diffusers" else "single_file",
        "source_layout": layout, "initializer_map": init_map, "export_seconds": timings, **info,
    }
    write_manifest(tmp, manifest)
    return manifest


def control_source(source: str) -> tuple[str, str] | None:
    """(kind, layout) when ``source`` is a ControlNet / T2I-Adapter (see :func:`.controlnet_single_file.control_layout`)."""
    return control_layout(os.path.abspath(source)) if os.path.exists(source) else None
