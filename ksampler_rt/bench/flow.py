"""``ksampler-rt bench --model tiny-flux`` (``tiny-flux-schnell``, ``tiny-sd3``, an SD3 / FLUX.1 export): ksampler-rt
on its engines against diffusers' ``FluxPipeline`` / ``StableDiffusion3Pipeline`` on the same weights, in one run.

The same work on both sides (method: docs/benchmarks.md, "SD3 and FLUX.1"): same weights, fp32, same threads;
the same text encoding (diffusers' ``max_sequence_length`` = the T5 token count of ksampler-rt's ComfyUI
tokenisation, ``comfy/text_encoders/flux.py`` / ``sd3_clip.py`` ``min_length``); SD3 at cfg 4.5 with the
negative prompt, FLUX.1 at cfg 1 (no negative pass on either side: ComfyUI's cfg-1 optimisation, diffusers'
``true_cfg_scale`` 1) with dev's distilled guidance 3.5; ksampler-rt's sigma list (``calculate_sigmas`` with
ComfyUI's ``ModelSamplingFlux`` / ``ModelSamplingDiscreteFlow`` shift) given to diffusers'
``FlowMatchEulerDiscreteScheduler`` with its own shifting off, Euler on both sides; the same initial noise
(ComfyUI's ``prepare_noise`` is ``torch.randn`` on a seeded CPU generator, as diffusers' ``randn_tensor``).
Checked in the run: the final latents of the timed jobs (diffusers' from its last step callback, unpacked and
put in VAE space as its decode does) and the images, relative L2.

Timed, interleaved (one job of each system per round, as the harness): end to end (text encode + sampling +
VAE decode), per step (the sampling loop's wall time / steps), the transformer call, the host time per step
outside it, text encode and VAE decode; medians of ``repeats`` warm jobs after one cold job each.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .harness import (BenchError, CallTimer, environment, interleave, load_checkpoint_timed, rel_l2, require_positive,
                      require_size, resolve_backends, set_torch_thread_policy, summary, time_method)

DEFAULT_BACKENDS = ("onnxruntime-cpu", "openvino-cpu")
#: cfg per family: FLUX.1 is guidance-distilled (cfg 1, ComfyUI's example graphs); SD3.5's example uses 4.5
DEFAULT_CFG = {"flux": 1.0, "flux-schnell": 1.0, "sd3": 4.5}
FLUX_GUIDANCE = 3.5


@dataclass
class FlowBenchConfig:
    model: str = "tiny-flux"
    backends: tuple[str, ...] | None = None       # None = those of DEFAULT_BACKENDS usable here
    width: int | None = None                      # None = the model's default size
    height: int | None = None
    steps: int = 20
    sampler: str = "euler"
    scheduler: str = "simple"
    cfg: float | None = None                      # None = the family's default (DEFAULT_CFG)
    guidance: float = FLUX_GUIDANCE               # FLUX.1 dev only
    seed: int = 42
    prompt: str = "a red apple on a wooden table"
    negative: str = "blurry"
    repeats: int = 5                              # warm interleaved jobs per system
    threads: int | None = None                    # engines' intra-op threads = torch threads; None = usable cores
    peers: tuple[str, ...] = ("diffusers",)
    out: str = "bench-results"
    quick: bool = False

    @classmethod
    def quick_config(cls, **overrides) -> "FlowBenchConfig":
        base = dict(steps=4, repeats=3, width=128, height=128, quick=True)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


def validate(cfg: FlowBenchConfig) -> None:
    require_positive(cfg, ("steps", "repeats"))
    require_size(cfg, 16, "FLUX.1 / SD3 pack 2x2 latent patches of the 1/8 latent")
    unknown = [p for p in cfg.peers if p != "diffusers"]
    if unknown:
        raise BenchError(f"--peers: received {', '.join(unknown)}, expected diffusers or none for an SD3 / FLUX.1 "
                         f"model")
    if cfg.peers and cfg.sampler != "euler":
        raise BenchError(f"--sampler: received {cfg.sampler!r}, expected euler (diffusers' "
                         f"FlowMatchEulerDiscreteScheduler is the peer); or pass --peers none")


# ---------------------------------------------------------------------------------------------
# the two sides


class FlowRunner:
    """ksampler-rt on one backend: CheckpointLoaderSimple -> CLIPTextEncode -> KSampler -> VAEDecode."""

    def __init__(self, export_dir, backend: str, cfg: FlowBenchConfig, family: str):
        self.export_dir, self.backend, self.cfg, self.family = export_dir, backend, cfg, family
        self.name = f"ksampler-rt {backend}"
        self.ckpt = None
        self.timer: CallTimer | None = None

    def load(self) -> dict:
        from ..engines import LoadOptions

        # a first build / cache verification, timed apart from the load (as the harness)
        self.ckpt, prepare_s, load_s = load_checkpoint_timed(
            self.export_dir, self.backend, options=LoadOptions(threads=self.cfg.threads, precision="fp32"))
        self.timer = CallTimer(self.ckpt.engines.transformer)
        return {"load_s": load_s, "first_prepare_s": prepare_s}

    def _conditioning(self, text: str) -> list:
        cond = self.ckpt.clip.encode(text)
        if self.family == "flux":  # FluxGuidance, explicit rather than the runtime's default
            cond = [(c, dict(opts, guidance=self.cfg.guidance)) for c, opts in cond]
        return cond

    def job(self, record: dict) -> np.ndarray:
        from ..runtime import ksampler

        c, ck = self.cfg, self.ckpt
        self.timer.calls.clear()
        t0 = time.perf_counter()
        pos = self._conditioning(c.prompt)
        # cfg 1 never evaluates the negative (ComfyUI's cfg-1 optimisation): not encoded, as diffusers does not
        neg = pos if np.isclose(c.cfg, 1.0) else self._conditioning(c.negative)
        t1 = time.perf_counter()
        latent = {"samples": np.zeros((1, ck.model.latent_channels, c.height // 8, c.width // 8), np.float32)}
        with self.timer:
            out = ksampler(ck.model, c.seed, c.steps, c.cfg, c.sampler, c.scheduler, pos, neg, latent)
        t2 = time.perf_counter()
        image = ck.vae.decode(out["samples"])
        t3 = time.perf_counter()
        record.update(text_s=t1 - t0, sampling_s=t2 - t1, decode_s=t3 - t2, total_s=t3 - t0,
                      model_calls=[b - a for a, b in self.timer.calls], latent=out["samples"], image=image,
                      context_tokens=int(pos[0][0].shape[1]))
        return image

    def release(self) -> None:
        if self.ckpt is not None:
            self.ckpt.release()
            self.ckpt = None


class DiffusersFlowPeer:
    """diffusers' FluxPipeline / StableDiffusion3Pipeline on the export's source folder, ksampler-rt's sigmas."""

    def __init__(self, source_dir, cfg: FlowBenchConfig, family: str, sigmas, t5_tokens: int):
        self.source_dir, self.cfg, self.family = Path(source_dir), cfg, family
        self.sigmas = [float(s) for s in sigmas[:-1]]  # the scheduler appends the final 0
        self.t5_tokens = int(t5_tokens)
        self.name = "diffusers torch eager"
        self.pipe = None
        self._marks: dict = {}
        self.cold: dict = {}

    def load(self, threads: int) -> dict:
        import torch
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        cls = StableDiffusion3Pipeline if self.family == "sd3" else FluxPipeline
        pipe = cls.from_pretrained(str(self.source_dir), local_files_only=True)
        # the sigmas given are used as they are (ComfyUI's shift is already in them)
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config,
                                                                     use_dynamic_shifting=False, shift=1.0)
        pipe.set_progress_bar_config(disable=True)
        self.name = f"diffusers torch eager ({cls.__name__})"
        self._instrument(pipe)
        self.pipe = pipe
        return {"load_s": time.perf_counter() - t0, "torch_threads": torch.get_num_threads()}

    def _instrument(self, pipe) -> None:
        """Times the text encoding, every transformer call and the VAE decode inside the pipeline's own call."""
        marks = self._marks
        for obj, attr, key in ((pipe, "encode_prompt", "text"), (pipe.transformer, "forward", "model"),
                               (pipe.vae, "decode", "decode")):
            time_method(obj, attr, lambda t0, t1, key=key: marks.setdefault(key, []).append((t0, t1)))

    def job(self, record: dict) -> np.ndarray:
        import torch

        c, pipe, marks = self.cfg, self.pipe, self._marks
        marks.clear()
        last: dict = {}

        def on_step(_pipe, i, _t, kwargs):
            last["step_end"] = time.perf_counter()
            if i == len(self.sigmas) - 1:
                last["latents"] = kwargs["latents"].detach().clone()
            return {}

        kw = dict(negative_prompt=c.negative, guidance_scale=c.cfg) if self.family == "sd3" else \
            dict(guidance_scale=c.guidance if self.family == "flux" else 0.0)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = pipe(c.prompt, height=c.height, width=c.width, num_inference_steps=len(self.sigmas),
                       sigmas=self.sigmas, max_sequence_length=self.t5_tokens,
                       generator=torch.Generator().manual_seed(c.seed), output_type="np",
                       callback_on_step_end=on_step, **kw)
        t3 = time.perf_counter()
        text = sum(b - a for a, b in marks["text"])
        t1 = marks["text"][-1][1]
        t2 = last["step_end"]
        record.update(text_s=text, sampling_s=t2 - t1, decode_s=sum(b - a for a, b in marks["decode"]),
                      total_s=t3 - t0, model_calls=[b - a for a, b in marks["model"]],
                      latent=self._vae_space(last["latents"]), image=out.images.astype(np.float32))
        return out.images

    def _vae_space(self, latents) -> np.ndarray:
        """The pipeline's final latents as its decode sees them: unpacked (FLUX.1), / scale + shift."""
        pipe, c = self.pipe, self.cfg
        if self.family != "sd3":
            latents = pipe._unpack_latents(latents, c.height, c.width, pipe.vae_scale_factor)
        vc = pipe.vae.config
        return (latents / vc.scaling_factor + vc.shift_factor).float().numpy()

    def release(self) -> None:
        self.pipe = None


