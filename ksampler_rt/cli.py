"""The ``ksampler-rt`` command. Each subpackage registers its own subcommands.

A command module exposes ``register(subparsers)``, which adds one or more sub-parsers whose
``func(args) -> int`` runs the command. Errors meant for the user are ``KsamplerRtError`` (or
``ValueError`` / ``FileNotFoundError``): printed as one line, exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Kept in data-flow order; a module listed here must import without torch.
COMMAND_MODULES = (
    "ksampler_rt.export.tiny_cli",
    "ksampler_rt.export.cli",
    "ksampler_rt.engines.cli",
    "ksampler_rt.workflow.cli",
    "ksampler_rt.serve.cli",
    "ksampler_rt.serve.deploy_cli",
    "ksampler_rt.bench.cli",
    "ksampler_rt.bench.gpu_check",
    "ksampler_rt.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ksampler-rt",
        description="ComfyUI's KSampler on ONNX Runtime / TensorRT engines.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that command is not part of this build yet
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .runtime.host_memory import tune_host_allocator

    tune_host_allocator()  # steady per-step host time (see its docstring); $KSAMPLER_RT_MALLOC_TUNING=0 skips
    if args.command in ("run", "serve", "demo", "bench"):
        from .runtime import jit

        jit.warm_up_in_background()  # compiled noise kernels load while engines load
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as exc:
        print(f"ksampler-rt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
