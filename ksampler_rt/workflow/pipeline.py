"""``Pipeline``: loaded engines plus the workflow runner, reused across calls.

    from ksampler_rt.workflow import Pipeline
    pipe = Pipeline()                                   # models from the local registry
    image = pipe.txt2img("tiny-sd15", "a red apple", seed=42)
    result = pipe.run_workflow("examples/workflows/txt2img.json")

``max_batch`` > 1 merges the UNet calls of runs made at the same time from several threads (the server's
prompts) into one engine call per step: see :mod:`ksampler_rt.runtime.batching`.
"""
from __future__ import annotations

import copy
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .executor import EventSink, ExecutionContext, ExecutionResult, OutputCache, execute, resolve_input
from .graph import Plan, is_link, load_workflow, validate
from .images import DEFAULT_MAX_IMAGE_PIXELS
from .nodes import build_node_specs
from .registry import ModelRegistry

# Backends whose engines hold one inference request each (openvino_backend: ``create_infer_request`` once
# per compiled shape): prompts running side by side must not enter them at once.
_ONE_REQUEST_BACKENDS = frozenset({"openvino-cpu"})

# Backends whose UNet sessions must always be entered from one thread (ORT CUDA graphs replay on the
# capturing thread; TensorRT execution contexts are per thread): their calls go through the gather
# point's engine thread even without batching.
_THREAD_AFFINE_BACKENDS = frozenset({"onnxruntime-cuda", "onnxruntime-trt", "tensorrt"})


def clip_layer_problem(manifest: Mapping, layer: int) -> str | None:
    """Why CLIPSetLastLayer(``layer``) cannot be computed on an export (None when every tower can)."""
    from .checkpoint import _TOWER_OPTIONS
    from .text_encoding import ClipTower

    options = _TOWER_OPTIONS.get(manifest.get("family"), {})
    for entry in manifest.get("text_encoders", []):
        if entry.get("name") not in options:
            continue
        _, layer_norm, offset = options[entry["name"]]
        tower = ClipTower(name=entry["name"], tokenizer=None, forward=None,
                          num_layers=int(entry.get("num_layers", 0)) + offset,
                          layer_norm_hidden_state=layer_norm, layer_offset=offset,
                          all_hidden_states=bool(entry.get("all_hidden_states")))
        try:
            tower.source(layer)
        except ValueError as exc:
            return str(exc).partition(": ")[2] or str(exc)
    return None


# The loaders whose export's manifest says a MODEL's family: class_type -> (registry folder, name input)
_MODEL_LOADERS = {"CheckpointLoaderSimple": ("checkpoints", "ckpt_name"),
                  "UNETLoader": ("diffusion_models", "unet_name")}
# The inputs a CONDITIONING (and the ControlNet applied to it) comes through
_CONDITIONING_INPUTS = ("conditioning", "positive", "negative", "conditioning_1", "conditioning_2",
                        "conditioning_to", "conditioning_from", "control_net")


def _upstream(prompt: Mapping, link, keys: tuple[str, ...]):
    """The nodes of API-format ``prompt`` reached from ``link`` through the inputs named ``keys`` (depth first,
    each once; links to nodes not in the prompt are skipped)."""
    seen, stack = set(), [link]
    while stack:
        link = stack.pop()
        if not is_link(link) or str(link[0]) not in prompt or str(link[0]) in seen:
            continue
        seen.add(str(link[0]))
        node = prompt[str(link[0])]
        yield node
        stack.extend(v for k, v in (node.get("inputs") or {}).items() if k in keys)


