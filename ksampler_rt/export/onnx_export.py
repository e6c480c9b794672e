"""Export a Stable Diffusion model (diffusers folder or single-file checkpoint) to ONNX + manifest.json.

Atomic: everything is written into ``.<out>.tmp-<pid>-*`` next to ``out`` and renamed into place only after
every model exported and validated. Any failure, Ctrl-C, SIGTERM or SIGHUP removes the temp dir; one left by a
killed process is removed by the next export (see ``workdirs``). The libraries' warnings and log output go to
``<out>/export.log`` (see ``library_log``), progress lines to stderr.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .errors import ExportError
from .families import CONTEXT_OUTPUT, PAD_WITH_END, TEXT_ENCODERS, is_sdxl
from .library_log import current as current_library_log
from .library_log import library_output_to
from .manifest import EXPORTER_REVISION, FORMAT, FORMAT_VERSION, versions, write_manifest
from .workdirs import (SCRATCH_PREFIX, drop_marker, make_owned_dir, old_prefix, remove_stale_export_dirs,
                       terminate_cleanly, tmp_prefix)

EXTERNAL_DATA_THRESHOLD = 2_000_000_000  # bytes of initializers above which a model uses ONNX external data
DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 7, 23
CLIP_LENGTH = 77


@dataclasses.dataclass
class ModelSpec:
    name: str
    file: str
    module: object            # torch wrapper exported (fp32 or fp16 inside)
    reference: object         # torch wrapper compared against (fp32)
    param_prefix: str         # prefix of wrapper parameter names to strip for initializer_map
    inputs: list              # [{"name","dtype","shape"}]
    outputs: list             # [{"name","dtype","shape"}]
    make_inputs: object       # callable(i) -> dict name -> tensor, i = 0, 1 (two shapes)
    precision: str


def log(msg):
    print(f"[export] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _keep_named_initializers():
    """The TorchScript exporter merges initializers with equal *values* (e.g. freshly-initialised norms);
    that would break the torch-name -> initializer map LoRA merging relies on. Disable it for the export."""
    import torch
    orig = getattr(torch._C, "_jit_pass_onnx_deduplicate_initializers", None)
    if orig is None:
        yield
        return
    torch._C._jit_pass_onnx_deduplicate_initializers = lambda graph, params, training: params
    try:
        yield
    finally:
        torch._C._jit_pass_onnx_deduplicate_initializers = orig


def _dims(shape):
    return {i: d for i, d in enumerate(shape) if isinstance(d, str)}


def _effective_opset(opset: int, exporter: str) -> int:
    """The dynamo exporter (onnxscript) emits opset >= 18."""
    return max(int(opset), 18) if exporter == "dynamo" else int(opset)


def torch_export(spec: ModelSpec, path: str, opset: int, exporter: str = "torchscript"):
    import torch
    example = spec.make_inputs(1)
    in_names = [i["name"] for i in spec.inputs]
    out_names = [o["name"] for o in spec.outputs]
    # The exporter's warnings (TracerWarning on the UNet's shape checks...) are expected; export_model sends
    # them to its log file (library_log), not the console.
    with torch.no_grad():
        if exporter == "dynamo":
            dyn = {}
            for i in spec.inputs:
                dyn[i["name"]] = {ax: torch.export.Dim.AUTO for ax in _dims(i["shape"])}
            torch.onnx.export(spec.module, tuple(example.values()), path, dynamo=True, input_names=in_names,
                              output_names=out_names, dynamic_shapes=dyn,
                              opset_version=_effective_opset(opset, exporter),
                              optimize=False, external_data=True, verbose=False)
        else:
            dyn = {i["name"]: _dims(i["shape"]) for i in spec.inputs + spec.outputs}
            with _keep_named_initializers():
                torch.onnx.export(spec.module, tuple(example.values()), path, dynamo=False, input_names=in_names,
                                  output_names=out_names, dynamic_axes=dyn, opset_version=opset,
                                  do_constant_folding=False, export_params=True)


def _constant_array(name: str, producers: dict, initializers: dict):
    """The value of ``name`` if it is a graph constant (an initializer, a Constant node, or a Cast of
    one), else None."""
    from onnx import helper, numpy_helper

    if name in initializers:
        return numpy_helper.to_array(initializers[name])
    node = producers.get(name)
    if node is None:
        return None
    if node.op_type == "Constant":
        for attr in node.attribute:
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
        return None
    if node.op_type == "Cast":
        value = _constant_array(node.input[0], producers, initializers)
        if value is None:
            return None
        to = next(a.i for a in node.attribute if a.name == "to")
        return value.astype(helper.tensor_dtype_to_np_dtype(to))
    return None


def _is_zero_tensor(name: str, producers: dict, initializers: dict) -> bool:
    """Whether ``name`` is ConstantOfShape(value 0), possibly times finite graph constants: the empty
    attention mask torch's SDPA export materialises."""
    from onnx import numpy_helper

    node = producers.get(name)
    if node is None:
        return False
    if node.op_type == "Mul":
        a, b = node.input
        for zero, other in ((a, b), (b, a)):
            value = _constant_array(other, producers, initializers)
            if value is not None and np.isfinite(value).all() and _is_zero_tensor(zero, producers, initializers):
                return True
        return False
    if node.op_type != "ConstantOfShape":
        return False
    for attr in node.attribute:
        if attr.name == "value":
            return not numpy_helper.to_array(attr.t).any()
    return True  # ConstantOfShape's default value is a float zero


