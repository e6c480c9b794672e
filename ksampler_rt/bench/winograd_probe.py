"""Would Winograd convolutions close the CPU gap? ``python -m ksampler_rt.bench.winograd_probe``.

The roofline (:mod:`.roofline`) shows that the half-width UNet's convolutions and linear layers
already run near this CPU's fp32 peak, so only *fewer* floating-point operations could make a call
much faster. Winograd's minimal filtering (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", 2015) computes an m x m output tile of a 3x3 convolution with (m+2)^2 multiplications
per input/output channel pair instead of 9 m^2: 2.25x fewer for F(2x2, 3x3), 4x for F(4x4, 3x3).

Neither ONNX Runtime's CPU provider nor OpenVINO's CPU plugin uses Winograd on this machine (AVX2,
no AVX-512), so this probe writes it as plain ONNX operators and measures it:

* input transform ``V = B^T d B`` of every (m+2) x (m+2) tile: a depthwise ``Conv`` (group = C,
  stride m) whose (m+2)^2 filters per channel are the outer products of B^T's rows;
* the elementwise products summed over channels: one batched ``MatMul`` of the transformed
  weights ``U = G g G^T`` [(m+2)^2, C_out, C] by V [(m+2)^2, C, tiles];
* output transform ``A^T M A``: a grouped ``ConvTranspose`` (group = C_out, stride m, kernel m).

Two measurements, side by side in one run, 2 threads, best and median of ``--repeats``:

* ``--layers``: single 3x3 convolutions of the half-width SD1.5 UNet's sizes (batch 2), direct
  against F(2,3) and F(4,3), under ONNX Runtime and OpenVINO;
* ``--unet LATENT``: the whole exported half-width UNet (``bench/models.py``; built and exported on
  first use) at one latent size, with every eligible 3x3 convolution (stride 1, pad 1, group 1,
  constant weights, spatial size divisible by m, at least ``--min-channels`` input channels)
  rewritten, under ONNX Runtime at the product's settings (optimisation level all, no spinning).

The rewrite here is static (reshape targets fixed for one latent size): it is a measurement, not a
product path. Results on this project's machine are in docs/benchmarks.md: not adopted.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

# Lavin & Gray (2015): F(2x2, 3x3), and F(4x4, 3x3) with interpolation points 0, +-1, +-2, inf.
_F2 = (
    [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
    [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
    [[1, 1, 1, 0], [0, 1, -1, -1]],
)
_F4 = (
    [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
     [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
    [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
     [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
    [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
)
TILES = (2, 4)


def winograd_matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B^T, G, A^T) of F(m x m, 3 x 3) in float64, for m in (2, 4)."""
    if m not in TILES:
        raise ValueError(f"tile: received {m!r}, expected one of {TILES}")
    return tuple(np.array(t, np.float64) for t in (_F2 if m == 2 else _F4))


