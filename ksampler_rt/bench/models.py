"""Benchmark models: which diffusers folder and export a ``--model`` name stands for.

* ``tiny`` -- the tiny SD1.5 fixture of ``ksampler_rt.export.tiny`` (``ksampler-rt demo``'s model).
* ``tiny-flux``, ``tiny-flux-schnell``, ``tiny-sd3`` -- the tiny FLUX.1 dev / schnell and SD3 fixtures of
  ``ksampler_rt.export.tiny`` (``make_tiny_model(out, family)``), measured by :mod:`ksampler_rt.bench.flow`.
* ``half-sd15`` -- an SD1.5-*shaped* UNet at half width, random weights, built here offline:
  SD1.5's UNet config (4 levels, 2 layers per block, cross-attention 768, 8 heads, time embedding
  4 x 160) with ``block_out_channels`` halved to (160, 320, 640, 640), ~220 M parameters (SD1.5:
  860 M). To keep the export minutes rather than tens of minutes on a small CPU, the text encoder is
  a 2-layer CLIP at CLIP-L's width (768, so the UNet's cross-attention is real size) and the VAE is
  the tiny fixture's (8, 16, 32, 32): the benchmark's subject is the UNet loop; the text encoder
  and the VAE run once per image on both sides of every comparison.
* any other value -- a path: an export directory (has ``manifest.json``; optionally a
  ``source`` entry naming the diffusers folder, needed for the diffusers peer) or a diffusers folder
  (exported into the cache on first use).

Built folders and exports live under ``$KSAMPLER_RT_CACHE`` (default ``~/.cache/ksampler-rt``):
``bench/<name>-r<recipe>`` and ``exports/bench-<name>-r<recipe>-e<exporter revision>``. Same recipe -> same weights
(every tensor is drawn from its own seeded generator, as the tiny fixtures).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

#: Bumped whenever a recipe below changes, so an older cached build is not reused.
BENCH_RECIPE_VERSION = 1

#: Built-in tiny flow fixtures: bench name -> ``ksampler_rt.export.tiny`` family.
FLOW_BUILTINS = {"tiny-flux": "flux", "tiny-flux-schnell": "flux-schnell", "tiny-sd3": "sd3"}
FLOW_FAMILIES = ("sd3", "flux", "flux-schnell")

BUILTIN_MODELS = ("tiny", "half-sd15", *FLOW_BUILTINS)

#: Resolution the benchmark uses by default per built-in model (the half-width UNet at 512 px takes
#: several seconds per step on 2 CPU cores; 256 px keeps a full run within minutes).
DEFAULT_SIZE = {"tiny": 256, "half-sd15": 256, **{name: 256 for name in FLOW_BUILTINS}}

HALF_SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(160, 320, 640, 640),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, center_input_sample=False,
    flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
)

HALF_SD15_CLIP = dict(hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=2,
                      num_attention_heads=12, hidden_act="quick_gelu", max_position_embeddings=77,
                      layer_norm_eps=1e-5, attention_dropout=0.0)


@dataclass
class BenchModel:
    name: str
    export_dir: Path
    source_dir: Path | None   # the diffusers folder (same weights) for the PyTorch peers; None = no peer
    family: str
    default_size: int
    note: str = ""


def cache_root() -> Path:
    return Path(os.environ.get("KSAMPLER_RT_CACHE") or Path.home() / ".cache" / "ksampler-rt").expanduser()


def _build_half_sd15(out: Path, seed: int = 0) -> None:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ..export import tiny

    ids = tiny.tokenizer_ids()
    tok_dir = out / "tokenizer"
    tiny.write_clip_tokenizer(tok_dir, pad_with_end=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**HALF_SD15_UNET)
        tiny._init_weights(unet, seed, "unet", {"conv_out": tiny._UNET_OUT_GAIN})
        te = CLIPTextModel(CLIPTextConfig(vocab_size=ids["vocab_size"], bos_token_id=ids["bos"],
                                          eos_token_id=ids["eos"], pad_token_id=ids["eos"], **HALF_SD15_CLIP))
        tiny._init_weights(te, seed, "text_encoder")
        vae = tiny._vae("sd15")
        tiny._init_weights(vae, seed, "vae", {"decoder.conv_out": tiny._VAE_OUT_GAIN})
    for m in (unet, te, vae):
        m.eval()
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1, prediction_type="epsilon",
                                       timestep_spacing="leading")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(tok_dir)
    tiny.write_clip_tokenizer(tok_dir, pad_with_end=True)  # CLIP's own file set, as users' folders have
    (out / "bench_model.json").write_text(json.dumps(
        {"name": "half-sd15", "seed": seed, "recipe_version": BENCH_RECIPE_VERSION,
         "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in HALF_SD15_UNET.items()},
         "text_encoder": HALF_SD15_CLIP, "vae": "tiny sd15 fixture VAE"}, indent=2, sort_keys=True) + "\n")


def ensure_source(name: str, log: Callable[[str], None] = print) -> Path:
    """The diffusers folder of a built-in model, built on first use (atomically)."""
    if name == "tiny":
        from ..export.tiny import ensure_tiny_model

        return ensure_tiny_model("sd15")
    if name != "half-sd15":
        raise ValueError(f"--model: received unknown built-in model {name!r}, expected one of "
                         f"{', '.join(BUILTIN_MODELS)} or a path")
    target = cache_root() / "bench" / f"{name}-r{BENCH_RECIPE_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"building the {name} model (random weights) in {target} ...")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _build_half_sd15(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _export_into_cache(source: Path, key: str, log: Callable[[str], None], **export_options) -> Path:
    """``source`` exported once under the cache (``export_options``: ``export_model``'s, e.g. control_inputs)."""
    from ..export.manifest import EXPORTER_REVISION

    export_dir = cache_root() / "exports" / f"{key}-e{EXPORTER_REVISION}"  # a new exporter re-exports
    if (export_dir / "manifest.json").is_file():
        return export_dir
    from ..export.onnx_export import export_model

    log(f"exporting {source} to {export_dir} (once; minutes for large models on a small CPU) ...")
    export_model(str(source), str(export_dir), overwrite=True, **export_options)
    return export_dir


def model_family(spec: str) -> str | None:
    """The family a ``--model`` value stands for, without building or importing anything heavy: a built-in's,
    an export's manifest ``family``, a diffusers folder's pipeline class; None when it cannot be told yet."""
    if spec in FLOW_BUILTINS:
        return FLOW_BUILTINS[spec]
    if spec in BUILTIN_MODELS:
        return "sd15"
    path = Path(spec).expanduser()
    try:
        if (path / "manifest.json").is_file():
            return json.loads((path / "manifest.json").read_text()).get("family")
        if (path / "model_index.json").is_file():
            cls = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
            return {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3"}.get(cls)
    except (OSError, ValueError):
        return None
    return None


def is_flow_model(spec: str) -> bool:
    """Whether ``--model`` names an SD3 / FLUX.1 model (benchmarked by :mod:`ksampler_rt.bench.flow`)."""
    return model_family(spec) in FLOW_FAMILIES


def _resolve_flow_builtin(spec: str, log: Callable[[str], None]) -> BenchModel:
    """A tiny flow fixture: built into the tiny-model cache, exported into the bench cache (as ``tiny``)."""
    from ..export.tiny import TINY_RECIPE_VERSION, ensure_tiny_model

    family = FLOW_BUILTINS[spec]
    source = ensure_tiny_model(family)
    export_dir = _export_into_cache(source, f"bench-{spec}-r{TINY_RECIPE_VERSION}", log)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    return BenchModel(spec, export_dir, source, manifest.get("family", family), DEFAULT_SIZE[spec],
                      f"tiny {family} fixture (ksampler_rt.export.tiny): a few narrow transformer blocks, tiny CLIP / "
                      f"T5 / 16-channel VAE, random weights")


def resolve_model(spec: str, log: Callable[[str], None] = print, *, need_source: bool = True) -> BenchModel:
    """``--model`` -> (export dir, diffusers folder), building and exporting built-ins on first use."""
    if spec == "tiny":
        from ..demo import prepare_tiny_checkpoint

        source = ensure_source("tiny", log)
        export_dir = prepare_tiny_checkpoint(log=log)
        return BenchModel("tiny", Path(export_dir), source, "sd15", DEFAULT_SIZE["tiny"],
                          "tiny SD1.5 fixture: UNet (32, 64), CLIP 32 wide x 3 layers, VAE (8, 16, 32, 32)")
    if spec in FLOW_BUILTINS:
        return _resolve_flow_builtin(spec, log)
    if spec == "half-sd15":
        source = ensure_source(spec, log)
        export_dir = _export_into_cache(source, f"bench-{spec}-r{BENCH_RECIPE_VERSION}", log)
        return BenchModel(spec, export_dir, source, "sd15", DEFAULT_SIZE[spec],
                          "SD1.5-shaped UNet at half width (160, 320, 640, 640), random weights; "
                          "2-layer CLIP-L-width text encoder; tiny VAE")
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--model: received {spec}, expected {' or '.join(BUILTIN_MODELS)}, an export "
                                f"directory or a diffusers folder: no such file or directory")
    if (path / "manifest.json").is_file():
        manifest = json.loads((path / "manifest.json").read_text())
        src = manifest.get("source")
        source = Path(src) if src and (Path(src) / "model_index.json").is_file() else None
        if source is None and need_source:
            log(f"note: {path}'s source ({src}) is not a diffusers folder here: no PyTorch peer for it")
        size = 1024 if "xl" in str(manifest.get("family", "")) else 512
        return BenchModel(path.name, path, source, manifest.get("family", "?"), size, "export directory")
    if (path / "model_index.json").is_file():
        import hashlib

        key = "bench-" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        export_dir = _export_into_cache(path, key, log)
        manifest = json.loads((export_dir / "manifest.json").read_text())
        size = 1024 if "xl" in str(manifest.get("family", "")) else 512
        return BenchModel(path.name, export_dir, path, manifest.get("family", "?"), size, "diffusers folder")
    raise ValueError(f"--model: received {path}, expected an export directory (manifest.json) or a diffusers "
                     "folder (model_index.json)")


# ---------------------------------------------------------------------------------------------
# ControlNet benchmark models (``ksampler-rt bench --controlnet``, :mod:`ksampler_rt.bench.controlnet`)

CONTROL_MODELS = ("tiny", "half-sd15")


@dataclass
class ControlBenchModel:
    name: str
    source_dir: Path          # the SD diffusers folder (UNet weights of both sides)
    controlnet_dir: Path      # the diffusers ControlNetModel folder (ControlNet weights of both sides)
    export_dir: Path          # the checkpoint export with ``unet`` and ``unet_control``
    controlnet_export: Path   # the ControlNet's export
    default_size: int
    note: str = ""


def _ensure_controlnet_source(source: Path, target: Path, log: Callable[[str], None]) -> Path:
    """``ControlNetModel.from_unet`` on ``source``'s UNet, its ControlNet-only layers re-drawn deterministically
    (:func:`ksampler_rt.export.tiny_control.make_tiny_controlnet`), kept under the bench cache."""
    if (target / "config.json").is_file():
        return target
    from ..export.tiny_control import make_tiny_controlnet

    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"building the ControlNet of {source.name} (random weights) in {target} ...")
    return make_tiny_controlnet(source, seed=0, out=target)  # written into a temp folder, then renamed