def _names_used(graph, subgraphs_only: bool = False) -> set:
    """Every tensor name a node of ``graph`` reads, subgraphs (If / Loop bodies) included; with
    ``subgraphs_only``, only the names read inside subgraphs."""
    import onnx

    used = set()
    for node in graph.node:
        if not subgraphs_only:
            used.update(node.input)
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subgraphs:
                used |= _names_used(sub)
    return used


def drop_zero_bias_adds(model) -> int:
    """Bypass every ``Add(x, zeros)`` whose zeros come from ConstantOfShape(0) (x + 0 == x; only a
    -0.0 turns into +0.0, which attention scores cannot tell apart), then prune what fed them.

    torch's SDPA export adds such an all-zero mask of [batch*heads, L, S] to every attention's scores;
    ONNX Runtime computes and adds it each call (7 % of a half-width SD1.5 UNet call at 32x32 latents
    on a 2-core CPU). A zero mask larger than x would broadcast x; the export's validation runs on the
    result and the export retries without this pass if it fails (see export_model). Returns the number
    of Adds bypassed."""
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    initializers = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    in_subgraphs = _names_used(graph, subgraphs_only=True)  # outer-scope reads stay as they are
    rename, dropped = {}, []
    for node in graph.node:
        if node.op_type != "Add" or node.output[0] in outputs or node.output[0] in in_subgraphs:
            continue
        a, b = node.input
        if _is_zero_tensor(b, producers, initializers):
            rename[node.output[0]] = a
        elif _is_zero_tensor(a, producers, initializers):
            rename[node.output[0]] = b
        else:
            continue
        dropped.append(node)
    if not dropped:
        return 0
    for node in dropped:
        graph.node.remove(node)
    for node in graph.node:
        for k, name in enumerate(node.input):
            while name in rename:
                name = rename[name]
            node.input[k] = name
    while True:  # prune nodes whose outputs nothing uses any more (the masks and their shape maths)
        used = _names_used(graph) | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    return len(dropped)


def finalize_onnx(scratch_path: str, final_path: str, spec: ModelSpec, drop_zero_masks: bool = True):
    """Re-save into the output dir (one external-data file if > 2 GB), name the dims, drop the
    zero attention masks, build initializer_map."""
    import onnx

    model = onnx.load(scratch_path, load_external_data=True)
    dropped = drop_zero_bias_adds(model) if drop_zero_masks else 0
    # symbolic names on graph I/O, so consumers (TensorRT profiles) see B/h/w/T
    for vi, spec_io in zip(list(model.graph.input) + list(model.graph.output), spec.inputs + spec.outputs):
        for d, s in zip(vi.type.tensor_type.shape.dim, spec_io["shape"]):
            if isinstance(s, str):
                d.dim_param = s
    init_names = {i.name for i in model.graph.initializer}
    size = sum(len(t.raw_data) if t.HasField("raw_data") else t.ByteSize() for t in model.graph.initializer)
    init_map, unmapped = {}, []
    for pname, _ in spec.module.named_parameters():
        key = pname[len(spec.param_prefix):] if pname.startswith(spec.param_prefix) else pname
        if pname in init_names:
            init_map[key] = pname
        else:
            unmapped.append(key)
    external = size > EXTERNAL_DATA_THRESHOLD
    if external:
        location = os.path.basename(final_path) + ".data"
        onnx.save_model(model, final_path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=location, size_threshold=1024)
    else:
        onnx.save_model(model, final_path)
    del model
    return {"external_data": external, "initializer_bytes": size, "init_map": init_map, "unmapped": unmapped,
            "zero_masks_dropped": dropped}


