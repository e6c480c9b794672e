"""``ksampler-rt serve``: the ComfyUI-compatible server (see docs/server.md)."""
from __future__ import annotations

import argparse
import os

DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192   # = workflow.images.DEFAULT_MAX_IMAGE_PIXELS (not imported: keeps --help light)


def _token(args: argparse.Namespace) -> str | None:
    """The auth token: --auth-token, else --auth-token-file's first line, else $KSAMPLER_RT_AUTH_TOKEN."""
    if args.auth_token and args.auth_token_file:
        raise ValueError("--auth-token / --auth-token-file: received both, expected one")
    token = args.auth_token
    if args.auth_token_file:
        try:
            with open(args.auth_token_file, encoding="utf-8") as f:
                token = f.readline().strip()
        except OSError as exc:
            raise ValueError(f"--auth-token-file: received {args.auth_token_file!r}, expected a readable file "
                             f"({exc.strerror})") from None
    token = token or os.environ.get("KSAMPLER_RT_AUTH_TOKEN") or None
    if token is not None and (len(token) < 16 or not token.isprintable() or token != token.strip()):
        raise ValueError(f"--auth-token: received {len(token)} characters, expected at least 16 printable "
                         "characters without spaces at the ends (e.g. `python -c 'import secrets; "
                         "print(secrets.token_urlsafe())'`)")
    return token


def _precision_arg(value: str) -> str | None:
    from ..workflow.cli import precision_arg  # light: its engines imports happen inside the function

    return precision_arg(value)