def resolve_control_model(spec: str, log: Callable[[str], None] = print) -> ControlBenchModel:
    """``--model`` of ``bench --controlnet``: a built-in SD1.5 model, its ControlNet, and both exports (the
    checkpoint with ``--control-inputs``), built and exported into the bench cache on first use."""
    if spec == "tiny":
        from ..export.tiny import TINY_RECIPE_VERSION

        source, key = ensure_source("tiny", log), f"tiny-r{TINY_RECIPE_VERSION}"
        note = "tiny SD1.5 fixture: UNet (32, 64), its ControlNet (from_unet, re-drawn control layers)"
    elif spec == "half-sd15":
        source, key = ensure_source("half-sd15", log), f"half-sd15-r{BENCH_RECIPE_VERSION}"
        note = ("SD1.5-shaped UNet at half width (160, 320, 640, 640) and its ControlNet (from_unet, re-drawn "
                "control layers), random weights")
    else:
        raise ValueError(f"--model: received {spec!r} with --controlnet, expected one of {', '.join(CONTROL_MODELS)}")
    cn_dir = _ensure_controlnet_source(source, cache_root() / "bench" / f"{key}-controlnet", log)
    export_dir = _export_into_cache(source, f"bench-{key}-control", log, control_inputs=True)
    cn_export = _export_into_cache(cn_dir, f"bench-{key}-controlnet", log)
    return ControlBenchModel(spec, source, cn_dir, export_dir, cn_export, DEFAULT_SIZE[spec], note)
