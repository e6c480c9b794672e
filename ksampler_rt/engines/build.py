"""Loader side: turn an export's ONNX files into cached, verified engines ("build once per machine").

* ``tensorrt``: a serialized plan (``engine.plan``) with one optimisation profile per shape bucket.
* ``onnxruntime-cpu`` / ``onnxruntime-cuda``: the session's optimized model
  (``SessionOptions.optimized_model_filepath``), which is specific to the ONNX Runtime version and the
  hardware it was optimized for, so it is keyed and verified exactly like a plan. Its graph accepts any
  shape the export accepts, so shape profiles are applied at load time and are not part of its key.
* ``openvino-cpu``: the export converted to OpenVINO IR (``model.xml`` + ``model.bin``, weights kept in
  the export's precision), keyed by the OpenVINO version and the CPU; the engine compiles it per input
  shape at run time, so it is not shape-bound either.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from .cache import CACHE_FORMAT, CacheEntry, EngineCache
from .envinfo import environment
from .manifest import ExportManifest, ModelEntry, load_manifest
from .profiles import ProfileRequest, compute_profiles
from .spec import EngineError, ShapeProfile, parse_range, parse_shapes

BACKENDS = ("tensorrt", "onnxruntime-cuda", "onnxruntime-trt", "onnxruntime-cpu", "openvino-cpu")
ORT_BACKENDS = ("onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-trt")
# Backends that run the export's own precision (no precision conversion at build time).
EXPORT_PRECISION_BACKENDS = ORT_BACKENDS + ("openvino-cpu",)
EXTERNAL_DATA_MIN_BYTES = 1 << 20


@dataclass
class BuildOptions:
    backend: str = "onnxruntime-cpu"
    sizes: list = field(default_factory=list)  # [(w, h)]; empty = default for the backend
    batch: tuple | None = None
    tokens: tuple | None = None
    dynamic: bool = False
    precision: str | None = None  # None = fp16 for tensorrt, the export's precision for ONNX Runtime / OpenVINO
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
    return [(1024, 1024)] if "xl" in fam else [(512, 512)]


def profile_request(manifest: ExportManifest, opts: BuildOptions, *, required: bool) -> ProfileRequest | None:
    """The shape request, or None (= any shape) for ONNX Runtime when the user gave no shapes."""
    if not required and not (opts.sizes or opts.batch or opts.tokens or opts.dynamic):
        return None
    return ProfileRequest(sizes=tuple(opts.sizes or default_sizes(manifest)), batch=opts.batch or (1, 4),
                          tokens=opts.tokens or (77, 77), dynamic=opts.dynamic, latent_scale=manifest.latent_scale)


def resolve_precision(manifest: ExportManifest, opts: BuildOptions) -> str:
    if opts.backend in EXPORT_PRECISION_BACKENDS:
        p = opts.precision or manifest.precision
        if p != manifest.precision:
            runtime = "OpenVINO" if opts.backend == "openvino-cpu" else "ONNX Runtime"
            raise EngineError(f"{runtime} runs the export's own precision ({manifest.precision}); to get {p}, "
                              f"re-export with `--precision {p}` or use --backend tensorrt")
        return p
    return opts.precision or "fp16"


def model_profiles(entry: ModelEntry, req: ProfileRequest | None) -> list[ShapeProfile]:
    return compute_profiles(entry.name, entry.inputs, req) if req is not None else []


def key_components(manifest: ExportManifest, entry: ModelEntry, opts: BuildOptions, precision: str,
                   profiles: list[ShapeProfile], env: dict) -> dict:
    shape_bound = opts.backend == "tensorrt"
    options = {"refit": opts.refit, "weight_streaming": opts.weight_streaming} if shape_bound else {}
    return {
        "cache_format": CACHE_FORMAT,
        "model": entry.name,
        "backend": opts.backend,
        "weights_hash": manifest.weights_hash,
        "source": {"file": entry.path.name, "size": entry.path.stat().st_size},
        "precision": precision,
        "profiles": [p.canonical() for p in profiles] if shape_bound else "any",
        "options": options,
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


def _build_ort(entry: ModelEntry, backend: str, device_id: int):
    def build(tmp: Path) -> dict:
        import onnxruntime as ort

        from .ort import CPU_EP, CUDA_EP, TRT_EP, check_providers, cpu_session_options

        out = tmp / "model.onnx"
        if backend == "onnxruntime-cpu":
            so = cpu_session_options(level="all", optimized_model_path=str(out),
                                     external_data_min_bytes=EXTERNAL_DATA_MIN_BYTES)
            providers, wanted = [CPU_EP], [CPU_EP]
        else:  # GPU: extended level (layout passes of "all" are CPU-only and EP-specific)
            so = cpu_session_options(level="extended", optimized_model_path=str(out),
                                     external_data_min_bytes=EXTERNAL_DATA_MIN_BYTES)
            providers = [(CUDA_EP, {"device_id": str(device_id)})]
            if backend == "onnxruntime-trt":
                providers.insert(0, (TRT_EP, {"device_id": str(device_id)}))
            wanted = [p[0] for p in providers]
        session = ort.InferenceSession(str(entry.path), sess_options=so, providers=providers)
        check_providers(session, wanted, entry.name)
        del session
        if not out.is_file():
            raise EngineError(f"ONNX Runtime did not write the optimized model for {entry.name}")
        data = tmp / "model.onnx.data"
        if data.exists() and data.stat().st_size == 0:
            data.unlink()
        return {"artefact": "model.onnx"}

    return build


def _build_openvino(entry: ModelEntry):
    def build(tmp: Path) -> dict:
        from .openvino_backend import import_openvino

        ov = import_openvino()
        model = ov.Core().read_model(str(entry.path))
        # compress_to_fp16=False: an fp32 export stays fp32 (save_model's default would halve the weights).
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        del model
        for f in ("model.xml", "model.bin"):
            if not (tmp / f).is_file():
                raise EngineError(f"OpenVINO did not write {f} for {entry.name}")
        return {"artefact": "model.xml"}

    return build


def _build_trt(entry: ModelEntry, profiles, precision, opts: BuildOptions, env: dict, cache: EngineCache):
    def build(tmp: Path) -> dict:
        from .trt_backend import build_plan

        plan = build_plan(entry.path, profiles, precision, env.get("compute_capability"), refit=opts.refit,
                          weight_streaming=opts.weight_streaming, timing_cache=cache.timing_cache_path(env))
        (tmp / "engine.plan").write_bytes(plan)
        return {"artefact": "engine.plan"}

    return build


def build_model(manifest: ExportManifest, name: str, opts: BuildOptions, cache: EngineCache | None = None,
                env: dict | None = None, log=None) -> CacheEntry:
    """Build (or find, verified) the cached engine of one model."""
    if opts.backend not in BACKENDS:
        raise EngineError(f"unknown backend {opts.backend!r}: choose one of {', '.join(BACKENDS)}")
    cache = cache or EngineCache()
    entry = manifest.models[name]
    env = env or environment(opts.backend, opts.device_id)
    req = profile_request(manifest, opts, required=opts.backend == "tensorrt")
    profiles = model_profiles(entry, req)
    precision = resolve_precision(manifest, opts)
    comps = key_components(manifest, entry, opts, precision, profiles, env)
    if not opts.force:
        found = cache.lookup(comps)
        if found is not None:
            if log:
                log(f"{name}: cached {found.path}")
            return found
    if opts.backend == "tensorrt":
        if importlib.util.find_spec("tensorrt") is None:
            from .trt_backend import import_tensorrt

            import_tensorrt()  # raises the install message
        builder = _build_trt(entry, profiles, precision, opts, env, cache)
    elif opts.backend == "openvino-cpu":
        builder = _build_openvino(entry)
    else:
        builder = _build_ort(entry, opts.backend, opts.device_id)
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
    manifest = load_manifest(export_dir)
    env = environment(opts.backend, opts.device_id)
    if opts.backend in ("tensorrt", "onnxruntime-cuda", "onnxruntime-trt") and not env.get("gpu"):
        raise EngineError(f"--backend {opts.backend} needs an NVIDIA GPU and none was found "
                          f"(use --backend onnxruntime-cpu)")
    names = [m for m in (models or manifest.models) if m in manifest.models]
    return {n: build_model(manifest, n, opts, cache, env, log) for n in names}
