"""``load_engines(export_dir, backend=...) -> EngineSet``: what the pipeline uses.

The sampler only sees ``EngineSet.unet_callable()`` (and the other engines' ``__call__``); it never
knows the backend.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from .backends import LoadJob, auto_order, available_backends, environment, get_backend, pick_backend
from .base import Engine
from .build import BuildOptions, build_model, key_components, model_profiles, profile_request, rebuild_command, \
    resolve_precision
from .cache import EngineCache
from .device import DeviceTensor
from .manifest import ExportManifest, load_manifest
from .profiles import MODELS, dim_roles
from .spec import EngineError

__all__ = ["EngineSet", "LoadOptions", "available_backends", "load_engines", "pick_backend"]


def __getattr__(name: str):
    if name == "AUTO_ORDER":  # the order ``backend="auto"`` tries, from the registry
        return auto_order()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class LoadOptions:
    """How ``load_engines`` finds, builds and opens engines; every field has a usable default.

    Shape request (as for ``ksampler-rt build``): ``shapes`` ('512x512,768x768' or [(w, h)]), ``batch``
    ('1-4'), ``tokens``, ``dynamic``. For a backend whose artefact accepts any shape (ONNX Runtime,
    OpenVINO) they only restrict what the engines accept (and pick CUDA-graph buckets); for a shape-bound
    one (TensorRT) they select the plan. ``precision``: as ``--precision`` (None: the backend's default).

    ``build_missing``: build an engine that is not cached yet; None = the backend's default (yes for ONNX
    Runtime and OpenVINO, seconds; no for TensorRT, minutes: run ``ksampler-rt build`` once), and a miss
    then raises an error saying why nothing usable is cached. ``verify``: checksum cached files on load.
    ``refit`` (TensorRT): use the plan built with ``--refit`` (LoRA weights swapped without a rebuild);
    None = the plain plan when it is cached (TensorRT 11.3 lists a known issue where REFIT builds can drop a
    GEMM bias), else a cached refittable one, else the plain one is built.

    Running: ``threads`` (CPU backends; None = ``$KSAMPLER_RT_ORT_THREADS`` or the usable cores),
    ``spinning`` (ONNX Runtime CPU: busy-waiting worker threads), ``cuda_graph`` (GPU backends),
    ``device_id`` (CUDA device). CUDA graphs are captured per shape bucket, batch and size ranges included.
    """

    shapes: str | Sequence | None = None
    batch: str | int | Sequence[int] | None = None
    tokens: str | int | Sequence[int] | None = None
    dynamic: bool = False
    precision: str | None = None
    build_missing: bool | None = None
    verify: bool = True
    refit: bool | None = None
    threads: int | None = None
    spinning: bool = False
    cuda_graph: bool = True
    device_id: int = 0

    def build_options(self, backend: str) -> BuildOptions:
        """The ``BuildOptions`` of the artefact these options ask for."""
        return BuildOptions.from_cli(backend, self.shapes, self.batch, self.tokens, self.dynamic, self.precision,
                                     device_id=self.device_id, refit=bool(self.refit))


LOAD_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(LoadOptions))


#: The inputs of each denoiser's ONNX graph that ``unet_callable`` maps its arguments onto:
#: (latent, timestep, context, pooled / ADM vector). SD / SDXL UNets (and the UNet taking ControlNet
#: residuals) use diffusers' names, the flow transformers ComfyUI's (x, timestep, context, y, guidance).
_DENOISER_INPUTS = {"unet": ("sample", "timestep", "encoder_hidden_states", "y"),
                    "unet_control": ("sample", "timestep", "encoder_hidden_states", "y"),
                    "transformer": ("x", "timestep", "context", "y")}


@dataclass
class EngineSet:
    """The engines of one export. SD / SDXL: ``unet``, ``clip`` (+ ``clip2``); SD3 / FLUX.1: ``transformer``,
    ``clip_l`` (+ ``clip_g``), ``t5xxl``; every family: ``vae_decoder`` / ``vae_encoder``. ``unet_control``
    is the UNet taking ControlNet residuals, ``controlnet`` / ``t2i_adapter`` the network of a ControlNet
    export. A separate component's export (a text encoder, a VAE) holds only its own engines."""

    manifest: ExportManifest
    backend: str
    unet: Engine | None = None
    clip: Engine | None = None
    clip2: Engine | None = None
    vae_decoder: Engine | None = None
    vae_encoder: Engine | None = None
    transformer: Engine | None = None
    clip_l: Engine | None = None
    clip_g: Engine | None = None
    t5xxl: Engine | None = None
    unet_control: Engine | None = None
    controlnet: Engine | None = None
    t2i_adapter: Engine | None = None
    scratch: object = field(default=None, repr=False)  # what the backend's open_set() returned (shared state)

    def engines(self) -> dict[str, Engine]:
        return {n: e for n in MODELS if (e := getattr(self, n)) is not None}

    @property
    def denoiser(self) -> Engine | None:
        """The UNet or the flow transformer (None in a text-encoder / VAE / ControlNet export)."""
        return self.unet if self.unet is not None else self.transformer

    def load(self) -> "EngineSet":
        for e in self.engines().values():
            e.load()
        return self

    def release(self) -> None:
        for e in self.engines().values():
            e.release()

    def __enter__(self) -> "EngineSet":
        return self.load()

    def __exit__(self, *exc) -> None:
        self.release()

    @staticmethod
    def _denoiser_kind(eng: Engine) -> str:
        names = {s.name for s in eng.inputs}
        if "x" in names:
            return "transformer"
        if "sample" in names:
            return "unet_control" if any(n.startswith("down_") for n in names) else "unet"
        raise EngineError(f"the exported denoiser has none of the latent inputs 'sample' / 'x' "
                          f"(inputs: {', '.join(sorted(names))})")

    def unet_callable(self, engine: Engine | None = None) -> Callable[..., np.ndarray]:
        """``unet(x, timestep, context, y=None, guidance=None, control=None) -> array`` with x's dtype, the
        runtime's network call (``ksampler_rt.runtime.Model``), mapped onto the exported inputs of the UNet
        (``sample``, ``timestep``, ``encoder_hidden_states``, ``y``) or the flow transformer (``x``,
        ``timestep``, ``context``, ``y``, ``guidance``) and the first output. Casts to the engine's input
        dtypes and broadcasts a scalar timestep (and guidance) over the batch. ``control`` (a UNet exported
        with ControlNet inputs): ``{"down": [...], "mid": array}``, the summed residuals; zeros are fed when
        it is None. ``engine``: another engine of the same network (``with_weights(...)`` for a LoRA);
        default the set's UNet or transformer."""
        eng = self.denoiser if engine is None else engine
        if eng is None:
            raise EngineError(f"{self.manifest.export_dir}: received an export without a UNet or transformer "
                              f"(models: {', '.join(self.engines())}), expected one to sample with")
        kind = self._denoiser_kind(eng)
        latent, t_name, ctx_name, y_name = _DENOISER_INPUTS[kind]
        specs = {s.name: s for s in eng.inputs}
        for need in (latent, t_name, ctx_name):
            if need not in specs:
                raise EngineError(f"the exported {kind} has no input {need!r} (inputs: {', '.join(specs)})")
        residuals = sorted((n for n in specs if n.startswith("down_")), key=lambda n: int(n.split("_")[1]))
        roles = dim_roles(kind, eng.inputs) if residuals else {}
        device = bool(getattr(eng, "device_inputs", False))  # takes DeviceTensor residuals (engines/device.py)

        def per_row(name, value, batch):
            spec = specs[name]
            v = np.asarray(value, dtype=spec.dtype)
            if spec.rank == 0:
                if v.size != 1:
                    raise EngineError(f"this {kind} takes one scalar {name}, received shape {v.shape}")
                return v.reshape(())
            if v.size == 1 and batch != 1:
                return np.full((batch,), v.reshape(-1)[0], dtype=spec.dtype)
            return v.reshape(-1) if spec.rank == 1 else v

        def unet(x, timestep, context, **kwargs) -> np.ndarray:
            y = kwargs.pop("y", None)
            guidance = kwargs.pop("guidance", None)
            control = kwargs.pop("control", None)
            extra = sorted(k for k, v in kwargs.items() if v is not None)
            if extra:
                raise TypeError(f"unet(): unsupported keyword argument(s) {extra}; the exported {kind} takes "
                                f"x, timestep, context, y, guidance and control")
            x = np.asarray(x)
            batch = x.shape[0]
            feeds = {latent: np.ascontiguousarray(x, dtype=specs[latent].dtype),
                     t_name: per_row(t_name, timestep, batch),
                     ctx_name: np.ascontiguousarray(context, dtype=specs[ctx_name].dtype)}
            if y_name in specs:
                if y is None:
                    raise TypeError(f"unet(): this {kind} needs y (the pooled / ADM vector)")
                feeds[y_name] = np.ascontiguousarray(y, dtype=specs[y_name].dtype)
            elif y is not None:
                raise TypeError(f"unet(): this {kind} takes no y")
            if "guidance" in specs:
                if guidance is None:
                    raise TypeError("unet(): this transformer (FLUX.1 dev) needs guidance (FluxGuidance)")
                feeds["guidance"] = per_row("guidance", guidance, batch)
            if residuals:
                feeds.update(_control_feeds(specs, roles, residuals, control, x, device=device))
            elif control is not None:
                raise TypeError("unet(): received ControlNet residuals (control=...), expected none: this export's "
                                "UNet takes no ControlNet inputs (re-export with --control-inputs)")
            out = eng(**feeds)[eng.output_names[0]]
            return out if out.dtype == x.dtype else out.astype(x.dtype)

        unet.engine = eng
        return unet

    def controlnet_callable(self) -> Callable[..., dict]:
        """The ControlNet of a ControlNet export (see :func:`controlnet_callable`)."""
        if self.controlnet is None:
            raise EngineError(f"{self.manifest.export_dir}: received an export of {', '.join(self.engines())}, "
                              f"expected a ControlNet export")
        return controlnet_callable(self.controlnet)