class Pipeline:
    def __init__(self, models_dir: str | os.PathLike | None = None, *, backend: str = "auto",
                 output_dir: str | os.PathLike = "output", input_dir: str | os.PathLike = "input",
                 temp_dir: str | os.PathLike | None = None, log: Callable[[str], None] | None = print,
                 max_batch: int = 1, batch_wait_ms: float | None = None, precision: str | None = None):
        from ..runtime.batching import DEFAULT_BATCH_WAIT_MS

        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch: received {max_batch!r}, expected a positive integer (1: no batching)")
        self.max_batch = max_batch
        self.batch_wait_ms = DEFAULT_BATCH_WAIT_MS if batch_wait_ms is None else float(batch_wait_ms)
        if not 0 <= self.batch_wait_ms <= 10_000:
            raise ValueError(f"batch_wait_ms: received {batch_wait_ms!r}, expected milliseconds in [0, 10000]")
        self._batchers: dict[int, Any] = {}   # id(model) -> its BatchingUNet
        self.registry = ModelRegistry(models_dir)
        self.backend = backend
        # ``--precision`` (engines.precision syntax; None: the export's own), given to load_engines for every
        # checkpoint loaded from now on; the backend refuses what it cannot run (never a silent fallback)
        self.precision = precision
        self.output_dir = Path(output_dir)
        self.input_dir = Path(input_dir)
        self.temp_dir = Path(temp_dir) if temp_dir else Path(tempfile.gettempdir()) / "ksampler-rt-temp"
        self.log = log or (lambda message: None)
        self._checkpoints: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS  # LoadImage's cap; the server sets its own
        self.specs = build_node_specs(self.registry.checkpoint_names, self._input_images,
                                      self.registry.lora_names, self.registry.lora, self.registry.component_names,
                                      self.registry.controlnet_names)

    # -- models ------------------------------------------------------------------------------
    def _input_images(self) -> list[str]:
        from .images import IMAGE_SUFFIXES

        if not self.input_dir.is_dir():
            return []
        return sorted(p.name for p in self.input_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)

    def load_checkpoint(self, name: str):
        """(MODEL, CLIP, VAE) of a registered checkpoint; engines load once and stay loaded."""
        with self._lock:
            if name not in self._checkpoints:
                from .checkpoint import load_checkpoint

                export_dir = self.registry.checkpoint(name)
                self._checkpoints[name] = load_checkpoint(export_dir, backend=self.backend, log=self.log,
                                                          registry=self.registry, **self._engine_options())
            return self._checkpoints[name]

    def _engine_options(self) -> dict:
        return {"precision": self.precision} if self.precision else {}

    def load_component(self, folder: str, names: tuple, options: dict):
        """A separate flow-family component (UNETLoader, DualCLIPLoader, TripleCLIPLoader, VAELoader), kept loaded."""
        from .checkpoint import load_component

        key = (folder, tuple(names), tuple(sorted(options.items())))
        with self._lock:
            if key not in self._checkpoints:
                self._checkpoints[key] = load_component(self.registry, folder, tuple(names), options,
                                                        backend=self.backend, log=self.log, **self._engine_options())
            return self._checkpoints[key]

    def load_controlnet(self, name: str):
        """ControlNetLoader's network (a registered ControlNet / T2I-Adapter export), kept loaded."""
        from .control_engines import load_controlnet

        key = ("controlnet", name)
        with self._lock:
            if key not in self._checkpoints:
                self._checkpoints[key] = load_controlnet(self.registry, name, backend=self.backend, log=self.log,
                                                         **self._engine_options())
            return self._checkpoints[key]

    def checkpoint_for_run(self, name: str):
        """:meth:`load_checkpoint`, with the MODEL's UNet behind the batching gather point when batching is
        on (``max_batch`` > 1) or the backend needs one engine thread. What workflows and the txt2img API use."""
        checkpoint = self.load_checkpoint(name)
        model = checkpoint.model if hasattr(checkpoint, "model") else checkpoint[0]
        engines = getattr(checkpoint, "engines", None)
        if self._gate(model, engines):
            if self.max_batch > 1 and getattr(engines, "backend", "") in _ONE_REQUEST_BACKENDS:
                _serialize_side_engines(checkpoint.vae, getattr(checkpoint, "clip", None))
        return checkpoint

    def component_for_run(self, folder: str, names: tuple, options: dict):
        """:meth:`load_component` with the same gates as :meth:`checkpoint_for_run`: a diffusion model's
        transformer behind the batching gather point, a VAE serialized on a one-request backend."""
        component = self.load_component(folder, names, options)
        value = getattr(component, "value", component)
        engines = (getattr(component, "engines", None) or [None])[0]
        if folder == "diffusion_models":
            self._gate(value, engines)
        elif self.max_batch > 1 and getattr(engines, "backend", "") in _ONE_REQUEST_BACKENDS:
            _serialize_side_engines(value if folder == "vae" else None, value if folder == "text_encoders" else None)
        return component

    def _gate(self, model, engines) -> bool:
        """Put ``model``'s network behind a :class:`BatchingUNet` once, when batching is on or the backend
        needs one engine thread; True when it was put there by this call."""
        backend = getattr(engines, "backend", "")
        if self.max_batch <= 1 and backend not in _THREAD_AFFINE_BACKENDS:
            return False
        with self._lock:
            if id(model) in self._batchers:
                return False
            from ..runtime.batching import BatchingUNet

            limit = self.max_batch
            engine_rows = _engine_max_rows(getattr(engines, "denoiser", None))
            if engine_rows is not None and engine_rows < limit:
                limit = engine_rows
            model.unet = BatchingUNet(model.unet, max_batch=limit, batch_wait_ms=self.batch_wait_ms,
                                      engine_thread=backend in _THREAD_AFFINE_BACKENDS, log=self.log)
            self._batchers[id(model)] = model.unet
            return True

    def release(self) -> None:
        with self._lock:
            for batcher in self._batchers.values():
                batcher.close()
            self._batchers.clear()
            for checkpoint in self._checkpoints.values():
                checkpoint.release()
            self._checkpoints.clear()

    # -- workflows -----------------------------------------------------------------------------
    def prepare(self, workflow: str | os.PathLike | Mapping, overrides: Mapping[str, Any] | None = None) -> Plan:
        """Parse (API or UI format), apply ``node.input=value`` overrides, validate everything."""
        prompt = copy.deepcopy(load_workflow(workflow, self.specs))  # overrides must not touch the caller's dict
        for target, value in (overrides or {}).items():
            node_id, _, name = target.partition(".")
            if node_id not in prompt or not name:
                raise ValueError(f"--set {target}: expected NODE_ID.INPUT with a node id of the workflow "
                                 f"({', '.join(prompt)})")
            prompt[node_id].setdefault("inputs", {})[name] = value
        return validate(prompt, self.specs, self._checker(prompt))

    def _checker(self, prompt: Mapping):
        """Checks that need files, run at validation so a bad workflow fails before any engine runs:
        LoadImage's file must decode within the pixel cap; SaveImage's filename_prefix must stay inside the output
        folder; CLIPSetLastLayer's layer must be one the checkpoint's export provides."""
        from .images import check_filename_prefix, check_image

        def check(node_id: str, class_type: str, spec, values: dict) -> list[tuple[str, str]]:
            if class_type == "LoadImage" and isinstance(values.get("image"), str):
                try:
                    check_image(resolve_input(self.input_dir, values["image"]), self.max_image_pixels)
                except (ValueError, OSError) as exc:
                    return [("image", str(exc))]
            if class_type == "SaveImage" and isinstance(values.get("filename_prefix"), str):
                try:
                    check_filename_prefix(values["filename_prefix"])
                except ValueError as exc:
                    return [("filename_prefix", str(exc).partition(": ")[2])]
            if class_type in ("KSampler", "KSamplerAdvanced"):
                message = self._controlnet_family_problem(prompt, values)
                if message:
                    return [("model", message)]
            if class_type == "CLIPSetLastLayer" and isinstance(values.get("stop_at_clip_layer"), int):
                message = self._clip_layer_problem(prompt, values.get("clip"), values["stop_at_clip_layer"])
                if message:
                    return [("stop_at_clip_layer", message)]
            return []

        return check

    def _manifest(self, folder: str, name) -> dict | None:
        """The manifest of the export registered as ``name`` in ``folder``; None when there is none (reported on
        the loader's own input)."""
        import json

        try:
            path = self.registry.checkpoint(name) if folder == "checkpoints" else self.registry.component(folder, name)
            return json.loads((path / "manifest.json").read_text())
        except (ValueError, OSError, TypeError):
            return None

    def _manifest_family(self, folder: str, name) -> str | None:
        return (self._manifest(folder, name) or {}).get("family")

    def _controlnet_family_problem(self, prompt: Mapping, values: Mapping) -> str | None:
        """A ControlNet registered for another family than the sampler's MODEL (its export's manifest says
        which UNet family it fits), found at validation, before any engine is built or run. None when they fit or
        either is unknown (stand-ins, models not in the registry: the runtime checks again at sampling)."""
        model_family = None
        for node in _upstream(prompt, values.get("model"), ("model",)):
            if node.get("class_type") in _MODEL_LOADERS:
                folder, key = _MODEL_LOADERS[node["class_type"]]
                model_family = self._manifest_family(folder, (node.get("inputs") or {}).get(key))
                break
        if model_family is None:
            return None
        group = {"sd2-v": "sd2"}.get
        for key in ("positive", "negative"):
            for node in _upstream(prompt, values.get(key), _CONDITIONING_INPUTS):
                name = (node.get("inputs") or {}).get("control_net_name")
                if node.get("class_type") not in ("ControlNetLoader", "DiffControlNetLoader") or name is None:
                    continue
                net_family = self._manifest_family("controlnet", name)
                if net_family is not None and group(net_family, net_family) != group(model_family, model_family):
                    return (f"control_net_name {name!r}: received a ControlNet for family {net_family!r}, expected one "
                            f"for the model's family {model_family!r}")
        return None

    def _clip_layer_problem(self, prompt: Mapping, link, layer: int) -> str | None:
        """Why ``layer`` cannot be served by the checkpoint the CLIP comes from (None when it can or is unknown)."""
        for node in _upstream(prompt, link, ("clip",)):
            if node.get("class_type") == "CheckpointLoaderSimple":
                manifest = self._manifest("checkpoints", (node.get("inputs") or {}).get("ckpt_name"))
                return None if manifest is None else clip_layer_problem(manifest, layer)
        return None

    def run_workflow(self, workflow: str | os.PathLike | Mapping | Plan, *, overrides: Mapping[str, Any] | None = None,
                     prompt_id: str | None = None, extra_pnginfo: dict | None = None,
                     on_event: EventSink | None = None, on_step=None,
                     is_interrupted: Callable[[], bool] = lambda: False,
                     cache: OutputCache | None = None) -> ExecutionResult:
        from ..runtime.batching import current_stats, run_scope

        plan = workflow if isinstance(workflow, Plan) else self.prepare(workflow, overrides)
        ctx = ExecutionContext(load_checkpoint=self.checkpoint_for_run, output_dir=self.output_dir,
                               input_dir=self.input_dir, temp_dir=self.temp_dir, prompt=plan.prompt,
                               extra_pnginfo=extra_pnginfo, prompt_id=prompt_id, on_event=on_event,
                               is_interrupted=is_interrupted, on_step=on_step,
                               max_image_pixels=self.max_image_pixels, load_component=self.component_for_run,
                               load_controlnet=self.load_controlnet)
        if current_stats() is not None:  # the caller (the server's worker) opened the run's scope
            return execute(plan, self.specs, ctx, cache)
        with run_scope(is_interrupted):  # an interrupted run's pending UNet call leaves the batch
            return execute(plan, self.specs, ctx, cache)

    # -- three-line Python API ---------------------------------------------------------------------
    def txt2img(self, ckpt_name: str, prompt: str, negative: str = "", *, seed: int = 0, steps: int = 20,
                cfg: float = 8.0, sampler_name: str = "euler", scheduler: str = "normal", width: int = 512,
                height: int = 512, batch_size: int = 1) -> np.ndarray:
        """IMAGE [B,H,W,3] float in [0,1] for a prompt (the KSampler txt2img graph)."""
        from ..runtime import ksampler

        model, clip, vae = tuple(self.checkpoint_for_run(ckpt_name))[:3]
        latent = {"samples": np.zeros((batch_size, model.latent_channels, height // 8, width // 8), np.float32)}
        out = ksampler(model, seed, steps, cfg, sampler_name, scheduler, clip.encode(prompt), clip.encode(negative),
                       latent)
        return vae.decode(out["samples"])

    def img2img(self, ckpt_name: str, image: np.ndarray, prompt: str, negative: str = "", *, denoise: float = 0.6,
                seed: int = 0, steps: int = 20, cfg: float = 8.0, sampler_name: str = "euler",
                scheduler: str = "normal") -> np.ndarray:
        """IMAGE for an input IMAGE [B,H,W,3] (VAEEncode -> KSampler with denoise -> VAEDecode)."""
        from ..runtime import ksampler

        model, clip, vae = tuple(self.checkpoint_for_run(ckpt_name))[:3]
        latent = {"samples": vae.encode(np.asarray(image, np.float32)[..., :3])}
        out = ksampler(model, seed, steps, cfg, sampler_name, scheduler, clip.encode(prompt), clip.encode(negative),
                       latent, denoise)
        return vae.decode(out["samples"])


def _engine_max_rows(engine) -> int | None:
    """The largest batch of the denoiser engine's latent input (``sample`` / ``x``) over its shape profiles
    (None: unbounded)."""
    profiles = getattr(engine, "profiles", None) or []
    rows = []
    for profile in profiles:
        try:
            rows.append(int(profile["x" if "x" in profile.ranges else "sample"].max[0]))
        except (KeyError, TypeError, IndexError, AttributeError, ValueError):
            return None
    return max(rows) if rows else None


class _Serialized:
    """An engine entered by one thread at a time (the text encoders and VAE of a backend with one
    inference request per engine, while several prompts run; the UNet has the gather point instead)."""

    def __init__(self, engine):
        self.engine = engine
        self._lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        with self._lock:
            return self.engine(*args, **kwargs)

    def __getattr__(self, name: str):
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)


def _serialize_side_engines(vae=None, clip=None) -> None:
    """Serialize a VAE's and a CLIP's engines (SD towers, or a FlowClip's CLIP / T5 towers)."""
    for name in ("decoder", "encoder"):
        engine = getattr(vae, name, None)
        if engine is not None and not isinstance(engine, _Serialized):
            setattr(vae, name, _Serialized(engine))
    towers = getattr(clip, "towers", ())
    for tower in (towers.values() if isinstance(towers, dict) else towers):
        forward = getattr(getattr(tower, "tower", tower), "forward", None)
        if hasattr(forward, "engine") and not isinstance(forward.engine, _Serialized):
            forward.engine = _Serialized(forward.engine)
