"""The engine cache: build once per machine, verify on every load.

Layout (root from ``$KSAMPLER_RT_CACHE``, default ``~/.cache/ksampler-rt``)::

    <root>/engines/<model>-<backend>-<weights_hash[:12]>-<key[:16]>/
        engine.plan | model.onnx [+ model.onnx.data]   the built artefact(s)
          | model.xml + model.bin                       (OpenVINO IR)
        entry.json                                      key, key components, sha256 + size per file
    <root>/engines/.tmp-*/                              a build in progress (never loaded)
    <root>/timing/<gpu>-<cc>-trt<version>.cache         TensorRT timing caches

The key is the sha256 of the canonical JSON of its components: the export's ``weights_hash``, the
model, the backend, the precision, the shape profiles, build options, and the machine (GPU name,
compute capability, driver, CUDA, TensorRT / ONNX Runtime / OpenVINO versions; CPU model and ISA for
the CPU backends). A build is written into a temp directory, the sidecar last, then renamed into place in one
``rename`` (atomic on POSIX), so a crash leaves only a ``.tmp-*`` directory that lookups never see
and ``prune`` removes. Loading re-derives the key from the sidecar's components, checks it against the
directory name and the caller's expectation, and checks every file's sha256.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .spec import EngineError

CACHE_FORMAT = 1
SIDECAR = "entry.json"
# The machine facts of the built-in backends, in the order messages list them; a backend may add others
# (every key of its environment is part of the key and compared the same way).
ENV_FIELDS = ("gpu", "compute_capability", "driver", "nvidia_driver", "cuda", "tensorrt", "onnxruntime",
              "openvino", "cpu", "arch", "isa")
# The components of a key that say what was built; every other component is the machine's (environment).
KEY_FIELDS = ("cache_format", "model", "backend", "weights_hash", "source", "precision", "profiles", "options")


class CacheError(EngineError):
    pass


class CacheCorruptError(CacheError):
    pass


class ForeignEngineError(CacheError):
    """A cached engine built for another GPU / driver / TensorRT / ONNX Runtime: never loaded."""


def default_cache_root() -> Path:
    return Path(os.environ.get("KSAMPLER_RT_CACHE") or Path.home() / ".cache" / "ksampler-rt").expanduser()


def compute_key(components: dict) -> str:
    blob = json.dumps(components, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 23) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def entry_name(components: dict, key: str) -> str:
    wh = "".join(c for c in str(components.get("weights_hash", "")) if c.isalnum())[:12] or "nohash"
    return f"{components['model']}-{components['backend']}-{wh}-{key[:16]}"


def environment_part(c: dict) -> dict:
    """The machine/software facts of key components (or of an environment: ``"backend"`` is dropped)."""
    return {k: v for k, v in c.items() if k not in KEY_FIELDS}


def _env_keys(*dicts: dict) -> list[str]:
    present = set().union(*(environment_part(d) for d in dicts))
    return [k for k in ENV_FIELDS if k in present] + sorted(present - set(ENV_FIELDS))


def describe_env(c: dict) -> str:
    parts = []
    if "gpu" in c:  # a CUDA backend's environment always names the GPU (None when there was none)
        parts.append(f"GPU {c.get('gpu')!r} (compute capability {c.get('compute_capability')})")
        parts.append(f"driver {c.get('nvidia_driver') or c.get('driver')}, CUDA {c.get('cuda')}")
    if c.get("cpu"):
        parts.append(f"CPU {c.get('cpu')!r}" + (f" [{c['isa']}]" if c.get("isa") else ""))
    if c.get("tensorrt"):
        parts.append(f"TensorRT {c['tensorrt']}")
    if c.get("onnxruntime"):
        parts.append(f"ONNX Runtime {c['onnxruntime']}")
    if c.get("openvino"):
        parts.append(f"OpenVINO {c['openvino']}")
    parts += [f"{k} {c[k]}" for k in _env_keys(c) if k not in ENV_FIELDS]  # another backend's facts
    return ", ".join(parts)


def env_differences(built: dict, here: dict) -> list[str]:
    """``"key 'built' != 'here' here"`` for each machine fact that differs (key components or environments)."""
    return [f"{k} {built.get(k)!r} != {here.get(k)!r} here" for k in _env_keys(built, here)
            if built.get(k) != here.get(k)]


@dataclass
class CacheEntry:
    path: Path
    meta: dict

    @property
    def key(self) -> str:
        return self.meta.get("key", "")

    @property
    def components(self) -> dict:
        return self.meta.get("components", {})

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def size(self) -> int:
        return sum(int(f.get("size", 0)) for f in self.meta.get("files", {}).values())

    def rebuild_command(self) -> str:
        return self.meta.get("rebuild") or (f"ksampler-rt build {self.meta.get('export_dir', 'EXPORT_DIR')} "
                                            f"--backend {self.components.get('backend')} --force")

    def verify(self, checksums: bool = True) -> "CacheEntry":
        """Key consistent with its components and its directory name; every file present and intact."""
        comp = self.components
        if not comp or compute_key(comp) != self.key:
            raise CacheCorruptError(f"{self.path / SIDECAR}: its key does not match its recorded build "
                                    f"parameters (edited or corrupt); rebuild with `{self.rebuild_command()}`")
        if self.path.name != entry_name(comp, self.key):
            raise CacheCorruptError(f"{self.path}: directory name does not match the key in its {SIDECAR} "
                                    f"(copied or renamed by hand); rebuild with `{self.rebuild_command()}`")
        for name, info in self.meta.get("files", {}).items():
            f = self.path / name
            if not f.is_file():
                raise CacheCorruptError(f"cached engine file {f} is missing; rebuild with "
                                        f"`{self.rebuild_command()}`")
            size = f.stat().st_size
            if size != int(info["size"]):
                raise CacheCorruptError(f"cached engine file {f} has {size} bytes, its {SIDECAR} says "
                                        f"{info['size']} (truncated or modified); rebuild with "
                                        f"`{self.rebuild_command()}`")
            if checksums:
                digest = sha256_file(f)
                if digest != info["sha256"]:
                    raise CacheCorruptError(
                        f"cached engine file {f} fails its checksum (sha256 {digest[:16]}..., expected "
                        f"{info['sha256'][:16]}...): it is corrupt or was modified; rebuild with "
                        f"`{self.rebuild_command()}`")
        return self

    def check_environment(self, here: dict) -> None:
        """Refuse an engine built for another machine / software stack, saying what differs."""
        diffs = env_differences(self.components, here)
        if diffs:
            raise ForeignEngineError(
                f"{self.path} was built for {describe_env(self.components)}; this machine has "
                f"{describe_env(here)} ({'; '.join(diffs)}). Engines are tied to the GPU and software "
                f"they were built with and are never loaded elsewhere; rebuild with `{self.rebuild_command()}`")


class EngineCache:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root else default_cache_root()
        self.engines_dir = self.root / "engines"
        self.timing_dir = self.root / "timing"

    # --- lookup -------------------------------------------------------------------------------------
    def path_for(self, components: dict) -> Path:
        return self.engines_dir / entry_name(components, compute_key(components))

    def read_entry(self, path: Path) -> CacheEntry:
        path = Path(path)
        if path.is_file():
            path = path.parent
        sidecar = path / SIDECAR
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CacheCorruptError(f"{path} has no {SIDECAR} (incomplete build); remove it with "
                                    f"`ksampler-rt engines prune`") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CacheCorruptError(f"{sidecar} is corrupt ({exc}); remove it with `ksampler-rt engines "
                                    f"prune` and rebuild") from None
        if not isinstance(meta, dict) or meta.get("format") != "ksampler-rt-engine":
            raise CacheCorruptError(f"{sidecar} is not a ksampler-rt engine sidecar")
        return CacheEntry(path, meta)

    def lookup(self, components: dict, checksums: bool = True) -> CacheEntry | None:
        """The verified entry for exactly these components, or None on a miss. Raises when the entry
        exists but is corrupt or does not carry the expected key."""
        key = compute_key(components)
        path = self.engines_dir / entry_name(components, key)
        if not path.exists():
            return None
        entry = self.read_entry(path)
        if entry.key != key:
            raise ForeignEngineError(
                f"{path} carries key {entry.key[:16]}... but {key[:16]}... was expected for this export and "
                f"machine ({'; '.join(env_differences(entry.components, components)) or 'build parameters differ'}); "
                f"it is not loaded; rebuild with `{entry.rebuild_command()}`")
        return entry.verify(checksums=checksums)

    def siblings(self, components: dict) -> list[CacheEntry]:
        """Readable entries of the same model/backend/export (any machine or profile)."""
        out = []
        for e in self.entries():
            c = e.components
            if (not isinstance(e, CacheEntry) or c.get("model") != components.get("model")
                    or c.get("backend") != components.get("backend")
                    or c.get("weights_hash") != components.get("weights_hash")):
                continue
            out.append(e)
        return out

    def explain_miss(self, components: dict) -> str:
        """Why there is no usable entry: nothing built, or built for another machine / profile."""
        reasons = []
        for e in self.siblings(components):
            diffs = env_differences(e.components, components)
            if diffs:
                reasons.append(f"{e.path.name} was built for {describe_env(e.components)} ({'; '.join(diffs)})")
            else:
                other = [k for k in ("precision", "profiles", "options", "source")
                         if e.components.get(k) != components.get(k)]
                reasons.append(f"{e.path.name} was built with a different {', '.join(other) or 'key'}")
        if not reasons:
            return "no engine has been built for it yet"
        return "the cached ones are not for this machine/request: " + "; ".join(reasons)

    def entries(self) -> list[CacheEntry]:
        out = []
        if not self.engines_dir.is_dir():
            return out
        for p in sorted(self.engines_dir.iterdir()):
            if p.is_dir() and not p.name.startswith(".tmp-"):
                try:
                    out.append(self.read_entry(p))
                except CacheError:
                    continue
        return out

    def all_dirs(self) -> list[Path]:
        return sorted(p for p in self.engines_dir.iterdir() if p.is_dir()) if self.engines_dir.is_dir() else []

    # --- writing ------------------------------------------------------------------------------------
    def write(self, components: dict, build: Callable[[Path], dict | None], meta: dict | None = None,
              force: bool = False) -> CacheEntry:
        """Run ``build(tmp_dir)`` (it writes the artefact files there and may return extra metadata),
        then checksum every file, write the sidecar, and rename the directory into place."""
        key = compute_key(components)
        final = self.engines_dir / entry_name(components, key)
        self.engines_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=self.engines_dir))
        try:
            t0 = time.perf_counter()
            extra = build(tmp)
            extra = extra if isinstance(extra, dict) else {}
            files = {}
            for f in sorted(tmp.iterdir()):
                if f.is_file() and f.name != SIDECAR:
                    files[f.name] = {"sha256": sha256_file(f), "size": f.stat().st_size}
            if not files:
                raise CacheError(f"building {components.get('model')} produced no file")
            sidecar = {"format": "ksampler-rt-engine", "key": key, "components": components, "files": files,
                       "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "build_seconds": round(time.perf_counter() - t0, 3), **(meta or {}), **extra}
            side_tmp = tmp / (SIDECAR + ".part")
            with open(side_tmp, "w", encoding="utf-8") as f:
                json.dump(sidecar, f, indent=1, sort_keys=True, default=str)
                f.flush()
                os.fsync(f.fileno())
            os.replace(side_tmp, tmp / SIDECAR)
            for f in tmp.iterdir():  # make the data durable before it becomes visible
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            if force and final.exists():
                trash = self.engines_dir / f".tmp-old-{final.name}-{uuid.uuid4().hex[:8]}"
                os.rename(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same build first
            _fsync_dir(self.engines_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.read_entry(final).verify()

    def timing_cache_path(self, env: dict) -> Path:
        gpu = "".join(c if c.isalnum() else "_" for c in str(env.get("gpu")))
        return self.timing_dir / f"{gpu}-cc{env.get('compute_capability')}-trt{env.get('tensorrt')}.cache"

    # --- cleaning -----------------------------------------------------------------------------------
    def prune(self, *, everything: bool = False, foreign: bool = True, older_than_days: float | None = None,
              weights_hash: str | None = None, env_for: Callable[[str], dict | None] | None = None,
              dry_run: bool = False, checksums: bool = True) -> list[tuple[Path, str]]:
        """Remove leftovers of interrupted builds, unreadable entries, and (by default) entries built for
        another machine/software stack. Returns (path, reason) for each removed directory."""
        removed = []
        now = time.time()
        env_cache: dict[str, dict | None] = {}
        for p in self.all_dirs():
            reason = None
            if everything:
                reason = "--all"
            elif p.name.startswith(".tmp-"):
                # A build may still be running in another process: leave very fresh temp dirs.
                if now - p.stat().st_mtime > 3600 or older_than_days == 0:
                    reason = "leftover of an interrupted build"
            else:
                try:
                    e = self.read_entry(p).verify(checksums=checksums)
                except CacheError as exc:
                    reason = f"invalid: {exc}"
                else:
                    c = e.components
                    if weights_hash and str(c.get("weights_hash")) == weights_hash:
                        reason = "belongs to the given export"
                    elif foreign and env_for is not None:
                        be = c.get("backend")
                        if be not in env_cache:
                            env_cache[be] = env_for(be)
                        here = env_cache[be]  # None: a backend this install does not know; kept
                        if here is not None and env_differences(c, here):
                            reason = "built for another machine: " + "; ".join(env_differences(c, here))
                    if reason is None and older_than_days is not None:
                        if now - p.stat().st_mtime > older_than_days * 86400:
                            reason = f"older than {older_than_days:g} days"
            if reason:
                removed.append((p, reason))
                if not dry_run:
                    shutil.rmtree(p, ignore_errors=True)
        return removed


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """temp file in the same directory + fsync + rename (used for TensorRT timing caches)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
