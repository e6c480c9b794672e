"""``ksampler-rt build`` and ``ksampler-rt engines list|inspect|prune``."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .backends import auto_order, backend_names, environment, pick_backend
from .build import BuildOptions, build_engines
from .cache import CacheError, EngineCache, env_differences


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "build", help="build the engines of an export into the engine cache (once per machine)",
        description="Build engines for every model of EXPORT_DIR into the cache ($KSAMPLER_RT_CACHE, default "
                    "~/.cache/ksampler-rt). An engine already cached for this machine and request is reused.")
    p.add_argument("export_dir", metavar="EXPORT_DIR")
    p.add_argument("--backend", default="auto", choices=("auto",) + backend_names(),
                   help=f"default: the best available ({' > '.join(auto_order())})")
    p.add_argument("--shapes", help="image sizes WxH, comma separated (default 512x512; 1024x1024 for SDXL)")
    p.add_argument("--batch", help="batch range MIN-MAX (default 1-4)")
    p.add_argument("--tokens", help="UNet context length range (default 77-231: prompts up to 3 chunks of 75 tokens)")
    p.add_argument("--dynamic", action="store_true",
                   help="one dynamic profile spanning all --shapes instead of one static profile per size")
    p.add_argument("--precision", type=_precision_arg,
                   help="fp32, fp16, bf16, fp8, int8 or auto, or per network (unet=bf16,vae=fp32); default: the "
                        "export's precision. openvino-cpu: bf16 / fp16 / int8 where the CPU runs them natively "
                        "(refused otherwise), auto = the fastest within the documented quality bound "
                        "(docs/engines.md, Precision)")
    p.add_argument("--refit", action="store_true", help="TensorRT: refittable engine (swap weights, e.g. LoRA)")
    p.add_argument("--weight-streaming", action="store_true", help="TensorRT: allow streaming weights from host")
    p.add_argument("--models", help="comma separated subset (unet,clip,clip2,vae_decoder,vae_encoder)")
    p.add_argument("--device", type=int, default=0, help="CUDA device id")
    p.add_argument("--cache", help="cache root (default $KSAMPLER_RT_CACHE or ~/.cache/ksampler-rt)")
    p.add_argument("--force", action="store_true", help="rebuild even when a valid engine is cached")
    p.set_defaults(func=_build)

    e = subparsers.add_parser("engines", help="list, inspect or prune the engine cache")
    e.add_argument("--cache", help="cache root (default $KSAMPLER_RT_CACHE or ~/.cache/ksampler-rt)")
    sub = e.add_subparsers(dest="engines_command", metavar="ACTION")
    ls = sub.add_parser("list", help="cached engines, one a line")
    ls.add_argument("--json", action="store_true")
    ins = sub.add_parser("inspect", help="everything known about one cached engine, verified")
    ins.add_argument("entry", metavar="ENTRY", help="a directory name from `engines list` (or a prefix), or a path")
    ins.add_argument("--no-checksum", action="store_true", help="skip hashing the files")
    pr = sub.add_parser("prune", help="remove interrupted builds, corrupt entries and engines for other machines")
    pr.add_argument("--all", action="store_true", help="remove every cached engine")
    pr.add_argument("--keep-foreign", action="store_true", help="keep engines built for other GPUs/versions")
    pr.add_argument("--older-than", type=float, metavar="DAYS", help="also remove entries older than DAYS")
    pr.add_argument("--export", metavar="EXPORT_DIR", help="also remove every engine of this export")
    pr.add_argument("--quick", action="store_true", help="check sizes only, do not hash every file")
    pr.add_argument("--dry-run", action="store_true")
    e.set_defaults(func=_engines)


def _pick_backend(name: str) -> str:
    # a named backend is built even where it cannot run (a GPU check follows in build_engines)
    return name if name != "auto" else pick_backend("auto")


def _build(args) -> int:
    backend = _pick_backend(args.backend)
    opts = BuildOptions.from_cli(backend, args.shapes, args.batch, args.tokens, args.dynamic, args.precision,
                                 refit=args.refit, weight_streaming=args.weight_streaming, device_id=args.device,
                                 force=args.force)
    models = [m.strip() for m in args.models.split(",")] if args.models else None
    t0 = time.perf_counter()
    built = build_engines(args.export_dir, opts, models=models, cache=EngineCache(args.cache),
                          log=lambda m: print(m, flush=True))
    print(f"{len(built)} engine(s) ready for {backend} in {time.perf_counter() - t0:.1f} s")
    if args.precision:  # say what was picked (auto) or built, per model
        print(f"precision {args.precision}: " + ", ".join(f"{n}={e.components.get('precision')}"
                                                          for n, e in built.items()))
    return 0


def _precision_arg(value: str) -> str:
    import argparse

    from .precision import parse_precision
    from .spec import EngineError

    try:
        spec = parse_precision(value)
    except EngineError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return spec.canonical() if spec else None


def _row(entry, here: dict | None) -> dict:
    c = entry.components
    status = "ok"
    if here is None:
        status = "unknown backend"
    elif env_differences(c, here):
        status = "foreign"
    return {"name": entry.path.name, "model": c.get("model"), "backend": c.get("backend"),
            "precision": c.get("precision"), "profiles": entry.meta.get("profiles") and
            "; ".join(p.get("label", "") for p in entry.meta["profiles"]) or "any shape",
            "machine": c.get("gpu") or c.get("cpu"), "size_mb": round(entry.size / 1e6, 2),
            "created": entry.meta.get("created"), "export_dir": entry.meta.get("export_dir"), "status": status}


def _find(cache: EngineCache, ref: str):
    p = Path(ref).expanduser()
    if p.exists():
        return cache.read_entry(p)
    matches = [d for d in cache.all_dirs() if d.name.startswith(ref) and not d.name.startswith(".tmp-")]
    if not matches:
        raise FileNotFoundError(f"ENTRY: received {ref!r}, expected the name (or a prefix) of a cached engine in "
                                f"{cache.engines_dir} (see `ksampler-rt engines list`)")
    if len(matches) > 1:
        raise ValueError(f"ENTRY: received {ref!r}, which matches {len(matches)} entries, expected a prefix of "
                         f"one: " + ", ".join(m.name for m in matches[:5]))
    return cache.read_entry(matches[0])


def _engines(args) -> int:
    cache = EngineCache(args.cache)
    action = getattr(args, "engines_command", None) or "list"
    envs: dict[str, dict | None] = {}
    known = set(backend_names())

    def here(backend) -> dict | None:
        """This machine's environment for ``backend``; None for a backend this install does not have."""
        if backend not in envs:
            envs[backend] = environment(backend) if backend in known else None
        return envs[backend]

    if action == "list":
        rows = [_row(e, here(e.components.get("backend"))) for e in cache.entries()]
        broken = [d for d in cache.all_dirs() if d.name.startswith(".tmp-") or not (d / "entry.json").exists()]
        if getattr(args, "json", False):
            print(json.dumps({"cache": str(cache.engines_dir), "entries": rows,
                              "incomplete": [d.name for d in broken]}, indent=1))
            return 0
        print(f"engine cache: {cache.engines_dir}")
        if not rows:
            print("  (no engines)")
        for r in rows:
            print(f"  {r['name']}  {r['precision']}  {r['profiles']}  {r['machine']}  {r['size_mb']} MB  "
                  f"{r['created']}  [{r['status']}]")
        for d in broken:
            print(f"  {d.name}  [incomplete: `ksampler-rt engines prune` removes it]")
        return 0
    if action == "inspect":
        entry = _find(cache, args.entry)
        problems = []
        try:
            entry.verify(checksums=not args.no_checksum)
        except CacheError as exc:
            problems.append(str(exc))
        env = here(entry.components.get("backend"))
        if env is None:
            problems.append(f"backend: received {entry.components.get('backend')!r}, expected one of "
                            f"{', '.join(sorted(known))} (no backend of that name is registered here)")
        else:
            try:
                entry.check_environment(env)
            except CacheError as exc:
                problems.append(str(exc))
        info = {"path": str(entry.path), "key": entry.key, "status": "ok" if not problems else "unusable here",
                "problems": problems, **{k: entry.meta.get(k) for k in
                                          ("components", "files", "created", "build_seconds", "export_dir",
                                           "rebuild", "request", "profiles", "io")}}
        print(json.dumps(info, indent=1, default=str))
        return 0 if not problems else 1
    if action == "prune":
        wh = None
        if args.export:
            from .manifest import load_manifest

            wh = load_manifest(args.export, read_onnx=False).weights_hash
        removed = cache.prune(everything=args.all, foreign=not args.keep_foreign, older_than_days=args.older_than,
                              weights_hash=wh, env_for=here, dry_run=args.dry_run,
                              checksums=not args.quick)
        verb = "would remove" if args.dry_run else "removed"
        for path, reason in removed:
            print(f"{verb} {path.name}: {reason}")
        print(f"{verb} {len(removed)} entr{'y' if len(removed) == 1 else 'ies'} from {cache.engines_dir}")
        return 0
    print(f"ACTION: received {action!r}, expected list, inspect or prune", file=sys.stderr)
    return 2
