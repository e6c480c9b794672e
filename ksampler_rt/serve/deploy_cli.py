"""``ksampler-rt deploy ray``: start the Ray Serve application on a running Ray cluster
(see docs/deploy-ray.md), or write the equivalent ``serve deploy`` config file."""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "deploy", help="start the prompt-executing Ray Serve application on a Ray cluster",
        description="Deploy the ksampler-rt replicas (one model's engines per replica, one GPU each) on a running "
                    "Ray cluster; then point `ksampler-rt serve --workers ray --ray-address ADDR` at it.")
    targets = p.add_subparsers(dest="target", required=True)
    r = targets.add_parser("ray", help="Ray Serve")
    r.add_argument("--address", default="auto",
                   help="Ray cluster address (default auto: $RAY_ADDRESS or the cluster started by `ray start`)")
    r.add_argument("--replicas", type=int, default=1, metavar="N", help="fixed replica count (default 1)")
    r.add_argument("--min-replicas", type=int, default=None, metavar="N", help="autoscaling lower bound")
    r.add_argument("--max-replicas", type=int, default=None, metavar="N",
                   help="autoscaling upper bound (autoscaling is on when max > min)")
    r.add_argument("--target-ongoing-requests", type=float, default=1.0, metavar="X",
                   help="autoscaling target of prompts in flight per replica (default 1)")
    r.add_argument("--model", action="append", default=[], metavar="NAME",
                   help="checkpoint every replica loads at start (repeatable; others load on first use)")
    r.add_argument("--models", default=None, metavar="DIR",
                   help="models folder as seen from every node (default $KSAMPLER_RT_MODELS or the cache)")
    r.add_argument("--backend", default="auto", help="engine backend in the replicas (default auto)")
    r.add_argument("--gpus-per-replica", type=float, default=None, metavar="G",
                   help="GPUs per replica (default 1 when the cluster has GPUs, else 0)")
    r.add_argument("--cpus-per-replica", type=float, default=1.0, metavar="C", help="CPUs per replica (default 1)")
    r.add_argument("--max-batch", "--max-batch-size", dest="max_batch_size", type=int, default=1, metavar="N",
                   help="step-level batching in each replica: up to N prompts at once, their compatible UNet calls "
                        "merged into engine calls of up to N rows (default 1: off)")
    r.add_argument("--batch-wait-ms", type=float, default=2.0, metavar="MS",
                   help="longest wait of a UNet call for batch partners (default 2; a lone prompt never waits)")
    r.add_argument("--shared-output", default=None, metavar="DIR",
                   help="replicas write images into this folder shared with the front (default: send them back)")
    r.add_argument("--preview", action="store_true", help="stream latent previews")
    r.add_argument("--app-name", default="ksampler-rt", help="Serve application name (default ksampler-rt)")
    r.add_argument("--write-config", default=None, metavar="FILE",
                   help="write a `serve deploy` config file (JSON, valid YAML) instead of deploying")
    p.set_defaults(func=run)


def app_config(args: argparse.Namespace):
    from .ray_app import RayAppConfig

    return RayAppConfig(models_dir=args.models, backend=args.backend, preload=list(args.model),
                        num_replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                        target_ongoing_requests=args.target_ongoing_requests,
                        num_gpus=args.gpus_per_replica if args.gpus_per_replica is not None else 0.0,
                        num_cpus=args.cpus_per_replica, max_batch_size=args.max_batch_size,
                        batch_wait_timeout_s=args.batch_wait_ms / 1000.0, shared_output=args.shared_output,
                        preview=args.preview, app_name=args.app_name)


def serve_config(config) -> dict:
    """The ``serve deploy`` / ``serve run`` config file of an application."""
    from dataclasses import asdict

    args = {k: v for k, v in asdict(config).items() if v is not None and k != "app_name"}
    return {"proxy_location": "Disabled",
            "applications": [{"name": config.app_name, "route_prefix": None,
                              "import_path": "ksampler_rt.serve.ray_app:build_app", "args": args}]}


def run(args: argparse.Namespace) -> int:
    if args.max_batch_size < 1:
        raise ValueError(f"--max-batch: received {args.max_batch_size}, expected a positive integer (1: no batching)")
    if not 0 <= args.batch_wait_ms <= 10_000:
        raise ValueError(f"--batch-wait-ms: received {args.batch_wait_ms:g}, expected milliseconds in [0, 10000]")
    if args.replicas < 1:
        raise ValueError(f"--replicas: received {args.replicas}, expected at least 1")
    if (args.min_replicas is None) != (args.max_replicas is None):
        raise ValueError("--min-replicas and --max-replicas go together")
    config = app_config(args)
    if args.write_config:
        with open(args.write_config, "w", encoding="utf-8") as f:
            json.dump(serve_config(config), f, indent=2)
        print(f"wrote {args.write_config}; start it with: serve deploy {args.write_config}")
        return 0
    try:
        import ray
    except ModuleNotFoundError:
        raise ValueError("deploy ray needs Ray Serve: pip install 'ksampler-rt[ray]'") from None
    from .ray_app import deploy, local_ray_options

    ray.init(address=args.address, **local_ray_options(args.address, {"log_to_driver": False}))
    if args.gpus_per_replica is None and ray.cluster_resources().get("GPU", 0) >= 1:
        config.num_gpus = 1.0
    deploy(config)
    kind = (f"{config.min_replicas}-{config.max_replicas} replicas (autoscaling)" if config.autoscaling
            else f"{config.num_replicas} replica(s)")
    print(f"deployed {config.app_name!r} on {args.address}: {kind}, {config.num_gpus:g} GPU / "
          f"{config.num_cpus:g} CPU each; run the front with: ksampler-rt serve --workers ray --ray-address "
          f"{args.address}")
    return 0