# ----------------------------------------------------------------------------------------------- specs

def _rng(i, salt):
    import torch
    return torch.Generator().manual_seed(1234 + 17 * i + salt)


def _clip_ids(cfg, batch, gen):
    import torch
    vocab = int(cfg.vocab_size)
    eos = int(cfg.eos_token_id) if cfg.eos_token_id not in (None, 2) and cfg.eos_token_id < vocab else vocab - 1
    bos = int(cfg.bos_token_id) if cfg.bos_token_id is not None and cfg.bos_token_id < vocab and cfg.bos_token_id != eos else vocab - 2
    ids = torch.randint(0, min(vocab - 2, eos) or 1, (batch, CLIP_LENGTH), generator=gen, dtype=torch.int64)
    ids[:, 0] = bos
    for b in range(batch):
        n = int(torch.randint(3, CLIP_LENGTH - 1, (1,), generator=gen))
        ids[b, n] = eos
        ids[b, n + 1:] = eos  # SD1-style padding with end token
    return ids


def pair(module, make, dtype):
    """(module to export, fp32 reference): the wrapper ``make(module, dtype)`` in the export dtype, and the
    fp32 one it is validated against (the same object when exporting fp32)."""
    import torch

    ref = make(module, torch.float32)
    if dtype == torch.float32:
        return ref, ref
    return make(copy.deepcopy(module).to(dtype), dtype), ref


def vae_specs(vae, precision: str, dtype) -> list:
    """The VAE decoder and encoder specs of an ``AutoencoderKL`` (any latent channel count), validated at
    two latent shapes."""
    import torch
    from .wrappers import VaeDecoderWrapper, VaeEncoderWrapper

    lc = int(vae.config.latent_channels)
    fv = 2 ** (len(vae.config.block_out_channels) - 1)
    dexp, dref = pair(vae, lambda m, d: VaeDecoderWrapper(m, d), dtype)
    eexp, eref = pair(vae, lambda m, d: VaeEncoderWrapper(m, d), dtype)
    lshapes = [(1, 4, 4), (2, 6, 8)]

    def dec_inputs(i):
        b, h, w = lshapes[i]
        return {"latent": torch.randn(b, lc, h, w, generator=_rng(i, 3))}

    def enc_inputs(i):
        b, h, w = lshapes[i]
        return {"image": torch.rand(b, 3, h * fv, w * fv, generator=_rng(i, 4)) * 2 - 1}
    return [ModelSpec("vae_decoder", "vae_decoder.onnx", dexp, dref, "vae.",
                      [{"name": "latent", "dtype": "float32", "shape": ["B", lc, "h", "w"]}],
                      [{"name": "image", "dtype": "float32", "shape": ["B", 3, "H", "W"]}], dec_inputs, precision),
            ModelSpec("vae_encoder", "vae_encoder.onnx", eexp, eref, "vae.",
                      [{"name": "image", "dtype": "float32", "shape": ["B", 3, "H", "W"]}],
                      [{"name": "latent", "dtype": "float32", "shape": ["B", lc, "h", "w"]}], enc_inputs, precision)]


