"""ONNX Runtime's transformer optimizer fusions for the CUDA execution provider.

ONNX Runtime's own Stable Diffusion tools (``onnxruntime/python/tools/transformers/models/stable_diffusion``)
run ``onnxruntime.transformers.optimizer.optimize_model`` with ``model_type`` ``unet`` / ``vae`` / ``clip``
before a CUDA session: fused multi-head attention, GroupNorm (NHWC on CUDA), BiasSplitGelu, SkipLayerNorm...
The generic session optimizer (``ORT_ENABLE_EXTENDED``) does none of these. This module applies that step
to one model of an export; the ``onnxruntime-cuda`` backend's build writes the fused model as its artefact.

LoRA: fusions pack several initializers into one (Q/K/V into one packed weight), so an export initializer
name no longer names a tensor of the fused graph. The LoRA path therefore replaces the initializers of the
export's *own* ONNX first and fuses afterwards (see ``OrtCudaEngine._session_source``).
"""
from __future__ import annotations

from pathlib import Path

from .spec import EngineError

#: Which of the optimizer's model types fits which model of an export.
#: ONNX Runtime's own diffusion tools use ``mmdit`` for the SD3 / FLUX.1 transformers and ``t5`` for T5-XXL.
MODEL_TYPES = {"unet": "unet", "unet_control": "unet", "controlnet": "unet", "vae_decoder": "vae",
               "vae_encoder": "vae", "clip": "clip", "clip2": "clip", "clip_l": "clip", "clip_g": "clip",
               "transformer": "mmdit", "t5xxl": "t5"}


def model_type(model: str) -> str | None:
    """The transformer optimizer's ``model_type`` for an export's model, None when it has none."""
    return MODEL_TYPES.get(model)


def fusion_options(kind: str, use_gpu: bool, half: bool = False):
    """``FusionOptions`` as ONNX Runtime's diffusion tools (``optimize_pipeline.py``) set them: NHWC GroupNorm
    and NhwcConv only for the GPU (the CPU has no such kernels), packed QKV / KV only for half precision
    graphs (as those tools do: the packed kernels are the fp16 ones)."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    opts = FusionOptions(kind)
    opts.enable_packed_kv = opts.enable_packed_kv and half
    opts.enable_packed_qkv = opts.enable_packed_qkv and half
    if kind in ("unet", "vae"):
        opts.enable_group_norm = bool(use_gpu)
        opts.enable_skip_group_norm = bool(use_gpu)
        opts.enable_nhwc_conv = bool(use_gpu)
        opts.group_norm_channels_last = bool(use_gpu)
    return opts


def fuse(model, model_name: str, *, use_gpu: bool = True, half: bool = False):
    """A ``ModelProto`` with the transformer optimizer's fusions for ``model_name`` applied (``model``: a
    ``ModelProto`` or a path). Raises ``EngineError`` for a model the optimizer has no type for."""
    kind = model_type(model_name)
    if kind is None:
        raise EngineError(f"model: received {model_name!r}, expected one of {', '.join(MODEL_TYPES)} "
                          f"(the models the transformer optimizer has fusions for)")
    from onnxruntime.transformers.optimizer import optimize_model

    if isinstance(model, Path):
        model = str(model)  # a path: the optimizer loads it (external data included) itself
    # opt_level=0: only the optimizer's python fusions; the session applies ORT's own passes on load.
    # The head count / hidden size are read from the graph (0 = detect).
    optimized = optimize_model(model, model_type=kind, num_heads=0, hidden_size=0, opt_level=0,
                               optimization_options=fusion_options(kind, use_gpu, half), use_gpu=use_gpu)
    return optimized.model


def fused_op_counts(model) -> dict[str, int]:
    """How many nodes of each fused contrib op a model holds (gpu-check and the tests report it)."""
    wanted = ("Attention", "MultiHeadAttention", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd",
              "SkipLayerNormalization", "LayerNormalization", "FastGelu", "NhwcConv")
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in wanted:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def save_model(model, path: Path, external_min_bytes: int = 1 << 20) -> Path:
    """Write ``model`` to ``path``; tensors of ``external_min_bytes`` or more go to ``<name>.data`` next to it
    when the model would not fit one protobuf (2 GiB)."""
    import onnx

    path = Path(path)
    if model.ByteSize() >= (1 << 31) - (1 << 20):
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=int(external_min_bytes))
    else:
        onnx.save_model(model, str(path))
    return path
