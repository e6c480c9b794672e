"""``ksampler-rt bench``: the product and its alternatives, measured in one run on the same weights.

What one run measures (see docs/benchmarks.md for the method):

* per backend (ONNX Runtime CPU / CUDA with and without CUDA graphs / TensorRT, whichever are
  present): cold start (engine load, then the first job) apart from warm runs; text encoding; the
  UNet per sampling step (mean, p50, p95, p99 over many steps); the host time per step outside
  the UNet engine call (sampler maths, copies, Python) absolute and as a fraction of the step; VAE
  decode / encode; end-to-end txt2img latency; images/s and steps/s per batch size; peak host RSS
  and, on a GPU, peak device memory;
* peers, same diffusers folder, resolution, steps, sigma schedule and CFG: diffusers'
  ``StableDiffusion(XL)Pipeline`` in PyTorch eager and with ``torch.compile`` where it works, and
  the engine floor (the sum of the engine calls alone, no host work);
* the sampler overhead table of ``ksampler_rt.bench.sampler_overhead`` (every sampler's host time
  per step against k-diffusion's torch implementation), when that module is present.

The product and its peers run *interleaved* (product job, peer job, product job, ...) so that a
noisy machine slows both alike; ratios are of medians.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


def on_gpu(backend: str) -> bool:
    """Whether ``backend`` runs on a CUDA device (the backend object says; unknown names do not)."""
    from ..engines.backends import device_type

    return device_type(backend) == "cuda"


DEFAULT_PERCENTILES = (50.0, 95.0, 99.0)
PEERS = ("diffusers", "diffusers-compile")


class BenchError(ValueError):
    """A bad benchmark request (printed as one line by the CLI, exit code 2)."""


# ---------------------------------------------------------------------------------------------
# configuration


@dataclass
class BenchConfig:
    model: str = "tiny"
    backends: tuple[str, ...] | None = None       # None = every available backend
    width: int | None = None                      # None = the model's default size
    height: int | None = None
    steps: int = 20
    sampler: str = "euler"
    scheduler: str = "normal"
    cfg: float = 8.0
    seed: int = 42
    prompt: str = "a red apple on a wooden table"
    negative: str = "blurry"
    batches: tuple[int, ...] = (1, 2, 4, 8)
    throughput_steps: int | None = None           # steps per throughput job; None = steps
    repeats: int = 5                              # warm end-to-end jobs per system (interleaved)
    unet_samples: int = 100                       # sampling steps timed for the per-step distribution
    stage_repeats: int = 10                       # text encoding / VAE repetitions
    throughput_repeats: int = 3                   # timed jobs per batch size (after one warm-up job)
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    threads: int | None = None                    # ORT intra-op threads = torch threads; None = usable cores
    peers: tuple[str, ...] = PEERS
    cuda_graph_variants: bool = True              # GPU: also measure without CUDA graphs
    sampler_overhead: bool = True
    tune_ort: bool = False                        # also measure ONNX Runtime CPU session variants (ort_tuning)
    comfyui: str | None = None                    # ComfyUI checkout: the k-diffusion peer of the sampler table
    out: str = "bench-results"
    chart: bool = True
    quick: bool = False

    @classmethod
    def quick_config(cls, **overrides) -> "BenchConfig":
        """Finishes in under two minutes on 2 CPU cores with the tiny model (export cached or not)."""
        base = dict(steps=10, repeats=3, unet_samples=40, stage_repeats=5, percentiles=(50.0, 95.0),
                    throughput_steps=4, throughput_repeats=1, peers=("diffusers",), quick=True, width=128, height=128)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


def required_samples(p: float) -> int:
    """Samples needed for a percentile to be more than the maximum: p99 needs 100, p95 20, p50 2."""
    if not 0 < p < 100:
        raise BenchError(f"percentile: received {p:g}, expected a number strictly between 0 and 100")
    return max(2, math.ceil(100.0 / (100.0 - p) - 1e-9))


def percentiles(samples, ps) -> dict:
    """{"p50": ..., ...} in the samples' unit; a clear error when there are too few samples."""
    n = len(samples)
    out = {}
    for p in ps:
        need = required_samples(p)
        if n < need:
            raise BenchError(f"p{p:g} samples: received {n}, expected at least {need}: raise --unet-samples to {need} "
                             f"or more, or drop p{p:g} from --percentiles")
        out[f"p{p:g}"] = float(np.percentile(np.asarray(samples, np.float64), p))
    return out


def require_positive(cfg, names) -> None:
    """Each of ``cfg``'s fields ``names`` is a positive int (the error names its ``--option``)."""
    for name in names:
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 1:
            raise BenchError(f"--{name.replace('_', '-')}: received {v!r}, expected a positive integer")


def require_size(cfg, multiple: int = 8, why: str = "") -> None:
    """``cfg.width`` / ``cfg.height`` (None: the model's default) are multiples of ``multiple``, at least 64."""
    for w in (cfg.width, cfg.height):
        if w is not None and (w < 64 or w % multiple):
            raise BenchError(f"--size: received {w} px, expected a multiple of {multiple} >= 64"
                             + (f" ({why})" if why else ""))


