"""Export benchmark: ``python -m ksampler_rt.bench.export [--full] [--families sd15,sd2-v,sdxl] [--json PATH]``.

For each tiny fixture family: export time (fp32, validation included), peak RSS of the exporting process and
file size per model. ``--full`` (opt-in, several GB of RAM/disk, minutes) also exports a full-size SD1.5-shaped
UNet with random weights (860M parameters: exercises the >2 GB external-data path) and validates it.
Each export runs in its own subprocess so peak memory is per export.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

_CHILD_TINY = r"""
import json, os, resource, sys, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
family, work, precision = sys.argv[1], sys.argv[2], sys.argv[3]
from ksampler_rt.export.tiny import make_tiny_model
src = make_tiny_model(os.path.join(work, "src-" + family), family, seed=0)
from ksampler_rt.export.onnx_export import export_model
t = time.time()
m = export_model(str(src), os.path.join(work, "out-" + family + "-" + precision), precision=precision)
total = time.time() - t
print("RESULT " + json.dumps({"family": family, "precision": precision, "total_s": round(total, 2),
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "models": {k: {"export_s": m["export_seconds"][k], "size_mb": round(v["size_bytes"] / 1e6, 3),
                   "max_rel_err": v["validation"]["max_rel_err"], "external_data": v["external_data"]}
               for k, v in m["models"].items()}}))
"""

_CHILD_FULL = r"""
import json, os, resource, sys, time
import torch
work, precision = sys.argv[1], sys.argv[2]
from diffusers import UNet2DConditionModel
from ksampler_rt.export import onnx_export as ox
from ksampler_rt.export.families import config_dir
from ksampler_rt.export.validate import validate
from ksampler_rt.export.wrappers import UNetWrapper, use_classic_attention
t0 = time.time()
torch.manual_seed(0)
unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir("sd15"), subfolder="unet")).eval()
use_classic_attention(unet, upcast=False)
t_init = time.time() - t0
dt = torch.float16 if precision == "fp16" else torch.float32
ref = UNetWrapper(unet)
exp = ref if dt == torch.float32 else UNetWrapper(__import__("copy").deepcopy(unet).to(dt), dt)
shapes = [(1, 8, 8, 1), (2, 16, 8, 2)]
def inputs(i):
    b, h, w, t = shapes[i]
    g = torch.Generator().manual_seed(i)
    return {"sample": torch.randn(b, 4, h, w, generator=g), "timestep": torch.rand(b, generator=g) * 999,
            "encoder_hidden_states": torch.randn(b, 77 * t, 768, generator=g)}
spec = ox.ModelSpec("unet", "unet.onnx", exp, ref, "unet.",
    [{"name": "sample", "dtype": "float32", "shape": ["B", 4, "h", "w"]},
     {"name": "timestep", "dtype": "float32", "shape": ["B"]},
     {"name": "encoder_hidden_states", "dtype": "float32", "shape": ["B", "T", 768]}],
    [{"name": "out", "dtype": "float32", "shape": ["B", 4, "h", "w"]}], inputs, precision)
os.makedirs(os.path.join(work, "scratch"), exist_ok=True)
os.makedirs(os.path.join(work, "out"), exist_ok=True)
t = time.time()
ox.torch_export(spec, os.path.join(work, "scratch", "model.onnx"), 17)
t_export = time.time() - t
t = time.time()
fin = ox.finalize_onnx(os.path.join(work, "scratch", "model.onnx"), os.path.join(work, "out", "unet.onnx"), spec)
t_save = time.time() - t
t = time.time()
res = validate(os.path.join(work, "out", "unet.onnx"), ref, [inputs(0), inputs(1)], ["out"])
t_val = time.time() - t
size = sum(os.path.getsize(os.path.join(work, "out", f)) for f in os.listdir(os.path.join(work, "out")))
print("RESULT " + json.dumps({"model": "sd15-shaped UNet (random weights)", "precision": precision,
    "params": sum(p.numel() for p in unet.parameters()), "init_s": round(t_init, 1), "export_s": round(t_export, 1),
    "save_s": round(t_save, 1), "validate_s": round(t_val, 1), "size_mb": round(size / 1e6, 1),
    "external_data": fin["external_data"], "mapped_params": len(fin["init_map"]), "unmapped": len(fin["unmapped"]),
    "max_abs_err": res["max_abs_err"], "max_rel_err": res["max_rel_err"],
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _run(code, args, timeout):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"benchmark child failed (rc {p.returncode}):\n{p.stderr[-3000:]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ksampler_rt.bench.export", description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="sd15,sd2-v,sdxl")
    ap.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    ap.add_argument("--full", action="store_true", help="also a full-size SD1.5-shaped UNet (random weights)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--workdir", default=None, help="where to write (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    results = {"tiny": [], "full": None}
    with tempfile.TemporaryDirectory(prefix="ksampler-rt-bench-export-") as tmp:
        work = args.workdir or tmp
        for fam in [f for f in args.families.split(",") if f]:
            r = _run(_CHILD_TINY, [fam, work, args.precision], 1800)
            results["tiny"].append(r)
            print(f"{fam:8s} {args.precision}  total {r['total_s']:6.1f} s  peak RSS {r['peak_rss_mb']:7.0f} MB")
            for name, m in r["models"].items():
                print(f"    {name:12s} export+validate {m['export_s']:6.2f} s  {m['size_mb']:8.3f} MB  "
                      f"max_rel_err {m['max_rel_err']:.2g}")
        if args.full:
            t = time.time()
            r = _run(_CHILD_FULL, [os.path.join(work, "full"), args.precision], 7200)
            results["full"] = r
            print(f"full SD1.5 UNet {r['precision']}: {r['params'] / 1e6:.0f}M params, init {r['init_s']} s, "
                  f"export {r['export_s']} s, save {r['save_s']} s, validate {r['validate_s']} s, "
                  f"{r['size_mb']} MB (external data: {r['external_data']}), max_rel_err {r['max_rel_err']:.2g}, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB, wall {time.time() - t:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
