#!/usr/bin/env python
"""Golden data for ksampler-rt's ControlNet semantics, made by running REAL ComfyUI 0.3.64 on the CPU.

Not part of the package and not run by the test suite. Its output (controlnet.npz, controlnet.json, next
to this file) is committed and read by tests/runtime/test_control.py and
tests/workflow/test_controlnet_nodes.py.

What it runs: ComfyUI's own ``nodes.ControlNetApply`` / ``ControlNetApplyAdvanced`` / ``KSampler`` /
``ImageScale`` / ``ImageScaleBy`` / ``ImageInvert`` and ``comfy.controlnet.ControlNet`` (hint resize,
percent window via ``pre_run``, ``control_merge`` chaining and strength, ``broadcast_image_to``),
``comfy/samplers.py`` (``can_concat_cond``, ``apply_empty_x_to_equal_area``) around real
``comfy.model_base`` models (built as make_comfyui_golden.py builds them) whose ``diffusion_model`` is
``AnalyticControlledUNetTorch`` and whose ControlNets' ``control_model`` is ``AnalyticControlNetTorch``:
the torch twins of tests/runtime/analytic_control.py.

Recorded per case: the final latent, the order of ControlNet and UNet calls (network, timestep, rows,
whether the UNet got control, cond_or_uncond), the residuals the UNet received at its first controlled
call, and for the resize cases the hint the ControlNet received.

    /work/comfy-lead-venv/bin/python tests/runtime/golden/make_comfyui_controlnet_golden.py /work/comfyui-lead
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CONTROLNETS = {  # the same numbers as tests/runtime/analytic_control.py
    "A": (0.7, 0.4, (0.02, -0.01, 0.03, 0.01)),
    "B": (1.3, -0.6, (-0.03, 0.02, 0.01, -0.02)),
}
ADAPTERS = {"T": (8, 3), "TX": (16, 3), "TG": (8, 1)}  # T2I-Adapters: name -> (unshuffle_amount, channels_in)
W_AD = (0.3, -0.2, 0.5, 0.1)


def _base_golden():
    spec = importlib.util.spec_from_file_location("_make_comfyui_golden", os.path.join(HERE, "make_comfyui_golden.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_classes(torch, base_unet, log):
    F = torch.nn.functional

    class AnalyticControlNetTorch(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            a, b, c = CONTROLNETS[name]
            self.name, self.a, self.b = name, a, b
            self.register_buffer("c", torch.tensor(c, dtype=torch.float32))
            self.dtype = torch.float32
            self.hints = []

        def forward(self, x, hint, timesteps, context, y=None, **kwargs):
            t = timesteps.to(torch.float32).reshape(-1)
            log.append({"net": "cn", "name": self.name, "t": float(t[0]), "rows": int(x.shape[0])})
            self.hints.append(hint.detach().clone().numpy())
            hp = F.avg_pool2d(hint, 8)
            g = hp.mean(dim=1, keepdim=True)
            base = torch.tanh(self.a * x) + self.b * g
            base = base + (t / 999.0)[:, None, None, None] * self.c[None, :, None, None]
            base = base + 0.1 * context.mean(dim=(1, 2))[:, None, None, None]
            if y is not None:
                base = base + 0.01 * y.mean(dim=1)[:, None, None, None]
            down = [base.clone(), 0.5 * base - hp[:, :1], F.avg_pool2d(base, 2)]
            mid = -0.3 * base.mean(dim=(2, 3), keepdim=True)
            return {"output": down, "middle": [mid]}

    class AnalyticAdapterTorch(torch.nn.Module):
        """ComfyUI's adapter layout: {"input": features reversed, None placeholders} (t2i_adapter/adapter.py)."""

        def __init__(self, name):
            super().__init__()
            self.name = name
            self.unshuffle_amount, self.input_channels = ADAPTERS[name]
            self.register_buffer("w", torch.tensor(W_AD, dtype=torch.float32))
            self.hints = []

        def forward(self, hint):
            log.append({"net": "adapter", "name": self.name, "rows": int(hint.shape[0])})
            self.hints.append(hint.detach().clone().numpy())
            s = F.avg_pool2d(hint, 8).sum(dim=1, keepdim=True)
            f0 = torch.tanh(s * self.w[None, :, None, None])
            return {"input": [F.avg_pool2d(f0, 2), None, f0]}

    class AnalyticControlledUNetTorch(base_unet):
        def __init__(self):
            super().__init__()
            self.controls = []

        def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
            out = super().forward(x, timesteps, context, y=y, transformer_options=transformer_options)
            log.append({"net": "unet", "t": float(timesteps.reshape(-1)[0]), "rows": int(x.shape[0]),
                        "control": control is not None,
                        "cond_or_uncond": list(transformer_options.get("cond_or_uncond", []))})
            if control is None:
                return out
            rec = {}
            if control.get("output"):
                d, m = control["output"], control["middle"]
                rec.update(down=[a.detach().clone().numpy() for a in d], mid=m[0].detach().clone().numpy())
                out = out + 0.1 * d[0] + 0.07 * d[1]
                out = out + 0.05 * d[2].mean(dim=(2, 3), keepdim=True) + 0.03 * m[0]
            if control.get("input"):
                a = control["input"][::-1]  # ComfyUI pops from the end: reversed = down-block order
                rec["adapter"] = [None if f is None else f.detach().clone().numpy() for f in a]
                out = out + 0.2 * a[0].mean(dim=(2, 3), keepdim=True)
                out = out + 0.1 * a[2].mean(dim=(2, 3), keepdim=True)
            self.controls.append(rec)
            return out

    return AnalyticControlNetTorch, AnalyticAdapterTorch, AnalyticControlledUNetTorch


