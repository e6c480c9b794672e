"""``ksampler-rt bench``: the product against diffusers/torch (and its own engine floor) in one run.

Imports neither torch nor the harness at registration time (``ksampler_rt.cli`` contract).
"""
from __future__ import annotations

import sys


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _size(value: str) -> tuple[int, int]:
    try:
        w, _, h = value.lower().partition("x")
        return int(w), int(h or w)
    except ValueError:
        raise ValueError(f"--size: received {value!r}, expected WIDTHxHEIGHT, e.g. 256x256") from None


def _peers(args) -> tuple[str, ...] | None:
    """``--peers``: the named peers (``none``: no peer), None when not given (the bench's default)."""
    return tuple(p for p in _csv(args.peers) if p != "none") if args.peers is not None else None


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench_precision(args) -> int:
    """``--precision``: each precision's speed and quality (ksampler_rt.bench.precision)."""
    from .precision import PrecisionBenchConfig, format_report, run, save, split_precisions

    w, h = _size(args.size) if args.size else (None, None)
    fields = dict(model=args.model, precisions=tuple(split_precisions(args.precision)), width=w, height=h,
                  steps=args.steps, cfg=args.cfg, seed=args.seed, repeats=args.repeats, threads=args.threads,
                  peers=_peers(args), out=args.out)  # None: the config's default (DEFAULT_PEERS)
    if args.backend:
        fields["backends"] = tuple(_csv(args.backend))
    cfg = PrecisionBenchConfig(**{k: v for k, v in fields.items() if v is not None})
    result = run(cfg, log=_log)
    print(format_report(result))
    print(f"\nwrote {save(result, cfg.out)}")
    return 0


def _common_fields(args) -> dict:
    """The options the flow and ControlNet benches share, as their config classes name them (None: default)."""
    w, h = _size(args.size) if args.size else (None, None)
    return dict(model=args.model, backends=tuple(_csv(args.backend)) if args.backend else None, width=w, height=h,
                steps=args.steps, sampler=args.sampler, scheduler=args.scheduler, cfg=args.cfg, seed=args.seed,
                repeats=args.repeats, threads=args.threads, out=args.out)


def _run_bench(module, config_cls, fields: dict, quick: bool) -> int:
    """Build the config (``--quick``: its quick preset), run the module's bench, print the report, save the JSON."""
    cfg = config_cls.quick_config(**fields) if quick else config_cls(**{k: v for k, v in fields.items()
                                                                        if v is not None})
    result = module.run(cfg, log=_log)
    print(module.format_report(result))
    print(f"\nwrote {module.save(result, cfg.out)}")
    return 0


def bench_flow(args) -> int:
    """An SD3 / FLUX.1 model: ksampler-rt against diffusers' pipeline on the same weights (ksampler_rt.bench.flow)."""
    from . import flow

    return _run_bench(flow, flow.FlowBenchConfig, dict(_common_fields(args), peers=_peers(args)), args.quick)


def bench_controlnet(args) -> int:
    """``--controlnet``: the per-step cost of one ControlNet beside the plain step, against diffusers'
    ControlNet pipeline on the same weights (ksampler_rt.bench.controlnet)."""
    from . import controlnet

    return _run_bench(controlnet, controlnet.ControlBenchConfig, _common_fields(args), args.quick)


