#!/usr/bin/env python
"""Golden data for the rectified-flow model samplings (SD3 / SD3.5, FLUX.1 dev and schnell), made by
running REAL ComfyUI 0.3.64 on the CPU. Not run by the test suite; its output
(tests/runtime/golden/flow_model_sampling.npz) is committed and read by
tests/runtime/test_model_sampling_flow.py.

It builds the model samplings exactly as ``comfy.model_base.model_sampling`` does for ComfyUI's own
``supported_models.SD3`` / ``Flux`` / ``FluxSchnell`` configs (and with the shifts the
ModelSamplingSD3 / ModelSamplingFlux nodes set), the latent formats of ``comfy.latent_formats``, and
records: the sigma tables, ``timestep``/``sigma`` on probe values, ``percent_to_sigma``,
``noise_scaling`` / ``inverse_noise_scaling`` / ``calculate_denoised`` of ``CONST`` and the
latent formats' process_in / process_out, plus the ModelSamplingFlux node's shift for a few sizes.

With ``--sampling`` it also runs ComfyUI's KSampler / KSamplerAdvanced nodes on real
``model_base.SD3`` / ``Flux`` models whose diffusion model is the torch twin of
``tests/runtime/analytic_unet.py``'s ``AnalyticFlowNet`` (flow_samplers.npz, flow_cases.json), and records
every scheduler's sigmas for each flow family (flow_schedulers.npz).

Run as the sampler golden script says (ComfyUI work tree + a venv with CPU torch 2.13):
    /work/comfy-venv/bin/python tests/runtime/golden/make_comfyui_flow_golden.py /work/comfyui \
        --out tests/runtime/golden
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_comfyui_golden import import_comfy  # noqa: E402  (one copy of the ComfyUI import)

# (name, supported_models config, model type, optional shift override as the nodes apply it)
CASES = [
    ("sd3", "SD3", "FLOW", None),
    ("sd3_shift_5", "SD3", "FLOW", 5.0),            # ModelSamplingSD3(shift=5)
    ("flux", "Flux", "FLUX", None),
    ("flux_1024x768", "Flux", "FLUX", "node:1024x768"),  # ModelSamplingFlux(max 1.15, base 0.5, 1024, 768)
    ("flux-schnell", "FluxSchnell", "FLOW", None),
]
PERCENTS = [0.0, 1e-4, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999, 1.0]


def model_sampling_for(C, config_name: str, model_type: str, shift):
    comfy = C.comfy
    sm, mb = comfy.supported_models, comfy.model_base
    cfg = getattr(sm, config_name)({"disable_unet_model_creation": True, "in_channels": 16})
    ms = mb.model_sampling(cfg, getattr(mb.ModelType, model_type))
    if shift is None:
        return ms, cfg
    import comfy_extras.nodes_model_advanced as adv

    if isinstance(shift, str):  # the ModelSamplingFlux node's own computation
        w, h = (int(v) for v in shift.split(":")[1].split("x"))
        x1, x2, max_shift, base_shift = 256, 4096, 1.15, 0.5
        mm = (max_shift - base_shift) / (x2 - x1)
        b = base_shift - mm * x1
        shift = (w * h / (8 * 8 * 2 * 2)) * mm + b
        ms.set_parameters(shift=shift)
        return ms, cfg
    # ModelSamplingSD3 node: a new ModelSamplingDiscreteFlow+CONST with this shift, multiplier 1000
    assert adv is not None
    ms.set_parameters(shift=shift, multiplier=1000)
    return ms, cfg


# ----------------------------------------------------------------------------- sampling
W16 = [0.05, -0.04, 0.03, -0.02] * 4
B16 = [0.01, -0.02, 0.015, -0.005] * 4
FLOW_FAMILIES = {  # name: (config, model type, timestep divisor, cfg, takes guidance)
    "sd3": ("SD3", "FLOW", 1000.0, 4.5, False),
    "flux": ("Flux", "FLUX", 1.0, 1.0, True),
    "flux-schnell": ("FluxSchnell", "FLOW", 1.0, 1.0, False),
}


def make_flow_net(torch, t_divisor: float, takes_guidance: bool):
    class AnalyticFlowNetTorch(torch.nn.Module):
        """Torch twin of tests/runtime/analytic_unet.py AnalyticFlowNet (same formula, same op order)."""

        def __init__(self):
            super().__init__()
            self.register_buffer("w_t", torch.tensor(W16, dtype=torch.float32))
            self.register_buffer("b_c", torch.tensor(B16, dtype=torch.float32))
            self.dtype = torch.float32

        def forward(self, x, timesteps=None, context=None, y=None, guidance=None, control=None,
                    transformer_options={}, **kwargs):
            t = timesteps.to(torch.float32).reshape(-1)
            c = x.shape[1]
            out = 0.9 * x + 0.1 * torch.tanh(x)
            out = out + (t / t_divisor)[:, None, None, None] * self.w_t[None, :c, None, None]
            out = out + 0.05 * context.mean(dim=(1, 2))[:, None, None, None]
            out = out + self.b_c[None, :c, None, None]
            if y is not None:
                out = out + 0.01 * y.mean(dim=1)[:, None, None, None]
            if takes_guidance and guidance is not None:
                out = out + 0.02 * guidance.to(torch.float32).reshape(-1)[:, None, None, None]
            return out

    return AnalyticFlowNetTorch()


def build_flow_model(C, family: str):
    torch, comfy = C.torch, C.comfy
    sm, mb = comfy.supported_models, comfy.model_base
    config_name, model_type, t_div, _, guid = FLOW_FAMILIES[family]
    cfg = getattr(sm, config_name)({"disable_unet_model_creation": True, "in_channels": 16, "out_channels": 16})
    cls = mb.Flux if config_name.startswith("Flux") else mb.SD3
    model = cls(cfg, model_type=getattr(mb.ModelType, model_type), device=torch.device("cpu"))
    model.diffusion_model = make_flow_net(torch, t_div, guid)
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def flow_inputs():
    rng = np.random.RandomState(20261205)
    f = np.float32
    return {
        "cond/pos": (0.5 * rng.standard_normal((1, 6, 8)) + 0.3).astype(f),
        "cond/neg": (0.5 * rng.standard_normal((1, 6, 8)) - 0.2).astype(f),
        "cond/pos2": (0.5 * rng.standard_normal((1, 3, 8)) + 0.6).astype(f),
        "pooled/pos": (0.5 * rng.standard_normal((1, 12)) + 0.4).astype(f),
        "pooled/neg": (0.5 * rng.standard_normal((1, 12)) - 0.3).astype(f),
        "pooled/pos2": (0.5 * rng.standard_normal((1, 12)) + 0.1).astype(f),
        "latent/zeros4ch": np.zeros((1, 4, 8, 8), f),      # EmptyLatentImage: widened to 16 channels
        "latent/zeros16": np.zeros((1, 16, 8, 8), f),      # EmptySD3LatentImage
        "latent/rand16": (0.8 * rng.standard_normal((1, 16, 8, 8)) + 0.1).astype(f),
        "latent/rand16b2": (0.8 * rng.standard_normal((2, 16, 8, 8)) - 0.1).astype(f),
    }


# guidance per prompt name for flux: the negative gets none, so ComfyUI's default 3.5 applies
GUIDANCE = {"pos": 3.5, "pos2": 2.0}


def flow_conditioning(C, inp, names, family):
    torch = C.torch
    out = []
    for n in names:
        d = {"pooled_output": torch.from_numpy(inp["pooled/" + n].copy())}
        if family == "flux" and n in GUIDANCE:
            d["guidance"] = GUIDANCE[n]
        out.append([torch.from_numpy(inp["cond/" + n].copy()), d])
    return out


def flow_cases(samplers, schedulers):
    cases = []

    def ks(cid, fam, sampler="euler", scheduler="simple", steps=4, cfg=None, latent="zeros16", denoise=1.0,
           positive=("pos",), negative=("neg",), seed=42):
        cases.append({"id": f"{fam}/{cid}", "kind": "ksampler", "family": fam, "latent": latent,
                      "positive": list(positive), "negative": list(negative),
                      "params": {"seed": seed, "steps": steps, "cfg": FLOW_FAMILIES[fam][3] if cfg is None else cfg,
                                 "sampler_name": sampler, "scheduler": scheduler, "denoise": denoise}})

    def ksa(cid, fam, sampler="euler", start=0, end=10000, add_noise="enable", leftover="disable",
            latent="zeros16", steps=4, scheduler="simple"):
        cases.append({"id": f"{fam}/{cid}", "kind": "ksampler_advanced", "family": fam, "latent": latent,
                      "positive": ["pos"], "negative": ["neg"],
                      "params": {"add_noise": add_noise, "noise_seed": 42, "steps": steps,
                                 "cfg": FLOW_FAMILIES[fam][3], "sampler_name": sampler, "scheduler": scheduler,
                                 "start_at_step": start, "end_at_step": end, "return_with_leftover_noise": leftover}})

    for fam in FLOW_FAMILIES:
        for s in samplers:
            ks(f"ks/{s}/s4_simple", fam, sampler=s)
        for sch in schedulers:
            ks(f"ks/euler/s5_{sch}", fam, scheduler=sch, steps=5)
        for s in ("euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "lcm", "uni_pc", "heun"):
            ks(f"ks/{s}/img2img_b2_d0.6", fam, sampler=s, latent="rand16b2", denoise=0.6, seed=7)
        ks("ks/euler/empty4ch", fam, latent="zeros4ch")
        ks("ks/euler/multicond_pos2", fam, positive=("pos", "pos2"))
        ks("ks/dpmpp_2m/cfg2", fam, sampler="dpmpp_2m", cfg=2.0)
        for s in ("euler", "dpmpp_2m", "euler_ancestral"):
            ksa(f"ksa/{s}/split_a_0_2_leftover", fam, sampler=s, end=2, leftover="enable")
            ksa(f"ksa/{s}/split_b_2_4_nonoise", fam, sampler=s, start=2, add_noise="disable",
                latent=f"out:{fam}/ksa/{s}/split_a_0_2_leftover")
        ksa("ksa/euler/add_noise_disable_rand", fam, add_noise="disable", latent="rand16")
        ksa("ksa/euler/start1_add_noise_disable_rand", fam, add_noise="disable", latent="rand16", start=1)
    return cases


def run_flow_case(C, models, inp, results, case):
    torch, nodes = C.torch, C.nodes
    fam = case["family"]
    lat = case["latent"]
    lat_np = results["out/" + lat[4:]] if lat.startswith("out:") else inp["latent/" + lat]
    latent = {"samples": torch.from_numpy(lat_np.copy())}
    pos = flow_conditioning(C, inp, case["positive"], fam)
    neg = flow_conditioning(C, inp, case["negative"], fam)
    p = case["params"]
    if case["kind"] == "ksampler":
        (res,) = nodes.KSampler().sample(models[fam], p["seed"], p["steps"], p["cfg"], p["sampler_name"],
                                         p["scheduler"], pos, neg, latent, denoise=p["denoise"])
    else:
        (res,) = nodes.KSamplerAdvanced().sample(models[fam], p["add_noise"], p["noise_seed"], p["steps"], p["cfg"],
                                                 p["sampler_name"], p["scheduler"], pos, neg, latent,
                                                 p["start_at_step"], p["end_at_step"],
                                                 p["return_with_leftover_noise"], denoise=1.0)
    results["out/" + case["id"]] = res["samples"].detach().cpu().numpy().astype(np.float32)


def run_flow_sampling(C, out_dir: str) -> None:
    comfy = C.comfy
    models = {f: build_flow_model(C, f) for f in FLOW_FAMILIES}
    samplers = list(comfy.samplers.KSampler.SAMPLERS)
    schedulers = list(comfy.samplers.KSampler.SCHEDULERS)
    sched, sched_meta = {}, []
    for fam, model in models.items():
        for sch in schedulers:
            for sampler in ("euler", "dpm_2"):
                for steps in (1, 2, 4, 7, 20):
                    for denoise in (1.0, 0.6):
                        cid = f"{fam}/{sch}/{sampler}/{steps}/{denoise}"
                        try:
                            sig = comfy.samplers.KSampler(model, steps, "cpu", sampler, sch, denoise).sigmas
                            sched[cid] = sig.detach().cpu().numpy().astype(np.float32)
                            err = None
                        except Exception as e:
                            sched[cid], err = np.array([np.nan], np.float32), f"{type(e).__name__}: {e}"
                        sched_meta.append({"id": cid, "family": fam, "scheduler": sch, "sampler_name": sampler,
                                           "steps": steps, "denoise": denoise, "error": err})
    np.savez_compressed(os.path.join(out_dir, "flow_schedulers.npz"), **sched)
    inp = flow_inputs()
    results = dict(inp)
    cases = flow_cases(samplers, schedulers)
    for case in cases:
        try:
            run_flow_case(C, models, inp, results, case)
            case["error"] = None
        except Exception as e:
            case["error"] = f"{type(e).__name__}: {e}"
            print("ERROR", case["id"], case["error"], flush=True)
    np.savez_compressed(os.path.join(out_dir, "flow_samplers.npz"), **results)
    with open(os.path.join(out_dir, "flow_cases.json"), "w") as fh:
        json.dump({"torch": C.torch.__version__, "cpu_capability": C.torch.backends.cpu.get_cpu_capability(),
                   "samplers": samplers, "schedulers": schedulers, "scheduler_cases": sched_meta,
                   "cases": cases, "analytic_net": {"W16": W16, "B16": B16, "guidance": GUIDANCE}},
                  fh, indent=1, sort_keys=True)
    print(f"flow sampling: {len(cases)} cases, {sum(1 for c in cases if c['error'])} ComfyUI errors; "
          f"{len(sched)} scheduler cases", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("comfyui")
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--sampling", action="store_true", help="also run the KSampler cases and schedulers")
    args = ap.parse_args()
    C = import_comfy(args.comfyui)
    torch = C.torch
    if args.sampling:
        import comfy.samplers  # noqa: F401
        import nodes
        C.nodes = nodes
        run_flow_sampling(C, args.out)
    rng = np.random.RandomState(7)
    data, meta = {}, {"torch": torch.__version__, "cases": {}}
    probe_t = np.concatenate([[1.0, 0.5, 1e-3], rng.uniform(0, 1, 61)]).astype(np.float32)
    noise = rng.standard_normal((2, 16, 4, 5)).astype(np.float32)
    latent = rng.standard_normal((2, 16, 4, 5)).astype(np.float32)
    out = rng.standard_normal((2, 16, 4, 5)).astype(np.float32)
    data["noise"], data["latent"], data["model_output"], data["probe_t"] = noise, latent, out, probe_t
    for name, config_name, model_type, shift in CASES:
        ms, cfg = model_sampling_for(C, config_name, model_type, shift)
        mult = float(getattr(ms, "multiplier", 1.0))
        data[f"{name}/sigmas"] = ms.sigmas.numpy()
        data[f"{name}/sigma_of_t"] = ms.sigma(torch.from_numpy(probe_t * mult)).numpy()
        sig = ms.sigmas.numpy()[::97].copy()
        data[f"{name}/probe_sigma"] = sig
        data[f"{name}/timestep"] = ms.timestep(torch.from_numpy(sig)).numpy()
        data[f"{name}/percent_to_sigma"] = np.asarray([ms.percent_to_sigma(p) for p in PERCENTS], dtype=np.float64)
        s0 = torch.tensor([0.8], dtype=torch.float32)
        data[f"{name}/noise_scaling"] = ms.noise_scaling(s0, torch.from_numpy(noise), torch.from_numpy(latent)).numpy()
        data[f"{name}/inverse_noise_scaling"] = ms.inverse_noise_scaling(torch.tensor(0.3), torch.from_numpy(latent)).numpy()
        data[f"{name}/denoised"] = ms.calculate_denoised(torch.tensor([0.6, 0.2]), torch.from_numpy(out),
                                                         torch.from_numpy(latent)).numpy()
        fmt = cfg.latent_format if not isinstance(cfg.latent_format, type) else cfg.latent_format()
        data[f"{name}/process_in"] = fmt.process_in(torch.from_numpy(latent)).numpy()
        data[f"{name}/process_out"] = fmt.process_out(torch.from_numpy(latent)).numpy()
        meta["cases"][name] = {"config": config_name, "model_type": model_type, "shift": float(ms.shift),
                               "multiplier": mult, "sampling": [c.__name__ for c in type(ms).__mro__[1:3]]}
    meta["percents"] = PERCENTS
    np.savez_compressed(os.path.join(args.out, "flow_model_sampling.npz"), **data)
    with open(os.path.join(args.out, "flow_model_sampling.json"), "w") as fh:
        json.dump(meta, fh, indent=1, sort_keys=True)
    print("wrote", len(data), "arrays")


if __name__ == "__main__":
    main()
