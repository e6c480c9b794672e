"""Load the export source: a diffusers-format folder or a single-file checkpoint (local only)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from .errors import ExportError
from .families import SUPPORTED_FAMILIES, TEXT_ENCODERS, is_sdxl, unsupported_family_message

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


@dataclasses.dataclass
class Source:
    path: str
    kind: str                 # "diffusers" | "single_file"
    family: str
    prediction: str           # "eps" | "v"
    modules: dict             # unet, vae, text_encoder?, text_encoder_2?  (torch modules, fp32, eval)
    schedule: dict
    latent_scale: float
    tokenizer_dirs: dict      # subfolder name -> path to copy (may be empty)
    weight_files: list
    vae_override: bool = False
    tokenizer_source: str = ""  # where tokenizer_dirs came from (printed)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: invalid JSON ({exc})") from None


def schedule_from_config(sched: dict | None) -> dict:
    sched = sched or {}
    bs = sched.get("beta_schedule", "scaled_linear")
    if bs != "scaled_linear":  # diffusers' 'linear' spaces the betas themselves linearly: another schedule
        raise ExportError(f"scheduler beta_schedule: received {bs!r}, expected 'scaled_linear' (ComfyUI's SD "
                          f"schedule, which ComfyUI calls 'linear')")
    return {"beta_schedule": "linear",  # ComfyUI's name for sqrt-space linear betas (diffusers 'scaled_linear')
            "linear_start": float(sched.get("beta_start", 0.00085)),
            "linear_end": float(sched.get("beta_end", 0.012)),
            "timesteps": int(sched.get("num_train_timesteps", 1000)),
            "zsnr": bool(sched.get("rescale_betas_zero_snr", False))}


def weights_hash(files: list[str]) -> str:
    """sha256 over the weight files' bytes (ordered by component folder + file name; paths not hashed)."""
    h = hashlib.sha256()
    for p in sorted(files, key=lambda p: (os.path.basename(os.path.dirname(p)), os.path.basename(p))):
        with open(p, "rb") as f:
            while True:
                chunk = f.read(16 << 20)
                if not chunk:
                    break
                h.update(chunk)
    return h.hexdigest()


def _weights_in(folder):
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.endswith(WEIGHT_SUFFIXES)]


def detect_diffusers_family(root: str, model_index: dict, family: str, prediction: str | None) -> tuple[str, str]:
    unet_cfg = _read_json(os.path.join(root, "unet", "config.json"))
    sched_path = os.path.join(root, "scheduler", "scheduler_config.json")
    sched = _read_json(sched_path) if os.path.isfile(sched_path) else {}
    pred = prediction or {"v_prediction": "v", "epsilon": "eps"}.get(sched.get("prediction_type", "epsilon"))
    if pred is None:
        raise ExportError(f"scheduler prediction_type: received {sched.get('prediction_type')!r}, expected "
                          f"'epsilon' or 'v_prediction'")
    has_te1 = bool(model_index.get("text_encoder") and model_index["text_encoder"][0])
    has_te2 = bool(model_index.get("text_encoder_2") and model_index["text_encoder_2"][0])
    if unet_cfg.get("addition_embed_type") == "text_time":
        detected = "sdxl" if has_te1 else "sdxl-refiner"
        if not has_te2:
            raise ExportError(f"{root}: SDXL-style UNet but model_index.json lists no text_encoder_2")
    elif unet_cfg.get("addition_embed_type") not in (None,) or unet_cfg.get("in_channels", 4) != 4:
        raise ExportError(unsupported_family_message(
            f"{model_index.get('_class_name')} (in_channels={unet_cfg.get('in_channels')}, "
            f"addition_embed_type={unet_cfg.get('addition_embed_type')})", "checkpoint family"))
    else:
        te_path = os.path.join(root, "text_encoder", "config.json")
        if has_te1 and not os.path.isfile(te_path):
            raise ExportError(f"{root}: missing component 'text_encoder/' (expected text_encoder/config.json)")
        te_cfg = _read_json(te_path) if has_te1 else {}
        sd2 = te_cfg.get("hidden_act") == "gelu" or unet_cfg.get("cross_attention_dim") == 1024
        detected = ("sd2-v" if pred == "v" else "sd2") if sd2 else "sd15"
    if family in (None, "auto"):
        return detected, pred
    if family not in SUPPORTED_FAMILIES:
        raise ExportError(unsupported_family_message(family))
    base = lambda f: "sd2" if f.startswith("sd2") else f  # noqa: E731
    if base(family) != base(detected):
        raise ExportError(f"--family: received {family}, expected {detected}: the checkpoint {root} does not "
                          f"match {family}, it looks like {detected}")
    if family == "sd2-v":
        pred = "v"
    elif family == "sd2" and prediction is None:
        pred = "eps"
    return family, pred


