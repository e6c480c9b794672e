"""``ksampler-rt make-tiny-model``: build a tiny random-weight SD checkpoint folder offline.

Imports without torch; the builder (torch, diffusers, transformers) is loaded when the command runs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

_FAMILIES = ("sd15", "sd2-v", "sdxl")  # = tiny.TINY_FAMILIES, repeated to keep this import light
_FLOW_FAMILIES = ("sd3", "flux", "flux-schnell")  # = tiny.TINY_FLOW_FAMILIES (SD3.5, FLUX.1 dev / schnell)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "make-tiny-model",
        help="write a tiny random-weight SD / SDXL / SD3.5 / FLUX.1 folder (diffusers layout) for tests",
        description="Build a deterministic tiny random-weight Stable Diffusion checkpoint in "
                    "diffusers folder layout, without downloading anything.",
    )
    p.add_argument("out", metavar="OUT", help="output folder (must be empty or absent)")
    p.add_argument("--family", default="sd15", choices=_FAMILIES + _FLOW_FAMILIES,
                   help="model family (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty OUT")
    p.add_argument("--controlnet", action="store_true",
                   help="also write OUT/controlnet: a tiny ControlNet for the tiny UNet (SD families)")
    p.add_argument("--t2i-adapter", action="store_true",
                   help="also write OUT/t2i_adapter: a tiny T2I-Adapter for the tiny UNet (SD families)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ksampler_rt.export.tiny import TINY_LORA_NAME, make_tiny_lora, make_tiny_model

    control = getattr(args, "controlnet", False) or getattr(args, "t2i_adapter", False)
    if control and args.family in _FLOW_FAMILIES:
        raise ValueError(f"--family: received {args.family!r} with --controlnet / --t2i-adapter, expected one of "
                         f"{_FAMILIES} (no tiny ControlNet for the flow families)")
    out = make_tiny_model(args.out, family=args.family, seed=args.seed, force=args.force)
    if control:
        from ksampler_rt.export.tiny_control import make_tiny_controlnet, make_tiny_t2i_adapter
        if args.controlnet:
            make_tiny_controlnet(out, seed=args.seed)
        if args.t2i_adapter:
            make_tiny_t2i_adapter(out, seed=args.seed)
    for f in sorted(p for p in Path(out).rglob("*") if p.is_file()):
        print(f)
    if args.family in _FLOW_FAMILIES:
        return 0  # no tiny LoRA for the flow families yet
    # the matching tiny LoRA (kohya layout), next to the model folder
    lora = make_tiny_lora(Path(out).parent / f"{Path(out).name}-{TINY_LORA_NAME}", seed=args.seed,
                          family=args.family)
    print(lora)
    return 0