def bench(args) -> int:
    if getattr(args, "precision", None):
        return bench_precision(args)
    if getattr(args, "controlnet", False):
        return bench_controlnet(args)
    from .models import is_flow_model

    if is_flow_model(args.model):
        return bench_flow(args)
    from .harness import BenchConfig, format_report, run, save

    overrides = dict(
        _common_fields(args), peers=_peers(args),
        batches=tuple(int(b) for b in _csv(args.batches)) if args.batches else None,
        throughput_steps=args.throughput_steps, throughput_repeats=args.throughput_repeats,
        unet_samples=args.unet_samples, stage_repeats=args.stage_repeats,
        percentiles=tuple(float(p) for p in _csv(args.percentiles)) if args.percentiles else None,
        sampler_overhead=not args.no_sampler_overhead, comfyui=args.comfyui, tune_ort=args.tune_ort or None,
        chart=not args.no_chart,
    )
    if args.quick:
        cfg = BenchConfig.quick_config(**overrides)
    else:
        cfg = BenchConfig(**{k: v for k, v in overrides.items() if v is not None})
    result = run(cfg, log=_log)
    print(format_report(result))
    paths = save(result, cfg.out, chart=cfg.chart)
    print(f"\nwrote {paths['json']}" + (f" and {paths['chart']}" if paths.get("chart") else ""))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="latency/throughput of every backend vs diffusers/torch on the same weights",
        description="Measures ksampler-rt per stage (text encoding, UNet per step with percentiles, host overhead "
                    "per step, VAE, end to end, throughput per batch size, cold start, memory) on every available "
                    "backend, and in the same run diffusers' pipeline in PyTorch on the same weights; prints a "
                    "table and writes JSON + a PNG chart under --out.")
    p.add_argument("--model", default="tiny",
                   help="tiny (default), half-sd15 (SD1.5-shaped UNet at half width, built and exported once), "
                        "tiny-flux, tiny-flux-schnell, tiny-sd3 (tiny FLUX.1 / SD3 fixtures: against diffusers' "
                        "FluxPipeline / StableDiffusion3Pipeline, default backends onnxruntime-cpu,openvino-cpu, "
                        "see docs/benchmarks.md), an export directory or a diffusers folder")
    p.add_argument("--backend", default=None,
                   help="comma list of tensorrt, onnxruntime-cuda, onnxruntime-trt, onnxruntime-cpu, openvino-cpu; default: every "
                        "available one")
    p.add_argument("--out", default="bench-results", help="folder for the JSON and the PNG (default ./bench-results)")
    p.add_argument("--quick", action="store_true",
                   help="reduced run (128x128, 10 steps, 3 repeats, p50/p95, eager peer only): < 2 min on 2 CPU "
                        "cores with the tiny model")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT in pixels (default: 256x256 for the built-in models, "
                                                "512 / 1024 for exports)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--sampler", default=None, help="sampler name (default euler; the diffusers peer needs euler)")
    p.add_argument("--scheduler", default=None, help="scheduler name (default normal)")
    p.add_argument("--cfg", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batches", default=None, help="batch sizes for throughput (default 1,2,4,8)")
    p.add_argument("--throughput-steps", type=int, default=None, help="steps per throughput job (default --steps)")
    p.add_argument("--throughput-repeats", type=int, default=None, help="timed jobs per batch size (default 3)")
    p.add_argument("--repeats", type=int, default=None, help="warm end-to-end jobs per system, interleaved")
    p.add_argument("--unet-samples", type=int, default=None,
                   help="sampling steps timed for the UNet per-step distribution (p99 needs >= 100)")
    p.add_argument("--stage-repeats", type=int, default=None, help="repetitions of text encoding / VAE")
    p.add_argument("--percentiles", default=None, help="default 50,95,99 (50,95 with --quick)")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime intra-op threads, also torch.set_num_threads for the peers (default: cores)")
    p.add_argument("--peers", default=None,
                   help="comma list of diffusers, diffusers-compile, or none (default both; --quick: diffusers)")
    p.add_argument("--no-sampler-overhead", action="store_true", help="skip the sampler overhead table")
    p.add_argument("--comfyui", default=None,
                   help="ComfyUI checkout: its k-diffusion torch samplers are the sampler table's peer")
    p.add_argument("--tune-ort", action="store_true",
                   help="also time the UNet under ONNX Runtime CPU session variants (optimisation level, threads, "
                        "spinning, transformer fusions), interleaved")
    p.add_argument("--no-chart", action="store_true", help="do not write the PNG")
    p.add_argument("--precision", default=None,
                   help="precision benchmark instead: comma list of precisions (fp32, bf16, fp16, int8, auto; a "
                        "per-network spec such as unet=bf16,vae=fp32 after a ';'), each run end to end on the CPU "
                        "backends (default openvino-cpu, onnxruntime-cpu) with its latent relative L2 and image "
                        "PSNR against the fp32 run of the same seed, beside diffusers eager fp32 and torch bf16 "
                        "autocast (--peers diffusers,diffusers-bf16)")
    p.add_argument("--controlnet", action="store_true",
                   help="ControlNet benchmark instead (--model tiny or half-sd15; default backend onnxruntime-cpu): "
                        "per-step ms of ksampler-rt plain and with one ControlNet (ControlNet engine + the "
                        "residual-taking UNet) beside diffusers' StableDiffusionPipeline and "
                        "StableDiffusionControlNetPipeline on the same weights and sigmas, interleaved, with the "
                        "latents' relative L2 (see docs/benchmarks.md)")
    p.set_defaults(func=bench)