def make_inputs():
    rng = np.random.RandomState(20251205)
    f = np.float32

    def image(*shape):  # what LoadImage gives: 8-bit pixels / 255
        return (rng.randint(0, 256, shape) / 255.0).astype(f)

    inp = {
        "cond/pos": (0.5 * rng.standard_normal((1, 4, 8)) + 0.3).astype(f),
        "cond/neg": (0.5 * rng.standard_normal((1, 4, 8)) - 0.2).astype(f),
        "cond/pos2": (0.5 * rng.standard_normal((1, 8, 8)) + 0.6).astype(f),
        "pooled/pos": (0.5 * rng.standard_normal((1, 1280)) + 0.4).astype(f),
        "pooled/neg": (0.5 * rng.standard_normal((1, 1280)) - 0.3).astype(f),
        "pooled/pos2": (0.5 * rng.standard_normal((1, 1280)) + 0.1).astype(f),
        # IMAGE tensors [B, H, W, C] in [0, 1]
        "image/a": image(1, 64, 64, 3),
        "image/b": image(1, 64, 64, 3),
        "image/odd": image(1, 37, 53, 3),     # odd sizes, wider than the latent
        "image/tall": image(1, 71, 30, 3),    # taller than the latent
        "image/batch2": image(2, 40, 40, 3),
        "latent/zeros1": np.zeros((1, 4, 8, 8), f),
        "latent/zeros1_6x8": np.zeros((1, 4, 6, 8), f),
        "latent/zeros2": np.zeros((2, 4, 8, 8), f),
        "latent/zeros1_5x6": np.zeros((1, 4, 5, 6), f),
    }
    return inp


def case(cid, ops, family="sd15", sampler="euler", steps=6, cfg=8.0, scheduler="normal", latent="zeros1",
         positive=("pos",), negative=("neg",), seed=42, record_hints=False):
    return {"id": cid, "family": family, "sampler": sampler, "steps": steps, "cfg": cfg, "scheduler": scheduler,
            "latent": latent, "positive": list(positive), "negative": list(negative), "seed": seed, "ops": ops,
            "record_hints": record_hints}


def adv(cn, image, strength, start=0.0, end=1.0):
    return {"node": "ControlNetApplyAdvanced", "cn": cn, "image": image, "strength": strength,
            "start_percent": start, "end_percent": end}


def apply(cn, image, strength):
    return {"node": "ControlNetApply", "cn": cn, "image": image, "strength": strength}