def controlnet_callable(eng: Engine) -> Callable[..., dict]:
    """``controlnet(x, timestep, context, hint, y=None) -> {"down": [...], "mid": array}`` over a ControlNet
    engine (ONNX inputs ``sample``, ``timestep``, ``encoder_hidden_states``, ``controlnet_cond``, SDXL ``y``;
    outputs ``down_0``.. and ``mid``), what the runtime's ControlNet application calls.

    An engine with ``device_outputs`` (ONNX Runtime CUDA) is asked to keep its outputs on the device: the
    arrays are then :class:`~ksampler_rt.engines.device.DeviceTensor` (``np.asarray`` copies one to the host),
    which a UNet engine with ``device_inputs`` takes by a device-to-device copy (issue #21)."""
    specs = {s.name: s for s in eng.inputs}
    for need in ("sample", "timestep", "encoder_hidden_states", "controlnet_cond"):
        if need not in specs:
            raise EngineError(f"the exported ControlNet has no input {need!r} (inputs: {', '.join(specs)})")
    downs = sorted((n for n in eng.output_names if n.startswith("down_")), key=lambda n: int(n.split("_")[1]))
    on_device = bool(getattr(eng, "device_outputs", False))
    def controlnet(x, timestep, context, hint, y=None) -> dict:
        x = np.asarray(x)
        t = np.asarray(timestep, dtype=specs["timestep"].dtype).reshape(-1)
        if t.size == 1 and x.shape[0] != 1:
            t = np.full((x.shape[0],), t[0], dtype=t.dtype)
        hint = np.asarray(hint)
        if hint.shape[0] == 1 and x.shape[0] != 1:  # one hint for every row (ComfyUI broadcasts it in torch)
            hint = np.broadcast_to(hint, (x.shape[0],) + hint.shape[1:])
        feeds = {"sample": np.ascontiguousarray(x, dtype=specs["sample"].dtype), "timestep": t,
                 "encoder_hidden_states": np.ascontiguousarray(context, dtype=specs["encoder_hidden_states"].dtype),
                 "controlnet_cond": np.ascontiguousarray(hint, dtype=specs["controlnet_cond"].dtype)}
        if "y" in specs:
            if y is None:
                raise TypeError("controlnet(): this ControlNet (SDXL) needs y (the ADM vector)")
            feeds["y"] = np.ascontiguousarray(y, dtype=specs["y"].dtype)
        out = eng(**feeds, keep_on_device=True) if on_device else eng(**feeds)
        return {"down": [out[n] for n in downs], "mid": out["mid"]}

    controlnet.engine = eng
    return controlnet


