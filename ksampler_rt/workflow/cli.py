"""``ksampler-rt run`` and ``ksampler-rt register``."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .graph import WorkflowError
from .registry import REGISTER_FOLDERS


def _parse_set(items: list[str]) -> dict:
    overrides = {}
    for item in items or []:
        target, sep, raw = item.partition("=")
        if not sep or "." not in target:
            raise ValueError(f"--set: received {item!r}, expected NODE_ID.INPUT=VALUE (e.g. 3.seed=7)")
        try:
            overrides[target] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[target] = raw  # a bare string, e.g. 3.sampler_name=dpmpp_2m
    return overrides


def precision_arg(value: str) -> str | None:
    """argparse ``type`` of ``--precision``: the spec's syntax (engines.precision.parse_precision), canonical."""
    import argparse

    from ..engines.precision import parse_precision

    try:
        spec = parse_precision(value, "--precision")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return spec.canonical() if spec else None


def check_precision(precision: str | None, backend: str) -> str | None:
    """``--precision`` checked against what ``backend`` ("auto": the one it picks) accepts, before any engine
    loads: a CPU backend its :data:`~ksampler_rt.engines.precision.CPU_BACKEND_PRECISIONS` plus ``auto``, each
    one this CPU runs natively (the refusal names the missing ISA feature); a GPU backend the precisions
    of ``engines.precision.PRECISIONS`` (its ``resolve_precision`` decides per export at load; ``auto`` is
    defined for the CPU backends only). Returns the canonical spec (None: the backend's default)."""
    from ..engines.backends import pick_backend
    from ..engines.precision import AUTO, CPU_BACKEND_PRECISIONS, PRECISIONS, cpu_precision_refusal, parse_precision

    spec = parse_precision(precision, "--precision")
    if spec is None:
        return None
    name = backend if backend != "auto" else pick_backend("auto")
    offered = CPU_BACKEND_PRECISIONS.get(name)
    accepted = offered + (AUTO,) if offered is not None else PRECISIONS
    for asked in ([spec.default] if spec.default else []) + [p for _, p in spec.per]:
        if asked not in accepted:
            raise ValueError(f"--precision: received {asked} for --backend {name}, expected one of "
                             f"{', '.join(accepted)}")
        why = cpu_precision_refusal(name, asked) if offered is not None and asked != AUTO else None
        if why:
            raise ValueError(f"--precision: received {asked}, which this machine cannot run: {why}")
    return spec.canonical()


def describe_precision(precision: str | None, backend: str) -> str:
    """One line saying what ``--precision`` means on ``backend`` (``auto`` on a CPU backend: its picks)."""
    from ..engines.backends import pick_backend
    from ..engines.precision import AUTO, CPU_BACKEND_PRECISIONS, explain_auto, parse_precision

    name = backend if backend != "auto" else pick_backend("auto")
    spec = parse_precision(precision, "--precision")
    if spec is None:
        return f"precision: the export's own on {name} (no --precision)"
    if spec.is_auto and name in CPU_BACKEND_PRECISIONS:
        picks = explain_auto(name)  # "precision auto on NAME: unet=bf16, ... (CPU: flags)"
        return picks if spec.canonical() == AUTO else f"precision {spec} on {name}; where {AUTO}: {picks}"
    return f"precision {spec} on {name}"


class _ProgressBars:
    """One tqdm bar per sampling node, fed by the executor's per-step callback."""

    def __init__(self):
        from tqdm import tqdm

        self._tqdm, self._bars = tqdm, {}

    def __call__(self, node_id, value, total, x, denoised):
        bar = self._bars.get(node_id)
        if bar is None or bar.total != total:
            bar = self._bars[node_id] = self._tqdm(total=total, desc=f"node {node_id}", unit="step", leave=True)
        bar.update(value - bar.n)

    def close(self):
        for bar in self._bars.values():
            bar.close()


