"""Quantized exports for TensorRT's explicit quantization: ``ksampler-rt export SRC --out DIR --quantize fp8|int8``.

TensorRT builds fp8 / int8 engines from an ONNX graph that carries QuantizeLinear / DequantizeLinear (Q/DQ)
pairs ("explicit quantization", TensorRT's documented path; the developer guide's "Working with Quantized
Types" / "Explicit Quantization" pages). This module writes such a graph for the denoiser (UNet or flow
transformer) of an fp32 export with ONNX Runtime's post-training quantizer
(``onnxruntime.quantization.quantize_static``, ``QuantFormat.QDQ``); text encoders and VAE are copied
unchanged (fp32). What the TensorRT documentation asks of a Q/DQ graph, and how the recipe meets it:

* symmetric quantization only (zero point 0): ``ActivationSymmetric`` / ``WeightSymmetric``;
* fp8 is E4M3 (``QuantType.QFLOAT8E4M3FN``), per-tensor scales; int8 activations per-tensor, weights
  per output channel (Conv axis 0, MatMul weight ``[K, N]`` axis 1);
* Q/DQ on the *inputs* of the GEMM-like layers TensorRT fuses (Conv, MatMul with a constant weight, Gemm),
  none on their outputs (``OpTypesToExcludeOutputQuantization``) and none on biases (``QuantizeBias=False``:
  TensorRT has no int32 dequantize for a bias, it keeps biases in the high precision);
* ONNX opset 19 (fp8 QuantizeLinear needs it) at IR version 9, which TensorRT 10's ONNX parser reads.

Calibration feeds real denoiser inputs: the latents, timesteps and text contexts the runtime passes to the
fp32 export's denoiser during a few short deterministic sampling runs (fixed prompts and seeds) on
onnxruntime-cpu. fp8 uses ORT's ``Distribution`` calibration (the only one its quantizer accepts for
float8), int8 ``MinMax``.

The CPU backends load the result, but run it *simulated* (ONNX Runtime executes the Q/DQ pairs as fake
quantization around fp32 kernels): it measures the quantization error (see :func:`measure_quality`), it is
not a fast CPU path.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import ExportError
from .manifest import MANIFEST_NAME, read_manifest, write_manifest

MODES = ("fp8", "int8")
DENOISERS = ("unet", "transformer")
QUANT_OP_TYPES = ("Conv", "MatMul", "Gemm")
QDQ_OPSET = 19  # QuantizeLinear / DequantizeLinear with float8 outputs
FP8_MAX = 448.0  # E4M3FN's largest finite value
QDQ_IR_VERSION = 9  # the IR version of opset 19; TensorRT 10's parser and ORT 1.31 read it
#: above this, the quantized graph keeps its weights in an external data file (protobuf's 2 GB limit)
EXTERNAL_DATA_BYTES = 1 << 30
SIMULATED_NOTE = ("CPU backends run a quantized export simulated (fake quantization: Q/DQ around fp32 "
                  "kernels), for quality checks only; fp8 / int8 speed needs TensorRT on a GPU")


@dataclass(frozen=True)
class CalibrationRecipe:
    """What the calibration data is: short txt2img runs of the fp32 export (every prompt x seed)."""

    prompts: tuple[str, ...] = ("a photograph of an astronaut riding a horse",
                                "a watercolor painting of a lighthouse at dusk, detailed")
    negative: str = "blurry, low quality"
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 4
    cfg: float = 7.0
    sampler: str = "euler"
    scheduler: str = "normal"
    width: int | None = None  # None: the family's native size
    height: int | None = None

    def size(self, family: str) -> tuple[int, int]:
        native = 512 if str(family).startswith(("sd1", "sd2")) else 1024
        return int(self.width or native), int(self.height or native)


@dataclass
class QuantizeResult:
    manifest: dict
    qdq: dict = field(default_factory=dict)


# --- calibration data ----------------------------------------------------------------------------------
def record_denoiser_inputs(export_dir: str | os.PathLike, recipe: CalibrationRecipe,
                           log: Callable[[str], None] | None = None) -> list[dict[str, np.ndarray]]:
    """The denoiser's feeds during the recipe's sampling runs of ``export_dir`` on onnxruntime-cpu."""
    from ..runtime import ksampler
    from ..workflow.checkpoint import load_checkpoint

    ck = load_checkpoint(export_dir, "onnxruntime-cpu", log=log)
    eng = ck.engines.denoiser
    if eng is None:
        raise ExportError(f"source: received {export_dir}, expected an export with a UNet or transformer")
    feeds: list[dict[str, np.ndarray]] = []
    run = eng._run

    def recording(inputs, profile_index):  # the exact arrays ONNX Runtime receives
        feeds.append({k: np.array(v, copy=True) for k, v in inputs.items()})
        return run(inputs, profile_index)

    eng._run = recording
    try:
        w, h = recipe.size(ck.manifest["family"])
        neg = ck.clip.encode(recipe.negative)
        for prompt in recipe.prompts:
            pos = ck.clip.encode(prompt)
            for seed in recipe.seeds:
                ksampler(ck.model, seed, recipe.steps, recipe.cfg, recipe.sampler, recipe.scheduler, pos, neg,
                         _empty_latent(ck.manifest, w, h))
    finally:
        eng._run = run
        ck.release()
    return feeds


def _empty_latent(manifest: dict, width: int, height: int) -> dict:
    """txt2img's start LATENT (one row) for an export of ``manifest``: its latent channels and downscale."""
    down = int(manifest.get("latent_downscale", 8))
    return {"samples": np.zeros((1, int(manifest.get("latent_channels", 4)), height // down, width // down),
                                np.float32)}


class _Feeds:
    """``CalibrationDataReader`` over recorded feeds (restartable: ORT may iterate twice)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds, self.i = feeds, 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self):
        self.i = 0


# --- the graph -----------------------------------------------------------------------------------------
def _load_at_qdq_opset(path: Path):
    """The model at opset 19 / IR 9 (the version converter works on the graph; weights are re-attached)."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset < QDQ_OPSET:
        model = version_converter.convert_version(model, QDQ_OPSET)
    model.ir_version = min(max(model.ir_version, QDQ_IR_VERSION), QDQ_IR_VERSION)
    onnx.load_external_data_for_model(model, str(path.parent))
    return model


def quantize_options(mode: str) -> dict:
    """``quantize_static`` keyword arguments for ``mode`` (what TensorRT wants, see the module docstring)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
             "OpTypesToExcludeOutputQuantization": list(QUANT_OP_TYPES), "MatMulConstBOnly": True,
             "CalibMaxIntermediateOutputs": 64}
    if mode == "fp8":
        return {"quant_format": QuantFormat.QDQ, "activation_type": QuantType.QFLOAT8E4M3FN,
                "weight_type": QuantType.QFLOAT8E4M3FN, "per_channel": False,
                "calibrate_method": CalibrationMethod.Distribution, "extra_options": extra}
    if mode == "int8":
        extra["QDQOpTypePerChannelSupportToAxis"] = {"MatMul": 1, "Gemm": 0}
        return {"quant_format": QuantFormat.QDQ, "activation_type": QuantType.QInt8,
                "weight_type": QuantType.QInt8, "per_channel": True, "reduce_range": False,
                "calibrate_method": CalibrationMethod.MinMax, "extra_options": extra}
    raise ExportError(f"quantize: received {mode!r}, expected one of {', '.join(MODES)}")


def quantize_graph(src: Path, dst: Path, mode: str, feeds: list[dict[str, np.ndarray]], scratch: Path) -> None:
    """Write the Q/DQ graph of ``src`` (an fp32 ONNX file) to ``dst``, calibrated on ``feeds``."""
    import onnx
    from onnxruntime.quantization import quantize_static

    model = _load_at_qdq_opset(src)
    big = model.ByteSize() > EXTERNAL_DATA_BYTES if model.ByteSize() > 0 else True
    staged = scratch / "stage.onnx"
    onnx.save(model, str(staged), save_as_external_data=big, location="stage.onnx.data")
    del model
    quantize_static(str(staged), str(dst), _Feeds(feeds), op_types_to_quantize=list(QUANT_OP_TYPES),
                    use_external_data_format=big, **quantize_options(mode))
    q = onnx.load(str(dst))
    if mode == "fp8":
        _fp8_amax_scales(q, staged, feeds, scratch, big)
    q.ir_version = min(q.ir_version, QDQ_IR_VERSION)  # the quantizer may stamp its own onnx's IR version
    onnx.save(q, str(dst), save_as_external_data=big, location=dst.name + ".data")


def _fp8_amax_scales(q, staged: Path, feeds, scratch: Path, big: bool) -> None:
    """Replace ORT's fp8 scales (from the spread of each tensor's histogram, which saturates the tails) by
    ``amax / 448``, E4M3's largest value: the max calibration TensorRT Model Optimizer uses for fp8, so that
    no calibrated activation and no weight saturates. Activations: per-tensor max |x| over the calibration
    feeds (ORT's MinMax calibrator); weights: max |w|, re-quantized from the fp32 weights."""
    import ml_dtypes
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    cal = create_calibrator(str(staged), list(QUANT_OP_TYPES), augmented_model_path=str(scratch / "aug.onnx"),
                            calibrate_method=CalibrationMethod.MinMax, use_external_data_format=big,
                            extra_options={"symmetric": True})
    cal.collect_data(_Feeds(feeds))
    ranges = cal.compute_data()
    del cal
    fp32 = {i.name: i for i in onnx.load(str(staged)).graph.initializer}
    inits = {i.name: i for i in q.graph.initializer}

    def put(name: str, arr: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(arr, name))

    for n in q.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits and n.input[0] in ranges:
            lo, hi = (float(np.asarray(v).max()) for v in ranges[n.input[0]].range_value)
            amax = max(abs(lo), abs(hi)) or 1.0
            put(n.input[1], np.array(amax / FP8_MAX, np.float32))
        elif n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized") and n.input[0] in inits:
            w = numpy_helper.to_array(fp32[n.input[0].removesuffix("_quantized")]).astype(np.float32)
            scale = np.float32((float(np.abs(w).max()) or 1.0) / FP8_MAX)
            put(n.input[1], np.array(scale, np.float32))
            put(n.input[0], (w / scale).astype(ml_dtypes.float8_e4m3fn))


def qdq_summary(path: str | os.PathLike) -> dict:
    """What the Q/DQ graph holds: node counts, zero-point element types, and which op types' inputs are
    dequantized (``{"Conv": [quantized inputs, inputs]}``) -- checked by the tests, stored in the manifest."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    dq_out = {n.output[0]: n for n in g.node if n.op_type == "DequantizeLinear"}
    zp_types = set()
    for n in g.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits:
            zp_types.add(onnx.TensorProto.DataType.Name(inits[n.input[2]].data_type).lower())
    covered = {}
    for n in g.node:
        if n.op_type in QUANT_OP_TYPES:
            ins = list(n.input[:2])
            c = covered.setdefault(n.op_type, [0, 0])
            c[0] += int(all(i in dq_out for i in ins))
            c[1] += 1
    count = {op: sum(n.op_type == op for n in g.node) for op in ("QuantizeLinear", "DequantizeLinear")}
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return {"nodes": count, "zero_point_types": sorted(zp_types), "quantized_layers": covered,
            "opset": opset, "ir_version": model.ir_version}


# --- the export ----------------------------------------------------------------------------------------
def _check_source(src: Path, mode: str) -> tuple[dict, str]:
    if mode not in MODES:
        raise ExportError(f"quantize: received {mode!r}, expected one of {', '.join(MODES)}")
    try:
        m = read_manifest(str(src))
    except (FileNotFoundError, ValueError) as e:
        raise ExportError(f"source: {e}") from None
    if m.get("quantized"):
        raise ExportError(f"source: received {src}, an export already quantized ({m['quantized']}), expected an "
                          f"fp32 export")
    if m.get("precision") != "fp32":
        raise ExportError(f"source: received an export in {m.get('precision')}, expected an fp32 export (the "
                          f"quantizer calibrates in fp32; re-export with --precision fp32)")
    denoiser = next((d for d in DENOISERS if d in m["models"]), None)
    if denoiser is None:
        raise ExportError(f"source: received an export without a denoiser (models: {', '.join(m['models'])}), "
                          f"expected one with {' or '.join(DENOISERS)}")
    return m, denoiser


def _copy_others(src: Path, tmp: Path, keep: set[str]) -> None:
    for p in src.iterdir():
        if p.name in keep or p.name == MANIFEST_NAME or p.name.startswith("."):
            continue
        if p.is_dir():
            shutil.copytree(p, tmp / p.name)
        else:
            shutil.copy2(p, tmp / p.name)


def quantize_export(source: str | os.PathLike, out: str | os.PathLike, mode: str, *,
                    recipe: CalibrationRecipe | None = None, overwrite: bool = False,
                    log: Callable[[str], None] = print) -> QuantizeResult:
    """Write ``out``: ``source`` (an fp32 export) with its denoiser quantized for ``mode`` (Q/DQ), atomically
    (a temp folder next to ``out``, renamed into place). The manifest gains ``"quantized": mode``, the
    denoiser's ``precision`` and the calibration recipe; ``weights_hash`` changes (another graph, other
    cached engines)."""
    from .onnx_export import _move_into_place
    from .workdirs import (SCRATCH_PREFIX, drop_marker, make_owned_dir, remove_stale_export_dirs,
                           terminate_cleanly, tmp_prefix)

    src, out = Path(source).absolute(), os.path.abspath(out)
    recipe = recipe or CalibrationRecipe()
    manifest, denoiser = _check_source(src, mode)
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)) and not overwrite:
        raise ExportError(f"out: received {out}, which already exists and is not empty; expected a new or empty "
                          f"folder (pass --overwrite to replace it)")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    remove_stale_export_dirs(out)
    t0 = time.time()
    with terminate_cleanly():
        tmp = scratch = None
        try:
            tmp = Path(make_owned_dir(tmp_prefix(out), os.path.dirname(out)))
            scratch = Path(make_owned_dir(SCRATCH_PREFIX))
            feeds = record_denoiser_inputs(src, recipe, log=None)
            log(f"calibration: {len(feeds)} {denoiser} calls recorded from {len(recipe.prompts)} prompts x "
                f"{len(recipe.seeds)} seeds x {recipe.steps} steps")
            entry = manifest["models"][denoiser]
            with _quiet(scratch / "quantize.log"):  # ORT's quantizer prints progress and warns on the root logger
                quantize_graph(src / entry["file"], tmp / entry["file"], mode, feeds, scratch)
            summary = qdq_summary(tmp / entry["file"])
            files = {entry["file"], entry["file"] + ".data", str(entry.get("external_data_file") or "")}
            _copy_others(src, tmp, files)
            new = _quantized_manifest(manifest, denoiser, tmp, mode, recipe, summary, len(feeds))
            write_manifest(str(tmp), new)  # tmp is renamed into place whole: the folder is the atomic unit
            drop_marker(str(tmp))
            _move_into_place(str(tmp), out, overwrite)
            tmp = None
        finally:
            for p in (tmp, scratch):
                if p is not None:
                    shutil.rmtree(p, ignore_errors=True)
    log(f"wrote {out} in {time.time() - t0:.1f}s: {denoiser} {mode} (Q/DQ: {summary['nodes']['QuantizeLinear']} "
        f"Q, {summary['nodes']['DequantizeLinear']} DQ); {SIMULATED_NOTE}")
    return QuantizeResult(new, summary)


@contextlib.contextmanager
def _quiet(path: Path):
    """Library output (ONNX Runtime's prints, warnings and root-logger records) into ``path``."""
    from .library_log import library_output_to

    root = logging.getLogger()
    handler = logging.FileHandler(path)
    saved = root.handlers[:]
    root.handlers = [handler]
    try:
        with open(path, "a") as f, contextlib.redirect_stdout(f), library_output_to(path):
            yield
    finally:
        root.handlers = saved
        handler.close()


def _quantized_manifest(m: dict, denoiser: str, tmp: Path, mode: str, recipe: CalibrationRecipe, summary: dict,
                        n_feeds: int) -> dict:
    new = json.loads(json.dumps(m))
    entry = new["models"][denoiser]
    entry["precision"] = mode
    data = entry["file"] + ".data"
    entry["external_data"] = (tmp / data).is_file()
    entry["external_data_file"] = data if entry["external_data"] else None
    entry["size_bytes"] = sum((tmp / f).stat().st_size for f in (entry["file"], data) if (tmp / f).is_file())
    entry["opset"] = summary["opset"]
    new["quantized"] = mode
    new["initializer_map"] = {**new.get("initializer_map", {}), denoiser: {}}  # weights are quantized: no refit
    opts = quantize_options(mode)
    new["quantization"] = {
        "mode": mode, "model": denoiser, "tool": "onnxruntime.quantization.quantize_static",
        "format": "QDQ", "activation_type": opts["activation_type"].name, "weight_type": opts["weight_type"].name,
        "per_channel": opts["per_channel"], "calibrate_method": opts["calibrate_method"].name,
        "op_types": list(QUANT_OP_TYPES), "extra_options": opts["extra_options"],
        "calibration": {**asdict(recipe), "backend": "onnxruntime-cpu", "denoiser_calls": n_feeds,
                        "source_weights_hash": m.get("weights_hash")},
        "qdq": summary, "cpu_note": SIMULATED_NOTE}
    h = hashlib.sha256(str(m.get("weights_hash")).encode())
    h.update((tmp / entry["file"]).read_bytes() if not entry["external_data"] else json.dumps(summary).encode())
    new["weights_hash"] = h.hexdigest()
    return json.loads(json.dumps(new))  # as read back from manifest.json (tuples become lists)


# --- quality -------------------------------------------------------------------------------------------
def generate(export_dir, prompt: str, seed: int, steps: int, width: int, height: int, *, cfg: float = 7.0,
             sampler: str = "euler", scheduler: str = "normal") -> tuple[np.ndarray, np.ndarray]:
    """(final latent, decoded image in [0, 1]) of one txt2img run on onnxruntime-cpu."""
    from ..runtime import ksampler
    from ..workflow.checkpoint import load_checkpoint

    ck = load_checkpoint(export_dir, "onnxruntime-cpu", log=None)
    try:
        pos, neg = ck.clip.encode(prompt), ck.clip.encode("")
        out = ksampler(ck.model, seed, steps, cfg, sampler, scheduler, pos, neg,
                       _empty_latent(ck.manifest, width, height))["samples"]
        return out, np.asarray(ck.vae.decode(out))
    finally:
        ck.release()


def measure_quality(fp32_dir, quant_dir, *, prompt: str = "a red cube on a wooden table", seed: int = 42,
                    steps: int = 8, width: int = 64, height: int = 64) -> dict:
    """Latent relative L2 and decoded-image PSNR (dB) of ``quant_dir`` against ``fp32_dir``, same seed."""
    a_lat, a_img = generate(fp32_dir, prompt, seed, steps, width, height)
    b_lat, b_img = generate(quant_dir, prompt, seed, steps, width, height)
    a64, b64 = a_lat.astype(np.float64), b_lat.astype(np.float64)
    rel = float(np.linalg.norm(b64 - a64) / np.linalg.norm(a64))
    mse = float(np.mean((np.clip(b_img, 0, 1).astype(np.float64) - np.clip(a_img, 0, 1)) ** 2))
    return {"rel_l2": rel, "psnr_db": float("inf") if mse == 0 else 10 * float(np.log10(1.0 / mse))}