def _precision(args: argparse.Namespace) -> str | None:
    """``--precision`` checked against the backend (workflow.cli.check_precision) before the server starts."""
    if not args.precision:
        return None
    if args.fake_checkpoint:
        raise ValueError(f"--precision: received {args.precision} with --fake-checkpoint, expected no --precision "
                         "(the analytic stand-ins run no engines)")
    if args.workers == "ray":
        raise ValueError(f"--precision: received {args.precision} with --workers ray, expected --workers local "
                         "(the Ray replicas load engines in the export's own precision)")
    from ..workflow.cli import check_precision

    return check_precision(args.precision, args.backend)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="run a ComfyUI-compatible API server (POST /prompt, /ws, /history, /view, ...)",
        description="A drop-in backend for ComfyUI API clients: same endpoints, JSON and WebSocket "
                    "messages; engines stay loaded between prompts.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; give --auth-token when binding another address)")
    p.add_argument("--port", type=int, default=8188, help="port (default 8188; 0 picks a free one)")
    p.add_argument("--models", default=None, metavar="DIR",
                   help="models folder (checkpoints/<name>/manifest.json); default $KSAMPLER_RT_MODELS or the cache")
    p.add_argument("--output", default="output", metavar="DIR", help="where SaveImage writes (default ./output)")
    p.add_argument("--input", default="input", metavar="DIR", help="LoadImage / upload folder (default ./input)")
    p.add_argument("--temp", default=None, metavar="DIR", help="PreviewImage folder (default: temp beside --output)")
    p.add_argument("--state-dir", default=None, metavar="DIR",
                   help="where history is persisted (default <output>/.ksampler-rt)")
    p.add_argument("--backend", default="auto", help="engine backend: auto, openvino-cpu, onnxruntime-cpu, onnxruntime-cuda, onnxruntime-trt, tensorrt "
                        "(default auto: the best available)")
    p.add_argument("--precision", type=_precision_arg, default=None, metavar="PRECISION",
                   help="engine precision: fp32, fp16, bf16, fp8, int8 or auto, or per network (unet=bf16,vae=fp32); "
                        "default: the export's own. openvino-cpu: fp32 / bf16 / fp16 / int8 where this CPU runs them "
                        "natively, onnxruntime-cpu: fp32; auto = the fastest within the documented quality bound "
                        "(docs/engines.md, Precision). The startup log says what it means here")
    p.add_argument("--workers", default="local", choices=("local", "ray"),
                   help="where prompts execute: local (one worker thread in this process) or ray (the Ray Serve "
                        "deployment of `ksampler-rt deploy ray`; see docs/deploy-ray.md)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="--workers ray: the Ray cluster (default: start a local Ray instance and deploy there)")
    p.add_argument("--ray-replicas", type=int, default=1, metavar="N",
                   help="--workers ray without a running app: replicas to deploy (default 1)")
    p.add_argument("--ray-concurrency", type=int, default=None, metavar="N",
                   help="--workers ray: prompts kept in flight at once (default: replicas x max ongoing requests "
                        "per replica, the deployment's capacity)")
    p.add_argument("--max-batch", type=int, default=1, metavar="N",
                   help="step-level batching: run up to N prompts at once and merge their compatible UNet calls "
                        "into engine calls of up to N rows (cond + uncond rows count; default 1: off). With "
                        "--workers ray: per replica (see docs/server.md)")
    p.add_argument("--batch-wait-ms", type=float, default=None, metavar="MS",
                   help="longest wait of a UNet call for batch partners while other prompts are running "
                        "(default 2; a lone prompt never waits)")
    p.add_argument("--max-queue", type=int, default=100, metavar="N",
                   help="waiting prompts before POST /prompt answers 429 (default 100)")
    p.add_argument("--max-history", type=int, default=10000, metavar="N", help="history entries kept (default 10000)")
    p.add_argument("--cache-mb", type=float, default=1024.0, metavar="MB",
                   help="memory bound of the node-output cache between prompts (default 1024; 0 disables)")
    p.add_argument("--preview", action="store_true",
                   help="send a JPEG latent preview (latent2rgb) over the WebSocket after every sampling step")
    p.add_argument("--preview-size", type=int, default=512, metavar="PX", help="largest preview side (default 512)")
    p.add_argument("--max-upload-mb", type=float, default=100.0, metavar="MB",
                   help="largest upload / request (default 100)")
    p.add_argument("--max-body-mb", type=float, default=16.0, metavar="MB",
                   help="largest JSON request body (default 16)")
    p.add_argument("--preload", action="append", default=[], metavar="CKPT",
                   help="load this checkpoint's engines at start (repeatable)")
    p.add_argument("--fake-checkpoint", action="append", default=[], metavar="NAME",
                   help="serve NAME with a built-in analytic stand-in model (for testing API clients; no engines)")
    p.add_argument("--no-ui", action="store_true",
                   help="do not serve ComfyUI's web frontend at / (the API only)")
    p.add_argument("--auth-token", default=None, metavar="TOKEN",
                   help="require this token on every route and the WebSocket (Authorization: Bearer TOKEN; a browser "
                        "opens /?token=TOKEN once); default $KSAMPLER_RT_AUTH_TOKEN")
    p.add_argument("--auth-token-file", default=None, metavar="FILE",
                   help="read the token from FILE (first line) instead of the command line")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="accept this Host name besides loopback names and the bound address (repeatable; '*' any). "
                        "Guards against DNS rebinding")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="accept browser requests from this Origin (scheme://host[:port]) besides the server's own "
                        "(repeatable; '*' any; 'null' for sandboxed pages)")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                   help=f"largest image (width x height x frames) accepted by uploads and LoadImage (default "
                        f"{DEFAULT_MAX_IMAGE_PIXELS}, 8192x8192)")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    try:
        from .server import PromptServer, ServerConfig, serve_forever
    except ModuleNotFoundError as exc:
        raise ValueError(f"serve needs the [serve] extra ({exc.name} is missing): "
                         "pip install 'ksampler-rt[serve]'") from None
    if args.ray_concurrency is not None and args.ray_concurrency < 1:
        raise ValueError(f"--ray-concurrency: received {args.ray_concurrency}, expected a positive integer")
    if args.max_batch < 1:
        raise ValueError(f"--max-batch: received {args.max_batch}, expected a positive integer (1: no batching)")
    if args.batch_wait_ms is not None and not 0 <= args.batch_wait_ms <= 10_000:
        raise ValueError(f"--batch-wait-ms: received {args.batch_wait_ms:g}, expected milliseconds in [0, 10000]")
    token = _token(args)
    precision = _precision(args)
    for name, value in (("--port", args.port), ("--max-queue", args.max_queue), ("--max-history", args.max_history),
                        ("--max-image-pixels", args.max_image_pixels)):
        if value < 0 or (name != "--port" and value == 0):
            raise ValueError(f"{name}: received {value}, expected a positive integer")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(host=args.host, port=args.port, models_dir=args.models, output_dir=args.output,
                          input_dir=args.input, temp_dir=args.temp, state_dir=args.state_dir, backend=args.backend,
                          max_queue=args.max_queue, max_history=args.max_history, cache_mb=args.cache_mb,
                          preview=args.preview, preview_size=args.preview_size, max_upload_mb=args.max_upload_mb,
                          max_body_mb=args.max_body_mb, preload=list(args.preload), ui=not args.no_ui,
                          auth_token=token, allow_hosts=list(args.allow_host), allow_origins=list(args.allow_origin),
                          max_image_pixels=args.max_image_pixels, max_batch=args.max_batch,
                          batch_wait_ms=args.batch_wait_ms)
    pipeline = None
    if args.fake_checkpoint:
        from .testing import fake_pipeline

        pipeline = fake_pipeline(args.fake_checkpoint, models_dir=args.models, backend=args.backend,
                                 output_dir=config.output_dir, input_dir=config.input_dir, temp_dir=args.temp)

    async def main() -> None:
        if args.workers == "ray":
            from .ray_app import RayAppConfig
            from .ray_worker import make_ray_server

            app = RayAppConfig(models_dir=args.models, backend=args.backend, num_replicas=args.ray_replicas,
                               preload=list(args.preload), preview=args.preview, preview_size=args.preview_size,
                               cache_mb=args.cache_mb, max_batch_size=args.max_batch,
                               **({} if args.batch_wait_ms is None
                                  else {"batch_wait_timeout_s": args.batch_wait_ms / 1000.0}))
            server = make_ray_server(config, address=args.ray_address, app_config=app, pipeline=pipeline,
                                     concurrency=args.ray_concurrency)
        else:
            server = PromptServer(config, pipeline=pipeline)
            if precision:  # before start(): --preload and every prompt load engines in it
                from ..workflow.cli import describe_precision

                server.pipeline.precision = precision
                logging.getLogger("ksampler_rt.serve").info("engines: %s", describe_precision(precision, args.backend))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        await serve_forever(server, stop)

    asyncio.run(main())
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m ksampler_rt.serve.cli serve ...`` (the same command as ``ksampler-rt serve``)."""
    parser = argparse.ArgumentParser(prog="ksampler-rt")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