def build_specs(src, precision: str, upcast_attention: bool, control_inputs: bool = False):
    import torch
    from .wrappers import ClipWrapper, UNetWrapper, use_classic_attention

    dt = torch.float16 if precision == "fp16" else torch.float32
    fam = src.family
    specs = []

    # --- UNet
    unet = src.modules["unet"]
    use_classic_attention(unet, upcast=False)
    ucfg = unet.config
    f = 2 ** (len(ucfg.block_out_channels) - 1)
    ctx_dim = ucfg.cross_attention_dim
    cin = ucfg.in_channels
    adm = int(ucfg.projection_class_embeddings_input_dim or 0) if ucfg.get("addition_embed_type") == "text_time" else 0
    uexp, uref = pair(unet, lambda m, d: UNetWrapper(m, d), dt)
    if dt == torch.float16:
        use_classic_attention(uexp.unet, upcast=upcast_attention)
    ushapes = [(1, 2 * f, 2 * f, 1), (2, 3 * f, 4 * f, 2)]

    def unet_inputs(i):
        b, h, w, t = ushapes[i]
        g = _rng(i, 1)
        d = {"sample": torch.randn(b, cin, h, w, generator=g),
             "timestep": torch.rand(b, generator=g) * 999.0,
             "encoder_hidden_states": torch.randn(b, CLIP_LENGTH * t, ctx_dim, generator=g)}
        if adm:
            d["y"] = torch.randn(b, adm, generator=g)
        return d
    uin = [{"name": "sample", "dtype": "float32", "shape": ["B", cin, "h", "w"]},
           {"name": "timestep", "dtype": "float32", "shape": ["B"]},
           {"name": "encoder_hidden_states", "dtype": "float32", "shape": ["B", "T", ctx_dim]}]
    if adm:
        uin.append({"name": "y", "dtype": "float32", "shape": ["B", adm]})
    uout = [{"name": "out", "dtype": "float32", "shape": ["B", ucfg.out_channels, "h", "w"]}]
    specs.append(ModelSpec("unet", "unet.onnx", uexp, uref, "unet.", uin, uout, unet_inputs, precision))
    if control_inputs:  # the residual-taking UNet for ControlNet / T2I-Adapter (see controlnet_export)
        from .controlnet_export import unet_control_spec
        specs.append(unet_control_spec(unet, dt, precision, upcast_attention, uin, uout, unet_inputs))

    # --- text encoders
    for name, sub, _tok in TEXT_ENCODERS[fam]:
        te = src.modules[sub]
        if hasattr(te, "set_attn_implementation"):
            te.set_attn_implementation("eager")  # sdpa's TorchScript symbolic breaks fp16 graphs
        cfg = te.config
        cexp, cref = pair(te, lambda m, d: ClipWrapper(m), dt)
        proj = hasattr(te, "text_projection")
        pooled_dim = int(cfg.projection_dim) if proj else int(cfg.hidden_size)
        hs = int(cfg.hidden_size)

        def clip_inputs(i, cfg=cfg):
            return {"input_ids": _clip_ids(cfg, i + 1, _rng(i, 2))}
        outs = [{"name": "last_hidden_state", "dtype": "float32", "shape": ["B", CLIP_LENGTH, hs]},
                {"name": "penultimate_hidden_state", "dtype": "float32", "shape": ["B", CLIP_LENGTH, hs]},
                {"name": "penultimate_hidden_state_norm", "dtype": "float32", "shape": ["B", CLIP_LENGTH, hs]},
                {"name": "pooled_output", "dtype": "float32", "shape": ["B", pooled_dim]},
                {"name": "hidden_states", "dtype": "float32", "shape": ["B", int(cfg.num_hidden_layers), CLIP_LENGTH, hs]},
                {"name": "hidden_states_norm", "dtype": "float32",
                 "shape": ["B", int(cfg.num_hidden_layers), CLIP_LENGTH, hs]}]
        specs.append(ModelSpec(name, f"{name}.onnx", cexp, cref, "model.",
                               [{"name": "input_ids", "dtype": "int64", "shape": ["B", CLIP_LENGTH]}],
                               outs, clip_inputs, precision))

    # --- VAE
    vae = src.modules["vae"]
    use_classic_attention(vae, upcast=False)
    vcfg = vae.config
    lc = int(vcfg.latent_channels)
    fv = 2 ** (len(vcfg.block_out_channels) - 1)
    vae_prec = precision
    vdt = dt
    if dt == torch.float16 and is_sdxl(fam) and not src.vae_override:
        vae_prec, vdt = "fp32", torch.float32
        log("SDXL VAE kept in fp32 (it overflows in fp16); pass --vae with an fp16-fixed SDXL VAE to get fp16")
    specs += vae_specs(vae, vae_prec, vdt)
    return specs, {"adm_channels": adm, "latent_channels": lc, "unet_downscale": f, "vae_downscale": fv}


# ------------------------------------------------------------------------------------------ tokenizer

