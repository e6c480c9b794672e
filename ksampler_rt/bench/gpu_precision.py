"""The ``precisions`` section of ``ksampler-rt gpu-check``: each precision (``--precisions fp32,fp16,bf16``,
optionally ``fp8`` / ``int8``) of each backend the run checks, against that backend's fp32 engine on the
same inputs.

Per precision it loads (building where needed) the UNet and the VAE decoder, then reports:

* ``unet``: ms per UNet call at every measured size and batch, the relative L2 of the output against the
  fp32 engine's (``||x - x_fp32|| / ||x_fp32||``, same inputs) and the NaN / inf counts;
* ``latent``: a short Euler run (no CFG, 4 steps, the family's discrete schedule: ComfyUI
  ``comfy/k_diffusion/sampling.py`` ``sample_euler`` with ``comfy/model_sampling.py`` ``EPS`` / ``V_PREDICTION``)
  whose final latent is compared with the fp32 run's (relative L2, NaN / inf);
* ``vae``: the decoder in that precision at the large-latent overflow shape (SDXL's (1, 4, 128, 128) on a
  GPU) -- when a half precision gives NaN / inf there, the decode falls back to the fp32 decoder (the
  documented rule for the SDXL VAE, kept out of fp16) and the row says so -- and the PSNR of the decoded
  image of the sampled latent against the fp32 image.

How a precision is obtained: the backend's own conversion (``load_engines(..., precision=p)``: TensorRT 10
builder flags, OpenVINO's inference precision hint); where the backend runs only the export's own precision
(ONNX Runtime CUDA, TensorRT 11's strongly typed networks), fp16 comes from an fp16 copy of the fp32 export
made here with ONNX Runtime's converter (``onnxruntime.transformers.float16``), and the row's ``source`` says
so. fp8 / int8 on a GPU need a quantized export (manifest ``"quantized": true``, Q/DQ nodes) and compute
capability >= 8.9 / 6.1: otherwise the row says why it was skipped. Every refusal is a row, never silence.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

DEFAULT_PRECISIONS = ("fp32", "fp16", "bf16")
LATENT_STEPS = 4
#: minimum compute capability per quantized precision (TensorRT's documented support matrix)
QUANT_MIN_CC = {"fp8": (8, 9), "int8": (6, 1)}


# --------------------------------------------------------------------------------------------- metrics

def relative_l2(x: np.ndarray, ref: np.ndarray) -> float:
    """``||x - ref|| / ||ref||`` in float64; NaN when either has a NaN / inf (the error is then undefined)."""
    x64, r64 = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    if x64.shape != r64.shape:
        raise ValueError(f"x: received shape {x64.shape}, expected the reference's {r64.shape}")
    if not (np.isfinite(x64).all() and np.isfinite(r64).all()):
        return float("nan")
    den = float(np.linalg.norm(r64))
    num = float(np.linalg.norm(x64 - r64))
    return num / den if den else (0.0 if num == 0 else float("inf"))


def psnr_db(image: np.ndarray, ref: np.ndarray, peak: float = 1.0) -> float:
    """PSNR of ``image`` against ``ref`` (both in [0, peak]): ``10 log10(peak^2 / MSE)``; inf when equal."""
    a, r = np.asarray(image, np.float64), np.asarray(ref, np.float64)
    if a.shape != r.shape:
        raise ValueError(f"image: received shape {a.shape}, expected the reference's {r.shape}")
    mse = float(np.mean((a - r) ** 2))
    if not np.isfinite(mse):
        return float("nan")
    return float("inf") if mse == 0 else 10.0 * float(np.log10(peak * peak / mse))


def nonfinite(a: np.ndarray) -> dict:
    """NaN and inf counts of ``a``."""
    a = np.asarray(a)
    return {"nan": int(np.isnan(a).sum()), "inf": int(np.isinf(a).sum())}


def to_image(decoded: np.ndarray) -> np.ndarray:
    """A VAE decoder's output ([-1, 1]) as an image in [0, 1] (what ComfyUI's VAE decode returns)."""
    return np.clip((np.asarray(decoded, np.float64) + 1.0) / 2.0, 0.0, 1.0)


# --------------------------------------------------------------------------------------------- gating

def parse_precisions(value: str | None) -> tuple[str, ...]:
    """``--precisions``: comma separated; ``none`` for no precision section. fp32 (the reference) is always
    run, first. Errors name the parameter."""
    from ..engines.precision import PRECISIONS

    if value is None:
        return DEFAULT_PRECISIONS
    items = [p.strip().lower() for p in str(value).split(",") if p.strip()]
    if items == ["none"]:
        return ()
    bad = [p for p in items if p not in PRECISIONS]
    if bad or not items:
        raise ValueError(f"--precisions: received {value!r}, expected a comma separated list of "
                         f"{', '.join(PRECISIONS)} (or none)")
    return tuple(dict.fromkeys(["fp32"] + items))


def _cc(value) -> tuple[int, int] | None:
    try:
        major, minor = str(value).split(".")[:2]
        return int(major), int(minor)
    except (TypeError, ValueError):
        return None


def quantized_skip_reason(precision: str, quantized: bool, compute_capability, gpu: bool) -> str | None:
    """Why ``precision`` (fp8 / int8) is not run, or None. On a GPU both need a quantized export (Q/DQ nodes,
    manifest ``"quantized": true``) and fp8 compute capability >= 8.9, int8 >= 6.1; no CPU backend runs fp8
    (int8 on the CPU is OpenVINO's weight compression, which the backend itself accepts or refuses)."""
    if precision not in QUANT_MIN_CC:
        return None
    if not gpu:
        return "fp8 runs on GPUs only (TensorRT, compute capability >= 8.9)" if precision == "fp8" else None
    if not quantized:
        return (f"{precision} needs a quantized export (manifest \"quantized\": true, Q/DQ nodes); "
                f"this export is not quantized")
    need, cc = QUANT_MIN_CC[precision], _cc(compute_capability)
    if cc is None:
        return f"{precision} needs compute capability >= {need[0]}.{need[1]}; this GPU's is unknown"
    if cc < need:
        return f"{precision} needs compute capability >= {need[0]}.{need[1]}, this GPU has {compute_capability}"
    return None


def quality_bound(network: str, precision: str) -> float | None:
    """The documented bound of ``engines.precision.QUALITY_BOUNDS`` (UNet: latent relative L2; VAE: PSNR)."""
    from ..engines.precision import QUALITY_BOUNDS

    b = QUALITY_BOUNDS.get((network, precision)) or {}
    return b.get("rel_l2" if network == "unet" else "psnr_db")


# --------------------------------------------------------------------------------------------- loading

@dataclass
class Loaded:
    """One precision's engines: ``unet`` and ``vae`` for the measured sizes, ``big_vae`` at the overflow
    shape, and how the precision was obtained (``source``)."""

    unet: object
    vae: object
    big_vae: object
    source: str
    load_s: float = 0.0
    closers: list = field(default_factory=list)

    def close(self) -> None:
        for c in self.closers:
            c()


class EngineLoader:
    """``loader(precision) -> Loaded`` for one backend and export (EngineError: the precision is refused)."""

    def __init__(self, backend: str, export_dir: Path, sizes, big_lat: tuple, workdir: Path, gpu: bool, log):
        self.backend, self.export_dir, self.sizes, self.big_lat = backend, Path(export_dir), sizes, big_lat
        self.workdir, self.gpu, self.log = Path(workdir), gpu, log
        self.manifest = json.loads((self.export_dir / "manifest.json").read_text())

    def __call__(self, precision: str) -> Loaded:
        from ..engines.spec import EngineError

        own = self.manifest.get("precision") or "fp32"
        t0 = time.perf_counter()
        try:
            req = None if precision == own else precision
            loaded = self._load(self.export_dir, req, "the export's own" if req is None else
                                f"{self.backend} conversion (load_engines precision={precision!r})")
        except EngineError as exc:
            if not (self.gpu and precision == "fp16" and own == "fp32"):
                raise
            self.log(f"{self.backend} fp16: {exc}; trying an fp16 copy of the export")
            half = half_export(self.export_dir, self.workdir / "export-fp16")
            loaded = self._load(half, None, f"fp16 export derived here (onnxruntime.transformers.float16; "
                                            f"{self.backend} refused the conversion: {exc})")
        loaded.load_s = time.perf_counter() - t0
        return loaded

    def _load(self, export_dir: Path, precision: str | None, source: str) -> Loaded:
        from ..engines import load_engines
        from .gpu_check import load_vae

        shapes = ",".join(f"{w}x{h}" for w, h in self.sizes)
        es = load_engines(export_dir, self.backend, models=["unet", "vae_decoder"], shapes=shapes, batch="1-2",
                          build_missing=True, cuda_graph=True, precision=precision)
        try:
            big = load_vae(export_dir, self.backend, self.big_lat, es.manifest.latent_scale, precision=precision)
        except Exception:
            es.release()
            raise
        return Loaded(es.unet, es.vae_decoder, big, source, closers=[big.release, es.release])


def half_export(export_dir: Path, out_dir: Path) -> Path:
    """An fp16 copy of the fp32 export's UNet and VAE decoder (inputs and outputs in fp16), converted with
    ONNX Runtime's float16 converter (ops it blocks stay fp32 behind casts); not the exporter's own fp16 path
    (``ksampler-rt export --precision fp16`` traces the model in fp16). Made once per ``out_dir``."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from ..engines.manifest import read_onnx_io

    out_dir = Path(out_dir)
    if (out_dir / "manifest.json").is_file():
        return out_dir
    src = json.loads((Path(export_dir) / "manifest.json").read_text())
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    models = {}
    for name in ("unet", "vae_decoder"):
        model = onnx.load(str(Path(export_dir) / src["models"][name]["file"]))
        half = convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True)
        path = tmp / f"{name}.onnx"
        big = half.ByteSize() > (1 << 30)  # protobuf's 2 GiB cap: large models keep their weights beside
        onnx.save(half, str(path), save_as_external_data=big, location=f"{name}.onnx.data" if big else None)
        ins, outs = read_onnx_io(path)
        models[name] = {**src["models"][name], "file": path.name, "inputs": [s.to_json() for s in ins],
                        "outputs": [s.to_json() for s in outs]}
    manifest = {**src, "precision": "fp16", "models": models, "derived_from": str(export_dir),
                "weights_hash": f"{src.get('weights_hash', '')}-fp16-converted"}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    tmp.replace(out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------- measuring

def _median_ms(fn: Callable[[], object], repeat: int) -> float:
    from .gpu_check import _time

    return _time(fn, max(1, repeat))["median_ms"]


def _run(eng, feeds: dict) -> np.ndarray:
    from .gpu_check import _call

    return np.asarray(_call(eng, feeds))


@dataclass
class Inputs:
    """The same inputs for every precision: UNet feeds per (size, batch), and the sampler's start."""

    unet: dict  # (w, h, batch) -> feeds (fp32)
    noise: np.ndarray
    context: np.ndarray
    sigmas: np.ndarray
    sampling: object
    latent_scale: float


def make_inputs(ref_unet, sizes, batches, scale: int, family: str | None, steps: int = LATENT_STEPS) -> Inputs:
    from ..runtime.model_sampling import ModelSamplingDiscrete, get_family
    from ..runtime.schedulers import simple_scheduler
    from .gpu_check import _unet_feeds

    rng = np.random.default_rng(123)
    feeds = {(w, h, b): _unet_feeds(ref_unet, rng, b, h // scale, w // scale) for w, h in sizes for b in batches}
    try:
        fam = get_family(family or "sd15")
        # gpu-check's UNet feeds are the SD families' (discrete VP); anything else samples as eps
        prediction, vae_scale = (fam.prediction if fam.prediction in ("eps", "v") else "eps"), fam.latent_scale
    except ValueError:
        prediction, vae_scale = "eps", 0.18215
    ms = ModelSamplingDiscrete(prediction=prediction)
    w, h = sizes[0]
    first = feeds[(w, h, batches[0])]
    noise = rng.standard_normal((1,) + first["sample"].shape[1:]).astype(np.float32)
    ctx = first["encoder_hidden_states"][:1].astype(np.float32)
    return Inputs(feeds, noise, ctx, simple_scheduler(ms, steps), ms, vae_scale)


def sample_latent(unet, inp: Inputs) -> np.ndarray:
    """Euler without CFG over ``inp.sigmas`` (ComfyUI ``sample_euler``, s_churn 0): the final latent."""
    ms, x = inp.sampling, inp.noise * inp.sigmas[0]
    extra = {}
    first = next(iter(inp.unet.values()))
    if "y" in first:
        extra["y"] = first["y"][:1]
    for s, s_next in zip(inp.sigmas[:-1], inp.sigmas[1:]):
        sig = np.full((1,), s, np.float32)
        feeds = {"sample": ms.calculate_input(sig, x).astype(np.float32), "timestep": ms.timestep(sig).astype(
            np.float32), "encoder_hidden_states": inp.context, **extra}
        out = _run(unet, feeds).astype(np.float32)
        denoised = ms.calculate_denoised(sig, out, x)
        x = (x + (x - denoised) / np.float32(s) * np.float32(s_next - s)).astype(np.float32)
    return x


def decode(vae, latent: np.ndarray, vae_scale: float) -> np.ndarray:
    spec = vae.inputs[0]
    z = (latent / np.float32(vae_scale)).astype(spec.dtype)
    return np.asarray(vae(**{spec.name: z})[vae.output_names[0]])


def overflow_probe(vae, lat: tuple) -> dict:
    """The decoder on large SDXL-scaled latents (as ``gpu_check.vae_nan_check``): NaN / inf counts."""
    from .gpu_check import vae_nan_check

    r = vae_nan_check(vae, lat)
    return {k: r[k] for k in ("shape", "dtype", "nan", "inf", "error") if k in r}


# --------------------------------------------------------------------------------------------- one row

@dataclass
class Reference:
    """The fp32 row's outputs, what every other precision is compared with."""

    unet: dict = field(default_factory=dict)
    latent: np.ndarray | None = None
    image: np.ndarray | None = None
    vae: object = None


def measure(precision: str, loaded: Loaded, inp: Inputs, ref: Reference, repeat: int, big_lat: tuple) -> dict:
    """One precision's row. The fp32 row fills ``ref`` (its own error columns are None: it is the reference)."""
    is_ref = precision == "fp32"
    row: dict = {"precision": precision, "source": loaded.source, "load_s": loaded.load_s, "unet": []}
    from .gpu_check import _cast

    for key, feeds in inp.unet.items():
        fe = _cast(loaded.unet, feeds)  # in the engine's dtypes: the timing is the engine's, not numpy's casts
        out = _run(loaded.unet, fe)
        w, h, b = key
        row["unet"].append({"size": f"{w}x{h}", "batch": b, **nonfinite(out),
                            "ms": _median_ms(lambda: loaded.unet(**fe), repeat),
                            "rel_l2": None if is_ref else relative_l2(out, ref.unet[key])})
        if is_ref:
            ref.unet[key] = out
    latent = sample_latent(loaded.unet, inp)
    row["latent"] = {"steps": len(inp.sigmas) - 1, **nonfinite(latent),
                     "rel_l2": None if is_ref else relative_l2(latent, ref.latent)}
    probe = overflow_probe(loaded.big_vae, big_lat)
    vae, vae_row = loaded.vae, {"precision": precision, "overflow": probe, "fallback": None}
    if (probe.get("nan") or probe.get("inf") or "error" in probe) and not is_ref:
        vae = ref.vae  # the documented rule (SDXL VAE): a decoder that overflows in half precision runs fp32
        vae_row.update(precision="fp32", fallback=f"fp32: {precision} overflowed ({probe.get('nan', '?')} NaN, "
                                                  f"{probe.get('inf', '?')} inf at {list(big_lat)})")
    image = to_image(decode(vae, latent, inp.latent_scale))
    vae_row["psnr_db"] = None if is_ref else psnr_db(image, ref.image)
    if is_ref:
        ref.latent, ref.image, ref.vae = latent, image, loaded.vae
    row["vae"] = vae_row
    row["bounds"] = {"latent_rel_l2": quality_bound("unet", precision),
                     "image_psnr_db": quality_bound("vae", vae_row["precision"])}
    row["passed"] = row_passed(row)
    return row


def row_passed(row: dict) -> bool:
    """Finite UNet outputs and latent, and inside the documented bounds where there are any (a VAE that
    fell back to fp32 is the rule working, not a failure)."""
    finite = all(c["nan"] == 0 and c["inf"] == 0 for c in row["unet"]) and \
        row["latent"]["nan"] == 0 and row["latent"]["inf"] == 0
    lb, pb = row["bounds"]["latent_rel_l2"], row["bounds"]["image_psnr_db"]
    rel, ps = row["latent"]["rel_l2"], row["vae"]["psnr_db"]
    ok_l = lb is None or (rel is not None and rel <= lb)
    ok_p = pb is None or (ps is not None and ps >= pb)
    return bool(finite and ok_l and ok_p)


# --------------------------------------------------------------------------------------------- the section

def precision_section(backend: str, loader: Callable[[str], Loaded], precisions, *, ref_unet, sizes, batches,
                      scale: int, family: str | None, quantized: bool, compute_capability, gpu: bool,
                      repeat: int, big_lat: tuple, budget_ok: Callable[[float], bool], log=print) -> dict:
    """Rows for ``precisions`` on ``backend`` (fp32 first: the reference). A precision that is refused, gated
    or out of time is a row with ``skipped`` and the reason."""
    from ..engines.spec import EngineError

    inp = make_inputs(ref_unet, sizes, batches, scale, family)
    ref, rows, fp32_loaded = Reference(), [], None

    def add(row: dict) -> None:
        rows.append(row)
        log(f"{backend} {row['precision']}: {_summary(row)}")

    for p in precisions:
        why = quantized_skip_reason(p, quantized, compute_capability, gpu)
        if why is None and not budget_ok(60):
            why = "time budget"
        if why is None and p != "fp32" and ref.latent is None:
            why = "no fp32 reference (the fp32 row did not run)"
        if why is not None:
            add({"precision": p, "skipped": why})
            continue
        try:
            loaded = loader(p)
        except (EngineError, ImportError) as exc:  # refused: the backend or the machine cannot run it
            add({"precision": p, "skipped": f"{type(exc).__name__}: {exc}"})
            continue
        except Exception as exc:  # a build that fails is a finding
            add({"precision": p, "passed": False, "error": f"{type(exc).__name__}: {exc}"})
            continue
        try:
            add(measure(p, loaded, inp, ref, repeat, big_lat))
        except Exception as exc:  # a precision that fails at run time is a finding
            add({"precision": p, "passed": False, "error": f"{type(exc).__name__}: {exc}"})
        finally:
            if p != "fp32":  # fp32's VAE is the fallback of the later rows
                loaded.close()
            else:
                fp32_loaded = loaded
    if fp32_loaded is not None:
        fp32_loaded.close()
    return {"reference": "fp32 engine of the same backend, same inputs", "rows": rows,
            "passed": all(r.get("passed", True) for r in rows)}


def _summary(row: dict) -> str:
    if "skipped" in row:
        return f"skipped: {row['skipped']}"
    if "error" in row:
        return f"ERROR {row['error']}"
    return f"latent rel L2 {_f(row['latent']['rel_l2'], '.2e')}, PSNR {_f(row['vae']['psnr_db'], '.1f')} dB"


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_rows(section: dict, backend: str) -> list[str]:
    """Table lines for one backend's precision rows (after the main table)."""
    lines = []
    for r in section["rows"]:
        head = f"{backend:<17} {r['precision']:<5}"
        if "skipped" in r or "error" in r:
            lines.append(f"{head} {'skipped: ' + r['skipped'] if 'skipped' in r else 'ERROR ' + r['error']}")
            continue
        ms = " ".join(f"{c['size']}/b{c['batch']} {c['ms']:.2f}ms rel {_f(c['rel_l2'], '.1e')}" for c in r["unet"])
        bad = sum(c["nan"] + c["inf"] for c in r["unet"]) + r["latent"]["nan"] + r["latent"]["inf"]
        vae = r["vae"]
        lines.append(f"{head} {ms}; latent rel {_f(r['latent']['rel_l2'], '.2e')}; nan/inf {bad}; "
                     f"vae {vae['precision']}{' (fallback)' if vae['fallback'] else ''} "
                     f"PSNR {_f(vae['psnr_db'], '.1f')} dB; {'pass' if r['passed'] else 'FAIL'}")
    return lines
