"""``ksampler-rt bench --controlnet``: the per-step cost of one ControlNet (ControlNet + residual-taking UNet)
beside the plain step, ksampler-rt against diffusers on the same weights, in one run.

Four systems, one job of each per round (interleaved, as the harness):

* (a) ksampler-rt, plain: ``KSamplerAdvanced`` on the export's ``unet`` engine;
* (b) ksampler-rt + ControlNet: ``ControlNetApplyAdvanced`` (strength 1, window 0..1) on both conditionings, so
  every step runs the ControlNet engine and the export's ``unet_control`` engine;
* (c) diffusers ``StableDiffusionPipeline`` and (d) ``StableDiffusionControlNetPipeline``, PyTorch eager, on the
  diffusers folders the exports were made from (``controlnet_conditioning_scale`` 1, guidance 0..1).

The same work on every side: fp32, the same threads (engines' intra-op threads = ``torch.set_num_threads``,
torch's OpenMP passive as the harness sets it), the same prompt embeddings (ksampler-rt's CLIP output for the
prompt and the negative, given to diffusers as ``prompt_embeds``), the same initial latent, the same hint image,
ksampler-rt's sigma list (``calculate_sigmas``) given to diffusers' ``EulerDiscreteScheduler(sigmas=...)``, Euler
on both sides, the same CFG (> 1: cond and uncond in one batch-2 call on both sides). No text encoding and no
VAE are timed: a job is the sampling call alone (ours: the ControlNet node plus ``ksampler_advanced``; diffusers:
the pipeline call with ``output_type="latent"``, which includes its image preparation), and its per-step cost
is the job's wall time / steps; the steady per-step cost (between progress callbacks, first step excluded) is
reported beside it. The final latents of the last timed jobs are compared (relative L2, (a) vs (c), (b) vs (d)):
the same arithmetic as tests/workflow/test_controlnet_engines.py, which checks it to 1e-4.

The default scheduler is ``simple`` (sigmas taken from the model's table): then both sides also give the UNet the
same timesteps. With ``normal`` the sigmas fall between table entries; ComfyUI (``ModelSamplingDiscrete.timestep``,
comfy/model_sampling.py) feeds the UNet the nearest table index while diffusers' ``EulerDiscreteScheduler``
(``_sigma_to_t``) interpolates it, a real difference of the two systems that grows to rel L2 ~3e-3 over 20 steps
of the tiny model (measured), unrelated to the engines; the timing is the same either way.
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

from .harness import (BenchError, CallTimer, environment, interleave, rel_l2, require_positive, require_size,
                      resolve_backends, set_torch_thread_policy, summary, time_method)

DEFAULT_BACKENDS = ("onnxruntime-cpu",)


@dataclass
class ControlBenchConfig:
    model: str = "tiny"
    backends: tuple[str, ...] | None = None       # None = DEFAULT_BACKENDS
    width: int | None = None                      # None = the model's default size
    height: int | None = None
    steps: int = 20
    sampler: str = "euler"                        # diffusers' EulerDiscreteScheduler is the peer's sampler
    scheduler: str = "simple"                     # table sigmas: the same timesteps on both sides (see above)
    cfg: float = 7.5
    strength: float = 1.0
    seed: int = 42
    prompt: str = "a red apple on a wooden table"
    negative: str = "blurry"
    repeats: int = 5                              # warm interleaved jobs per system
    threads: int | None = None                    # engines' intra-op threads = torch threads; None = usable cores
    out: str = "bench-results"
    quick: bool = False

    @classmethod
    def quick_config(cls, **overrides) -> "ControlBenchConfig":
        base = dict(steps=10, repeats=3, width=128, height=128, quick=True)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


def validate(cfg: ControlBenchConfig) -> None:
    require_positive(cfg, ("steps", "repeats"))
    if cfg.steps < 2:
        raise BenchError(f"--steps: received {cfg.steps}, expected at least 2")
    if cfg.sampler != "euler":
        raise BenchError(f"--sampler: received {cfg.sampler!r}, expected euler (diffusers' EulerDiscreteScheduler "
                         f"is the peer's sampler)")
    if not cfg.cfg > 1:
        raise BenchError(f"--cfg: received {cfg.cfg}, expected a value > 1 (cond and uncond both run)")
    require_size(cfg, 8)


@dataclass
class Inputs:
    """What every system gets: prompt embeddings, the initial latent (x0 = noise * sigma_max), the hint."""
    pos: np.ndarray
    neg: np.ndarray
    x0: np.ndarray
    hint: np.ndarray          # IMAGE [1, H, W, 3] in [0, 1]
    sigmas: np.ndarray
    latent_scale: float


# ---------------------------------------------------------------------------------------------
# ksampler-rt


class OursRunner:
    """One ksampler-rt system on a loaded checkpoint: plain, or with the ControlNet engine applied."""

    def __init__(self, ckpt, net, backend: str, cfg: ControlBenchConfig, inputs: Inputs, control: bool):
        self.ckpt, self.net, self.backend, self.cfg, self.inputs, self.control = ckpt, net, backend, cfg, inputs, control
        self.name = f"ksampler-rt {backend}" + (" + ControlNet" if control else "")
        self.key = "ours_controlnet" if control else "ours_plain"

    def _timers(self) -> dict[str, CallTimer]:
        timers = {"unet": CallTimer(self.ckpt.engines.unet)}
        if self.control:
            timers["controlnet"] = CallTimer(self.net.engines.controlnet)
            # the residual-taking UNet engine, loaded by the first controlled call (as the engines test reads it)
            engines = getattr(self.ckpt.model.control_unet, "_engines", None)
            if engines is not None:
                timers["unet"] = CallTimer(engines.unet_control)
        return timers

    def job(self, record: dict) -> np.ndarray:
        from ..runtime import ksampler_advanced
        from ..workflow.controlnet_nodes import controlnet_apply_advanced

        c, i = self.cfg, self.inputs
        marks: list[float] = []
        timers = self._timers()
        for t in timers.values():
            t.__enter__()
        try:
            t0 = time.perf_counter()
            pos, neg = [[i.pos, {}]], [[i.neg, {}]]
            if self.control:
                pos, neg = controlnet_apply_advanced(None, "bench", pos, neg, self.net, i.hint, c.strength, 0.0, 1.0)
            # the latent is given already noised (add_noise disable), in LATENT space (process_in multiplies)
            out = ksampler_advanced(self.ckpt.model, "disable", 0, c.steps, c.cfg, c.sampler, c.scheduler, pos, neg,
                                    {"samples": i.x0 / np.float32(i.latent_scale)}, 0, 10000, "disable",
                                    callback=lambda *a: marks.append(time.perf_counter()))
            t1 = time.perf_counter()
        finally:
            for t in timers.values():
                t.__exit__()
        latent = out["samples"] * np.float32(i.latent_scale)
        record.update(sampling_s=t1 - t0, marks=marks, latent=latent,
                      calls={k: [b - a for a, b in t.calls] for k, t in timers.items()})
        return latent


def _load_ours(model, backend: str, cfg: ControlBenchConfig):
    from ..engines import LoadOptions, load_engines
    from ..workflow.checkpoint import load_checkpoint
    from ..workflow.control_engines import EngineControl

    opts = LoadOptions(threads=cfg.threads, precision="fp32")
    t0 = time.perf_counter()
    ckpt = load_checkpoint(model.export_dir, backend, log=None, options=opts)
    manifest = json.loads((Path(model.controlnet_export) / "manifest.json").read_text())
    net = EngineControl(load_engines(model.controlnet_export, backend=backend, log=None, options=opts), manifest)
    return ckpt, net, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# diffusers


class DiffusersRunner:
    """diffusers' SD pipeline (plain or ControlNet) on the source folders, components only (no VAE / CLIP)."""

    def __init__(self, unet, controlnet, scheduler_config: dict, cfg: ControlBenchConfig, inputs: Inputs,
                 calls: dict[str, list]):
        from diffusers import EulerDiscreteScheduler, StableDiffusionControlNetPipeline, StableDiffusionPipeline

        self.cfg, self.inputs, self.control = cfg, inputs, controlnet is not None
        scheduler = EulerDiscreteScheduler.from_config(scheduler_config)
        common = dict(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if self.control:
            self.pipe = StableDiffusionControlNetPipeline(controlnet=controlnet, **common)
        else:
            self.pipe = StableDiffusionPipeline(**common)
        self.pipe.set_progress_bar_config(disable=True)
        self.name = f"diffusers torch eager ({type(self.pipe).__name__})"
        self.key = "diffusers_controlnet" if self.control else "diffusers_plain"
        # diffusers 0.42's EulerDiscreteScheduler takes custom sigmas with the final 0 (len - 1 steps)
        self.sigmas = [float(s) for s in inputs.sigmas]
        probe = EulerDiscreteScheduler.from_config(scheduler_config)
        probe.set_timesteps(sigmas=self.sigmas)
        self.init_noise_sigma = float(probe.init_noise_sigma)  # prepare_latents multiplies by it
        self._calls = calls  # {"unet": [(start, end)], "controlnet": [...]}, shared by the runners (_instrument)

    def job(self, record: dict) -> np.ndarray:
        import torch

        c, i = self.cfg, self.inputs
        marks: list[float] = []

        def on_step(_pipe, _i, _t, kwargs):
            marks.append(time.perf_counter())
            return {}

        kw = dict(prompt_embeds=torch.from_numpy(i.pos), negative_prompt_embeds=torch.from_numpy(i.neg),
                  height=c.height, width=c.width, sigmas=self.sigmas,
                  guidance_scale=c.cfg, latents=torch.from_numpy(i.x0) / self.init_noise_sigma,
                  output_type="latent", callback_on_step_end=on_step)
        if self.control:
            kw.update(image=torch.from_numpy(np.moveaxis(i.hint, -1, 1).copy()),
                      controlnet_conditioning_scale=c.strength, control_guidance_start=0.0, control_guidance_end=1.0)
        self._calls.clear()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.pipe(**kw)
        t1 = time.perf_counter()
        latent = out.images.float().numpy()
        record.update(sampling_s=t1 - t0, marks=marks, latent=latent,
                      calls={k: [b - a for a, b in v if a >= t0] for k, v in self._calls.items()})
        return latent

    def release(self) -> None:
        self.pipe = None


def _load_diffusers(model, cfg: ControlBenchConfig, inputs: Inputs) -> tuple[list, float]:
    from diffusers import ControlNetModel, UNet2DConditionModel

    t0 = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(model.source_dir / "unet", local_files_only=True).eval()
    net = ControlNetModel.from_pretrained(model.controlnet_dir, local_files_only=True).eval()
    with open(model.source_dir / "scheduler" / "scheduler_config.json") as f:
        sched = json.load(f)
    calls: dict[str, list] = {}
    for module, key in ((unet, "unet"), (net, "controlnet")):  # the UNet is shared by both pipelines: wrapped once
        time_method(module, "forward", lambda t0, t1, key=key: calls.setdefault(key, []).append((t0, t1)))
    runners = [DiffusersRunner(unet, None, sched, cfg, inputs, calls),
               DiffusersRunner(unet, net, sched, cfg, inputs, calls)]
    return runners, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# the run


def _inputs(ckpt, manifest: dict, cfg: ControlBenchConfig) -> Inputs:
    from ..runtime import calculate_sigmas

    sigmas = np.asarray(calculate_sigmas(ckpt.model, cfg.scheduler, cfg.steps, cfg.sampler), np.float32)
    pos, neg = ckpt.clip.encode(cfg.prompt)[0][0], ckpt.clip.encode(cfg.negative)[0][0]
    rng = np.random.default_rng(cfg.seed)
    noise = rng.standard_normal((1, 4, cfg.height // 8, cfg.width // 8)).astype(np.float32)
    hint = rng.random((1, cfg.height, cfg.width, 3)).astype(np.float32)
    return Inputs(np.ascontiguousarray(pos, np.float32), np.ascontiguousarray(neg, np.float32),
                  noise * sigmas[0], hint, sigmas, float(manifest.get("latent_scale", 0.18215)))


def _stats(records: list[dict], steps: int) -> dict:
    steady = [b - a for r in records for a, b in zip(r["marks"][1:-1], r["marks"][2:])] or \
             [b - a for r in records for a, b in zip(r["marks"][:-1], r["marks"][1:])]
    out = {"per_step": summary([r["sampling_s"] / steps for r in records]),
           "steady_step": summary(steady), "job": summary([r["sampling_s"] for r in records]),
           # the sampling call's time outside the network calls (sampler maths, CFG, ControlNet plumbing, Python)
           "host_per_step": summary([max(0.0, r["sampling_s"] - sum(sum(c) for c in r["calls"].values())) / steps
                                     for r in records])}
    for key in sorted({k for r in records for k in r["calls"]}):
        calls = [t for r in records for t in r["calls"].get(key, [])]
        if calls:
            out[f"{key}_call"] = summary(calls)
            out[f"{key}_calls_per_step"] = len(calls) / (len(records) * steps)
    return out


def _ratios(rows: dict) -> dict:
    med = {k: v["per_step"]["median_ms"] for k, v in rows.items()}
    return {"ours_controlnet_overhead": med["ours_controlnet"] / med["ours_plain"],
            "diffusers_controlnet_overhead": med["diffusers_controlnet"] / med["diffusers_plain"],
            "plain_speedup_vs_diffusers": med["diffusers_plain"] / med["ours_plain"],
            "controlnet_speedup_vs_diffusers": med["diffusers_controlnet"] / med["ours_controlnet"]}


def run(cfg: ControlBenchConfig, log: Callable[[str], None] = print) -> dict:
    from .models import resolve_control_model

    policy = set_torch_thread_policy()  # before torch is imported
    validate(cfg)
    backends = resolve_backends(list(cfg.backends or DEFAULT_BACKENDS))
    model = resolve_control_model(cfg.model, log=log)
    cfg.width, cfg.height = cfg.width or model.default_size, cfg.height or model.default_size
    validate(cfg)
    manifest = json.loads((Path(model.export_dir) / "manifest.json").read_text())
    env = environment(backends, cfg, manifest)
    env.update(torch_thread_policy=policy, precision="fp32", cpu_flags=env["cpu"].get("isa", "").split(","))
    result: dict = {"kind": "controlnet", "config": dataclasses.asdict(cfg),
                    "model": {"name": model.name, "family": "sd15", "note": model.note,
                              "export_dir": str(model.export_dir), "controlnet_export": str(model.controlnet_export),
                              "source_dir": str(model.source_dir), "controlnet_dir": str(model.controlnet_dir)},
                    "environment": env, "backends": []}
    t_run = time.perf_counter()
    for backend in backends:
        result["backends"].append(_measure_backend(model, manifest, backend, cfg, log))
    env["loadavg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    result["wall_s"] = time.perf_counter() - t_run
    return result


def _measure_backend(model, manifest: dict, backend: str, cfg: ControlBenchConfig, log) -> dict:
    """The four systems for one backend: loaded, one cold job each, then ``repeats`` interleaved rounds."""
    import torch

    from .harness import _default_threads

    threads = cfg.threads or _default_threads()
    torch.set_num_threads(threads)
    log(f"loading ksampler-rt {backend} (checkpoint + ControlNet engines) ...")
    ckpt, net, load_s = _load_ours(model, backend, cfg)
    try:
        inputs = _inputs(ckpt, manifest, cfg)
        systems = [OursRunner(ckpt, net, backend, cfg, inputs, False), OursRunner(ckpt, net, backend, cfg, inputs, True)]
        log("loading diffusers' pipelines ...")
        peers, peer_load_s = _load_diffusers(model, cfg, inputs)
        systems += peers
        cold = {}
        for s in systems:
            rec: dict = {}
            s.job(rec)  # cold: engine builds / the residual-taking UNet's first load, torch's first call
            cold[s.key] = rec["sampling_s"]
        log(f"{cfg.repeats} interleaved warm jobs each: " + ", ".join(s.name for s in systems))
        records = interleave(systems, cfg.repeats, key=lambda s: s.key)
    finally:
        net.release()
        ckpt.release()
    rows = {s.key: {"name": s.name, "cold_job_s": cold[s.key], **_stats(records[s.key], cfg.steps)} for s in systems}
    last = {k: v[-1]["latent"] for k, v in records.items()}
    return {"backend": backend, "threads": threads, "torch_threads": torch.get_num_threads(),
            "load_s": {"ours": load_s, "diffusers": peer_load_s}, "rows": rows, "ratios": _ratios(rows),
            "latent_rel_l2": {"plain": rel_l2(last["ours_plain"], last["diffusers_plain"]),
                              "controlnet": rel_l2(last["ours_controlnet"], last["diffusers_controlnet"]),
                              "controlnet_effect": rel_l2(last["ours_controlnet"], last["ours_plain"])}}


# ---------------------------------------------------------------------------------------------
# reporting

ROW_LABELS = {"ours_plain": "(a)", "ours_controlnet": "(b)", "diffusers_plain": "(c)", "diffusers_controlnet": "(d)"}


def _call(row: dict, key: str) -> str:
    c = row.get(f"{key}_call")
    return "-" if c is None else f"{c['median_ms']:.2f}"


def format_report(result: dict) -> str:
    cfg, env, m = result["config"], result["environment"], result["model"]
    lines = [f"model {m['name']} ({m['note']})",
             f"{cfg['width']}x{cfg['height']}, {cfg['steps']} steps {cfg['sampler']}/{cfg['scheduler']}, cfg "
             f"{cfg['cfg']}, ControlNet strength {cfg['strength']}, fp32, {env['threads']} threads (torch too); "
             f"CPU {env['cpu'].get('cpu')} [{env['cpu'].get('isa') or 'no AVX flags'}]"]
    for b in result["backends"]:
        lines += ["", f"{'system':<62} {'step ms':>8} {'steady ms':>9} {'UNet ms':>8} {'CN ms':>7} {'host ms':>8} {'cold s':>7}"]
        for key, label in ROW_LABELS.items():
            r = b["rows"][key]
            lines.append(f"{label} {r['name']:<58} {r['per_step']['median_ms']:>8.2f} "
                         f"{r['steady_step']['median_ms']:>9.2f} {_call(r, 'unet'):>8} {_call(r, 'controlnet'):>7} "
                         f"{r['host_per_step']['median_ms']:>8.2f} {r['cold_job_s']:>7.2f}")
        q, e = b["ratios"], b["latent_rel_l2"]
        lines += [f"ControlNet overhead per step: ksampler-rt b/a = {q['ours_controlnet_overhead']:.2f}x, "
                  f"diffusers d/c = {q['diffusers_controlnet_overhead']:.2f}x",
                  f"ksampler-rt vs diffusers per step (> 1 = ksampler-rt faster): plain c/a = "
                  f"{q['plain_speedup_vs_diffusers']:.2f}x, ControlNet d/b = {q['controlnet_speedup_vs_diffusers']:.2f}x",
                  f"latents rel L2 (last timed jobs): plain a vs c {e['plain']:.2e}, ControlNet b vs d "
                  f"{e['controlnet']:.2e} (ControlNet effect b vs a {e['controlnet_effect']:.2e})"]
    if cfg["scheduler"] != "simple":
        lines.append(f"note: with --scheduler {cfg['scheduler']} ComfyUI rounds each sigma's timestep to the table, "
                     f"diffusers interpolates it: the latents differ by that, not by the engines")
    lines.append(f"\nmedians of {cfg['repeats']} interleaved warm jobs (sampling only: no text encoding, no VAE); "
                 f"load average at start {env.get('loadavg_at_start')}, at end {env.get('loadavg_at_end')}; run took "
                 f"{result.get('wall_s', 0):.0f} s")
    return "\n".join(lines)


def save(result: dict, out_dir) -> Path:
    """``bench-controlnet-<model>-<time>.json`` under ``out_dir``, written atomically, without arrays (latents
    stay in memory only)."""
    from .harness import write_json

    path = Path(out_dir) / f"bench-controlnet-{result['model']['name']}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    return write_json(path, result, default=lambda o: None if isinstance(o, np.ndarray) else str(o))