def _tokenizer_info(tdir):
    info = {"pad_token": None, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
    if not tdir or not os.path.isdir(tdir):
        return info

    def tok_str(v):
        return v.get("content") if isinstance(v, dict) else v
    cfg = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        p = os.path.join(tdir, name)
        if os.path.isfile(p):
            with open(p) as fh:
                cfg.update({k: v for k, v in json.load(fh).items() if v is not None})
    vocab = {}
    if os.path.isfile(os.path.join(tdir, "vocab.json")):
        with open(os.path.join(tdir, "vocab.json")) as fh:
            vocab = json.load(fh)
    for key in ("pad", "bos", "eos"):
        t = tok_str(cfg.get(f"{key}_token"))
        if key == "pad":
            info["pad_token"] = t
        info[f"{key}_token_id"] = vocab.get(t) if t is not None else None
    return info


# ---------------------------------------------------------------------------------------- orchestration

def _check_space(parent: str, need: int):
    free = shutil.disk_usage(parent).free
    if free < need:
        raise ExportError(f"no space left: export needs about {need / 1e9:.2f} GB in {parent}, "
                          f"only {free / 1e9:.2f} GB free")


def _param_bytes(module, precision):
    n = sum(p.numel() for p in module.parameters())
    return n * (2 if precision == "fp16" else 4)


def export_model(source: str, out: str, precision: str = "fp32", family: str = "auto", opset: int = DEFAULT_OPSET,
                 prediction: str | None = None, vae: str | None = None, config: str | None = None,
                 overwrite: bool = False, exporter: str = "torchscript", tolerance: float | None = None,
                 upcast_attention: bool | None = None, tokenizer: str | None = None, no_tokenizer: bool = False,
                 models: list[str] | tuple[str, ...] | None = None,
                 library_log: str | os.PathLike | None = None, clip_l: str | None = None,
                 clip_g: str | None = None, t5: str | None = None, control_inputs: bool = False) -> dict:
    """Export ``source`` into ``out``; returns the manifest.

    ``control_inputs``: also export ``unet_control`` (the UNet taking ControlNet residuals and T2I-Adapter
    features, see :mod:`.controlnet_export`). A ControlNet / T2I-Adapter ``source`` is exported as such.

    ``tokenizer``: a folder with CLIP's vocab.json + merges.txt used for every text encoder (overrides the
    checkpoint's own). Single-file checkpoints carry no tokenizer: without ``tokenizer`` (or ``config`` with
    tokenizer folders) one is looked up locally (:func:`clip_tokenizer.find_clip_tokenizer`); when none is found the
    export fails unless ``no_tokenizer``. ``models``: export only these models (e.g. ``["unet"]``; for tests and
    debugging -- the manifest then lists only them and is not a complete export).

    Progress goes to stderr as ``[export]`` step lines. What torch / transformers / diffusers warn or log on the
    way (the TorchScript exporter's ``TracerWarning`` s...) goes to a log file instead
    (:mod:`.library_log`): ``library_log`` if given (appended), else ``<out>/export.log`` -- or, when the export
    fails with an error, ``<out>.export.log`` next to where ``out`` would have been; one line names the file when
    anything was written. Working folders of exports whose process died are removed first (:mod:`.workdirs`), and
    SIGTERM / SIGHUP / Ctrl-C during the export remove this one's.
    """
    only = list(models) if models is not None else None
    if precision not in ("fp32", "fp16"):
        raise ExportError(f"precision: received {precision!r}, expected 'fp32' or 'fp16'")
    if exporter not in ("torchscript", "dynamo"):
        raise ExportError(f"exporter: received {exporter!r}, expected 'torchscript' or 'dynamo'")
    if not (MIN_OPSET <= int(opset) <= MAX_OPSET):
        raise ExportError(f"opset: received {opset}, expected an integer from {MIN_OPSET} to {MAX_OPSET} "
                          f"(default {DEFAULT_OPSET})")
    if tokenizer and no_tokenizer:
        raise ExportError("tokenizer: received both --tokenizer and --no-tokenizer, expected at most one of them")
    out = os.path.abspath(out)
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)) and not overwrite:
        raise ExportError(f"out: received {out}, which already exists and is not empty; expected a new or empty "
                          f"folder (pass --overwrite to replace it)")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    t0 = time.time()
    for path in remove_stale_export_dirs(out):
        log(f"removed {path} (left behind by an export that was killed)")
    failed_log = out + ".export.log"
    own_log = library_log is None
    enclosing = current_library_log()
    reports = own_log or enclosing is None or enclosing.path != Path(library_log).absolute()  # else its owner does
    with terminate_cleanly():  # SIGTERM / SIGHUP unwind through the finally below (Ctrl-C does anyway)
        tmp = scratch = captured = None
        failed = False
        try:
            tmp = make_owned_dir(tmp_prefix(out), parent)
            scratch = make_owned_dir(SCRATCH_PREFIX)
            log_path = Path(scratch, "export.log") if own_log else Path(library_log).absolute()
            with library_output_to(log_path) as captured:
                manifest = _export_into(tmp, scratch, source, out, precision, family, opset, prediction, vae, config,
                                        exporter, tolerance, upcast_attention, tokenizer, no_tokenizer, only,
                                        {"clip_l": clip_l, "clip_g": clip_g, "t5": t5}, control_inputs)
            if own_log and captured.count:
                shutil.move(log_path, os.path.join(tmp, "export.log"))
            drop_marker(tmp)
            _move_into_place(tmp, out, overwrite)
            if own_log and os.path.isfile(failed_log):
                os.remove(failed_log)  # an earlier failed attempt's log; this export's own is in out/
            log(f"wrote {out} in {time.time() - t0:.1f}s")
            if reports and captured.count:
                log(captured.summary(os.path.join(out, "export.log") if own_log else log_path))
            return manifest
        except Exception as exc:
            failed = True  # (not on Ctrl-C / SIGTERM: whoever stopped the export does not want its log)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise ExportError(f"no space left on device while exporting to {out}; nothing written") from None
            raise
        finally:
            if failed and own_log and captured is not None and captured.count:
                kept = [p for p in (os.path.join(scratch, "export.log"), os.path.join(tmp, "export.log"))
                        if os.path.isfile(p)]
                if kept:
                    shutil.move(kept[0], failed_log)  # its log outlives the failed export's temp folders
                    log(captured.summary(failed_log))
            for path in (scratch, tmp):
                if path and os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)