def _control_feeds(specs: dict, roles: dict, residuals: list[str], control, x: np.ndarray,
                   device: bool = False) -> dict:
    """The residual inputs of a UNet exported with ControlNet inputs: ``control``'s ``down`` / ``mid`` (and
    T2I-Adapter ``adapter`` / ``adapter_mid``) arrays; zeros of the matching shape for what is absent.
    ``device``: the engine takes device-resident residuals (``device_inputs``): those of its input's dtype are
    passed as they are (a device-to-device copy there); any other one is copied to the host here."""
    control = control or {}
    adapters = sorted((n for n in specs if n.startswith("adapter_") and n != "adapter_mid"),
                      key=lambda n: int(n.split("_")[1]))
    given = {}
    for key, names in (("down", residuals), ("adapter", adapters)):
        arrays = list(control.get(key) or [])
        if arrays and len(arrays) != len(names):
            raise EngineError(f"control: received {len(arrays)} {key} residuals, expected {len(names)} "
                              f"({', '.join(names)})")
        given.update(zip(names, arrays))
    for key in ("mid", "adapter_mid"):
        if control.get(key) is not None:
            given[key] = control[key]
    feeds = {}
    for name in residuals + ["mid"] + adapters + ["adapter_mid"]:
        if name not in specs:
            continue
        value = given.get(name)
        if value is None:
            feeds[name] = np.zeros(_residual_shape(specs[name], roles[name], x), dtype=specs[name].dtype)
        elif device and isinstance(value, DeviceTensor) and value.dtype == np.dtype(specs[name].dtype):
            feeds[name] = value
        else:
            feeds[name] = np.ascontiguousarray(value, dtype=specs[name].dtype)  # a DeviceTensor: explicit D2H
    return feeds


