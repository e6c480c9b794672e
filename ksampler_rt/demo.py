"""``ksampler-rt demo``: the whole product on a tiny model built here, end to end.

tiny SD1.5-shaped model (deterministic, no download) -> ONNX export -> engines for the best
backend on this machine -> ComfyUI's split-sampling workflow and its unsplit twin -> PNGs, plus
the same split with exact continuation, and the differences between them.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np

TINY_CHECKPOINT = "tiny-sd15"
EXAMPLES = Path(__file__).resolve().parent / "workflow" / "examples"


def prepare_tiny_checkpoint(models_dir=None, *, family: str = "sd15", log=print) -> Path:
    """Build, export and register the tiny model as ``tiny-sd15`` (reused when already there).

    What torch / transformers / diffusers warn or log while the model is built and exported goes to
    ``<cache>/exports/<name>.log`` (one ``log`` line names it when there is any), not the console; the export's
    own step lines go to stderr."""
    from .export.manifest import EXPORTER_REVISION
    from .export.tiny import TINY_RECIPE_VERSION, ensure_tiny_model
    from .workflow.registry import ModelRegistry, default_cache_dir

    registry = ModelRegistry(models_dir)
    name = TINY_CHECKPOINT if family == "sd15" else f"tiny-{family}"
    export_dir = default_cache_dir() / "exports" / f"{name}-r{TINY_RECIPE_VERSION}-e{EXPORTER_REVISION}"
    if not (export_dir / "manifest.json").is_file():
        from .export.library_log import library_output_to
        from .export.onnx_export import export_model

        library_log = export_dir.with_name(export_dir.name + ".log")
        library_log.unlink(missing_ok=True)  # this run's messages only
        log(f"building the tiny {family} model and exporting it to {export_dir} ...")
        with library_output_to(library_log) as captured:
            try:
                source = ensure_tiny_model(family)
                export_model(str(source), str(export_dir), overwrite=True, library_log=library_log)
            finally:
                if captured.count:
                    log(captured.summary())
    registry.register_checkpoint(name, export_dir)
    if family == "sd15":  # the tiny LoRA of the lora-switch workflow (kohya layout, deterministic)
        from .export.tiny import TINY_LORA_NAME, ensure_tiny_lora

        if not (registry.loras_dir / TINY_LORA_NAME).is_file():
            registry.register_lora(ensure_tiny_lora(family), TINY_LORA_NAME)
    return export_dir


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def run_demo(out_dir: str | os.PathLike = "output", backend: str = "auto", models_dir=None, log=print) -> dict:
    from .engines import available_backends
    from .engines.loader import pick_backend
    from .workflow.pipeline import Pipeline

    export_dir = prepare_tiny_checkpoint(models_dir, log=log)
    chosen = pick_backend(backend)
    unavailable = {k: v for k, v in available_backends().items() if v}
    log(f"backend: {chosen}" + "".join(f"\n  ({name}: {why})" for name, why in unavailable.items()))
    pipe = Pipeline(models_dir, backend=chosen, output_dir=out_dir, input_dir=EXAMPLES, log=log)

    try:
        workflow = json.loads((EXAMPLES / "advanced-split.json").read_text())
        comfy = pipe.run_workflow(workflow, extra_pnginfo=None)
        split, unsplit = comfy.outputs["11"][0]["samples"], comfy.outputs["12"][0]["samples"]

        exact_workflow = copy.deepcopy(workflow)
        for node_id in ("10", "11"):
            exact_workflow[node_id]["inputs"]["continuation"] = "exact"
        exact_workflow["9"]["inputs"]["filename_prefix"] = "split_exact"
        exact_workflow["14"]["inputs"]["filename_prefix"] = "unsplit_again"
        exact = pipe.run_workflow(exact_workflow)
        split_exact = exact.outputs["11"][0]["samples"]

        files = [Path(pipe.output_dir) / img["subfolder"] / img["filename"]
                 for result in (comfy, exact) for ui in result.ui.values() for img in ui["images"]]
        report = {
            "export_dir": str(export_dir),
            "backend": chosen,
            "files": [str(f) for f in files],
            "max_diff_split_vs_unsplit_comfyui": _max_diff(split, unsplit),
            "max_diff_split_vs_unsplit_exact": _max_diff(split_exact, unsplit),
        }
    finally:
        pipe.release()
    return report


def demo(args) -> int:
    report = run_demo(args.out, args.backend, args.models)
    print("\nwrote:")
    for f in report["files"]:
        print(f"  {f}")
    print(f"split (0-10 with leftover noise, then 10-20) vs unsplit 20-step run, latent max |diff|:\n"
          f"  ComfyUI semantics:   {report['max_diff_split_vs_unsplit_comfyui']:.3g}  "
          "(the scale round trip between the two nodes)\n"
          f"  exact continuation:  {report['max_diff_split_vs_unsplit_exact']:.3g}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="tiny model -> export -> engines -> split-sampling workflow -> PNGs")
    p.add_argument("--out", default="output", help="where the PNGs go (default ./output)")
    p.add_argument("--backend", default="auto", help="tensorrt, onnxruntime-cuda, openvino-cpu, onnxruntime-cpu or auto")
    p.add_argument("--models", default=None, help="model registry folder (default $KSAMPLER_RT_MODELS or the cache)")
    p.set_defaults(func=demo)