def cases():
    out = []
    for s in ("euler", "dpmpp_2m", "heun", "uni_pc", "euler_ancestral"):
        out.append(case(f"window/{s}", [adv("A", "a", 0.8, 0.2, 0.7)], sampler=s))
    out.append(case("window/karras_0.35_0.6", [adv("A", "a", 1.0, 0.35, 0.6)], scheduler="karras", steps=8))
    out.append(case("full/euler", [adv("A", "a", 1.0)]))
    out.append(case("chain/euler", [adv("A", "a", 0.6), adv("B", "b", 1.3, 0.3, 0.9)]))
    out.append(case("chain/dpmpp_2m", [adv("A", "a", 0.6, 0.0, 0.5), adv("B", "b", 1.3, 0.2, 1.0)], sampler="dpmpp_2m"))
    out.append(case("apply_positive_only/euler", [apply("A", "a", 0.9)]))
    out.append(case("apply_then_adv/euler", [apply("A", "a", 0.9), adv("B", "b", 0.7)]))
    out.append(case("apply_multicond/euler", [apply("A", "a", 0.9)], positive=("pos", "pos2")))
    out.append(case("adv_multicond/euler", [adv("A", "a", 0.5)], positive=("pos", "pos2")))
    out.append(case("strength0/euler", [adv("A", "a", 0.0)]))
    out.append(case("cfg1/euler", [adv("A", "a", 0.8)], cfg=1.0))
    out.append(case("resize_odd/euler", [adv("A", "odd", 1.0)], latent="zeros1_6x8", record_hints=True))
    out.append(case("resize_tall/euler", [adv("B", "tall", 1.0)], record_hints=True))
    out.append(case("batch2_hint2/euler", [adv("A", "batch2", 1.0)], latent="zeros2", record_hints=True))
    out.append(case("batch2_hint2_apply/euler", [apply("A", "batch2", 1.0)], latent="zeros2", positive=("pos", "pos2"),
                    record_hints=True))
    out.append(case("sdxl/euler", [adv("A", "a", 0.8, 0.1, 0.8)], family="sdxl"))
    out.append(case("sd2-v/euler", [adv("A", "a", 0.8, 0.1, 0.8)], family="sd2-v"))
    # T2I-Adapters (ControlNetLoader loads them in ComfyUI): window, rounding up to the unshuffle, gray input,
    # chained after a ControlNet, ControlNetApply
    out.append(case("t2i/euler", [adv("T", "a", 0.8, 0.0, 0.6)], record_hints=True))
    out.append(case("t2i_round16/euler", [adv("TX", "odd", 1.2)], latent="zeros1_5x6", record_hints=True))
    out.append(case("t2i_gray/dpmpp_2m", [adv("TG", "tall", 0.7)], sampler="dpmpp_2m", record_hints=True))
    out.append(case("t2i_after_cn/euler", [adv("A", "a", 0.6), adv("T", "b", 0.9, 0.2, 1.0)]))
    out.append(case("t2i_apply/euler", [apply("T", "a", 0.5)]))
    return out


IMAGE_CASES = [("ImageScale", "odd", m, 26, 17, crop) for m in ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
               for crop in ("disabled", "center")] + [
    ("ImageScale", "tall", "nearest-exact", 0, 48, "disabled"), ("ImageScale", "tall", "bilinear", 40, 0, "center"),
    ("ImageScaleBy", "odd", "nearest-exact", 1.5), ("ImageScaleBy", "tall", "bicubic", 0.6),
    ("ImageScaleBy", "odd", "lanczos", 0.7), ("ImageInvert", "odd")]


