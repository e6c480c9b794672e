"""Precision as a choice: parse ``--precision``, say what this machine runs natively, resolve ``auto``.

``--precision`` takes one precision for every network (``bf16``) or a per-network form
(``unet=bf16,vae=fp32``, optionally with a default first: ``bf16,vae=fp32``). Networks are ``unet``,
``clip`` (the text encoders: ``clip``, ``clip2``; SD3 / FLUX.1's ``clip_l``, ``clip_g``, ``t5xxl``) and ``vae``
(``vae_decoder`` and ``vae_encoder``); ``unet`` also covers the flow ``transformer`` and the ControlNet networks;
an export's model name (``vae_decoder``) may be used too and wins over its network's entry.

What a CPU backend can run is decided here, from the CPU's ISA flags (``/proc/cpuinfo``), so a refusal
names the missing feature (``bf16 on openvino-cpu needs AVX-512-BF16 or AMX; this CPU has avx2``) and
nothing falls back silently to another precision. ``auto`` picks, per network, the fastest precision this
machine runs natively whose measured error stays inside :data:`QUALITY_BOUNDS` (docs/engines.md,
"Precision"): on an AMX / AVX-512-BF16 CPU that is a bf16 UNet and text encoder with an fp32 VAE (the
VAE runs once per image, and its bf16 output costs image PSNR for little time).

GPU backends (TensorRT, ONNX Runtime CUDA) keep their own precision rules (``Backend.resolve_precision``);
this module only parses the spec for them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from .spec import EngineError

PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8")
AUTO = "auto"

#: network name -> the export's model names it covers
NETWORKS: dict[str, tuple[str, ...]] = {
    "unet": ("unet", "transformer", "unet_control", "controlnet", "t2i_adapter"),
    "clip": ("clip", "clip2", "clip_l", "clip_g", "t5xxl"),
    "vae": ("vae_decoder", "vae_encoder"),
}

#: Models a *network-wide or default* fp16 request builds in fp32, and why; asking for the model by name
#: (``t5xxl=fp16``) is honoured. T5-XXL: its feed-forward activations exceed fp16's range (65504) -- the
#: reason the T5 v1.1 checkpoints are published in bf16/fp32, diffusers' pipelines keep it out of fp16 and
#: ComfyUI's T5 runs in fp32/bf16 where it can; bf16 (fp32's range) is fine.
FP16_KEEPS_FP32 = {"t5xxl": "T5-XXL's feed-forward activations overflow fp16"}


def keeps_fp32(model: str, family: str | None) -> str | None:
    """Why ``model`` is built in fp32 when fp16 is asked for its network (None: it is not). T5-XXL (above);
    FLUX.1's VAE, whose decoder activations exceed fp16's range at large sizes (as the flow export keeps it
    fp32 in an fp16 export)."""
    if model in FP16_KEEPS_FP32:
        return FP16_KEEPS_FP32[model]
    if model.startswith("vae_") and str(family or "").startswith("flux"):
        return "FLUX.1's VAE activations exceed fp16's range"
    return None
MODEL_NAMES = tuple(m for ms in NETWORKS.values() for m in ms)
_NETWORK_OF = {m: n for n, ms in NETWORKS.items() for m in ms}

#: CPU ISA flags (as /proc/cpuinfo spells them) under which a precision runs natively on the CPU, and how a
#: message names them. fp32 needs nothing; fp8 has no CPU path in any backend here.
CPU_FEATURES: dict[str, tuple[tuple[str, ...], str]] = {
    "bf16": (("amx_bf16", "avx512_bf16"), "AVX-512-BF16 or AMX"),
    "fp16": (("amx_fp16", "avx512_fp16"), "AVX-512-FP16 or AMX-FP16"),
    "int8": (("amx_int8", "avx512_vnni", "avx_vnni"), "AVX-512-VNNI, AVX-VNNI or AMX-INT8"),
}

#: The ISA flags a refusal lists ("this CPU has ..."), most capable first.
_SHOWN_FLAGS = ("amx_bf16", "amx_fp16", "amx_int8", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni",
                "avx512f", "avx2", "avx", "asimd", "sve")

#: Precisions each CPU backend can run (beyond the export's own fp32), measured on an AMX Xeon with
#: ``ksampler-rt bench --precision`` (docs/engines.md, "Precision"):
#: * openvino-cpu: bf16 and fp16 through ``INFERENCE_PRECISION_HINT``; int8 as NNCF int8 weight compression
#:   (``nncf.compress_weights``, activations stay in the inference precision) when ``nncf`` is installed.
#: * onnxruntime-cpu: fp32 only -- fp16 is not native to its CPU kernels (it inserts casts and runs slower)
#:   and dynamic int8 quantization was measured slower than fp32 on the UNet, so neither is offered.
CPU_BACKEND_PRECISIONS: dict[str, tuple[str, ...]] = {
    "openvino-cpu": ("fp32", "bf16", "fp16", "int8"),
    "onnxruntime-cpu": ("fp32",),
}

#: Documented quality bound per (network, precision): the largest error accepted against the fp32 run of the
#: same seed -- latent relative L2 (``||x - x_fp32|| / ||x_fp32||``) for the UNet and the text encoder's
#: hidden states, decoded-image PSNR (dB, 8-bit scale, higher is better) for the VAE. ``auto`` only picks
#: a precision listed here; tests/engines/test_precision.py checks the tiny model stays inside them.
QUALITY_BOUNDS: dict[tuple[str, str], dict[str, float]] = {
    ("unet", "bf16"): {"rel_l2": 0.15},
    ("unet", "fp16"): {"rel_l2": 0.05},
    ("unet", "int8"): {"rel_l2": 0.15},
    # the fp8 Q/DQ export (``export --quantize fp8``, TensorRT; measured on the CPU as fake quantization, a
    # whole job at CFG 7): tiny SD1.5 0.32-0.35 / 25-27 dB, half-width SD1.5 0.27-0.29 / 25.6-26.4 dB. The
    # int8 Q/DQ export has no bound: on random-weight models its per-tensor ranges fail (rel. L2 0.69-0.97,
    # 17.6-18.6 dB); ("unet", "int8") above is openvino-cpu's NNCF weight compression
    ("unet", "fp8"): {"rel_l2": 0.45, "psnr_db": 22.0},
    ("clip", "bf16"): {"rel_l2": 0.05},
    ("clip", "fp16"): {"rel_l2": 0.01},
    ("clip", "int8"): {"rel_l2": 0.05},
    ("vae", "bf16"): {"psnr_db": 30.0},
    ("vae", "fp16"): {"psnr_db": 40.0},
    ("vae", "int8"): {"psnr_db": 30.0},
}

#: What ``auto`` tries per network on the CPU, fastest first (int8 weight compression is not here: measured
#: no faster than bf16 on AMX, see docs/engines.md). The VAE stays fp32: it runs once per image.
AUTO_CPU_ORDER: dict[str, tuple[str, ...]] = {
    "unet": ("bf16", "fp32"),
    "clip": ("bf16", "fp32"),
    "vae": ("fp32",),
}


@dataclass(frozen=True)
class PrecisionSpec:
    """A parsed ``--precision``: ``default`` (None = the backend's default) and per-network/model entries."""

    default: str | None = None
    per: tuple[tuple[str, str], ...] = ()  # sorted (network or model name, precision)

    def for_model(self, model: str, family: str | None = None, *, exceptions: bool = True) -> str | None:
        """The precision asked for ``model`` (an export's model name): its own entry, else its network's,
        else the default -- except that fp16 asked for a whole network keeps the models of
        :func:`keeps_fp32` in fp32 (``exceptions=False``: the request as written)."""
        per = dict(self.per)
        if model in per:
            return per[model]
        p = per.get(_NETWORK_OF.get(model, model)) or self.default
        return "fp32" if exceptions and p == "fp16" and keeps_fp32(model, family) else p

    @property
    def is_auto(self) -> bool:
        return self.default == AUTO or any(p == AUTO for _, p in self.per)

    @property
    def uniform(self) -> str | None:
        """The one precision of every network, or None when networks differ."""
        return self.default if not self.per else None

    def canonical(self) -> str:
        items = [self.default] if self.default else []
        return ",".join(items + [f"{k}={v}" for k, v in self.per])

    def __str__(self) -> str:
        return self.canonical()


def parse_precision(value, name: str = "--precision") -> PrecisionSpec | None:
    """``None`` / ``""`` -> None (the backend's default); ``"bf16"``; ``"unet=bf16,vae=fp32"``;
    ``"bf16,vae=fp32"``; a :class:`PrecisionSpec` is returned as is. Errors: ``NAME: received X, expected Y``."""
    if value is None or isinstance(value, PrecisionSpec):
        return value
    if not isinstance(value, str):
        raise EngineError(f"{name}: received {value!r}, expected a string such as bf16 or unet=bf16,vae=fp32")
    text = value.strip().lower()
    if not text:
        return None
    accepted = ", ".join(PRECISIONS + (AUTO,))
    default, per = None, {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            raise EngineError(f"{name}: received {value!r}, expected comma-separated items without empty ones")
        key, eq, prec = item.partition("=")
        key, prec = key.strip(), prec.strip()
        if not eq:
            key, prec = None, key
        if prec not in PRECISIONS + (AUTO,):
            raise EngineError(f"{name}: received {prec!r}" + (f" for {key}" if key else "")
                              + f", expected one of {accepted}")
        if key is None:
            if default is not None:
                raise EngineError(f"{name}: received two default precisions ({default}, {prec}) in {value!r}, "
                                  f"expected at most one item without NETWORK=")
            default = prec
            continue
        if key not in NETWORKS and key not in MODEL_NAMES:
            raise EngineError(f"{name}: received network {key!r}, expected one of "
                              f"{', '.join(tuple(NETWORKS) + MODEL_NAMES)}")
        if key in per:
            raise EngineError(f"{name}: received {key} twice in {value!r}, expected each network once")
        per[key] = prec
    return PrecisionSpec(default, tuple(sorted(per.items())))


# --- this machine --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's ISA flags (``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def describe_cpu(flags: frozenset[str] | set[str] | None = None) -> str:
    """The ISA flags a precision message names, e.g. ``avx2`` or ``amx_bf16, avx512_bf16, avx512f``."""
    flags = cpu_flags() if flags is None else flags
    shown = [f for f in _SHOWN_FLAGS if f in flags]
    return ", ".join(shown) if shown else "none of " + "/".join(_SHOWN_FLAGS[:8])


def cpu_runs_natively(precision: str, flags: frozenset[str] | set[str] | None = None) -> bool:
    """Whether this CPU has a native path for ``precision`` (fp32 always; fp8 never)."""
    flags = cpu_flags() if flags is None else flags
    if precision == "fp32":
        return True
    need = CPU_FEATURES.get(precision)
    return bool(need) and any(f in flags for f in need[0])


def cpu_precision_refusal(backend: str, precision: str, flags=None) -> str | None:
    """None when ``backend`` (a CPU backend) runs ``precision`` natively on this CPU, else why not."""
    offered = CPU_BACKEND_PRECISIONS.get(backend)
    if offered is None:
        return None  # not a CPU backend this module knows: its own resolve_precision decides
    if precision not in offered:
        why = {"fp8": "fp8 runs on TensorRT on Hopper-class GPUs (--backend tensorrt)"}.get(
            precision, f"{backend} runs {', '.join(offered)}")
        return f"precision: received {precision!r} for {backend}, expected one of {', '.join(offered)} ({why})"
    if not cpu_runs_natively(precision, flags):
        need = CPU_FEATURES[precision][1]
        return f"{precision} on {backend} needs {need}; this CPU has {describe_cpu(flags)}"
    if backend == "openvino-cpu" and precision == "int8":
        import importlib.util

        if importlib.util.find_spec("nncf") is None:
            return "int8 on openvino-cpu needs NNCF for the weight compression: nncf is not installed " \
                   "(pip install nncf)"
    return None


def check_cpu_precision(backend: str, precision: str, flags=None) -> None:
    """Raise the refusal of :func:`cpu_precision_refusal` (never a silent fallback)."""
    why = cpu_precision_refusal(backend, precision, flags)
    if why:
        raise EngineError(why)


def auto_precision(backend: str, network: str, flags=None) -> str:
    """``auto`` for one network on a CPU backend: the first of :data:`AUTO_CPU_ORDER` this machine runs
    natively, that the backend offers and that has a documented quality bound (fp32 needs none)."""
    for p in AUTO_CPU_ORDER.get(network, ("fp32",)):
        if p != "fp32" and (network, p) not in QUALITY_BOUNDS:
            continue
        if cpu_precision_refusal(backend, p, flags) is None:
            return p
    return "fp32"


def resolve_cpu_spec(backend: str, export_precision: str, requested, flags=None) -> str:
    """The canonical per-network precision string a CPU backend builds (the engine cache key's set-level
    precision): ``auto`` resolved per network, every precision checked against this machine. An export in
    a half precision keeps it (the CPU backends then run the export's own precision only)."""
    spec = parse_precision(requested)
    if spec is None:
        return export_precision
    if export_precision != "fp32":
        uniform = spec.uniform
        if uniform in (None, AUTO) or uniform != export_precision:
            raise EngineError(f"precision: received {spec}, expected {export_precision!r} (the export's own "
                              f"precision: {backend} converts only fp32 exports; re-export in fp32)")
        return export_precision
    resolved = {}
    for network, models in NETWORKS.items():
        for model in models:
            p = spec.for_model(model, exceptions=False) or "fp32"
            if p == AUTO:
                p = auto_precision(backend, network, flags)
            check_cpu_precision(backend, p, flags)
            resolved[model] = p
    if len(set(resolved.values())) == 1:
        return next(iter(resolved.values()))
    by_net = {}
    for network, models in NETWORKS.items():
        ps = {resolved[m] for m in models}
        if len(ps) == 1:
            by_net[network] = ps.pop()
        else:
            by_net.update({m: resolved[m] for m in models})
    return ",".join(f"{k}={v}" for k, v in sorted(by_net.items()))


def model_precision_of(spec: str, model: str, family: str | None = None) -> str:
    """The precision ``model`` is built in, from a resolved spec string (``bf16`` or ``unet=bf16,vae=fp32``;
    fp16 for a whole network keeps :func:`keeps_fp32`'s models in fp32)."""
    parsed = parse_precision(spec)
    p = parsed.for_model(model, family) if parsed else None
    return p or "fp32"


def explain_auto(backend: str, flags=None) -> str:
    """What ``auto`` picks on this machine for ``backend``, one line (printed by build / bench)."""
    picks = {n: auto_precision(backend, n, flags) for n in NETWORKS}
    why = describe_cpu(flags)
    return f"precision auto on {backend}: " + ", ".join(f"{n}={p}" for n, p in picks.items()) + f" (CPU: {why})"


# --- quantized (Q/DQ) exports --------------------------------------------------------------------------
#: What a CPU backend says when it loads a quantized export (``ksampler-rt export ... --quantize``).
QUANTIZED_CPU_NOTE = ("runs simulated on the CPU (fake quantization: the Q/DQ nodes around fp32 kernels): "
                      "for quality checks, not speed; fp8 / int8 speed needs TensorRT on a GPU")


def quantized_model(manifest_data: dict, model: str) -> str | None:
    """The quantization (``fp8`` / ``int8``) of ``model``'s graph in an export, None when it has no Q/DQ
    nodes (every model of an ordinary export; a quantized export's text encoders and VAE)."""
    q = manifest_data.get("quantized")
    entry = (manifest_data.get("models") or {}).get(model) or {}
    return q if q and entry.get("precision") == q else None


def ort_session_configs(manifest_data: dict, model: str) -> dict[str, str]:
    """ONNX Runtime session config entries (``SessionOptions.add_session_config_entry``) the CPU build of
    ``model`` needs: for a Q/DQ graph, ``session.disable_quant_qdq=1``, so that the Q/DQ pairs run as written
    (fake quantization, what the quality figures measure). Without it ONNX Runtime 1.31 fuses the float8
    DequantizeLinear -> MatMul pairs into ``MatMulIntegerToFloat``, which has no float8 kernel, and the session
    fails ("Type 'tensor(float8e4m3fn)' of input parameter ... of operator (MatMulIntegerToFloat) ... is
    invalid"); for int8 it would swap in integer kernels, a different computation than TensorRT's."""
    return {"session.disable_quant_qdq": "1"} if quantized_model(manifest_data, model) else {}
