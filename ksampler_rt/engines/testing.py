"""Tiny hand-built ONNX models + manifest in the export-dir format, for tests and the benchmark.

Needs the ``onnx`` package (export extra). The graphs are small but shaped like the real ones:

* unet: sample (batch, 4, height, width) f32, timestep (batch,) f32, encoder_hidden_states
  (batch, tokens, C) f32 [, y (batch, Y) f32] -> out (batch, 4, height, width): a conv stack, plus a
  timestep, a single-head attention over the context and (SDXL-like) a projection of y.
* clip: input_ids (batch, 77) int64 -> last_hidden_state (batch, 77, C), pooled (batch, C).
* vae_decoder: latent (batch, 4, h, w) -> image (batch, 3, 8h, 8w); vae_encoder: image -> latent (mean).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np


def _onnx():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    return onnx, TensorProto, helper, numpy_helper


def _save(model, path: Path):
    onnx, *_ = _onnx()
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def make_unet(path: Path, context_dim: int = 32, y_dim: int | None = None, width: int = 16, depth: int = 2,
              seed: int = 0, static: dict | None = None):
    """``static``: {'batch': 2, 'height': 8, ...} fixes those dims (for static-export tests)."""
    onnx, TP, h, nh = _onnx()
    rng = np.random.default_rng(seed)
    st = static or {}
    B, H, W, T = (st.get(k, k) for k in ("batch", "height", "width", "tokens"))
    inits, nodes = [], []

    def w(name, *shape, scale=None):
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        a = (rng.standard_normal(shape) * (scale or 1 / np.sqrt(fan_in))).astype(np.float32)
        inits.append(nh.from_array(a, name))
        return name

    prev, ch = "sample", 4
    for i in range(depth + 1):
        co = 4 if i == depth else width
        nodes.append(h.make_node("Conv", [prev, w(f"conv{i}.w", co, ch, 3, 3), w(f"conv{i}.b", co, scale=0.02)],
                                 [f"h{i}"], pads=[1, 1, 1, 1]))
        prev, ch = f"h{i}", co
        if i < depth:
            nodes.append(h.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    # timestep: (B,) -> (B, 4, 1, 1) * wt
    inits.append(nh.from_array(np.array([-1, 1, 1, 1], np.int64), "shape_b111"))
    inits.append(nh.from_array(np.array([-1, 4, 1, 1], np.int64), "shape_b411"))
    inits.append(nh.from_array(np.array([1], np.int64), "axis1"))
    nodes += [h.make_node("Reshape", ["timestep", "shape_b111"], ["t4"]),
              h.make_node("Mul", ["t4", w("t.w", 1, 4, 1, 1, scale=0.001)], ["temb"]),
              h.make_node("Add", [prev, "temb"], ["ht"])]
    # attention: q = mean over pixels of the feature map (B, 4) -> (B,1,C); softmax(q k^T) v over tokens
    nodes += [h.make_node("ReduceMean", ["ht"], ["pool"], axes=[2, 3], keepdims=0),  # (B, 4)
              h.make_node("MatMul", ["pool", w("q.w", 4, context_dim)], ["q"]),
              h.make_node("Unsqueeze", ["q", "axis1"], ["q3"]),  # (B, 1, C)
              h.make_node("Transpose", ["encoder_hidden_states"], ["kT"], perm=[0, 2, 1]),
              h.make_node("MatMul", ["q3", "kT"], ["scores"]),  # (B, 1, T)
              h.make_node("Softmax", ["scores"], ["attn"], axis=-1),
              h.make_node("MatMul", ["attn", "encoder_hidden_states"], ["ctx"]),  # (B, 1, C)
              h.make_node("MatMul", ["ctx", w("o.w", context_dim, 4)], ["ctx4"]),  # (B, 1, 4)
              h.make_node("Reshape", ["ctx4", "shape_b411"], ["ctxb"]),
              h.make_node("Add", ["ht", "ctxb"], ["hc"])]
    last = "hc"
    inputs = [h.make_tensor_value_info("sample", TP.FLOAT, [B, 4, H, W]),
              h.make_tensor_value_info("timestep", TP.FLOAT, [B]),
              h.make_tensor_value_info("encoder_hidden_states", TP.FLOAT, [B, T, context_dim])]
    if y_dim:
        inputs.append(h.make_tensor_value_info("y", TP.FLOAT, [B, y_dim]))
        nodes += [h.make_node("MatMul", ["y", w("y.w", y_dim, 4)], ["y4"]),
                  h.make_node("Reshape", ["y4", "shape_b411"], ["yb"]),
                  h.make_node("Add", [last, "yb"], ["hy"])]
        last = "hy"
    nodes.append(h.make_node("Identity", [last], ["out"]))
    graph = h.make_graph(nodes, "tiny_unet", inputs, [h.make_tensor_value_info("out", TP.FLOAT, [B, 4, H, W])],
                         initializer=inits)
    _save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8), path)


def make_clip(path: Path, dim: int = 32, vocab: int = 64, seed: int = 1):
    onnx, TP, h, nh = _onnx()
    rng = np.random.default_rng(seed)
    emb = (rng.standard_normal((vocab, dim)) / np.sqrt(dim)).astype(np.float32)
    inits = [nh.from_array(emb, "tok_emb")]
    nodes = [h.make_node("Gather", ["tok_emb", "input_ids"], ["e"]),
             h.make_node("Tanh", ["e"], ["last_hidden_state"]),
             h.make_node("ReduceMean", ["last_hidden_state"], ["pooled"], axes=[1], keepdims=0)]
    graph = h.make_graph(nodes, "tiny_clip", [h.make_tensor_value_info("input_ids", TP.INT64, ["batch", 77])],
                         [h.make_tensor_value_info("last_hidden_state", TP.FLOAT, ["batch", 77, dim]),
                          h.make_tensor_value_info("pooled", TP.FLOAT, ["batch", dim])], initializer=inits)
    _save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8), path)


def make_vae_decoder(path: Path, seed: int = 2):
    onnx, TP, h, nh = _onnx()
    rng = np.random.default_rng(seed)
    inits = [nh.from_array((rng.standard_normal((3, 4, 3, 3)) / 6).astype(np.float32), "w"),
             nh.from_array(np.zeros(3, np.float32), "b"),
             nh.from_array(np.array([1, 1, 8, 8], np.float32), "scales")]
    nodes = [h.make_node("Conv", ["latent", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             h.make_node("Resize", ["c", "", "scales"], ["up"], mode="nearest"),
             h.make_node("Tanh", ["up"], ["image"])]
    graph = h.make_graph(nodes, "tiny_vae_decoder",
                         [h.make_tensor_value_info("latent", TP.FLOAT, ["batch", 4, "height", "width"])],
                         [h.make_tensor_value_info("image", TP.FLOAT, ["batch", 3, "image_height", "image_width"])],
                         initializer=inits)
    _save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8), path)


def make_vae_encoder(path: Path, seed: int = 3):
    onnx, TP, h, nh = _onnx()
    rng = np.random.default_rng(seed)
    inits = [nh.from_array((rng.standard_normal((4, 3, 1, 1)) / 2).astype(np.float32), "w"),
             nh.from_array(np.zeros(4, np.float32), "b")]
    nodes = [h.make_node("AveragePool", ["image"], ["p"], kernel_shape=[8, 8], strides=[8, 8]),
             h.make_node("Conv", ["p", "w", "b"], ["latent"])]
    graph = h.make_graph(nodes, "tiny_vae_encoder",
                         [h.make_tensor_value_info("image", TP.FLOAT, ["batch", 3, "image_height", "image_width"])],
                         [h.make_tensor_value_info("latent", TP.FLOAT, ["batch", 4, "height", "width"])],
                         initializer=inits)
    _save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8), path)


def _io(path: Path) -> dict:
    from .manifest import read_onnx_io

    ins, outs = read_onnx_io(path)
    return {"inputs": [s.to_json() for s in ins], "outputs": [s.to_json() for s in outs]}


def make_tiny_export(out_dir, family: str = "sd15", unet_width: int = 16, unet_depth: int = 2,
                     unet_static: dict | None = None, seed: int = 0) -> Path:
    """Write ``out_dir`` with unet/clip[/clip2]/vae_decoder/vae_encoder ONNX files and manifest.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sdxl = family == "sdxl"
    make_unet(out / "unet.onnx", context_dim=32, y_dim=16 if sdxl else None, width=unet_width,
              depth=unet_depth, seed=seed, static=unet_static)
    make_clip(out / "clip.onnx", dim=32 if not sdxl else 16)
    if sdxl:
        make_clip(out / "clip2.onnx", dim=16, seed=4)
    make_vae_decoder(out / "vae_decoder.onnx")
    make_vae_encoder(out / "vae_encoder.onnx")
    names = ["unet", "clip"] + (["clip2"] if sdxl else []) + ["vae_decoder", "vae_encoder"]
    h = hashlib.sha256()
    for n in names:
        h.update((out / f"{n}.onnx").read_bytes())
    manifest = {"format": "ksampler-rt-export", "format_version": 1, "family": family,
                "prediction": "epsilon", "latent_scale": 8, "precision": "fp32",
                "weights_hash": h.hexdigest(),
                "models": {n: {"file": f"{n}.onnx", **_io(out / f"{n}.onnx")} for n in names}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out
