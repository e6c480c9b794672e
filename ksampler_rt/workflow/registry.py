"""The local model registry: what a workflow's ``ckpt_name`` / ``lora_name`` resolve to.

Layout (like ComfyUI's ``models/`` folder)::

    MODELS_DIR/checkpoints/<ckpt_name>/manifest.json   an export directory (``ksampler-rt export``)
    MODELS_DIR/loras/<lora_name>                        LoRA files (.safetensors)
    MODELS_DIR/diffusion_models/<unet_name>/            separate components of the flow families
    MODELS_DIR/text_encoders/<clip_name>/               (UNETLoader, DualCLIPLoader / TripleCLIPLoader,
    MODELS_DIR/vae/<vae_name>/                          VAELoader): export directories, as checkpoints
    MODELS_DIR/controlnet/<control_net_name>/           ControlNet / T2I-Adapter exports (ControlNetLoader)

``MODELS_DIR`` is ``--models`` on the command line, else ``$KSAMPLER_RT_MODELS``, else
``$KSAMPLER_RT_CACHE/models`` (default ``~/.cache/ksampler-rt/models``).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def default_cache_dir() -> Path:
    return Path(os.environ.get("KSAMPLER_RT_CACHE", Path.home() / ".cache" / "ksampler-rt")).expanduser()


def default_models_dir() -> Path:
    env = os.environ.get("KSAMPLER_RT_MODELS")
    return Path(env).expanduser() if env else default_cache_dir() / "models"


def check_entry_name(kind: str, name) -> str:
    """A registry entry name is one plain file or folder name: no separators, not '.' or '..'."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"{kind}: received {name!r}, expected a plain name (no '/', '\\', '.' or '..')")
    return name


COMPONENT_INPUTS = {"diffusion_models": "unet_name", "text_encoders": "clip_name", "vae": "vae_name",
                    "controlnet": "control_net_name"}
#: ``register --as`` choices: the registry folder an export is made available in.
REGISTER_FOLDERS = ("checkpoints",) + tuple(COMPONENT_INPUTS)
_DENOISERS = ("unet", "transformer")
_TEXT_ENCODERS = ("clip", "clip2", "clip_l", "clip_g", "t5xxl")


def folder_for_export(manifest: dict) -> str:
    """Where ``ksampler-rt register`` puts an export by default, from what it holds: a ControlNet export under
    ``controlnet/``; a denoiser with its text encoders and VAE under ``checkpoints/`` (CheckpointLoaderSimple);
    else the separate component it is: ``diffusion_models/`` (a transformer / UNet alone), ``text_encoders/``,
    ``vae/``."""
    if manifest.get("kind") in ("controlnet", "t2i_adapter"):
        return "controlnet"
    models = set(manifest.get("models", {}))
    has_denoiser, has_te, has_vae = models & set(_DENOISERS), models & set(_TEXT_ENCODERS), "vae_decoder" in models
    if has_denoiser and (has_te or has_vae):
        return "checkpoints"
    if has_denoiser:
        return "diffusion_models"
    if has_te and not has_vae:
        return "text_encoders"
    if has_vae and not has_te:
        return "vae"
    raise ValueError(f"export_dir: received an export of {sorted(models)}, expected a checkpoint, a diffusion "
                     f"model, text encoders, a VAE or a ControlNet (say which with --as)")


def check_component_folder(folder: str) -> str:
    if folder not in COMPONENT_INPUTS:
        raise ValueError(f"folder: received {folder!r}, expected one of {tuple(COMPONENT_INPUTS)}")
    return folder


class ModelRegistry:
    def __init__(self, models_dir: str | os.PathLike | None = None):
        self.root = Path(models_dir).expanduser() if models_dir else default_models_dir()

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def loras_dir(self) -> Path:
        return self.root / "loras"

    def component_names(self, folder: str) -> list[str]:
        """The entries of a component folder (``diffusion_models``, ``text_encoders``, ``vae``)."""
        root = self.root / check_component_folder(folder)
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if (p / "manifest.json").is_file())

    def component(self, folder: str, name: str) -> Path:
        root = self.root / check_component_folder(folder)
        key = COMPONENT_INPUTS[folder]
        check_entry_name(key, name)
        path = root / name
        if not (path / "manifest.json").is_file():
            names = ", ".join(self.component_names(folder)) or "(none)"
            raise ValueError(f"{key}: received {name!r}, expected one of the exports in {root}: {names}")
        return path

    def checkpoint_names(self) -> list[str]:
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted(p.name for p in self.checkpoints_dir.iterdir() if (p / "manifest.json").is_file())

    def lora_names(self) -> list[str]:
        if not self.loras_dir.is_dir():
            return []
        return sorted(p.name for p in self.loras_dir.iterdir() if p.suffix == ".safetensors")

    def checkpoint(self, name: str) -> Path:
        path = self.checkpoints_dir / str(name)
        if (not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", "..")
                or not (path / "manifest.json").is_file()):
            names = ", ".join(self.checkpoint_names()) or "(none: run `ksampler-rt demo` or `ksampler-rt register`)"
            raise ValueError(f"ckpt_name: received {name!r}, expected one of the registered checkpoints in "
                             f"{self.checkpoints_dir}: {names}")
        return path

    def lora(self, name: str) -> Path:
        path = self.loras_dir / name
        if "/" in name or "\\" in name or not path.is_file():
            names = ", ".join(self.lora_names()) or "(none)"
            raise FileNotFoundError(f"lora_name: received {name!r}, expected one of the LoRA files in "
                                    f"{self.loras_dir}: {names}")
        return path

    def controlnet_names(self) -> list[str]:
        return self.component_names("controlnet")

    def register_checkpoint(self, name: str, export_dir: str | os.PathLike, *, copy: bool = False) -> Path:
        """Make an export directory available as ``ckpt_name``: a symlink (or a copy) under checkpoints/."""
        return self.register(name, export_dir, "checkpoints", copy=copy)

    def register(self, name: str, export_dir: str | os.PathLike, folder: str | None = None, *,
                 copy: bool = False) -> Path:
        """Make an export directory available under ``name`` in ``folder`` (``checkpoints`` or a component
        folder; None: :func:`folder_for_export` decides): a symlink (or a copy)."""
        export_dir = Path(export_dir).resolve()
        if not (export_dir / "manifest.json").is_file():
            raise FileNotFoundError(f"export_dir: {export_dir} has no manifest.json; expected the output of "
                                    "`ksampler-rt export`")
        if folder is None:
            import json

            folder = folder_for_export(json.loads((export_dir / "manifest.json").read_text()))
        if folder not in REGISTER_FOLDERS:
            raise ValueError(f"folder: received {folder!r}, expected one of {REGISTER_FOLDERS}")
        root = self.root / folder
        target = root / check_entry_name("name", name)
        root.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)
        if copy:
            shutil.copytree(export_dir, target)
        else:
            target.symlink_to(export_dir, target_is_directory=True)
        return target

    def register_lora(self, path: str | os.PathLike, name: str | None = None) -> Path:
        path = Path(path).resolve()
        target = self.loras_dir / check_entry_name("name", name or path.name)
        self.loras_dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)
        return target