# ---------------------------------------------------------------------------------------------
# the run


def _stats(records: list[dict], steps: int) -> dict:
    calls = [t for r in records for t in r["model_calls"]]
    return {"end_to_end": summary([r["total_s"] for r in records]),
            "per_step": summary([r["sampling_s"] / steps for r in records]),
            # the sampling loop's time outside the transformer calls (sampler maths, CFG, copies, Python)
            "host_per_step": summary([max(0.0, r["sampling_s"] - sum(r["model_calls"])) / steps for r in records]),
            "model_call": summary(calls),
            "model_calls_per_step": len(calls) / (len(records) * steps),
            "text_encode": summary([r["text_s"] for r in records]),
            "vae_decode": summary([r["decode_s"] for r in records])}


def run(cfg: FlowBenchConfig, log: Callable[[str], None] = print) -> dict:
    from .models import resolve_model

    policy = set_torch_thread_policy()
    validate(cfg)
    backends = resolve_backends(list(cfg.backends or _default_backends()))
    model = resolve_model(cfg.model, log=log)
    if model.family not in DEFAULT_CFG:
        raise BenchError(f"--model: received {cfg.model} of family {model.family!r}, expected an SD3 / FLUX.1 model")
    cfg.width, cfg.height = cfg.width or model.default_size, cfg.height or model.default_size
    cfg.cfg = DEFAULT_CFG[model.family] if cfg.cfg is None else float(cfg.cfg)
    validate(cfg)
    manifest = json.loads((Path(model.export_dir) / "manifest.json").read_text())
    env = environment(backends, cfg, manifest)
    env.update(torch_thread_policy=policy, precision="fp32",
               shapes={"image": [cfg.height, cfg.width], "latent": [manifest.get("latent_channels", 16),
                                                                    cfg.height // 8, cfg.width // 8]})
    result: dict = {"kind": "flow", "config": dataclasses.asdict(cfg),
                    "model": {"name": model.name, "family": model.family, "export_dir": str(model.export_dir),
                              "source_dir": str(model.source_dir or ""), "note": model.note},
                    "environment": env, "products": [], "peers": [], "comparison": []}
    t_run = time.perf_counter()
    systems: list = []
    try:
        _measure(model, cfg, backends, systems, result, log)
    finally:
        for s in systems:
            s.release()
    env["loadavg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    result["wall_s"] = time.perf_counter() - t_run
    return result


def _measure(model, cfg: FlowBenchConfig, backends: list[str], systems: list, result: dict, log) -> None:
    """Loads every system into ``systems`` (the caller releases them), one cold job each, then the interleaved
    warm jobs; fills ``result``."""
    colds, tokens = {}, 0
    for backend in backends:
        r = FlowRunner(model.export_dir, backend, cfg, model.family)
        log(f"loading {r.name} ...")
        systems.append(r)
        colds[r.name] = r.load()
        rec: dict = {}
        t0 = time.perf_counter()
        r.job(rec)
        colds[r.name]["first_job_s"] = time.perf_counter() - t0
        tokens = rec["context_tokens"]
    peer = None
    if cfg.peers and model.source_dir is None:
        result["peers"].append({"name": "diffusers", "available": False,
                                "why": "no diffusers folder for this model (the export's source)"})
    elif cfg.peers:
        peer = _load_peer(model, cfg, systems[0], tokens, log)
        systems.append(peer)
        colds[peer.name] = peer.cold
    log(f"{cfg.repeats} interleaved warm jobs each: " + ", ".join(s.name for s in systems))
    records = interleave(systems, cfg.repeats)
    stats = {s.name: _stats(records[s.name], cfg.steps) for s in systems}
    for r in systems[:len(backends)]:
        result["products"].append({"name": r.name, "backend": r.backend, "cold": colds[r.name],
                                   "context_tokens": tokens, **stats[r.name]})
    if peer is not None:
        result["peers"].append({"name": peer.name, "available": True, "cold": colds[peer.name], **stats[peer.name]})
        result["comparison"] = [_compare(r.name, peer.name, stats, records) for r in systems[:len(backends)]]


def _default_backends() -> list[str]:
    from ..engines import available_backends

    avail = available_backends()
    usable = [b for b in DEFAULT_BACKENDS if avail.get(b) is None]
    if not usable:
        raise BenchError(f"--backend: none of the default backends is usable here "
                         f"({'; '.join(f'{b}: {avail.get(b)}' for b in DEFAULT_BACKENDS)}); name one with --backend")
    return usable


def _load_peer(model, cfg: FlowBenchConfig, first: FlowRunner, tokens: int, log) -> DiffusersFlowPeer:
    from ..runtime import calculate_sigmas
    from .harness import _default_threads

    sigmas = calculate_sigmas(first.ckpt.model, cfg.scheduler, cfg.steps, cfg.sampler)
    t5_tokens = tokens - 77 if model.family == "sd3" else tokens  # SD3's context: CLIP-L||CLIP-G (77) then T5
    peer = DiffusersFlowPeer(model.source_dir, cfg, model.family, sigmas, t5_tokens)
    log(f"loading {peer.name} ...")
    peer.cold = peer.load(cfg.threads or _default_threads())
    t0 = time.perf_counter()
    peer.job({})
    peer.cold.update(first_job_s=time.perf_counter() - t0, sigmas=[float(s) for s in sigmas])
    return peer


def _compare(mine: str, theirs: str, stats: dict, records: dict) -> dict:
    """Ratios of the medians measured side by side (> 1: ksampler-rt faster), and the agreement of the two
    systems' last timed outputs."""
    ratio = {f"{k}_speedup": stats[theirs][k]["median_ms"] / stats[mine][k]["median_ms"]
             for k in ("end_to_end", "per_step", "model_call")}
    a, b = records[mine][-1], records[theirs][-1]
    return {"product": mine, "peer": theirs, **ratio, "latent_rel_l2": rel_l2(a["latent"], b["latent"]),
            "image_rel_l2": rel_l2(a["image"], b["image"], "image"),
            "image_max_abs": float(np.abs(a["image"] - b["image"]).max())}


# ---------------------------------------------------------------------------------------------
# reporting


def format_report(result: dict) -> str:
    cfg, env, m = result["config"], result["environment"], result["model"]
    guide = f", guidance {cfg['guidance']}" if m["family"] == "flux" else ""
    lines = [f"model {m['name']} ({m['family']}; {m['note']})",
             f"{cfg['width']}x{cfg['height']}, {cfg['steps']} steps {cfg['sampler']}/{cfg['scheduler']}, "
             f"cfg {cfg['cfg']}{guide}, fp32, {env['threads']} threads (torch too); CPU {env['cpu'].get('cpu')} "
             f"[{env['cpu'].get('isa', '?')}]", "",
             f"{'system':<52} {'e2e ms':>8} {'step ms':>8} {'model ms':>9} {'calls/step':>10} {'text ms':>8} "
             f"{'vae ms':>7} {'host ms/step':>12} {'load s':>7}"]
    for s in result["products"] + [p for p in result["peers"] if p.get("available")]:
        lines.append(f"{s['name']:<52} {s['end_to_end']['median_ms']:>8.1f} {s['per_step']['median_ms']:>8.2f} "
                     f"{s['model_call']['median_ms']:>9.2f} {s['model_calls_per_step']:>10.2f} "
                     f"{s['text_encode']['median_ms']:>8.1f} {s['vae_decode']['median_ms']:>7.1f} "
                     f"{s['host_per_step']['median_ms']:>12.2f} {s['cold']['load_s']:>7.2f}")
    for p in result["peers"]:
        if not p.get("available"):
            lines.append(f"{p['name']:<52} unavailable: {p['why']}")
    if result["comparison"]:
        lines += ["", f"side by side (medians of {cfg['repeats']} interleaved warm jobs; > 1 = ksampler-rt faster),"
                      " and agreement of the timed jobs' outputs:"]
        for c in result["comparison"]:
            lines.append(f"  {c['product']:<30} vs diffusers: end to end {c['end_to_end_speedup']:.2f}x, per step "
                         f"{c['per_step_speedup']:.2f}x, transformer call {c['model_call_speedup']:.2f}x; latent rel "
                         f"L2 {c['latent_rel_l2']:.2e}, image rel L2 {c['image_rel_l2']:.2e}")
    lines.append(f"\nload average at start {env.get('loadavg_at_start')}, at end {env.get('loadavg_at_end')}; "
                 f"run took {result.get('wall_s', 0):.0f} s")
    return "\n".join(lines)


def save(result: dict, out_dir) -> Path:
    """``bench-<model>-<time>.json`` under ``out_dir``, written atomically (the harness' JSON, no chart)."""
    from .harness import save as save_bench

    return Path(save_bench(result, out_dir, chart=False)["json"])
