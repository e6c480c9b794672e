"""``ksampler-rt bench --precision ...``: speed and quality of each precision, against the fp32 run of the
same seed, beside diffusers/torch eager fp32 and torch's own bf16 on the same weights, in one run.

For each CPU backend and precision (``fp32``, ``bf16``, ``unet=bf16,vae=fp32``, ``auto``...) the product
runs the same txt2img job (text encoding, KSampler, VAE decode) as ``ksampler-rt bench``; the quality
columns compare its final latent (relative L2, ``||x - x_fp32|| / ||x_fp32||``) and its decoded image
(PSNR in dB, images in [0, 1]) with the product's fp32 job on the same backend and seed. The torch peers
are diffusers' pipeline in eager fp32 and under ``torch.autocast("cpu", torch.bfloat16)`` on the same
diffusers folder, same sigmas and CFG; their image PSNR is against the product's fp32 image (the same
model and sampler, so fp32 agrees to ~60 dB and the bf16 peer shows torch's own bf16 price).

A precision the machine cannot run is a row with the refusal (the missing CPU feature), not an error.
The CPU flags the run saw are recorded (``environment.cpu_flags``). Jobs are interleaved across systems,
as in the main harness, so a noisy shared machine slows all of them alike.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .harness import BenchConfig, DiffusersPeer, ProductRunner, set_torch_thread_policy, summary

#: The ISA flags a precision result depends on (recorded with every run).
PRECISION_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
                   "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")
DEFAULT_PRECISIONS = ("fp32", "bf16", "fp16", "int8", "auto")
DEFAULT_PEERS = ("diffusers", "diffusers-bf16")


@dataclass
class PrecisionBenchConfig:
    model: str = "tiny"
    backends: tuple[str, ...] = ("openvino-cpu", "onnxruntime-cpu")
    precisions: tuple[str, ...] = DEFAULT_PRECISIONS
    width: int | None = None
    height: int | None = None
    steps: int = 20
    cfg: float = 8.0
    seed: int = 42
    repeats: int = 3  # timed jobs per system after the warm-up job; 0: quality columns only
    threads: int | None = None
    peers: tuple[str, ...] = DEFAULT_PEERS
    out: str = "bench-results"

    def harness_config(self) -> BenchConfig:
        return BenchConfig(model=self.model, width=self.width, height=self.height, steps=self.steps, cfg=self.cfg,
                           seed=self.seed, threads=self.threads, batches=(1,), repeats=self.repeats)


def relative_l2(x: np.ndarray, ref: np.ndarray) -> float:
    """``||x - ref|| / ||ref||`` in float64 (0 for identical arrays)."""
    x64, r64 = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    if x64.shape != r64.shape:
        raise ValueError(f"relative_l2: received shapes {x64.shape} and {r64.shape}, expected equal shapes")
    den = float(np.linalg.norm(r64))
    return float(np.linalg.norm(x64 - r64)) / den if den else float(np.linalg.norm(x64))


def psnr(image: np.ndarray, ref: np.ndarray, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of ``image`` against ``ref`` (both in [0, peak]); inf when equal."""
    a, b = np.asarray(image, np.float64), np.asarray(ref, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr: received shapes {a.shape} and {b.shape}, expected equal shapes")
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def cpu_flags_record() -> dict:
    from ..engines.envinfo import cpu_info
    from ..engines.precision import cpu_flags, describe_cpu

    flags = cpu_flags()
    return {"cpu": cpu_info().get("cpu"), "cpu_flags": [f for f in PRECISION_FLAGS if f in flags],
            "amx_or_avx512_bf16": bool({"amx_bf16", "avx512_bf16"} & flags), "summary": describe_cpu(flags)}


class PrecisionRunner(ProductRunner):
    """The product on one backend in one precision; ``job`` keeps the final latent for the quality columns."""

    def __init__(self, export_dir, backend: str, precision: str, cfg: BenchConfig, log=print):
        super().__init__(export_dir, backend, cfg, log=log)
        self.precision = precision
        self.name = f"ksampler-rt {backend} {precision}"
        self.resolved: dict[str, str] = {}

    def _engine_options(self) -> dict:
        from ..engines import LoadOptions

        return {"options": LoadOptions(threads=self.cfg.threads, precision=self.precision)}

    def load(self) -> dict:
        res = super().load()
        self.resolved = {m: getattr(e, "precision", "fp32") for m, e in self.ckpt.engines.engines().items()}
        return res

    def job(self, batch: int = 1, steps: int | None = None, record: dict | None = None) -> np.ndarray:
        from ..runtime import ksampler

        c, ck = self.cfg, self.ckpt
        rec = record if record is not None else {}
        t0 = time.perf_counter()
        pos, neg = ck.clip.encode(c.prompt), ck.clip.encode(c.negative)
        latent = {"samples": np.zeros((batch, 4, c.height // 8, c.width // 8), np.float32)}
        out = ksampler(ck.model, c.seed, steps or c.steps, c.cfg, c.sampler, c.scheduler, pos, neg, latent)
        image = ck.vae.decode(out["samples"])
        rec.update(total_s=time.perf_counter() - t0, latent=out["samples"])
        return image


class AutocastPeer(DiffusersPeer):
    """diffusers' pipeline under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (torch's own bf16)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.name = "diffusers torch eager bf16-autocast"

    def job(self, batch: int = 1, steps: int | None = None, record: dict | None = None):
        import torch

        with torch.autocast("cpu", dtype=torch.bfloat16):
            return super().job(batch, steps, record)


def run(pcfg: PrecisionBenchConfig, log: Callable[[str], None] = print) -> dict:
    """Measure every (backend, precision) and the peers; returns the result dict (see ``format_report``)."""
    from ..engines import available_backends
    from ..engines.precision import parse_precision
    from ..engines.spec import EngineError
    from .models import resolve_model

    torch_policy = set_torch_thread_policy()
    for p in pcfg.precisions:
        parse_precision(p)  # a typo fails before minutes of building
    model = resolve_model(pcfg.model, log=log)
    cfg = pcfg.harness_config()
    cfg.width = cfg.width or model.default_size
    cfg.height = cfg.height or model.default_size
    result: dict = {"config": dataclasses.asdict(pcfg), "model": {"name": model.name, "note": model.note},
                    "environment": {**cpu_flags_record(), "torch_thread_policy": torch_policy,
                                    "size": f"{cfg.width}x{cfg.height}"}, "rows": [], "peers": []}
    avail = available_backends()
    precisions = list(dict.fromkeys(("fp32",) + tuple(pcfg.precisions)))  # fp32 first: the reference
    runners: list[PrecisionRunner] = []
    for backend in pcfg.backends:
        if avail.get(backend):
            result["rows"].append({"backend": backend, "precision": "-", "refused": avail[backend]})
            continue
        for prec in precisions:
            runner = PrecisionRunner(model.export_dir, backend, prec, cfg, log=log)
            log(f"loading {runner.name} ...")
            try:
                cold = runner.load()
            except EngineError as exc:  # a precision this machine / backend cannot run: said, not skipped silently
                log(f"  refused: {exc}")
                result["rows"].append({"backend": backend, "precision": prec, "refused": str(exc)})
                continue
            runner.cold = cold
            runners.append(runner)
    peers = []
    if model.source_dir is not None and runners:
        from ..runtime import calculate_sigmas

        sigmas = calculate_sigmas(runners[0].ckpt.model.model_sampling, cfg.scheduler, cfg.steps)
        for name in pcfg.peers:
            cls = {"diffusers": DiffusersPeer, "diffusers-bf16": AutocastPeer}.get(name)
            if cls is None:
                raise ValueError(f"--peers: received {name!r}, expected diffusers, diffusers-bf16 or none")
            peer = cls(model.source_dir, cfg, sigmas, family=model.family)
            log(f"loading {peer.name} ...")
            peer.load()
            peers.append(peer)
    systems = [(r.name, r.job) for r in runners] + [(p.name, p.job) for p in peers]
    log(f"end to end at {cfg.width}x{cfg.height}, {cfg.steps} steps, {pcfg.repeats} interleaved warm jobs after "
        f"one warm-up each: " + ", ".join(n for n, _ in systems))
    times: dict[str, list[float]] = {n: [] for n, _ in systems}
    outputs: dict[str, tuple] = {}
    for n, fn in systems:  # warm-up (compiles the shape signature), and the job the quality columns use
        rec: dict = {}
        outputs[n] = (fn(record=rec), rec.get("latent"))
    for i in range(pcfg.repeats):
        for n, fn in systems:
            rec = {}
            fn(record=rec)
            times[n].append(rec["total_s"])
            log(f"  [{i + 1}/{pcfg.repeats}] {n}: {rec['total_s']:.2f} s")
    refs = {r.backend: outputs[r.name] for r in runners if r.precision == "fp32"}
    for r in runners:
        image, latent = outputs[r.name]
        ref_image, ref_latent = refs[r.backend]
        result["rows"].append({
            "backend": r.backend, "precision": r.precision, "resolved": r.resolved,
            "end_to_end": summary(times[r.name]) if times[r.name] else None,
            "latent_rel_l2": relative_l2(latent, ref_latent), "image_psnr_db": psnr(image, ref_image),
            "engine_load_s": r.cold.get("engine_load_s"), "first_prepare_s": r.cold.get("first_prepare_s")})
        r.release()
    ref_image = next(iter(refs.values()))[0] if refs else None
    for p in peers:
        image = outputs[p.name][0]
        row = {"name": p.name, "end_to_end": summary(times[p.name]) if times[p.name] else None}
        if ref_image is not None and np.shape(image) == np.shape(ref_image):
            row["image_psnr_db_vs_product_fp32"] = psnr(image, ref_image)
        result["peers"].append(row)
        p.release()
    result["comparison"] = _speedups(result)
    return result


def _speedups(result: dict) -> list[dict]:
    """Each product row's median end-to-end speed-up over each peer (> 1: the product is faster)."""
    out = []
    peers = {p["name"]: p["end_to_end"]["median_ms"] for p in result["peers"] if p["end_to_end"]}
    for row in result["rows"]:
        if not row.get("end_to_end"):
            continue
        t = row["end_to_end"]["median_ms"]
        out.append({"system": f"{row['backend']} {row['precision']}",
                    **{f"x_vs_{name}": peers[name] / t for name in peers}})
    return out


def _f(v, spec) -> str:
    return "-" if v is None else ("inf" if isinstance(v, float) and math.isinf(v) else format(v, spec))


def format_report(result: dict) -> str:
    env = result["environment"]
    lines = [f"precision benchmark: {result['model']['name']} at {env['size']}, {result['config']['steps']} steps, "
             f"CPU {env['cpu']} ({', '.join(env['cpu_flags']) or 'no AVX2'})"]
    if not env["amx_or_avx512_bf16"]:
        lines.append("this CPU has neither AMX nor AVX-512-BF16: bf16 is refused, fp32 is what it runs")
    peers = {p["name"]: p["end_to_end"]["median_ms"] for p in result["peers"] if p["end_to_end"]}
    head = f"{'system':48s} {'e2e ms':>9s} {'latent relL2':>13s} {'PSNR dB':>8s}" + \
        "".join(f" {'x vs ' + n.split()[-1]:>12s}" for n in peers)
    lines += [head, "-" * len(head)]
    for row in result["rows"]:
        name = f"ksampler-rt {row['backend']} {row['precision']}"
        if "refused" in row:
            lines.append(f"{name:48s} refused: {row['refused']}")
            continue
        t = row["end_to_end"]["median_ms"] if row["end_to_end"] else None
        lines.append(f"{name:48s} {_f(t, '9.0f'):>9s} {_f(row['latent_rel_l2'], '.4f'):>13s} "
                     f"{_f(row['image_psnr_db'], '.1f'):>8s}" + "".join(f" {v / t:12.2f}" for v in peers.values() if t))
        if row["precision"] == "auto" or "," in row["precision"]:
            lines.append(f"{'':48s} picked: " + ", ".join(f"{k}={v}" for k, v in row["resolved"].items()))
    for p in result["peers"]:
        t = p["end_to_end"]["median_ms"] if p["end_to_end"] else None
        lines.append(f"{p['name']:48s} {_f(t, '9.0f'):>9s} {'-':>13s} "
                     f"{_f(p.get('image_psnr_db_vs_product_fp32'), '.1f'):>8s}")
    return "\n".join(lines)


def save(result: dict, out_dir) -> Path:
    """``precision-<model>-<time>.json`` under ``out_dir``, written atomically (infinite PSNRs as ``Infinity``)."""
    from .harness import write_json

    path = Path(out_dir) / f"precision-{result['model']['name']}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    return write_json(path, result, indent=1, default=str)


def main(argv=None) -> int:  # pragma: no cover - thin wrapper, the CLI goes through ksampler_rt.bench.cli
    import argparse
    import sys

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--precision", default=",".join(DEFAULT_PRECISIONS))
    args = ap.parse_args(argv)
    res = run(PrecisionBenchConfig(model=args.model, precisions=tuple(split_precisions(args.precision))),
              log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_report(res))
    return 0


def split_precisions(value: str) -> list[str]:
    """``--precision`` of the bench: precisions separated by ``;`` or ``,``, where a per-network spec
    (``unet=bf16,vae=fp32``) is kept whole -- ``fp32,bf16;unet=bf16,vae=fp32`` -> 3 runs."""
    out: list[str] = []
    for group in value.split(";"):
        group = group.strip()
        if not group:
            continue
        if "=" in group:
            out.append(group)
        else:
            out.extend(p.strip() for p in group.split(",") if p.strip())
    if not out:
        raise ValueError(f"--precision: received {value!r}, expected e.g. fp32,bf16,auto or 'fp32;unet=bf16,vae=fp32'")
    return out


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