def winograd_nodes(x: str, y: str, weight: np.ndarray, bias: str | None, shape, m: int, prefix: str):
    """ONNX nodes and initializers computing ``y = Conv(x, weight, bias, pads=1)`` (3x3, stride 1)
    for an input of static ``shape`` [N, C, H, W] with H and W divisible by m."""
    from onnx import helper, numpy_helper

    n, c, h, w = (int(v) for v in shape)
    co = weight.shape[0]
    if weight.shape[1:] != (c, 3, 3):
        raise ValueError(f"weight: received shape {weight.shape}, expected [C_out, {c}, 3, 3]")
    if h % m or w % m:
        raise ValueError(f"shape: received {h}x{w}, expected sides divisible by the tile {m}")
    bt, g, at = winograd_matrices(m)
    a, k, tiles = m + 2, (m + 2) ** 2, (h // m) * (w // m)
    w_in = np.einsum("ai,bj->abij", bt, bt).reshape(1, k, a, a)
    w_in = np.broadcast_to(w_in, (c, k, a, a)).reshape(c * k, 1, a, a).astype(np.float32)
    u = np.einsum("ai,ocij,bj->aboc", g, weight.astype(np.float64), g).reshape(k, co, c).astype(np.float32)
    w_out = np.einsum("pa,qb->abpq", at, at).reshape(1, k, m, m)
    w_out = np.broadcast_to(w_out, (co, k, m, m)).reshape(co * k, 1, m, m).astype(np.float32)
    p = prefix

    def shape_of(values, name):
        return numpy_helper.from_array(np.array(values, np.int64), p + name)

    inits = [numpy_helper.from_array(w_in, p + "w_in"), numpy_helper.from_array(u, p + "u"),
             numpy_helper.from_array(w_out, p + "w_out"),
             shape_of([n, c, k, tiles], "s_v"), shape_of([k, c, n * tiles], "s_vm"),
             shape_of([k, co, n, tiles], "s_m"), shape_of([n, co * k, h // m, w // m], "s_out")]
    nodes = [
        helper.make_node("Conv", [x, p + "w_in"], [p + "v"], pads=[1, 1, 1, 1], kernel_shape=[a, a],
                         strides=[m, m], group=c),
        helper.make_node("Reshape", [p + "v", p + "s_v"], [p + "v1"]),
        helper.make_node("Transpose", [p + "v1"], [p + "v2"], perm=[2, 1, 0, 3]),   # [k, C, N, tiles]
        helper.make_node("Reshape", [p + "v2", p + "s_vm"], [p + "v3"]),
        helper.make_node("MatMul", [p + "u", p + "v3"], [p + "mm"]),                 # [k, C_out, N*tiles]
        helper.make_node("Reshape", [p + "mm", p + "s_m"], [p + "m1"]),
        helper.make_node("Transpose", [p + "m1"], [p + "m2"], perm=[2, 1, 0, 3]),   # [N, C_out, k, tiles]
        helper.make_node("Reshape", [p + "m2", p + "s_out"], [p + "m3"]),
        helper.make_node("ConvTranspose", [p + "m3", p + "w_out"] + ([bias] if bias else []), [y],
                         strides=[m, m], kernel_shape=[m, m], group=co),
    ]
    return nodes, inits


def conv_model(weight: np.ndarray, bias: np.ndarray, shape, m: int | None):
    """A one-layer model: direct 3x3 convolution (m None) or its F(m,3) rewrite."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(bias.astype(np.float32), "b")]
    if m is None:
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], kernel_shape=[3, 3])]
        inits.append(numpy_helper.from_array(weight.astype(np.float32), "w"))
    else:
        nodes, more = winograd_nodes("x", "y", weight, "b", shape, m, "wg_")
        inits += more
    graph = helper.make_graph(nodes, "conv3x3", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _ort_session(model_bytes: bytes, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def _times(fns: dict, repeats: int) -> dict:
    """Interleaved wall times in ms of each callable (one untimed call each first)."""
    for fn in fns.values():
        fn()
    out = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            out[k].append((time.perf_counter() - t) * 1e3)
    return out


LAYERS = ((2, 160, 32), (2, 320, 16), (2, 640, 8), (2, 160, 64), (2, 320, 32), (2, 640, 16))


def probe_layers(threads: int, repeats: int) -> list[dict]:
    try:
        import openvino as ov
        core = ov.Core()
    except ImportError:
        core = None
    rng = np.random.default_rng(0)
    print(f"{'layer [N,C,H,W] -> C':24s} {'backend':9s} {'direct ms':>9s} {'F(2,3) ms':>15s} {'F(4,3) ms':>15s}"
          f" {'rel. error F(2,3) / F(4,3)':>27s}")
    rows = []
    for n, c, hw in LAYERS:
        shape = (n, c, hw, hw)
        weight = (rng.standard_normal((c, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
        bias = rng.standard_normal(c).astype(np.float32)
        x = rng.standard_normal(shape).astype(np.float32)
        models = {m: conv_model(weight, bias, shape, m).SerializeToString() for m in (None, *TILES)}
        runners = {("onnxruntime", m): (lambda s=_ort_session(b, threads): s.run(None, {"x": x})[0])
                   for m, b in models.items()}
        if core is not None:
            for m, b in models.items():
                req = core.compile_model(core.read_model(b, b""), "CPU", {
                    "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
                runners[("openvino", m)] = lambda r=req: next(iter(r.infer({0: x}).values()))
        ref = runners[("onnxruntime", None)]()
        errs = {m: float(np.abs(runners[("onnxruntime", m)]() - ref).max() / np.abs(ref).max()) for m in TILES}
        t = _times(runners, repeats)
        for backend in ("onnxruntime", "openvino"):
            if (backend, None) not in t:
                continue
            best = {m: min(t[(backend, m)]) for m in (None, *TILES)}
            row = {"layer": list(shape), "backend": backend, "direct_ms": best[None],
                   **{f"f{m}_ms": best[m] for m in TILES}, **{f"f{m}_rel_error": errs[m] for m in TILES}}
            rows.append(row)
            cells = " ".join(f"{best[m]:7.1f} ({best[None] / best[m]:.2f}x)" for m in TILES)
            print(f"{str(list(shape)):24s} {backend:9s} {best[None]:9.1f} {cells} "
                  f"{errs[2]:13.1e} / {errs[4]:.1e}")
    return rows


def probe_unet(latent: int, tile: int, min_channels: int, threads: int, repeats: int) -> dict:
    """The whole exported half-width UNet at ``latent``, direct vs every eligible conv rewritten."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from .models import resolve_model

    model = onnx.load(str(resolve_model("half-sd15", need_source=False).export_dir / "unet.onnx"))
    inits = {i.name: i for i in model.graph.initializer}

    def eligible(node) -> bool:
        if node.op_type != "Conv" or node.input[1] not in inits or list(inits[node.input[1]].dims[2:]) != [3, 3]:
            return False
        at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        return (list(at.get("strides", [1, 1])) == [1, 1] and at.get("group", 1) == 1
                and list(at.get("pads", [0] * 4)) == [1] * 4 and list(at.get("dilations", [1, 1])) == [1, 1])

    convs = [nd for nd in model.graph.node if eligible(nd)]
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, latent, latent)).astype(np.float32),
             "timestep": np.full(2, 500, np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 768)).astype(np.float32)}
    # every candidate's input shape, from one unoptimised run with those tensors as extra outputs
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for nd in convs:
        probe.graph.output.append(helper.make_tensor_value_info(nd.input[0], TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = threads
    outs = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)
    del probe
    shapes = {nd.input[0]: o.shape for nd, o in zip(convs, outs[1:])}
    reference = outs[0]

    rewritten, nodes, extra = 0, [], []
    for nd in model.graph.node:
        shape = shapes.get(nd.input[0]) if nd in convs else None
        if shape is None or shape[1] < min_channels or shape[2] % tile or shape[3] % tile:
            nodes.append(nd)
            continue
        rewritten += 1
        more_nodes, more_inits = winograd_nodes(nd.input[0], nd.output[0], numpy_helper.to_array(inits[nd.input[1]]),
                                                nd.input[2] if len(nd.input) > 2 else None, shape, tile,
                                                f"winograd{rewritten}_")
        nodes += more_nodes
        extra += more_inits
    base_bytes = model.SerializeToString()
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    # the replaced convolutions' own weights are dead now: drop them, or the model carries both
    used = {name for nd in nodes for name in nd.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + extra)
    try:
        wino_bytes = model.SerializeToString()
    except Exception as e:  # noqa: BLE001 - protobuf's 2 GB limit: F(4,3) weights are 4x the direct ones
        res = {"latent": latent, "tile": tile, "rewritten": rewritten,
               "error": f"the rewritten model ({rewritten} convolutions as F({tile},3)) does not serialise: "
                        f"{type(e).__name__}: {e} (protobuf's 2 GB limit; F({tile},3)'s transformed weights are "
                        f"{(tile + 2) ** 2 / 9:.1f}x the direct ones)"}
        print(f"half-width UNet, latent {latent}x{latent}: {res['error']}")
        return res
    del model
    sessions = {"direct": _ort_session(base_bytes, threads), f"F({tile},3)": _ort_session(wino_bytes, threads)}
    del base_bytes, wino_bytes
    errors = {k: float(np.abs(s.run(None, feeds)[0] - reference).max() / np.abs(reference).max())
              for k, s in sessions.items()}
    t = _times({k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}, repeats)
    res = {"latent": latent, "tile": tile, "min_channels": min_channels, "rewritten": rewritten,
           "eligible": len(convs), "ms": {k: float(np.median(v)) for k, v in t.items()},
           "best_ms": {k: min(v) for k, v in t.items()}, "rel_error_vs_unoptimised": errors}
    d, w = res["ms"]["direct"], res["ms"][f"F({tile},3)"]
    print(f"half-width UNet, latent {latent}x{latent}, batch 2, ONNX Runtime: {rewritten} of {len(convs)} 3x3 "
          f"convolutions as F({tile},3): direct {d:.0f} ms, Winograd {w:.0f} ms (median of {repeats}; "
          f"{d / w:.2f}x); max relative error vs the unoptimised graph {errors['direct']:.1e} / "
          f"{errors[f'F({tile},3)']:.1e}")
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", action="store_true", help="single 3x3 convolutions, direct vs F(2,3) / F(4,3)")
    ap.add_argument("--unet", type=int, metavar="LATENT", help="the whole half-width UNet at this latent size")
    ap.add_argument("--tile", type=int, default=2, choices=TILES, help="m of F(m,3) for --unet (default 2)")
    ap.add_argument("--min-channels", type=int, default=0, help="--unet: rewrite only convolutions with at "
                                                                "least this many input channels")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats: received {args.repeats}, expected an integer >= 1")
    out = {}
    if args.layers or args.unet is None:
        out["layers"] = probe_layers(args.threads, args.repeats)
    if args.unet is not None:
        out["unet"] = probe_unet(args.unet, args.tile, args.min_channels, args.threads, args.repeats)
    return out


if __name__ == "__main__":
    main()