def load_diffusers_folder(root: str, family: str = "auto", prediction: str | None = None) -> Source:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    mi_path = os.path.join(root, "model_index.json")
    if not os.path.isfile(mi_path):
        raise ExportError(f"{root}: not a diffusers folder (no model_index.json) and not a .safetensors checkpoint")
    model_index = _read_json(mi_path)
    for comp in ("unet", "vae"):
        if not os.path.isfile(os.path.join(root, comp, "config.json")):
            raise ExportError(f"{root}: missing component '{comp}/' (expected {comp}/config.json and weights)")
    fam, pred = detect_diffusers_family(root, model_index, family, prediction)
    needed = ["unet", "vae"] + [sub for _, sub, _ in TEXT_ENCODERS[fam]]
    weight_files = []
    for comp in needed:
        cdir = os.path.join(root, comp)
        if not os.path.isfile(os.path.join(cdir, "config.json")):
            raise ExportError(f"{root}: missing component '{comp}/' needed for {fam} (expected {comp}/config.json)")
        w = _weights_in(cdir)
        if not w:
            raise ExportError(f"{root}: component '{comp}/' has no weight files ({', '.join(WEIGHT_SUFFIXES)})")
        weight_files += w
    kw = dict(local_files_only=True)
    modules = {
        "unet": UNet2DConditionModel.from_pretrained(root, subfolder="unet", **kw),
        "vae": AutoencoderKL.from_pretrained(root, subfolder="vae", **kw),
    }
    for _, sub, _ in TEXT_ENCODERS[fam]:
        cls = CLIPTextModelWithProjection if sub == "text_encoder_2" else CLIPTextModel
        arch = _read_json(os.path.join(root, sub, "config.json")).get("architectures") or []
        if "CLIPTextModelWithProjection" in arch:
            cls = CLIPTextModelWithProjection
        modules[sub] = cls.from_pretrained(root, subfolder=sub, **kw)
    for m in modules.values():
        m.to(torch.float32).eval()
    sched_path = os.path.join(root, "scheduler", "scheduler_config.json")
    schedule = schedule_from_config(_read_json(sched_path) if os.path.isfile(sched_path) else None)
    toks = {}
    for _, _, tok in TEXT_ENCODERS[fam]:
        tdir = os.path.join(root, tok)
        if not os.path.isdir(tdir):
            raise ExportError(f"{root}: missing component '{tok}/' (tokenizer files)")
        toks[tok] = tdir
    return Source(root, "diffusers", fam, pred, modules, schedule,
                  float(modules["vae"].config.get("scaling_factor", 0.18215)), toks, weight_files,
                  tokenizer_source=f"checkpoint folder ({root})")


def load_source(path: str, family: str = "auto", prediction: str | None = None, vae: str | None = None,
                config: str | None = None) -> Source:
    if family not in (None, "auto") and family not in SUPPORTED_FAMILIES:
        raise ExportError(unsupported_family_message(family))
    if prediction not in (None, "eps", "v"):
        raise ExportError(f"--prediction: received {prediction!r}, expected 'eps' or 'v'")
    if not os.path.exists(path):
        raise ExportError(f"checkpoint: received {path}, expected a diffusers folder or a .safetensors file: no such "
                          f"file or folder")
    path = os.path.abspath(path)
    if os.path.isdir(path):
        src = load_diffusers_folder(path, family, prediction)
    elif path.endswith(".safetensors"):
        from .single_file import load_single_file
        fam, pred, modules, cfg_root = load_single_file(path, family, prediction, config)
        sched_path = os.path.join(cfg_root, "scheduler", "scheduler_config.json")
        toks = {}
        for _, _, tok in TEXT_ENCODERS[fam]:
            if os.path.isdir(os.path.join(cfg_root, tok)):
                toks[tok] = os.path.join(cfg_root, tok)
        src = Source(path, "single_file", fam, pred, modules,
                     schedule_from_config(_read_json(sched_path) if os.path.isfile(sched_path) else None),
                     float(modules["vae"].config.get("scaling_factor", 0.18215)), toks, [path],
                     tokenizer_source=f"--config {cfg_root}")
    elif path.endswith((".ckpt", ".pt", ".pth", ".bin")):
        raise ExportError(f"checkpoint: received {path}, a pickle checkpoint (not loaded: unpickling runs code), "
                          f"expected a .safetensors file; convert it first")
    else:
        raise ExportError(f"checkpoint: received {path}, expected a diffusers folder or a .safetensors file")
    if vae:
        from .single_file import load_vae_file
        src.modules["vae"] = load_vae_file(os.path.abspath(vae), src.family)
        src.weight_files.append(os.path.abspath(vae) if os.path.isfile(vae) else None)
        src.weight_files = [w for w in src.weight_files if w] + (_weights_in(vae) if os.path.isdir(vae) else [])
        src.latent_scale = float(src.modules["vae"].config.get("scaling_factor", src.latent_scale))
    if is_sdxl(src.family) and src.prediction == "v":
        pass  # v-pred SDXL fine-tunes exist; recorded as given
    return src
