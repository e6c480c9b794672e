"""Run an exported ONNX model on ONNX Runtime (CPU) and compare with the torch module."""
from __future__ import annotations

import numpy as np

# max_rel_err = max|onnx - torch| / max|torch| (over all outputs). fp16 graphs are compared with the fp32
# torch module, so their error includes the fp16 rounding itself.
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}


def compare(session, module, inputs: dict, output_names: list[str]):
    import torch
    feeds = {k: v.numpy() for k, v in inputs.items()}
    got = session.run(output_names, feeds)
    with torch.no_grad():
        ref = module(*inputs.values())
    if isinstance(ref, torch.Tensor):
        ref = (ref,)
    max_abs, max_rel = 0.0, 0.0
    for name, g, r in zip(output_names, got, ref):
        r = r.detach().float().numpy()
        if g.shape != r.shape:
            raise AssertionError(f"output {name}: received ONNX shape {g.shape}, expected torch's {r.shape}")
        if not np.isfinite(g).all():
            return float("inf"), float("inf")
        diff = float(np.abs(g.astype(np.float64) - r).max()) if g.size else 0.0
        scale = float(np.abs(r).max()) if r.size else 0.0
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / max(scale, 1e-6))
    return max_abs, max_rel


def validate(onnx_path: str, module, input_sets: list[dict], output_names: list[str], threads: int = 0):
    """Returns {"max_abs_err", "max_rel_err", "shapes"} over all input sets."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    max_abs, max_rel, shapes = 0.0, 0.0, []
    for inputs in input_sets:
        a, r = compare(sess, module, inputs, output_names)
        max_abs, max_rel = max(max_abs, a), max(max_rel, r)
        shapes.append({k: list(v.shape) for k, v in inputs.items()})
    del sess
    return {"max_abs_err": max_abs, "max_rel_err": max_rel, "shapes": shapes}