def validate_config(cfg: BenchConfig) -> None:
    require_positive(cfg, ("steps", "repeats", "unet_samples", "stage_repeats", "throughput_repeats"))
    if cfg.steps < 2:
        raise BenchError(f"--steps: received {cfg.steps}, expected at least 2 (per-step times need 2 steps per job)")
    for b in cfg.batches:
        if not isinstance(b, int) or b < 1:
            raise BenchError(f"--batches: received {b!r}, expected positive integers")
    for p in cfg.percentiles:
        need = required_samples(p)
        if cfg.unet_samples < need:
            raise BenchError(f"--unet-samples: received {cfg.unet_samples}, expected at least {need} for p{p:g}; "
                             f"raise --unet-samples or drop p{p:g} from --percentiles")
    require_size(cfg, 8, "the latent is 1/8 of the image")
    unknown = [p for p in cfg.peers if p not in PEERS]
    if unknown:
        raise BenchError(f"--peers: received unknown {', '.join(unknown)}, expected some of {', '.join(PEERS)} "
                         f"(or none)")
    from ..runtime import SAMPLER_NAMES, SCHEDULER_NAMES

    if cfg.sampler not in SAMPLER_NAMES:
        raise BenchError(f"--sampler: received {cfg.sampler!r}, expected one of {', '.join(SAMPLER_NAMES)}")
    if cfg.scheduler not in SCHEDULER_NAMES:
        raise BenchError(f"--scheduler: received {cfg.scheduler!r}, expected one of {', '.join(SCHEDULER_NAMES)}")


def resolve_backends(requested) -> list[str]:
    """Requested backends (or all usable ones); an unknown or unusable one is a clear error."""
    from ..engines import BACKENDS, available_backends

    avail = available_backends()
    listing = "; ".join(f"{b}: {'available' if avail.get(b) is None else avail[b]}" for b in BACKENDS)
    if not requested or list(requested) in (["all"], ["auto"]):
        usable = [b for b in BACKENDS if avail.get(b) is None]
        if not usable:
            raise BenchError(f"no backend is usable here ({listing})")
        return usable if requested != ["auto"] else usable[:1]
    out = []
    for b in requested:
        if b not in BACKENDS:
            raise BenchError(f"--backend: received unknown backend {b!r}, expected one of {', '.join(BACKENDS)} "
                             f"({listing})")
        if avail.get(b):
            raise BenchError(f"--backend: received {b}, expected a backend usable here; backend {b} is not "
                             f"available: {avail[b]} ({listing})")
        out.append(b)
    return out


# ---------------------------------------------------------------------------------------------
# measuring tools


def summary(samples_s, ps=()) -> dict:
    """Milliseconds: mean, min, max, n and the asked percentiles of samples given in seconds."""
    ms = [s * 1e3 for s in samples_s]
    out = {"n": len(ms), "mean_ms": float(statistics.fmean(ms)), "min_ms": float(min(ms)),
           "max_ms": float(max(ms)), "median_ms": float(statistics.median(ms))}
    out.update({k + "_ms": v for k, v in percentiles(ms, ps).items()})
    return out


def rel_l2(a: np.ndarray, b: np.ndarray, what: str = "latents") -> float:
    """``||a - b|| / ||b||`` in float64 (``b``: the peer's / the reference); ``what`` names the arrays in the
    shape error."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise BenchError(f"{what}: shapes {a.shape} and {b.shape} differ")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def time_method(obj, attr: str, record: Callable[[float, float], None]) -> None:
    """Replaces ``obj.<attr>`` by a wrapper that reports every call's (start, end) ``perf_counter`` times to
    ``record``, whether the call returns or raises (a torch module's ``forward``, a pipeline's stage)."""
    inner = getattr(obj, attr)

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            record(t, time.perf_counter())
    setattr(obj, attr, timed)


def interleave(systems: list, repeats: int, key: Callable = lambda s: s.name) -> dict[str, list[dict]]:
    """``repeats`` rounds of one ``job(record)`` per system, so that a noisy machine slows every system alike;
    the records per ``key(system)``."""
    records: dict[str, list[dict]] = {key(s): [] for s in systems}
    for _ in range(repeats):
        for s in systems:
            rec: dict = {}
            s.job(rec)
            records[key(s)].append(rec)
    return records


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakSampler:
    """Peak host RSS (and GPU memory used, via NVML, when asked) while the ``with`` block runs."""

    def __init__(self, gpu: bool = False, interval: float = 0.005):
        self.interval, self.gpu = interval, gpu
        self.start_rss = self.peak_rss = 0
        self.peak_gpu = self.start_gpu = None
        self._stop = threading.Event()
        self._nvml = None

    def _gpu_used(self):
        if self._nvml is None:
            return None
        try:
            return int(self._nvml[0].nvmlDeviceGetMemoryInfo(self._nvml[1]).used)
        except Exception:
            return None

    def _loop(self):
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, rss_bytes())
            if self._nvml is not None:
                g = self._gpu_used()
                if g is not None:
                    self.peak_gpu = max(self.peak_gpu or 0, g)

    def __enter__(self):
        if self.gpu:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(0))
                self.start_gpu = self.peak_gpu = self._gpu_used()
            except Exception:  # no pynvml: device memory is not reported (said in the JSON)
                self._nvml = None
        self.start_rss = self.peak_rss = rss_bytes()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, rss_bytes())

    def result(self) -> dict:
        out = {"peak_rss_mb": self.peak_rss / 2**20, "rss_at_start_mb": self.start_rss / 2**20}
        if self.gpu:
            out["peak_gpu_used_mb"] = None if self.peak_gpu is None else self.peak_gpu / 2**20
            out["gpu_used_at_start_mb"] = None if self.start_gpu is None else self.start_gpu / 2**20
            if self._nvml is None:
                out["gpu_note"] = "device memory not measured: install nvidia-ml-py (pynvml)"
        return out


class CallTimer:
    """Times every call of an engine's backend run (``Engine._run``), the "UNet engine call"."""

    def __init__(self, engine):
        self.engine = engine
        self.calls: list[tuple[float, float]] = []

    def __enter__(self):
        inner = type(self.engine)._run.__get__(self.engine)
        calls = self.calls

        def timed(feeds, profile_index):
            t0 = time.perf_counter()
            try:
                return inner(feeds, profile_index)
            finally:
                calls.append((t0, time.perf_counter()))

        self.engine._run = timed
        return self

    def __exit__(self, *exc):
        self.engine.__dict__.pop("_run", None)

    def within(self, t0: float, t1: float) -> float:
        return sum(b - a for a, b in self.calls if a >= t0 and b <= t1)