def _residual_shape(spec, roles: list, x: np.ndarray) -> tuple[int, ...]:
    """A residual input's shape for latent ``x``: static dims as exported, batch / latent size from x."""
    size = {"batch": x.shape[0], "latent_h": x.shape[2], "latent_w": x.shape[3]}
    shape = []
    for d, role in zip(spec.shape, roles):
        if isinstance(d, int):
            shape.append(d)
            continue
        base, _, div = (role or "").partition("/")
        if base not in size:
            raise EngineError(f"control: cannot size the zeros of {spec.name!r} {spec.shape_str()} (dim {d!r})")
        shape.append(-(-size[base] // int(div or 1)))
    return tuple(shape)


def load_engines(export_dir, backend: str = "auto", options: LoadOptions | None = None, *,
                 cache: EngineCache | str | None = None, models=None, log=None, **option_fields) -> EngineSet:
    """Engines for every model of the export (or of ``models``), from the engine cache, for ``backend``
    ("auto" or a registered backend's name).

    ``options``: a :class:`LoadOptions` (shapes, precision, build/verify policy, threads, CUDA graphs...);
    its fields may also be given as keywords (``load_engines(d, "onnxruntime-cpu", shapes="64x64")``), which
    override ``options``. ``cache``: an ``EngineCache`` or its root (default ``$KSAMPLER_RT_CACHE``).
    ``log``: called with a line per build step.
    """
    if options is not None and not isinstance(options, LoadOptions):
        raise TypeError(f"load_engines options: received {type(options).__name__}, expected LoadOptions "
                        f"(or its fields as keywords)")
    unknown = sorted(set(option_fields) - set(LOAD_OPTION_NAMES))
    if unknown:
        raise TypeError(f"load_engines: received unexpected keyword argument(s) {unknown}, expected export_dir, "
                        f"backend, options, cache, models, log or a LoadOptions field: {', '.join(LOAD_OPTION_NAMES)}")
    options = replace(options or LoadOptions(), **option_fields)
    name = pick_backend(backend)
    impl = get_backend(name)
    cache = cache if isinstance(cache, EngineCache) else EngineCache(cache)
    manifest = load_manifest(export_dir)
    if models is not None:
        wanted = [m.strip() for m in models.split(",")] if isinstance(models, str) else list(models)
        unknown = [m for m in wanted if m not in manifest.models]
        if not wanted or unknown:
            raise EngineError(f"models: received {wanted}, expected a non-empty selection of "
                              f"{', '.join(manifest.models)} (the models of {manifest.export_dir})")
    opts = options.build_options(name)
    build_missing = impl.builds_on_load if options.build_missing is None else options.build_missing
    env = environment(name, options.device_id)
    req = profile_request(manifest, opts, required=impl.shape_bound)
    precision = resolve_precision(manifest, opts)
    candidates = impl.lookup_options(opts, options)
    shared = impl.open_set(options)
    engines: dict[str, Engine] = {}
    for model, entry in manifest.models.items():
        if models is not None and model not in wanted:
            continue
        profiles = model_profiles(entry, req)
        built_in = impl.model_precision(precision, entry, manifest)
        found = None
        for candidate in candidates:
            comps = key_components(manifest, entry, candidate, built_in, profiles, env)
            found = cache.lookup(comps, checksums=options.verify)
            if found is not None:
                break
        if found is None:  # the first candidate is the one that is built
            comps = key_components(manifest, entry, candidates[0], built_in, profiles, env)
            if not build_missing:
                raise EngineError(
                    f"no {name} engine for {model} of {manifest.export_dir} on this machine: "
                    f"{cache.explain_miss(comps)}. Build it once with "
                    f"`{rebuild_command(manifest, candidates[0], req, False)}`")
            found = build_model(manifest, model, candidates[0], cache, env, log)
        found.check_environment(env)
        artefact = found.file(found.meta.get("artefact", "model.onnx"))
        engines[model] = impl.make_engine(LoadJob(entry, artefact, profiles, req, str(manifest.export_dir), options,
                                                  cache, shared))
    return EngineSet(manifest, name, scratch=shared, **engines)
