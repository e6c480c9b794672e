"""Export of the flow families -- SD3 / SD3.5 (``sd3``), FLUX.1 dev (``flux``), FLUX.1 schnell
(``flux-schnell``) -- to ONNX + manifest.json, validated against torch like the SD export.

Networks (files) and their ONNX inputs / outputs, all float32 except the token ids:

==================  ==============================================================================================
transformer.onnx    x [B,16,h,w], timestep [B] (SD3: sigma*1000; FLUX: sigma), context [B,T,D], y [B,P],
                    FLUX.1 dev also guidance [B]  ->  out [B,16,h,w] (the velocity; ComfyUI's CONST prediction).
                    Exactly what ksampler-rt's runtime hands its unet callable
                    (``Model(unet, family=...)``); see :mod:`.flow_wrappers` for the conventions.
clip_l.onnx         input_ids [B,77] -> the CLIP outputs of the SD export (``ClipWrapper``); CLIP-L is exported
                    without its text projection: ComfyUI's SD3 and FLUX clip_l use the un-projected pooled
                    output (``return_projected_pooled=False``, comfy/text_encoders/sd3_clip.py, flux.py)
clip_g.onnx         (SD3) the same, with projection (``pooled_output`` = ``text_embeds``, SDXLClipG's)
t5xxl.onnx          input_ids [B,T] -> last_hidden_state [B,T,D]; kept in fp32 with --precision fp16 (T5's
                    feed-forward activations overflow fp16; ComfyUI also runs T5 in fp32/bf16 where it can)
vae_decoder.onnx    latent [B,16,h,w] (unscaled: latent / scale + shift already applied) -> image [B,3,8h,8w]
vae_encoder.onnx    image [B,3,H,W] -> latent mean [B,16,H/8,W/8] (unscaled); FLUX's VAE stays fp32 by default
==================  ==============================================================================================

The text conditioning the transformer wants is composed from those outputs by
:mod:`ksampler_rt.workflow.flow_text` (torch-free; ComfyUI's SD3ClipModel / FluxClipModel).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

from .errors import ExportError
from .onnx_export import CLIP_LENGTH, ModelSpec, _rng, _tokenizer_info, export_specs, log, pair, vae_specs

FLOW_FAMILIES = ("sd3", "flux", "flux-schnell")

# (manifest / file name, diffusers subfolder, tokenizer subfolder, kind)
FLOW_TEXT_ENCODERS = {
    "sd3": [("clip_l", "text_encoder", "tokenizer", "clip"), ("clip_g", "text_encoder_2", "tokenizer_2", "clip"),
            ("t5xxl", "text_encoder_3", "tokenizer_3", "t5")],
    "flux": [("clip_l", "text_encoder", "tokenizer", "clip"), ("t5xxl", "text_encoder_2", "tokenizer_2", "t5")],
    "flux-schnell": [("clip_l", "text_encoder", "tokenizer", "clip"),
                     ("t5xxl", "text_encoder_2", "tokenizer_2", "t5")],
}

#: T5 sequence length the pipelines pad to (diffusers' max_sequence_length; ComfyUI pads T5 to at least 256
#: for FLUX, 77 for SD3; the ONNX graph takes any length).
T5_LENGTH = {"sd3": 256, "flux": 512, "flux-schnell": 256}

#: comfy/supported_models.py SD3 / Flux / FluxSchnell sampling_settings, the runtime's Family defaults.
FLOW_SCHEDULE = {"sd3": {"sampling": "flow", "shift": 3.0, "multiplier": 1000.0},
                 "flux": {"sampling": "flux", "shift": 1.15, "multiplier": 1.0},
                 "flux-schnell": {"sampling": "flow", "shift": 1.0, "multiplier": 1.0}}

MODEL_NAMES = {fam: ["transformer"] + [n for n, _, _, _ in tes] + ["vae_decoder", "vae_encoder"]
               for fam, tes in FLOW_TEXT_ENCODERS.items()}


@dataclasses.dataclass
class FlowSource:
    path: str
    kind: str                # "diffusers" | "single_file" | "flux_files"
    family: str
    modules: dict            # transformer, vae, clip_l, clip_g?, t5xxl (torch, fp32, eval)
    latent_scale: float
    latent_shift: float
    tokenizer_dirs: dict     # text encoder name -> folder to copy
    weight_files: list
    tokenizer_source: str = ""
    tokenizer_rewrite: bool = False  # CLIP folders hold only vocab.json + merges.txt (ComfyUI's): write the configs


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def folder_flow_family(root: str) -> str | None:
    """The flow family of a diffusers folder (from model_index.json and the transformer config), or None."""
    mi = os.path.join(root, "model_index.json")
    if not os.path.isfile(mi):
        return None
    cls = _read_json(mi).get("_class_name", "")
    if cls.startswith("StableDiffusion3"):
        return "sd3"
    if cls.startswith("Flux"):
        tcfg = os.path.join(root, "transformer", "config.json")
        if not os.path.isfile(tcfg):
            raise ExportError(f"{root}: missing component 'transformer/' (expected transformer/config.json)")
        return "flux" if _read_json(tcfg).get("guidance_embeds") else "flux-schnell"
    return None


def flow_family_of(source: str, family: str | None) -> str | None:
    """The flow family ``source`` is exported as, or None when it is an SD / SDXL checkpoint."""
    detected = None
    if os.path.isdir(source):
        detected = folder_flow_family(source)
    elif os.path.isfile(source) and source.endswith(".safetensors"):
        from .flow_single_file import single_file_flow_family
        detected = single_file_flow_family(source)
    if family in (None, "auto"):
        return detected
    if family in FLOW_FAMILIES:
        if detected is not None and detected != family and {detected, family} != {"flux", "flux-schnell"}:
            raise ExportError(f"--family: received {family}, expected {detected}: {source} looks like {detected}")
        if detected is None and os.path.exists(source):
            raise ExportError(f"--family: received {family}, expected the family of {source}, which is no "
                              f"{family} checkpoint (no StableDiffusion3 / Flux model_index.json or weights)")
        return family
    if detected is not None:
        raise ExportError(f"--family: received {family}, expected {detected}: {source} looks like {detected}")
    return None


def _weights_in(folder):
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder))
            if n.endswith((".safetensors", ".bin"))] if os.path.isdir(folder) else []


def load_flow_folder(root: str, family: str) -> FlowSource:
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    kw = dict(local_files_only=True)
    needed = ["transformer", "vae"] + [sub for _, sub, _, _ in FLOW_TEXT_ENCODERS[family]]
    weight_files = []
    for comp in needed:
        if not os.path.isfile(os.path.join(root, comp, "config.json")):
            raise ExportError(f"{root}: missing component '{comp}/' needed for {family} "
                              f"(expected {comp}/config.json and weights)")
        w = _weights_in(os.path.join(root, comp))
        if not w:
            raise ExportError(f"{root}: component '{comp}/' has no weight files (.safetensors, .bin)")
        weight_files += w
    tcls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
    modules = {"transformer": tcls.from_pretrained(root, subfolder="transformer", **kw),
               "vae": AutoencoderKL.from_pretrained(root, subfolder="vae", **kw)}
    tok_dirs = {}
    for name, sub, tok, kind in FLOW_TEXT_ENCODERS[family]:
        cls = {"clip_l": CLIPTextModel, "clip_g": CLIPTextModelWithProjection, "t5xxl": T5EncoderModel}[name]
        modules[name] = cls.from_pretrained(root, subfolder=sub, **kw)
        if os.path.isdir(os.path.join(root, tok)):
            tok_dirs[name] = os.path.join(root, tok)
    for m in modules.values():
        m.to(torch.float32).eval()
    vcfg = modules["vae"].config
    return FlowSource(root, "diffusers", family, modules, float(vcfg.scaling_factor),
                      float(vcfg.shift_factor or 0.0), tok_dirs, weight_files,
                      tokenizer_source=f"checkpoint folder ({root})")


# ------------------------------------------------------------------------------------------------ specs

def build_flow_specs(src: FlowSource, precision: str) -> list[ModelSpec]:
    import torch

    from .flow_wrappers import FluxTransformerWrapper, SD3TransformerWrapper, T5Wrapper
    from .wrappers import ClipWrapper, use_classic_attention

    fam = src.family
    dt = torch.float16 if precision == "fp16" else torch.float32

    specs = []
    # --- transformer
    tr = src.modules["transformer"]
    tcfg = tr.config
    ctx_dim = int(tcfg.joint_attention_dim)
    pooled = int(tcfg.pooled_projection_dim)
    guidance = fam == "flux"
    if fam == "sd3":
        texp, tref = pair(tr, lambda m, d: SD3TransformerWrapper(m, d), dt)
        shapes = [(1, 8, 8, 2 * CLIP_LENGTH), (2, 12, 16, CLIP_LENGTH + 32)]
        t_scale = 1000.0
    else:
        if guidance != bool(tcfg.guidance_embeds):
            raise ExportError(f"--family: received {fam}, expected {'flux' if tcfg.guidance_embeds else 'flux-schnell'}"
                              f": the transformer {'has' if tcfg.guidance_embeds else 'has no'} guidance embedding")
        texp, tref = pair(tr, lambda m, d: FluxTransformerWrapper(m, d), dt)
        shapes = [(1, 8, 8, 32), (2, 12, 16, 48)]
        t_scale = 1.0

    def tr_inputs(i):
        b, h, w, t = shapes[i]
        g = _rng(i, 11)
        d = {"x": torch.randn(b, 16, h, w, generator=g),
             "timestep": (0.05 + 0.9 * torch.rand(b, generator=g)) * t_scale,
             "context": torch.randn(b, t, ctx_dim, generator=g),
             "y": torch.randn(b, pooled, generator=g)}
        if guidance:
            d["guidance"] = 1.0 + 4.0 * torch.rand(b, generator=g)
        return d
    tin = [{"name": "x", "dtype": "float32", "shape": ["B", 16, "h", "w"]},
           {"name": "timestep", "dtype": "float32", "shape": ["B"]},
           {"name": "context", "dtype": "float32", "shape": ["B", "T", ctx_dim]},
           {"name": "y", "dtype": "float32", "shape": ["B", pooled]}]
    if guidance:
        tin.append({"name": "guidance", "dtype": "float32", "shape": ["B"]})
    specs.append(ModelSpec("transformer", "transformer.onnx", texp, tref, "transformer.", tin,
                           [{"name": "out", "dtype": "float32", "shape": ["B", 16, "h", "w"]}], tr_inputs, precision))

    # --- text encoders
    for name, _sub, _tok, kind in FLOW_TEXT_ENCODERS[fam]:
        if name not in src.modules:  # a single file without it, and no separate file given
            continue
        te = src.modules[name]
        if hasattr(te, "set_attn_implementation"):
            te.set_attn_implementation("eager")  # sdpa's TorchScript symbolic breaks fp16 graphs
        cfg = te.config
        if kind == "t5":
            vocab = int(cfg.vocab_size)
            t5_shapes = [(1, 32), (2, 48)]

            def t5_inputs(i, vocab=vocab, t5_shapes=t5_shapes):
                b, t = t5_shapes[i]
                ids = torch.randint(3, vocab, (b, t), generator=_rng(i, 12), dtype=torch.int64)
                ids[:, t // 2] = 1   # </s>, then <pad> = 0, as the tokenizer pads
                ids[:, t // 2 + 1:] = 0
                return {"input_ids": ids}
            mod = T5Wrapper(te)  # fp32 at every precision (see the module docstring)
            d = int(cfg.d_model)
            specs.append(ModelSpec(name, f"{name}.onnx", mod, mod, "model.",
                                   [{"name": "input_ids", "dtype": "int64", "shape": ["B", "T"]}],
                                   [{"name": "last_hidden_state", "dtype": "float32", "shape": ["B", "T", d]}],
                                   t5_inputs, "fp32"))
            continue
        from .onnx_export import _clip_ids
        cexp, cref = pair(te, lambda m, d: ClipWrapper(m), dt)
        proj = hasattr(te, "text_projection")
        pooled_dim = int(cfg.projection_dim) if proj else int(cfg.hidden_size)
        hs, nl = int(cfg.hidden_size), int(cfg.num_hidden_layers)

        def clip_inputs(i, cfg=cfg):
            return {"input_ids": _clip_ids(cfg, i + 1, _rng(i, 2))}
        outs = [{"name": "last_hidden_state", "dtype": "float32", "shape": ["B", CLIP_LENGTH, hs]},
                {"name": "penultimate_hidden_state", "dtype": "float32", "shape": ["B", CLIP_LENGTH, hs]},
                {"name": "penultimate_hidden_state_norm", "dtype": "float32", "shape": ["B", CLIP_LENGTH, hs]},
                {"name": "pooled_output", "dtype": "float32", "shape": ["B", pooled_dim]},
                {"name": "hidden_states", "dtype": "float32", "shape": ["B", nl, CLIP_LENGTH, hs]},
                {"name": "hidden_states_norm", "dtype": "float32", "shape": ["B", nl, CLIP_LENGTH, hs]}]
        specs.append(ModelSpec(name, f"{name}.onnx", cexp, cref, "model.",
                               [{"name": "input_ids", "dtype": "int64", "shape": ["B", CLIP_LENGTH]}],
                               outs, clip_inputs, precision))

    # --- VAE (16 channels, no quant convs)
    if "vae" not in src.modules:
        return specs
    vae = src.modules["vae"]
    use_classic_attention(vae, upcast=False)
    vae_prec, vdt = precision, dt
    if dt == torch.float16 and fam.startswith("flux"):
        vae_prec, vdt = "fp32", torch.float32
        log("FLUX VAE kept in fp32 (its decoder's activations exceed fp16's range at large sizes)")
    specs += vae_specs(vae, vae_prec, vdt)
    return specs


# ---------------------------------------------------------------------------------------- orchestration

def _t5_tokenizer_info(tdir: str | None) -> dict:
    info = {"pad_token": "<pad>", "pad_token_id": 0, "bos_token_id": None, "eos_token_id": 1}
    if tdir and os.path.isfile(os.path.join(tdir, "tokenizer.json")):
        vocab = {}
        model = _read_json(os.path.join(tdir, "tokenizer.json")).get("model", {})
        for i, entry in enumerate(model.get("vocab", [])):
            vocab[entry[0]] = i
        info["pad_token_id"] = vocab.get("<pad>", 0)
        info["eos_token_id"] = vocab.get("</s>", 1)
    return info


def load_flow_source(source: str, family: str, *, clip_l: str | None = None, clip_g: str | None = None,
                     t5: str | None = None, vae: str | None = None, config: str | None = None,
                     tokenizer: str | None = None) -> FlowSource:
    """A diffusers folder, or a single file (+ the separate text encoder / VAE files, see
    :mod:`.flow_single_file`)."""
    if os.path.isdir(source):
        if clip_l or clip_g or t5 or vae or config:
            raise ExportError("--clip-l / --clip-g / --t5 / --vae / --config: received one with a diffusers folder, "
                              "expected them only with a single-file checkpoint")
        src = load_flow_folder(source, family)
        if tokenizer:
            src.tokenizer_dirs = {n: os.path.join(tokenizer, tok) for n, _, tok, _ in FLOW_TEXT_ENCODERS[family]
                                  if os.path.isdir(os.path.join(tokenizer, tok))}
            src.tokenizer_source = f"--tokenizer {os.path.abspath(tokenizer)}"
        return src
    from .flow_single_file import load_flow_single_file
    return load_flow_single_file(source, family, clip_l=clip_l, clip_g=clip_g, t5=t5, vae=vae, config=config,
                                 tokenizer=tokenizer)


def export_flow_into(tmp: str, scratch: str, source: str, family: str, precision: str, opset: int, exporter: str,
                     tolerance: float | None, tokenizer: str | None, no_tokenizer: bool,
                     only: list[str] | None, *, clip_l: str | None = None, clip_g: str | None = None,
                     t5: str | None = None, vae: str | None = None, config: str | None = None) -> dict:
    """The flow-family counterpart of ``onnx_export._export_into``: load, export + validate each network into
    ``tmp``, copy the tokenizers, write the manifest there."""
    import torch

    from .manifest import EXPORTER_REVISION, FORMAT, FORMAT_VERSION, versions, write_manifest
    from .onnx_export import _effective_opset
    from .source import weights_hash
    from .validate import TOLERANCE

    log(f"loading the {family} checkpoint {os.path.abspath(source)} ...")
    src = load_flow_source(source, family, clip_l=clip_l, clip_g=clip_g, t5=t5, vae=vae, config=config,
                           tokenizer=tokenizer)
    present = [n for n in MODEL_NAMES[family] if n in src.modules or (n.startswith("vae_") and "vae" in src.modules)]
    if only is None and len(present) < len(MODEL_NAMES[family]):
        only = present
        log(f"{source} (with the files given) holds only {', '.join(present)}: exporting those")
    tol = tolerance if tolerance is not None else TOLERANCE[precision]
    log(f"{src.kind} {src.path}: family {family}, precision {precision}")
    torch.manual_seed(0)
    specs = build_flow_specs(src, precision)
    if only is not None:
        known = MODEL_NAMES[family]
        if not only or any(m not in known for m in only):
            raise ExportError(f"models: received {only}, expected a non-empty subset of {known} for {family}")
        specs = [s for s in specs if s.name in only]
    models, init_map, timings = export_specs(specs, tmp, scratch, opset, exporter, tol, precision)
    if "t5xxl" in models and precision == "fp16":
        models["t5xxl"]["notes"] = "kept in fp32: T5's feed-forward activations overflow fp16"

    text_encoders = []
    for name, _sub, tok, kind in FLOW_TEXT_ENCODERS[family]:
        if name not in models:
            continue
        cfg = src.modules[name].config
        tdir, how = os.path.join(tmp, tok), None
        if src.tokenizer_dirs.get(name) and not no_tokenizer:
            if src.tokenizer_rewrite and kind == "clip":
                from .clip_tokenizer import write_clip_tokenizer_dir
                # ComfyUI's padding: clip_l with <|endoftext|>, clip_g with id 0 (sd3_clip.py / sdxl_clip.py)
                write_clip_tokenizer_dir(src.tokenizer_dirs[name], tdir, name == "clip_l", CLIP_LENGTH)
            else:
                shutil.copytree(src.tokenizer_dirs[name], tdir)
            how = src.tokenizer_source
        else:
            tdir = None
            log(f"warning: no tokenizer files for {name}; the workflow runner cannot encode prompts with it")
        entry = {"name": name, "file": f"{name}.onnx", "kind": kind, "tokenizer": tok if tdir else None,
                 "tokenizer_source": how}
        if kind == "t5":
            entry.update({"hidden_size": int(cfg.d_model), "num_layers": int(cfg.num_layers),
                          "max_length": T5_LENGTH[family], "context_output": "last_hidden_state",
                          "pooled_dim": None, "pooled_projected": False, **_t5_tokenizer_info(tdir)})
        else:
            entry.update({"hidden_size": int(cfg.hidden_size), "num_layers": int(cfg.num_hidden_layers),
                          "all_hidden_states": True, "max_length": CLIP_LENGTH,
                          "pooled_dim": models[name]["outputs"][3]["shape"][1],
                          "pooled_projected": hasattr(src.modules[name], "text_projection"),
                          "context_output": "penultimate_hidden_state" if family == "sd3" else None,
                          **_tokenizer_info(tdir)})
        text_encoders.append(entry)

    tcfg = src.modules["transformer"].config
    pooled = int(tcfg.pooled_projection_dim)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "exporter_revision": EXPORTER_REVISION,
        "family": family, "prediction": "const", "denoiser": "transformer",
        "latent_channels": 16, "latent_scale": src.latent_scale, "latent_shift": src.latent_shift,
        "latent_downscale": (2 ** (len(src.modules["vae"].config.block_out_channels) - 1)
                             if "vae" in src.modules else 8),
        "schedule": dict(FLOW_SCHEDULE[family]),
        "guidance": family == "flux",
        "context_dim": int(tcfg.joint_attention_dim), "pooled_dim": pooled,
        "adm_channels": pooled,  # the runtime's y [B, pooled] (model_base.SD3 / Flux encode_adm)
        "sdxl_adm": None,
        "conditioning": ("sd3: context = cat(pad(cat(clip_l, clip_g penultimate, -1), t5 width), t5, tokens); "
                         "y = cat(clip_l pooled, clip_g pooled)" if family == "sd3" else
                         "flux: context = t5 last_hidden_state; y = clip_l pooled"),
        "text_encoders": text_encoders,
        "models": models,
        "precision": precision, "opset": _effective_opset(opset, exporter), "exporter": exporter,
        "versions": versions(),
        "weights_hash": weights_hash(src.weight_files),
        "source": src.path, "source_kind": src.kind,
        "initializer_map": init_map,
        "export_seconds": timings,
        "complete": sorted(models) == sorted(MODEL_NAMES[family]),
    }
    write_manifest(tmp, manifest)
    return manifest