# ---------------------------------------------------------------------------------------------
# the product


class ProductRunner:
    """One backend (+ variant) of ksampler-rt on one export: load, jobs, per-stage timings."""

    def __init__(self, export_dir, backend: str, cfg: BenchConfig, *, cuda_graph: bool = True, log=print):
        self.export_dir, self.backend, self.cfg, self.cuda_graph, self.log = export_dir, backend, cfg, cuda_graph, log
        self.name = "ksampler-rt " + backend + ("" if not on_gpu(backend) else
                                                 (" +cuda-graph" if cuda_graph else " no-graph"))
        self.ckpt = None

    def _engine_options(self) -> dict:
        from ..engines import LoadOptions

        opts = LoadOptions(threads=self.cfg.threads, cuda_graph=self.cuda_graph)
        if on_gpu(self.backend):
            w, h = self.cfg.width, self.cfg.height
            # CFG doubles the UNet batch
            opts = LoadOptions(threads=self.cfg.threads, cuda_graph=self.cuda_graph, shapes=f"{w}x{h}",
                               batch=f"1-{2 * max(self.cfg.batches)}")
        return {"options": opts}

    def load(self) -> dict:
        """Cold start: engine load (sessions / plans into memory) timed apart from any build."""
        self.ckpt, t_prepare, t_load = load_checkpoint_timed(self.export_dir, self.backend, **self._engine_options())
        return {"engine_load_s": t_load, "first_prepare_s": t_prepare}

    def check_shapes(self) -> None:
        check_shapes(self.ckpt.engines, self.cfg.width, self.cfg.height, self.cfg.batches,
                     self.ckpt.manifest.get("latent_downscale", 8))

    def release(self):
        if self.ckpt is not None:
            self.ckpt.release()
            self.ckpt = None

    def job(self, batch: int = 1, steps: int | None = None, record: dict | None = None) -> np.ndarray:
        """A txt2img job as ``Pipeline.txt2img``: encode both prompts, KSampler, VAE decode."""
        from ..runtime import ksampler

        c, ck = self.cfg, self.ckpt
        steps = steps or c.steps
        rec = record if record is not None else {}
        t0 = time.perf_counter()
        pos, neg = ck.clip.encode(c.prompt), ck.clip.encode(c.negative)
        t1 = time.perf_counter()
        latent = {"samples": np.zeros((batch, 4, c.height // 8, c.width // 8), np.float32)}
        marks: list[float] = []
        out = ksampler(ck.model, c.seed, steps, c.cfg, c.sampler, c.scheduler, pos, neg, latent,
                       callback=lambda *a: marks.append(time.perf_counter()))
        t2 = time.perf_counter()
        image = ck.vae.decode(out["samples"])
        t3 = time.perf_counter()
        rec.update(text_s=t1 - t0, sampling_s=t2 - t1, decode_s=t3 - t2, total_s=t3 - t0, marks=marks,
                   sampling_start=t1)
        return image


def load_checkpoint_timed(export_dir, backend: str, **options) -> tuple[object, float, float]:
    """(loaded checkpoint, prepare s, load s): a first load that builds / verifies the engine cache, released,
    then the timed load of the engines into memory (``load_checkpoint(..., **options)``)."""
    from ..workflow.checkpoint import load_checkpoint

    t0 = time.perf_counter()
    ck = load_checkpoint(export_dir, backend, log=None, **options)
    ck.engines.release()  # any build / cache verification is done now; what follows is the load
    t1 = time.perf_counter()
    ck = load_checkpoint(export_dir, backend, log=None, **options)
    ck.engines.load()
    return ck, t1 - t0, time.perf_counter() - t1


def check_shapes(engines, width, height, batches, downscale=8) -> None:
    """Refuse, before any timing, a size or batch the loaded engines were not built for."""
    from ..engines.spec import EngineError

    unet = engines.unet
    specs = {s.name: s for s in unet.inputs}
    ctx = specs["encoder_hidden_states"]
    dim = ctx.shape[2] if isinstance(ctx.shape[2], int) else 768
    for b in batches:
        feeds = {"sample": np.zeros((2 * b, 4, height // downscale, width // downscale), np.float32),
                 "timestep": np.zeros((2 * b,) if specs["timestep"].rank == 1 else (), np.float32),
                 "encoder_hidden_states": np.zeros((2 * b, 77, dim), np.float32)}
        if "y" in specs:
            feeds["y"] = np.zeros((2 * b, specs["y"].shape[1]), np.float32)
        try:
            unet.validate(feeds)
        except EngineError as exc:
            raise BenchError(f"{width}x{height} at batch {b} (UNet batch {2 * b} with CFG) is outside the engines "
                             f"built for {engines.backend}: {exc}") from None


def step_stats(records: list[dict], timer: CallTimer) -> tuple[list[float], list[float], list[float]]:
    """(step seconds, UNet seconds, host seconds) for every step after the first of each job.

    A step is the time between two progress callbacks; the first step of a job also holds the job's
    setup (noise, sigmas, CFG layout) and is reported apart as ``setup``.
    """
    steps, unet, host = [], [], []
    for r in records:
        m = r["marks"]
        for a, b in zip(m[:-1], m[1:]):
            u = timer.within(a, b)
            steps.append(b - a)
            unet.append(u)
            host.append(max(0.0, (b - a) - u))
    return steps, unet, host


def measure_product(runner: ProductRunner, cfg: BenchConfig, log=print) -> dict:
    """Everything about one backend variant except the interleaved end-to-end comparison."""
    res: dict = {"name": runner.name, "backend": runner.backend}
    gpu = on_gpu(runner.backend)
    with PeakSampler(gpu=gpu) as mem:
        res["cold"] = runner.load()
        runner.check_shapes()
        rec: dict = {}
        t0 = time.perf_counter()
        runner.job(record=rec)
        res["cold"]["first_job_s"] = time.perf_counter() - t0
        res["cold"]["engine_load_plus_first_job_s"] = res["cold"]["engine_load_s"] + res["cold"]["first_job_s"]
        ck = runner.ckpt
        # per stage
        stage = {}
        ts = []
        for _ in range(cfg.stage_repeats):
            t = time.perf_counter()
            ck.clip.encode(cfg.prompt)
            ts.append(time.perf_counter() - t)
        stage["text_encode"] = summary(ts)
        rng = np.random.default_rng(0)
        latent = rng.standard_normal((1, 4, cfg.height // 8, cfg.width // 8)).astype(np.float32)
        ts = []
        for _ in range(cfg.stage_repeats):
            t = time.perf_counter()
            ck.vae.decode(latent)
            ts.append(time.perf_counter() - t)
        stage["vae_decode"] = summary(ts)
        if ck.vae.encoder is not None:
            pixels = rng.random((1, cfg.height, cfg.width, 3)).astype(np.float32)
            ts = []
            for _ in range(cfg.stage_repeats):
                t = time.perf_counter()
                ck.vae.encode(pixels)
                ts.append(time.perf_counter() - t)
            stage["vae_encode"] = summary(ts)
        # UNet per step + host overhead, over enough sampling steps
        records = []
        with CallTimer(ck.engines.unet) as timer:
            n = 0
            while n < cfg.unet_samples:
                r: dict = {}
                runner.job(record=r)
                records.append(r)
                n += cfg.steps - 1
            steps, unet, host = step_stats(records, timer)
        ps = cfg.percentiles
        stage["step"] = summary(steps, ps)
        stage["unet_call"] = summary(unet, ps)
        stage["host_per_step"] = summary(host, ps)
        stage["host_fraction_of_step"] = float(sum(host) / sum(steps))
        stage["setup_first_step"] = summary([r["marks"][0] - r["sampling_start"] for r in records])
        stage["sampling"] = summary([r["sampling_s"] for r in records])
        stage["unet_calls_per_step"] = len(timer.calls) / max(1, sum(len(r["marks"]) for r in records))
        res["stages"] = stage
        # throughput per batch size
        res["throughput"] = []
        tsteps = cfg.throughput_steps or cfg.steps
        for b in cfg.batches:
            r: dict = {}
            runner.job(batch=b, steps=tsteps, record=r)  # warm-up of the new shape
            rs = []
            for _ in range(cfg.throughput_repeats):
                r = {}
                runner.job(batch=b, steps=tsteps, record=r)
                rs.append(r)
            tot = statistics.median(x["total_s"] for x in rs)
            samp = statistics.median(x["sampling_s"] for x in rs)
            res["throughput"].append({"batch": b, "steps": tsteps, "job_s": tot, "images_per_s": b / tot,
                                      "steps_per_s": tsteps / samp, "image_steps_per_s": b * tsteps / samp})
            log(f"  {runner.name}: batch {b}: {b / tot:.3g} images/s, {tsteps / samp:.3g} steps/s")
    res["memory"] = mem.result()
    return res


# ---------------------------------------------------------------------------------------------
# peers


class DiffusersPeer:
    """diffusers' pipeline on the same folder, same sigmas (EulerDiscreteScheduler(sigmas=...)), same CFG."""

    def __init__(self, source_dir, cfg: BenchConfig, sigmas, *, compile: bool = False, family: str = "sd15"):
        self.source_dir, self.cfg, self.compile, self.family = Path(source_dir), cfg, compile, family
        # the whole list, final 0 included: diffusers' EulerDiscreteScheduler(sigmas=...) takes the last entry as
        # the final sigma (0.42 appends nothing), so dropping the 0 would run one step fewer than ours
        self.sigmas = [float(s) for s in sigmas]
        self.name = "diffusers torch " + ("compile" if compile else "eager")
        self.pipe = None
        self.unet_calls: list[tuple[float, float]] = []

    def load(self) -> dict:
        import torch
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        if self.cfg.sampler != "euler":
            raise BenchError(f"the diffusers peer is set up for --sampler euler (EulerDiscreteScheduler); "
                             f"received {self.cfg.sampler}")
        torch.set_num_threads(self.cfg.threads or _default_threads())
        cls = StableDiffusionXLPipeline if "xl" in self.family else StableDiffusionPipeline
        t0 = time.perf_counter()
        kw = {} if cls is StableDiffusionXLPipeline else dict(safety_checker=None, requires_safety_checker=False)
        pipe = cls.from_pretrained(str(self.source_dir), **kw)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        if self.compile:
            pipe.unet = torch.compile(pipe.unet)
        t_load = time.perf_counter() - t0
        calls = self.unet_calls
        time_method(pipe.unet, "forward", lambda t0, t1: calls.append((t0, t1)))
        self.pipe = pipe
        return {"load_s": t_load}

    def job(self, batch: int = 1, steps: int | None = None, record: dict | None = None):
        import torch

        c = self.cfg
        sigmas = self.sigmas if steps in (None, c.steps) else None
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.pipe(c.prompt, negative_prompt=c.negative, height=c.height, width=c.width,
                            num_inference_steps=steps or c.steps, sigmas=sigmas, guidance_scale=c.cfg,
                            num_images_per_prompt=batch, generator=torch.Generator().manual_seed(c.seed),
                            output_type="np")
        if record is not None:
            record["total_s"] = time.perf_counter() - t0
        return out.images

    def release(self):
        self.pipe = None


def _default_threads() -> int:
    from ..engines.ort import default_cpu_threads

    return default_cpu_threads()


# ---------------------------------------------------------------------------------------------
# environment, sampler overhead


def environment(backends, cfg: BenchConfig, manifest: dict) -> dict:
    from ..engines.envinfo import cpu_info, gpu_info, module_version

    env = {
        "python": platform.python_version(), "platform": platform.platform(),
        "cpu": cpu_info(), "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "gpu": gpu_info(0) if any(on_gpu(b) for b in backends) else None,
        "versions": {m: module_version(m) for m in ("ksampler_rt", "numpy", "onnxruntime", "openvino", "tensorrt", "torch",
                                                     "diffusers", "transformers")},
        "threads": cfg.threads or _default_threads(),
        "backends": list(backends),
        "precision": manifest.get("precision"), "family": manifest.get("family"),
        "shapes": {"image": [cfg.height, cfg.width], "latent": [4, cfg.height // 8, cfg.width // 8],
                   "unet_batch_per_image": 2, "tokens": 77},
    }
    return env


def run_sampler_overhead(cfg: BenchConfig, log=print) -> dict:
    """``ksampler_rt.bench.sampler_overhead`` (every sampler's host time per step against ComfyUI's
    k-diffusion torch samplers), called as it is; its own table goes to the log."""
    import contextlib
    import io

    try:
        from . import sampler_overhead
    except ImportError as exc:
        return {"available": False, "why": f"ksampler_rt.bench.sampler_overhead is not importable ({exc})"}
    argv = ["--steps", str(cfg.steps)] + (["--quick"] if cfg.quick else [])
    if cfg.comfyui:
        argv += ["--comfyui", str(cfg.comfyui)]
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            res = sampler_overhead.main(argv)
    except SystemExit as exc:
        return {"available": False, "why": f"sampler_overhead exited ({exc.code}): {buf.getvalue()[-300:]}"}
    except Exception as exc:  # its failure must not lose the rest of the run
        return {"available": False, "why": f"sampler_overhead failed: {type(exc).__name__}: {exc}"}
    for line in buf.getvalue().splitlines():
        log("  " + line)
    return dict(res, available=True, argv=argv)


# ---------------------------------------------------------------------------------------------
# the run


def set_torch_thread_policy() -> dict:
    """Give the PyTorch peers the same threading policy as the product's ONNX Runtime sessions.

    ONNX Runtime runs with ``allow_spinning=0`` (idle workers sleep). PyTorch's OpenMP spins by
    default, which on a shared or oversubscribed CPU makes a 2-thread torch UNet call ~30x slower
    (measured: 2.9 s vs 95 ms for the tiny UNet at load average 10 on 2 cores), a result about
    the machine, not about diffusers. ``OMP_WAIT_POLICY=PASSIVE`` must be set before torch is
    imported; set it yourself to override.
    """
    already = "torch" in sys.modules
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return {"OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"], "torch_imported_before": already}


def run(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict:
    from .models import resolve_model

    torch_policy = set_torch_thread_policy()
    validate_config(cfg)
    backends = resolve_backends(list(cfg.backends) if cfg.backends else None)
    model = resolve_model(cfg.model, log=log)
    if cfg.width is None or cfg.height is None:
        cfg.width = cfg.width or model.default_size
        cfg.height = cfg.height or model.default_size
    manifest = json.loads((Path(model.export_dir) / "manifest.json").read_text())
    result: dict = {"config": dataclasses.asdict(cfg), "model": {
        "name": model.name, "export_dir": str(model.export_dir), "source_dir": str(model.source_dir or ""),
        "note": model.note, "family": model.family}, "environment": environment(backends, cfg, manifest),
        "products": [], "peers": [], "comparison": []}
    result["environment"]["torch_thread_policy"] = torch_policy
    t_run = time.perf_counter()

    # 1. the product on every backend variant (no torch imported yet: its RSS is the product's own)
    runners = []
    for backend in backends:
        variants = [True, False] if on_gpu(backend) and cfg.cuda_graph_variants else [True]
        for graph in variants:
            runner = ProductRunner(model.export_dir, backend, cfg, cuda_graph=graph, log=log)
            log(f"measuring {runner.name} ...")
            try:
                res = measure_product(runner, cfg, log)
            except BenchError:
                runner.release()
                raise
            except Exception as exc:
                if "ksampler-rt build" in str(exc):  # no engine for this shape: say how to build one
                    runner.release()
                    raise BenchError(f"{runner.name}: {exc}") from None
                if on_gpu(backend) and graph:
                    log(f"  {runner.name} failed ({exc}); continuing")
                    result["products"].append({"name": runner.name, "backend": backend, "error": str(exc)})
                    runner.release()
                    continue
                raise
            result["products"].append(res)
            runners.append((runner, res))
    # 2. peers, interleaved with the product's first runner (all of its variants in turn)
    from ..runtime import calculate_sigmas

    primary = runners[0][0]
    sigmas = calculate_sigmas(primary.ckpt.model.model_sampling, cfg.scheduler, cfg.steps)
    peers = []
    for name in cfg.peers:
        if model.source_dir is None:
            result["peers"].append({"name": name, "available": False, "why": "no diffusers folder for this model"})
            continue
        peer = DiffusersPeer(model.source_dir, cfg, sigmas, compile=name == "diffusers-compile", family=model.family)
        log(f"loading {peer.name} ...")
        try:
            with PeakSampler() as mem:
                cold = peer.load()
                t0 = time.perf_counter()
                peer.job()
                cold["first_job_s"] = time.perf_counter() - t0
        except BenchError:
            raise
        except Exception as exc:
            log(f"  {peer.name} unavailable: {type(exc).__name__}: {exc}")
            result["peers"].append({"name": peer.name, "available": False, "why": f"{type(exc).__name__}: {exc}"})
            continue
        peers.append((peer, {"name": peer.name, "available": True, "cold": cold, "memory": mem.result()}))

    systems = [(r.name, r.job) for r, _ in runners] + [(p.name, p.job) for p, _ in peers]
    log(f"end to end, {cfg.repeats} interleaved warm jobs each: " + ", ".join(n for n, _ in systems))
    times: dict[str, list[float]] = {n: [] for n, _ in systems}
    floors: dict[str, list[float]] = {r.name: [] for r, _ in runners}
    timers = {r.name: [CallTimer(e) for e in r.ckpt.engines.engines().values()] for r, _ in runners}
    for _ in range(cfg.repeats):
        for n, fn in systems:
            rec: dict = {}
            if n in timers:  # the engine floor: the engine calls alone, inside the same jobs
                for t in timers[n]:
                    t.calls.clear()
                    t.__enter__()
                try:
                    fn(record=rec)
                finally:
                    for t in timers[n]:
                        t.__exit__()
                floors[n].append(sum(b - a for t in timers[n] for a, b in t.calls))
            else:
                fn(record=rec)
            times[n].append(rec["total_s"])
    for r, res in runners:
        res["end_to_end"] = summary(times[r.name])
        res["engine_floor_job_s"] = statistics.median(floors[r.name])
        res["end_to_end"]["outside_engines_fraction"] = float(
            1 - sum(floors[r.name]) / sum(times[r.name]))
    for p, info in peers:
        info["end_to_end"] = summary(times[p.name])
        calls = p.unet_calls[-cfg.steps * cfg.repeats:]
        if calls:
            info["unet_call"] = summary([b - a for a, b in calls])
        # peer throughput per batch size
        info["throughput"] = []
        tsteps = cfg.throughput_steps or cfg.steps
        for b in cfg.batches:
            p.job(batch=b, steps=tsteps)
            rs = []
            for _ in range(cfg.throughput_repeats):
                rec = {}
                p.job(batch=b, steps=tsteps, record=rec)
                rs.append(rec["total_s"])
            tot = statistics.median(rs)
            info["throughput"].append({"batch": b, "steps": tsteps, "job_s": tot, "images_per_s": b / tot})
        result["peers"].append(info)
    # 3. ratios: every product variant against every peer and its own engine floor
    for r, res in runners:
        mine = res["end_to_end"]["median_ms"] / 1e3
        for p, info in peers:
            theirs = info["end_to_end"]["median_ms"] / 1e3
            result["comparison"].append({"product": r.name, "peer": p.name, "product_s": mine, "peer_s": theirs,
                                         "speedup": theirs / mine})
        result["comparison"].append({"product": r.name, "peer": "engine floor (engine calls only)",
                                     "product_s": mine, "peer_s": res["engine_floor_job_s"],
                                     "speedup": res["engine_floor_job_s"] / mine})
    for r, _ in runners:
        r.release()
    for p, _ in peers:
        p.release()
    if cfg.tune_ort and "onnxruntime-cpu" in backends:
        from .ort_tuning import measure_variants

        log("ONNX Runtime CPU session variants for the UNet ...")
        result["ort_tuning"] = measure_variants(model.export_dir, cfg.width, cfg.height, 2, cfg.repeats,
                                                threads=cfg.threads, fusions=not cfg.quick, log=log)
    if cfg.sampler_overhead:
        log("sampler overhead table ...")
        result["sampler_overhead"] = run_sampler_overhead(cfg, log)
    result["environment"]["loadavg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    result["wall_s"] = time.perf_counter() - t_run
    return result


# ---------------------------------------------------------------------------------------------
# reporting


def _fmt(v, spec=".3f") -> str:
    return "n/a" if not isinstance(v, (int, float)) else format(v, spec)


def _ms(v) -> str:
    return "-" if v is None else (f"{v:.3g}" if v < 100 else f"{v:.0f}")


def format_report(result: dict) -> str:
    lines = []
    cfg, env = result["config"], result["environment"]
    lines.append(f"model {result['model']['name']} ({result['model']['note']})")
    lines.append(f"{cfg['width']}x{cfg['height']}, {cfg['steps']} steps {cfg['sampler']}/{cfg['scheduler']}, "
                 f"cfg {cfg['cfg']}, {env['threads']} threads, precision {env['precision']}; CPU {env['cpu']['cpu']}"
                 + (f"; GPU {env['gpu'].get('gpu')}" if env.get("gpu") else ""))
    pcols = [f"p{p:g}" for p in cfg["percentiles"]]
    lines.append("")
    lines.append(f"{'system':<36} {'load s':>7} {'1st job s':>9} {'text ms':>8} {'unet/step ms':>12} "
                 + " ".join(f"{c + ' ms':>8}" for c in pcols)
                 + f" {'host ms':>8} {'host %':>7} {'dec ms':>7} {'enc ms':>7} {'e2e s':>7} {'RSS MB':>7}")
    for res in result["products"]:
        if "error" in res:
            lines.append(f"{res['name']:<36} error: {res['error']}")
            continue
        s, c = res["stages"], res["cold"]
        lines.append(
            f"{res['name']:<36} {c['engine_load_s']:>7.2f} {c['first_job_s']:>9.2f} "
            f"{_ms(s['text_encode']['median_ms']):>8} {_ms(s['unet_call']['mean_ms']):>12} "
            + " ".join(f"{_ms(s['unet_call'][k + '_ms']):>8}" for k in pcols)
            + f" {s['host_per_step']['mean_ms']:>8.3f} {100 * s['host_fraction_of_step']:>6.2f}% "
            f"{_ms(s['vae_decode']['median_ms']):>7} {_ms(s.get('vae_encode', {}).get('median_ms')):>7} "
            f"{res['end_to_end']['median_ms'] / 1e3:>7.3f} {res['memory']['peak_rss_mb']:>7.0f}")
    for info in result["peers"]:
        if not info.get("available"):
            lines.append(f"{info['name']:<36} unavailable: {info['why']}")
            continue
        u = info.get("unet_call", {})
        lines.append(f"{info['name']:<36} {info['cold']['load_s']:>7.2f} {info['cold']['first_job_s']:>9.2f} "
                     f"{'':>8} {_ms(u.get('mean_ms')):>12} " + " ".join(f"{'':>8}" for _ in pcols)
                     + f" {'':>8} {'':>7} {'':>7} {'':>7} {info['end_to_end']['median_ms'] / 1e3:>7.3f} "
                     f"{info['memory']['peak_rss_mb']:>7.0f}")
    lines.append("")
    lines.append("throughput (images/s by batch size):")
    batches = cfg["batches"]
    lines.append(f"  {'system':<34} " + " ".join(f"{'b=' + str(b):>9}" for b in batches) + "   steps/s (b=1)")
    for res in result["products"] + [p for p in result["peers"] if p.get("available")]:
        if "throughput" not in res:
            continue
        by = {t["batch"]: t for t in res["throughput"]}
        sps = by.get(batches[0], {}).get("steps_per_s")
        lines.append(f"  {res['name']:<34} " + " ".join(f"{by[b]['images_per_s']:>9.3g}" for b in batches)
                     + (f"   {sps:.3g}" if sps else ""))
    lines.append("")
    lines.append("end to end (median of interleaved warm jobs), product vs peers:")
    for c in result["comparison"]:
        if c["peer"].startswith("engine floor"):
            lines.append(f"  {c['product']:<34} {c['product_s']:>8.3f} s  engine calls alone {c['peer_s']:.3f} s "
                         f"= {100 * c['speedup']:.1f}% of the job (the floor)")
            continue
        lines.append(f"  {c['product']:<34} {c['product_s']:>8.3f} s  vs {c['peer']:<34} {c['peer_s']:>8.3f} s  "
                     f"-> {c['speedup']:.2f}x" + (" faster" if c['speedup'] >= 1 else " (slower)"))
    if result.get("ort_tuning"):
        from .ort_tuning import format_rows

        lines.append("")
        lines.append(format_rows(result["ort_tuning"], cfg["width"], cfg["height"], 2))
    so = result.get("sampler_overhead")
    if so is not None:
        lines.append("")
        if not so.get("available"):
            lines.append(f"sampler overhead table: not run ({so['why']})")
        else:
            peer = "ComfyUI k-diffusion torch" if result["config"].get("comfyui") else \
                "no peer (pass --comfyui PATH for k-diffusion's torch samplers)"
            lines.append(f"sampler host time per step, ksampler-rt vs {peer}:")
            lines.append(f"  {'sampler':<28} {'latent':<16} {'ours ms':>9} {'peer ms':>9} {'ratio':>7}")
            for row in so.get("rows", []):
                lines.append(f"  {row.get('sampler', '?'):<28} {str(row.get('latent', '')):<16} "
                             f"{_fmt(row.get('ours_ms_per_step')):>9} {_fmt(row.get('peer_ms_per_step')):>9} "
                             f"{_fmt(row.get('ratio'), '.2f'):>7}")
    lines.append(f"\nload average at start {env.get('loadavg_at_start')}, at end {env.get('loadavg_at_end')}; "
                 f"run took {result.get('wall_s', 0):.0f} s")
    return "\n".join(lines)


def write_chart(result: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    stages = [("text_encode", "median_ms", "text encode"), ("unet_call", "mean_ms", "UNet / step"),
              ("host_per_step", "mean_ms", "host / step"), ("vae_decode", "median_ms", "VAE decode"),
              ("vae_encode", "median_ms", "VAE encode")]
    prods = [r for r in result["products"] if "stages" in r]
    width = 0.8 / max(1, len(prods) + 1)
    xs = np.arange(len(stages) + 1)
    for i, r in enumerate(prods):
        vals = [r["stages"].get(k, {}).get(f, np.nan) for k, f, _ in stages] + [r["end_to_end"]["median_ms"]]
        ax1.bar(xs + i * width, vals, width, label=r["name"])
    for j, p in enumerate([p for p in result["peers"] if p.get("available")]):
        vals = [np.nan, p.get("unet_call", {}).get("mean_ms", np.nan)] + [np.nan] * 3 + [p["end_to_end"]["median_ms"]]
        ax1.bar(xs + (len(prods) + j) * width, vals, width, label=p["name"], hatch="//")
    ax1.set_xticks(xs + width * (len(prods) - 1) / 2)
    ax1.set_xticklabels([s[2] for s in stages] + ["end to end"], rotation=20)
    ax1.set_yscale("log")
    ax1.set_ylabel("ms (log)")
    ax1.set_title("latency per stage")
    ax1.legend(fontsize=7)
    for r in prods + [p for p in result["peers"] if p.get("available")]:
        t = r.get("throughput") or []
        if t:
            ax2.plot([x["batch"] for x in t], [x["images_per_s"] for x in t], marker="o", label=r["name"])
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("batch size")
    ax2.set_ylabel("images / s")
    ax2.set_title(f"throughput ({result['config'].get('throughput_steps') or result['config']['steps']} steps/job)")
    ax2.legend(fontsize=7)
    fig.suptitle(f"ksampler-rt bench: {result['model']['name']} {result['config']['width']}x"
                 f"{result['config']['height']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save(result: dict, out_dir, chart: bool = True) -> dict:
    out = Path(out_dir)
    stem = f"bench-{result['model']['name']}-{time.strftime('%Y%m%d-%H%M%S')}"
    jpath = write_json(out / f"{stem}.json", result)
    paths = {"json": str(jpath)}
    if chart:
        c = write_chart(result, out / f"{stem}.png")
        paths["chart"] = str(c) if c else None
    return paths


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def write_json(path, obj, *, indent: int = 2, default: Callable = _json_default) -> Path:
    """``obj`` as JSON (+ newline) at ``path``, written atomically (temp file + rename), folders made. Not
    ``engines.cache.atomic_write_bytes``: its ``mkstemp`` file would leave the report readable by its owner only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=indent, default=default) + "\n")
    os.replace(tmp, path)
    return path