def _export_into(tmp: str, scratch: str, source: str, out: str, precision: str, family: str, opset: int,
                 prediction: str | None, vae: str | None, config: str | None, exporter: str,
                 tolerance: float | None, upcast_attention: bool | None, tokenizer: str | None,
                 no_tokenizer: bool, only: list[str] | None, flow_files: dict | None = None,
                 control_inputs: bool = False) -> dict:
    """The export proper: load, export + validate each model into ``tmp``, write the manifest there."""
    from .controlnet_export import control_source, export_control_into
    from .flow_export import export_flow_into, flow_family_of
    from .validate import TOLERANCE

    control = control_source(source)
    if control is not None:  # a ControlNet / T2I-Adapter
        extra = {"--control-inputs": control_inputs, "--vae": vae, "--prediction": prediction, "--tokenizer": tokenizer,
                 "models": only, **{f"--{k.replace('_', '-')}": v for k, v in (flow_files or {}).items()}}
        given = [k for k, v in extra.items() if v]
        if given:
            raise ExportError(f"{given[0]}: received {extra[given[0]]!r} for the {control[0]} {source}, expected it "
                              f"only with a Stable Diffusion checkpoint")
        return export_control_into(tmp, scratch, source, control, family, precision, opset, exporter,
                                   tolerance if tolerance is not None else TOLERANCE[precision], config)

    flow = flow_family_of(source, family)
    if flow is not None and control_inputs:
        raise ExportError(f"--control-inputs: received it for the flow family {flow}, expected it only with an SD1.x / "
                          f"SD2.x / SDXL checkpoint (no ControlNet support for the flow families)")
    if flow is not None:  # SD3.5 / FLUX.1
        if prediction:
            raise ExportError(f"--prediction: received {prediction!r}, expected none for the flow family {flow} "
                              f"(rectified flow)")
        return export_flow_into(tmp, scratch, source, flow, precision, opset, exporter, tolerance, tokenizer,
                                no_tokenizer, only, vae=vae, config=config, **(flow_files or {}))
    if flow_files and any(flow_files.values()):
        raise ExportError(f"--clip-l / --clip-g / --t5: received {flow_files}, expected them only with an SD3.5 / "
                          f"FLUX.1 checkpoint; {source} is none")
    import torch
    from .source import load_source, weights_hash
    from .clip_tokenizer import check_tokenizer_dir, find_clip_tokenizer, read_vocab, write_clip_tokenizer_dir

    parent = os.path.dirname(out)
    # tokenizer files: (folder with vocab.json + merges.txt for every tower, where it came from) or None;
    # resolved before the (long) checkpoint load so a missing tokenizer fails fast
    clip_tok = None
    if tokenizer:
        clip_tok = (check_tokenizer_dir(tokenizer, "--tokenizer"), f"--tokenizer {os.path.abspath(tokenizer)}")
    elif not no_tokenizer and os.path.isfile(source) and source.endswith(".safetensors"):
        from .single_file import detect_family, read_safetensors_header
        fam, _ = detect_family(read_safetensors_header(source), family, prediction)
        if any(not (config and os.path.isdir(os.path.join(config, tok)))
               for name, _, tok in TEXT_ENCODERS[fam] if only is None or name in only):
            clip_tok = find_clip_tokenizer(os.path.abspath(source))
    kind = "single-file checkpoint" if os.path.isfile(source) else "checkpoint"
    log(f"loading the {kind} {os.path.abspath(source)} ...")
    src = load_source(source, family, prediction, vae, config)
    src.vae_override = bool(vae)
    tol = tolerance if tolerance is not None else TOLERANCE[precision]
    if upcast_attention is None:
        upcast_attention = src.family in ("sd2", "sd2-v")
    log(f"{src.kind} {src.path}: family {src.family}, prediction {src.prediction}, precision {precision}")
    towers = TEXT_ENCODERS[src.family]
    if only is not None:
        known = ["unet", "vae_decoder", "vae_encoder"] + [n for n, _, _ in towers] + (
            ["unet_control"] if control_inputs else [])
        if not only or any(m not in known for m in only):
            raise ExportError(f"models: received {only}, expected a non-empty subset of {known} for {src.family}")
        towers = [t for t in towers if t[0] in only]
    if clip_tok and towers:
        vocab = read_vocab(clip_tok[0])
        top = max(vocab.values())
        for name, sub, _ in towers:
            n = int(src.modules[sub].config.vocab_size)
            if top >= n:
                raise ExportError(f"tokenizer from {clip_tok[1]}: received ids up to {top}, expected ids below text "
                                  f"encoder {name}'s vocab_size {n}: not this model's tokenizer")
        log(f"tokenizer for {', '.join(n for n, _, _ in towers)}: {clip_tok[1]}")
    elif towers and src.tokenizer_dirs:
        log(f"tokenizer for {', '.join(n for n, _, _ in towers)}: {src.tokenizer_source}")

    need = int(sum(_param_bytes(m, precision) for m in src.modules.values()) * 1.15) + (64 << 20)
    _check_space(parent, need)
    torch.manual_seed(0)
    specs, dims = build_specs(src, precision, upcast_attention, control_inputs)
    if only is not None:
        specs = [s for s in specs if s.name in only]
    models, init_map, timings = export_specs(specs, tmp, scratch, opset, exporter, tol, precision)
    if is_sdxl(src.family) and "fp16" == precision and "unet" in models:
        models["unet"]["notes"] = "fp16 weights; I/O float32"
    if src.family in ("sd2", "sd2-v") and precision == "fp16" and upcast_attention and "unet" in models:
        models["unet"]["notes"] = "attention scores and softmax computed in fp32 (SD2.x overflows in fp16)"

    text_encoders = []
    for name, sub, tok in towers:
        cfg = src.modules[sub].config
        tdir, how = os.path.join(tmp, tok), None
        if clip_tok:
            write_clip_tokenizer_dir(clip_tok[0], tdir, PAD_WITH_END[src.family][name], CLIP_LENGTH)
            how = clip_tok[1]
        elif src.tokenizer_dirs.get(tok):
            shutil.copytree(src.tokenizer_dirs[tok], tdir)
            how = src.tokenizer_source
        else:
            tdir = None
            log(f"warning: no tokenizer files for {name} (--no-tokenizer); the workflow runner cannot encode "
                f"prompts with this export")
        text_encoders.append(dict(
            {"name": name, "file": f"{name}.onnx", "tokenizer": tok if tdir else None, "tokenizer_source": how,
             "hidden_size": int(cfg.hidden_size), "num_layers": int(cfg.num_hidden_layers),
             "all_hidden_states": True,
             "pooled_dim": models[name]["outputs"][3]["shape"][1],
             "pooled_projected": hasattr(src.modules[sub], "text_projection"),
             "max_length": CLIP_LENGTH, "context_output": CONTEXT_OUTPUT[src.family][name]},
            **_tokenizer_info(tdir)))

    adm = dims["adm_channels"]
    sdxl_adm = None
    if adm:
        ucfg = src.modules["unet"].config
        n_ids = 6 if src.family == "sdxl" else 5
        embed = int(ucfg.addition_time_embed_dim)
        sdxl_adm = {"pooled_from": "clip2", "pooled_dim": adm - n_ids * embed, "time_embed_dim": embed,
                    "time_ids": (["height", "width", "crop_h", "crop_w", "target_height", "target_width"]
                                 if n_ids == 6 else ["height", "width", "crop_h", "crop_w", "aesthetic_score"]),
                    "embedding": "comfy timestep_embedding: cat(cos, sin), max_period 10000"}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "exporter_revision": EXPORTER_REVISION,
        "family": src.family, "prediction": src.prediction,
        "latent_channels": dims["latent_channels"], "latent_scale": src.latent_scale,
        "latent_downscale": dims["vae_downscale"],
        "schedule": src.schedule,
        "text_encoders": text_encoders,
        "adm_channels": adm, "sdxl_adm": sdxl_adm,
        "models": models,
        "precision": precision, "opset": _effective_opset(opset, exporter), "exporter": exporter,
        "versions": versions(),
        "weights_hash": weights_hash(src.weight_files),
        "source": src.path, "source_kind": src.kind,
        "initializer_map": init_map,
        "export_seconds": timings,
    }
    if "unet_control" in models:
        names = [i["name"] for i in models["unet_control"]["inputs"]]
        manifest["control_inputs"] = {"down": [n for n in names if n.startswith("down_")], "mid": "mid",
                                      "adapter": [n for n in names if n.startswith("adapter_") and n != "adapter_mid"],
                                      "adapter_mid": "adapter_mid"}
    write_manifest(tmp, manifest)
    return manifest


