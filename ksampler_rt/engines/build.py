"""Loader side: turn an export's ONNX files into cached, verified engines ("build once per machine").

What is built, and for which machine, is the backend's business (``ksampler_rt.engines.backends``): a
TensorRT plan, ONNX Runtime's optimized model, OpenVINO IR... This module does what is common to all of
them: the shape request, the cache key, the build log and the sidecar metadata.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .backends import Backend, BuildJob, backend_names, environment, get_backend, registered
from .backends._onnxruntime import EXTERNAL_DATA_MIN_BYTES, OnnxRuntimeBackend  # noqa: F401 -- kept importable
from .cache import CACHE_FORMAT, KEY_FIELDS, CacheEntry, EngineCache
from .manifest import ExportManifest, ModelEntry, load_manifest
from .profiles import ProfileRequest, compute_profiles
from .spec import EngineError, ShapeProfile, parse_range, parse_shapes

_default_precision = Backend.resolve_precision

#: Context lengths a build accepts unless ``--tokens`` says otherwise: ComfyUI encodes prompts past 75 tokens
#: as further 77-token chunks, so 1-3 chunks (77-231) let a default build take prompts up to 225 tokens.
DEFAULT_TOKENS = (77, 231)

#: The flow families' context lengths (ComfyUI 0.3.64 pads T5 to at least 256 tokens for FLUX.1,
#: comfy/text_encoders/flux.py, and to 77 for SD3 after CLIP-L/G's 77, sd3_clip.py): up to twice the minimum
#: unless ``--tokens`` says otherwise. T5's own input is the context minus SD3's 77 CLIP tokens.
FLOW_DEFAULT_TOKENS = {"flux": (256, 512), "flux-schnell": (256, 512), "sd3": (154, 308)}
FLOW_CLIP_TOKENS = {"flux": 0, "flux-schnell": 0, "sd3": 77}


def __getattr__(name: str):
    # The backend lists of earlier versions, computed from the registry (a backend registered later shows up).
    if name == "BACKENDS":
        return backend_names()
    if name == "ORT_BACKENDS":
        return tuple(b.name for b in registered() if isinstance(b, OnnxRuntimeBackend))
    if name == "EXPORT_PRECISION_BACKENDS":
        return tuple(b.name for b in registered() if type(b).resolve_precision is _default_precision)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class BuildOptions:
    backend: str = "onnxruntime-cpu"
    sizes: list = field(default_factory=list)  # [(w, h)]; empty = default for the backend
    batch: tuple | None = None
    tokens: tuple | None = None
    dynamic: bool = False
    precision: str | None = None  # None = the export's precision (per model: see Backend.model_precision)
    refit: bool = False
    weight_streaming: bool = False
    device_id: int = 0
    force: bool = False

    @classmethod
    def from_cli(cls, backend, shapes=None, batch=None, tokens=None, dynamic=False, precision=None, **kw):
        return cls(backend=backend, sizes=parse_shapes(shapes), batch=parse_range(batch, "batch"),
                   tokens=parse_range(tokens, "tokens"), dynamic=bool(dynamic), precision=precision, **kw)


def default_sizes(manifest: ExportManifest) -> list[tuple[int, int]]:
    fam = str(manifest.family or "").lower()
    return [(1024, 1024)] if "xl" in fam or fam in FLOW_DEFAULT_TOKENS else [(512, 512)]


def profile_request(manifest: ExportManifest, opts: BuildOptions, *, required: bool) -> ProfileRequest | None:
    """The shape request, or None (= any shape) for ONNX Runtime when the user gave no shapes."""
    if not required and not (opts.sizes or opts.batch or opts.tokens or opts.dynamic):
        return None
    family = str(manifest.family or "")
    tokens = opts.tokens or FLOW_DEFAULT_TOKENS.get(family, DEFAULT_TOKENS)
    text_tokens = None
    if family in FLOW_CLIP_TOKENS:  # T5's input: the context minus the CLIP part (SD3)
        clip = FLOW_CLIP_TOKENS[family]
        text_tokens = (max(1, tokens[0] - clip), max(1, tokens[1] - clip))
    return ProfileRequest(sizes=tuple(opts.sizes or default_sizes(manifest)), batch=opts.batch or (1, 4),
                          tokens=tokens, dynamic=opts.dynamic, latent_scale=manifest.latent_scale,
                          text_tokens=text_tokens)


def resolve_precision(manifest: ExportManifest, opts: BuildOptions) -> str:
    return get_backend(opts.backend).resolve_precision(manifest.precision, opts.precision)


def model_profiles(entry: ModelEntry, req: ProfileRequest | None) -> list[ShapeProfile]:
    return compute_profiles(entry.name, entry.inputs, req) if req is not None else []


def key_components(manifest: ExportManifest, entry: ModelEntry, opts: BuildOptions, precision: str,
                   profiles: list[ShapeProfile], env: dict) -> dict:
    """The cache key's components: what was built (export, model, precision, profiles of a shape-bound
    backend, the backend's key options) and the backend's environment (everything in ``env`` but
    ``"backend"``)."""
    backend = get_backend(opts.backend)
    clash = sorted(set(env) & set(KEY_FIELDS) - {"backend"})
    if clash:
        raise EngineError(f"{backend.name}.environment(): received keys {clash}, expected none of the cache "
                          f"key's own fields {', '.join(KEY_FIELDS)}")
    return {
        "cache_format": CACHE_FORMAT,
        "model": entry.name,
        "backend": opts.backend,
        "weights_hash": manifest.weights_hash,
        "source": {"file": entry.path.name, "size": entry.path.stat().st_size},
        "precision": precision,
        "profiles": [p.canonical() for p in profiles] if backend.shape_bound else "any",
        "options": {**backend.key_options(opts), **backend.export_key(manifest)},
        **{k: v for k, v in env.items() if k != "backend"},
    }


def rebuild_command(manifest: ExportManifest, opts: BuildOptions, req: ProfileRequest | None,
                    force: bool = True) -> str:
    cmd = f"ksampler-rt build {manifest.export_dir} --backend {opts.backend}"
    if req is not None:
        cmd += " " + req.cli_args()
    if opts.precision:
        cmd += f" --precision {opts.precision}"
    if opts.refit:
        cmd += " --refit"
    if opts.weight_streaming:
        cmd += " --weight-streaming"
    return cmd + (" --force" if force else "")


def build_model(manifest: ExportManifest, name: str, opts: BuildOptions, cache: EngineCache | None = None,
                env: dict | None = None, log=None) -> CacheEntry:
    """Build (or find, verified) the cached engine of one model."""
    backend = get_backend(opts.backend)
    cache = cache or EngineCache()
    if name not in manifest.models:
        raise EngineError(f"model: received {name!r}, expected one of {', '.join(manifest.models)} "
                          f"(the models of {manifest.export_dir})")
    entry = manifest.models[name]
    env = env or environment(opts.backend, opts.device_id)
    req = profile_request(manifest, opts, required=backend.shape_bound)
    profiles = model_profiles(entry, req)
    precision = backend.model_precision(resolve_precision(manifest, opts), entry, manifest)
    comps = key_components(manifest, entry, opts, precision, profiles, env)
    if not opts.force:
        found = cache.lookup(comps)
        if found is not None:
            if log:
                log(f"{name}: cached {found.path}")
            return found
    builder = backend.builder(BuildJob(manifest, entry, opts, precision, profiles, env, cache))
    if log:
        log(f"{name}: building {opts.backend} ({precision}, "
            f"{'; '.join(p.label for p in profiles) or 'any shape'}) ...")
    meta = {
        "export_dir": str(manifest.export_dir),
        "rebuild": rebuild_command(manifest, opts, req),
        "request": None if req is None else {"sizes": [list(s) for s in req.sizes], "batch": list(req.batch),
                                              "tokens": list(req.tokens), "dynamic": req.dynamic,
                                              "latent_scale": req.latent_scale},
        "profiles": [p.to_json() for p in profiles],
        "io": {"inputs": [s.to_json() for s in entry.inputs], "outputs": [s.to_json() for s in entry.outputs]},
    }
    built = cache.write(comps, builder, meta=meta, force=opts.force)
    if log:
        log(f"{name}: wrote {built.path} ({built.size / 1e6:.1f} MB, {built.meta.get('build_seconds')} s)")
    return built


def build_engines(export_dir, opts: BuildOptions, models=None, cache: EngineCache | None = None,
                  log=None) -> dict[str, CacheEntry]:
    backend = get_backend(opts.backend)
    manifest = load_manifest(export_dir)
    env = environment(opts.backend, opts.device_id)
    backend.check_build(env)
    names = [m for m in (models or manifest.models) if m in manifest.models]
    return {n: build_model(manifest, n, opts, cache, env, log) for n in names}