def run_case(C, models, cnet_objs, inp, results, log, c):
    torch, nodes = C.torch, C.nodes
    model = models[c["family"]]

    def cond(names):
        out = []
        for n in names:
            d = {"pooled_output": torch.from_numpy(inp["pooled/" + n].copy())} if c["family"] == "sdxl" else {}
            out.append([torch.from_numpy(inp["cond/" + n].copy()), d])
        return out

    pos, neg = cond(c["positive"]), cond(c["negative"])
    for op in c["ops"]:
        image = torch.from_numpy(inp["image/" + op["image"]].copy())
        cn = cnet_objs[op["cn"]]
        if op["node"] == "ControlNetApply":
            (pos,) = nodes.ControlNetApply().apply_controlnet(pos, cn, image, op["strength"])
        else:
            pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, cn, image, op["strength"],
                                                                        op["start_percent"], op["end_percent"])
    unet = model.model.diffusion_model
    unet.controls.clear()
    for cn in cnet_objs.values():
        _network(cn).hints.clear()
    log.clear()
    latent = {"samples": torch.from_numpy(inp["latent/" + c["latent"]].copy())}
    (res,) = nodes.KSampler().sample(model, c["seed"], c["steps"], c["cfg"], c["sampler"], c["scheduler"], pos, neg,
                                     latent, denoise=1.0)
    cid = c["id"]
    results["out/" + cid] = res["samples"].numpy().astype(np.float32)
    c["calls"] = list(log)
    sigmas = C.comfy.samplers.KSampler(model, c["steps"], "cpu", c["sampler"], c["scheduler"], 1.0).sigmas
    c["sigmas"] = [float(s) for s in sigmas]
    if unet.controls:
        first = unet.controls[0]
        for i, a in enumerate(first.get("down", [])):
            results[f"control/{cid}/down{i}"] = a
        if "mid" in first:
            results[f"control/{cid}/mid"] = first["mid"]
        for i, a in enumerate(first.get("adapter", [])):
            if a is not None:
                results[f"control/{cid}/adapter{i}"] = a
    if c["record_hints"]:
        for name, cn in cnet_objs.items():
            hints = _network(cn).hints
            if hints:
                hint = hints[0]
                # batched hints: which image row each call row got, by its sums (the full resize is checked
                # on the one-row cases)
                results[f"hint/{cid}/{name}"] = hint if hint.shape[0] == 1 else hint.sum(axis=(1, 2, 3), dtype=np.float64)


def _network(cn):
    return cn.t2i_model if hasattr(cn, "t2i_model") else cn.control_model


def run_images(C, inp, results):
    nodes = C.nodes
    meta = []
    for spec in IMAGE_CASES:
        node, image = spec[0], C.torch.from_numpy(inp["image/" + spec[1]].copy())
        if node == "ImageScale":
            (out,) = nodes.ImageScale().upscale(image, spec[2], spec[3], spec[4], spec[5])
        elif node == "ImageScaleBy":
            (out,) = nodes.ImageScaleBy().upscale(image, spec[2], spec[3])
        else:
            (out,) = nodes.ImageInvert().invert(image)
        cid = "/".join(str(v) for v in spec)
        results["image_out/" + cid] = out.numpy().astype(np.float32)
        meta.append({"id": cid, "node": node, "args": list(spec[1:])})
    return meta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("comfyui", help="path to a ComfyUI 0.3.64 work tree")
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    base = _base_golden()
    C = base.import_comfy(args.comfyui)
    torch = C.torch
    import comfy.controlnet
    import comfyui_version

    log: list = []
    cn_cls, adapter_cls, unet_cls = make_classes(torch, base.make_unet_class(torch), log)
    C.Unet = unet_cls
    models = {f: base.build_model(C, f) for f in ("sd15", "sd2-v", "sdxl")}
    cpu = torch.device("cpu")
    cnet_objs = {name: comfy.controlnet.ControlNet(cn_cls(name), load_device=cpu) for name in CONTROLNETS}
    for name, (_, channels_in) in ADAPTERS.items():  # as comfy/controlnet.py load_t2i_adapter builds them
        cnet_objs[name] = comfy.controlnet.T2IAdapter(adapter_cls(name), channels_in, 8, "nearest-exact", device=cpu)

    inp = make_inputs()
    results = dict(inp)
    all_cases = cases()
    t0 = time.time()
    for c in all_cases:
        run_case(C, models, cnet_objs, inp, results, log, c)
        n_cn = sum(1 for e in c["calls"] if e["net"] != "unet")
        print(f"{c['id']}: {len(c['calls']) - n_cn} unet calls, {n_cn} controlnet calls", flush=True)
    image_cases = run_images(C, inp, results)
    meta = {"env": {"torch": torch.__version__, "numpy": np.__version__,
                    "comfyui_version": comfyui_version.__version__,
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
            "controlnets": CONTROLNETS, "adapters": ADAPTERS, "cases": all_cases, "image_cases": image_cases}
    for name, data in (("controlnet.npz", None), ("controlnet.json", meta)):
        path = os.path.join(args.out, name)
        tmp = path + ".tmp"
        if data is None:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **results)
        else:
            with open(tmp, "w") as fh:
                json.dump(data, fh, indent=1)
        os.replace(tmp, path)
    print(f"{len(all_cases)} cases, {len(image_cases)} image cases in {time.time() - t0:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