def export_specs(specs: list, tmp: str, scratch: str, opset: int, exporter: str, tol: float,
                 precision: str) -> tuple[dict, dict, dict]:
    """Export each spec into ``tmp`` (scratch files in ``scratch``) and validate it against torch with ONNX
    Runtime at two shapes; returns (manifest ``models`` entries, initializer maps, seconds per model).
    Raises :class:`ExportError` when a model misses ``tol``."""
    import torch
    from .validate import validate

    models, init_map, timings = {}, {}, {}
    threads = max(1, min(4, torch.get_num_threads()))  # ONNX Runtime validation follows torch's setting
    for k, spec in enumerate(specs, 1):
        step = f"[{k}/{len(specs)}] {spec.name}"
        t = time.time()
        sdir = os.path.join(scratch, spec.name)
        os.makedirs(sdir)
        log(f"{step}: exporting with torch.onnx ({exporter}, {spec.precision}) ...")
        torch_export(spec, os.path.join(sdir, "model.onnx"), opset, exporter)
        fin = finalize_onnx(os.path.join(sdir, "model.onnx"), os.path.join(tmp, spec.file), spec)
        texp = time.time() - t
        val_args = (spec.reference, [spec.make_inputs(0), spec.make_inputs(1)], [o["name"] for o in spec.outputs],
                    threads)
        log(f"{step}: validating with ONNX Runtime against torch at 2 shapes ...")
        try:
            res = validate(os.path.join(tmp, spec.file), *val_args)
        except AssertionError:  # an output shape changed
            if not fin["zero_masks_dropped"]:
                raise
            res = {"max_rel_err": float("inf")}
        if not res["max_rel_err"] <= tol and fin["zero_masks_dropped"]:
            log(f"{step}: validation failed with the zero attention masks dropped; exporting them as they are")
            fin = finalize_onnx(os.path.join(sdir, "model.onnx"), os.path.join(tmp, spec.file), spec,
                                drop_zero_masks=False)
            res = validate(os.path.join(tmp, spec.file), *val_args)
        shutil.rmtree(sdir, ignore_errors=True)
        log(f"{step}: {spec.file} exported in {texp:.1f}s, validated: max_abs_err {res['max_abs_err']:.3g}, "
            f"max_rel_err {res['max_rel_err']:.3g} (tolerance {tol:g})")
        if not res["max_rel_err"] <= tol:
            raise ExportError(f"{spec.file} failed validation: max_rel_err {res['max_rel_err']:.3g} > tolerance "
                              f"{tol:g} for {precision} (max_abs_err {res['max_abs_err']:.3g}); nothing written")
        files = [spec.file] + ([spec.file + ".data"] if fin["external_data"] else [])
        models[spec.name] = {"file": spec.file, "inputs": spec.inputs, "outputs": spec.outputs,
                             "external_data": fin["external_data"],
                             "external_data_file": spec.file + ".data" if fin["external_data"] else None,
                             "precision": spec.precision,
                             "size_bytes": sum(os.path.getsize(os.path.join(tmp, x)) for x in files),
                             "validation": dict(res, tolerance=tol, reference="torch fp32 (CPU)",
                                                runtime="onnxruntime CPUExecutionProvider")}
        init_map[spec.name] = fin["init_map"]
        timings[spec.name] = round(time.time() - t, 3)
    return models, init_map, timings


def _move_into_place(tmp: str, out: str, overwrite: bool):
    if os.path.isdir(out) and not os.listdir(out):
        os.rmdir(out)
    if os.path.exists(out):
        if not overwrite:
            raise ExportError(f"out: {out} appeared during the export; expected it to stay absent (not replacing it)")
        # the previous export steps aside under a name with this pid, so that a process killed between the
        # renames leaves it findable (and removable once out is complete again, see workdirs)
        old = tempfile.mkdtemp(prefix=f"{old_prefix(out)}{os.getpid()}-", dir=os.path.dirname(out))
        os.rmdir(old)
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)  # interrupted or failed: the previous export stays where it was
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
