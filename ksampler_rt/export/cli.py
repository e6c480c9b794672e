"""``ksampler-rt export``: checkpoint (diffusers folder or single .safetensors) -> ONNX models + manifest.json.

Imports no torch at registration time (the CLI contract); torch/diffusers load when the command runs.
"""
from __future__ import annotations

from .families import FAMILY_CHOICES


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a Stable Diffusion / SD3.5 / FLUX.1 checkpoint to ONNX (+ manifest.json)",
        description="Export a diffusers folder or a single-file .safetensors checkpoint (SD1.x, SD2.x, SDXL "
                    "base/refiner) to unet.onnx, clip.onnx[, clip2.onnx], vae_decoder.onnx, vae_encoder.onnx and "
                    "manifest.json; SD3.5 / FLUX.1 (diffusers folder, SD3.5 all-in-one file or a FLUX transformer "
                    "file in Black Forest Labs' layout) to transformer.onnx, clip_l.onnx[, clip_g.onnx], "
                    "t5xxl.onnx, vae_decoder.onnx, vae_encoder.onnx and manifest.json (see docs/export.md). Every model is validated against torch with ONNX Runtime (CPU) at two shapes. "
                    "The output directory appears only when everything succeeded.")
    p.add_argument("checkpoint", help="diffusers folder (model_index.json, unet/, ...) or .safetensors file")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty, see --overwrite)")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--family", choices=FAMILY_CHOICES, default="auto")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--prediction", choices=("eps", "v"), default=None,
                   help="prediction type; required for SD2.x single-file checkpoints (not visible in the weights)")
    p.add_argument("--vae", default=None, help="replacement VAE: diffusers VAE folder or single-file .safetensors "
                   "(e.g. an fp16-fixed SDXL VAE, which lets --precision fp16 export the SDXL VAE in fp16)")
    p.add_argument("--config", default=None, help="single-file only: a diffusers-format folder whose configs "
                   "(and tokenizer folders) describe the checkpoint, instead of the packaged ones")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="folder with CLIP's vocab.json + merges.txt, used for every text encoder (single-file "
                        "checkpoints carry none; without it the export looks in the ComfyUI installation the "
                        "checkpoint is in, then in the local Hugging Face cache, and fails if neither has one)")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="export a single-file checkpoint without tokenizer files (the workflow runner then cannot "
                        "encode prompts with it)")
    p.add_argument("--clip-l", default=None, metavar="FILE",
                   help="SD3.5 / FLUX.1 single files: CLIP-L text encoder file (clip_l.safetensors, HF keys)")
    p.add_argument("--clip-g", default=None, metavar="FILE",
                   help="SD3.5 single files: CLIP-G text encoder file (clip_g.safetensors, HF keys)")
    p.add_argument("--t5", default=None, metavar="FILE",
                   help="SD3.5 / FLUX.1 single files: T5-XXL encoder file (t5xxl_fp16.safetensors, HF keys)")
    p.add_argument("--control-inputs", action="store_true",
                   help="SD families: also export unet_control.onnx, the UNet taking ControlNet residuals and "
                        "T2I-Adapter features (needed to run ControlNets / T2I-Adapters with this checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory (atomically)")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                   help="torch.onnx exporter (default torchscript: much faster, keeps parameter names)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max relative error allowed in validation (default 1e-3 fp32, 5e-2 fp16)")
    p.add_argument("--quantize", choices=("fp8", "int8"), default=None,
                   help="also quantize the denoiser (UNet / transformer) for TensorRT's explicit quantization: "
                        "Q/DQ nodes calibrated on a few fp32 sampling runs (text encoders and VAE stay fp32; see "
                        "docs/engines.md, Precision). CHECKPOINT may then also be an existing fp32 export folder. "
                        "CPU backends run the result simulated (quality checks only)")
    p.add_argument("--calibration-size", type=int, default=None, metavar="PIXELS",
                   help="with --quantize: image size of the calibration runs (default: the family's native size)")
    p.set_defaults(func=run)


def run(args) -> int:
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
    if args.quantize:
        return run_quantized(args)
    from .onnx_export import export_model
    m = export_model(args.checkpoint, args.out, precision=args.precision, family=args.family, opset=args.opset,
                     prediction=args.prediction, vae=args.vae, config=args.config, overwrite=args.overwrite,
                     exporter=args.exporter, tolerance=args.tolerance, tokenizer=args.tokenizer,
                     no_tokenizer=args.no_tokenizer, clip_l=args.clip_l, clip_g=args.clip_g, t5=args.t5,
                     control_inputs=args.control_inputs)
    for name, info in m["models"].items():
        v = info["validation"]
        print(f"{name:12s} {info['file']:18s} {info['size_bytes'] / 1e6:9.1f} MB  {info['precision']}  "
              f"max_abs_err {v['max_abs_err']:.3g}  max_rel_err {v['max_rel_err']:.3g}")
    for te in m["text_encoders"]:
        print(f"tokenizer {te['name']:6s} {te['tokenizer'] or '-':12s} from {te.get('tokenizer_source') or 'nowhere'}")
    if m.get("kind") in ("controlnet", "t2i_adapter"):
        print(f"{m['kind']} for {m['family']} UNets  -> {os.path.abspath(args.out)}")
        return 0
    print(f"family {m['family']}  prediction {m['prediction']}  -> {os.path.abspath(args.out)}")
    if m.get("complete") is False:
        print(f"note: partial export ({', '.join(m['models'])}); the other networks come from other exports")
    return 0


def run_quantized(args) -> int:
    """``--quantize``: an existing fp32 export is quantized directly; a checkpoint is exported in fp32 into a
    scratch folder first (removed afterwards). The output appears only when everything succeeded."""
    import os
    import shutil
    import tempfile

    from .errors import ExportError
    from .quantize import CalibrationRecipe, quantize_export

    if args.precision != "fp32":
        raise ExportError(f"--precision: received {args.precision!r} with --quantize, expected fp32 (the "
                          f"quantizer calibrates the fp32 graph; the Q/DQ nodes set the denoiser's precision)")
    size = args.calibration_size
    recipe = CalibrationRecipe(width=size, height=size)
    if os.path.isfile(os.path.join(args.checkpoint, "manifest.json")):
        r = quantize_export(args.checkpoint, args.out, args.quantize, recipe=recipe, overwrite=args.overwrite)
    else:
        from .onnx_export import export_model

        out = os.path.abspath(args.out)  # the fp32 export is as large as the checkpoint: next to out, not /tmp
        os.makedirs(os.path.dirname(out), exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.fp32-", dir=os.path.dirname(out))
        try:
            fp32 = os.path.join(scratch, "fp32")
            export_model(args.checkpoint, fp32, precision="fp32", family=args.family, opset=args.opset,
                         prediction=args.prediction, vae=args.vae, config=args.config, exporter=args.exporter,
                         tolerance=args.tolerance, tokenizer=args.tokenizer, no_tokenizer=args.no_tokenizer,
                         clip_l=args.clip_l, clip_g=args.clip_g, t5=args.t5, control_inputs=args.control_inputs)
            r = quantize_export(fp32, args.out, args.quantize, recipe=recipe, overwrite=args.overwrite)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    q = r.manifest["quantization"]
    print(f"{q['model']} quantized {q['mode']}: {r.qdq['nodes']['QuantizeLinear']} QuantizeLinear, "
          f"{r.qdq['nodes']['DequantizeLinear']} DequantizeLinear (opset {r.qdq['opset']}), calibrated on "
          f"{q['calibration']['denoiser_calls']} calls -> {os.path.abspath(args.out)}")
    return 0