def run(args) -> int:
    from .pipeline import Pipeline

    if args.fake_checkpoint and args.precision:
        raise ValueError(f"--precision: received {args.precision} with --fake-checkpoint, expected no --precision "
                         "(the analytic stand-ins run no engines)")
    if args.fake_checkpoint:
        # the analytic stand-ins (ksampler_rt.serve.testing), as `ksampler-rt serve --fake-checkpoint` serves them
        from ..serve.testing import fake_pipeline

        pipe = fake_pipeline(args.fake_checkpoint, output_dir=args.out, input_dir=args.input)
    else:
        precision = check_precision(args.precision, args.backend)
        if precision:
            print(describe_precision(precision, args.backend), file=sys.stderr)
        pipe = Pipeline(args.models, backend=args.backend, precision=precision, output_dir=args.out,
                        input_dir=args.input)
    try:
        plan = pipe.prepare(args.workflow, _parse_set(args.set))
    except WorkflowError as exc:
        print(f"ksampler-rt run: {exc}", file=sys.stderr)
        return 2
    bars = _ProgressBars()
    current: dict = {}

    def on_event(kind: str, data) -> None:
        if kind == "executing" and isinstance(data, dict) and data.get("node") is not None:
            current["node"] = data["node"]

    try:
        result = pipe.run_workflow(plan, on_step=bars, on_event=on_event, extra_pnginfo=_ui_workflow(args.workflow))
    except (ValueError, OSError, RuntimeError) as exc:
        # the node that failed and, in the message, the input (e.g. "filename_prefix: received ...")
        node = current.get("node")
        where = f"node {node} ({plan.prompt[node]['class_type']})" if node in plan.prompt else "the workflow"
        print(f"ksampler-rt run: {where} failed: {exc}", file=sys.stderr)
        return 1
    finally:
        bars.close()
    for node_id, ui in result.ui.items():
        for image in ui.get("images", []):
            folder = pipe.output_dir if image["type"] == "output" else pipe.temp_dir
            print(Path(folder) / image["subfolder"] / image["filename"])
    return 0


def _ui_workflow(path: str) -> dict | None:
    """The UI-format workflow to embed in PNGs (ComfyUI's extra_pnginfo.workflow), when the file is one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        return {"workflow": data}
    if isinstance(data, dict) and isinstance(data.get("extra_data"), dict):
        return data["extra_data"].get("extra_pnginfo")
    return None


def register_cmd(args) -> int:
    from .registry import ModelRegistry

    folder = None if args.as_folder == "auto" else args.as_folder
    target = ModelRegistry(args.models).register(args.name, args.export_dir, folder, copy=args.copy)
    print(f"registered {args.name!r} as {target.parent.name}/{target.name} -> {args.export_dir}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="run a ComfyUI workflow (API or UI format) on engines")
    p.add_argument("workflow", help="workflow JSON (API format, a /prompt body, or the UI format)")
    p.add_argument("--out", default="output", help="folder for SaveImage (default ./output)")
    p.add_argument("--input", default="input", help="folder LoadImage reads from (default ./input)")
    p.add_argument("--models", default=None, help="model registry folder (default $KSAMPLER_RT_MODELS or the cache)")
    p.add_argument("--backend", default="auto", help="tensorrt, onnxruntime-cuda, openvino-cpu, onnxruntime-cpu or auto")
    p.add_argument("--precision", type=precision_arg, default=None, metavar="PRECISION",
                   help="engine precision: fp32, fp16, bf16, fp8, int8 or auto, or per network (unet=bf16,vae=fp32); "
                        "default: the export's own. CPU backends: openvino-cpu fp32 / bf16 / fp16 / int8 where this "
                        "CPU runs them natively, onnxruntime-cpu fp32; auto = the fastest within the documented "
                        "quality bound (docs/engines.md, Precision). Refused, never replaced, when not runnable")
    p.add_argument("--set", action="append", metavar="NODE.INPUT=VALUE", help="override an input, e.g. 3.seed=7")
    p.add_argument("--fake-checkpoint", action="append", default=[], metavar="NAME",
                   help="run on built-in analytic stand-ins instead of engines: NAME is a stand-in ckpt_name (its "
                        "family follows the name: sd3, flux, schnell, else SD1.5); the separate SD3 / FLUX.1 loaders "
                        "get stand-ins too (repeatable; for trying graphs, the images are meaningless)")
    p.set_defaults(func=run)

    r = subparsers.add_parser("register", help="make an export directory usable under a name in workflows "
                                               "(ckpt_name, unet_name, clip_name, vae_name, control_net_name)")
    r.add_argument("name", help="the name workflows use, e.g. flux1-dev.safetensors")
    r.add_argument("export_dir", help="a directory written by `ksampler-rt export`")
    r.add_argument("--models", default=None, help="model registry folder")
    r.add_argument("--copy", action="store_true", help="copy instead of symlinking")
    r.add_argument("--as", dest="as_folder", default="auto", choices=("auto",) + REGISTER_FOLDERS,
                   help="the registry folder (loader) it serves: checkpoints (CheckpointLoaderSimple), "
                        "diffusion_models (UNETLoader), text_encoders (DualCLIPLoader / TripleCLIPLoader), vae "
                        "(VAELoader), controlnet (ControlNetLoader); auto (default): from what the export holds")
    r.set_defaults(func=register_cmd)
