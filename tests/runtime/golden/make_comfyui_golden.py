#!/usr/bin/env python
"""Produce golden reference data for ksampler-rt by running REAL ComfyUI on the CPU.

Not part of the package and not run by the test suite: it needs a ComfyUI checkout and
torch. The data it writes (tests/runtime/golden/*.npz, *.json) is committed and read by
tests/runtime/test_comfyui_parity.py.

What it does
------------
* Imports ComfyUI's own code (``nodes.common_ksampler``, ``comfy.samplers.KSampler``,
  ``comfy.sample.prepare_noise`` via the node, ``comfy.model_base.BaseModel`` / ``SDXL``,
  ``comfy.model_patcher.ModelPatcher``) with ``--cpu`` and one torch thread.
* Builds real ComfyUI models (SD1.5 EPS, SD2 V_PREDICTION, SDXL EPS) from
  ``comfy.supported_models`` configs with ``disable_unet_model_creation`` and plugs in
  :class:`AnalyticUNetTorch` as ``diffusion_model`` -- the torch twin of
  ``tests/runtime/analytic_unet.py``. ComfyUI's model sampling (c_in, timestep rounding,
  eps/v denoised), latent formats, CFG batching, noise, schedulers and samplers then run
  untouched.
* Writes
    schedulers.npz  -- ``KSampler(model, steps, "cpu", sampler, scheduler, denoise).sigmas``
    samplers.npz    -- final LATENT samples (unscaled, as the node returns them), per-step
                       callback x / denoised for some cases, inputs (latents, conditioning)
                       and the UNet inputs of one recorded case
    cases.json      -- case descriptions + environment (torch, ComfyUI commit, CPU capability)

How to run
----------
    # ComfyUI 0.3.64 (commit a125cd84b054a57729b5eecab930ca9408719832) work tree:
    mkdir -p /work/comfyui
    git -C <ComfyUI.git> archive HEAD -- . \
        ':(exclude)comfy/text_encoders/llama_tokenizer/tokenizer.json' | tar -x -C /work/comfyui
    # a venv OUTSIDE the project; CPU torch first and alone:
    python3 -m venv /work/comfy-venv
    /work/comfy-venv/bin/pip install torch==2.13.0          # the +cpu wheel
    /work/comfy-venv/bin/pip install numpy torchsde einops safetensors scipy psutil tqdm \
        pyyaml Pillow transformers tokenizers sentencepiece aiohttp av pydantic
    /work/comfy-venv/bin/python tests/runtime/golden/make_comfyui_golden.py /work/comfyui \
        --out tests/runtime/golden --comfy-commit a125cd84b054a57729b5eecab930ca9408719832

torchvision is not needed for sampling; if it is missing (or its binary does not match the
CPU torch) a stub module is installed so that ``comfy.model_base`` (which imports model
families that use torchvision.transforms at run time only) can be imported.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np

COMFY_COMMIT_0_3_64 = "a125cd84b054a57729b5eecab930ca9408719832"

W_T = [0.05, -0.04, 0.03, -0.02]
B_C = [0.01, -0.02, 0.015, -0.005]


# ----------------------------------------------------------------------------- setup
def import_comfy(comfy_path: str):
    """Import ComfyUI from ``comfy_path`` in --cpu mode with one torch thread.

    The import itself (argument parsing, --cpu, torchvision stub) is the sampler benchmark's ComfyUI peer's,
    ``ksampler_rt/bench/comfyui_peer.py``, loaded by path: that file needs only torch and ComfyUI, so it runs
    in ComfyUI's own venv, where ksampler_rt is not installed."""
    peer_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "ksampler_rt", "bench",
                             "comfyui_peer.py")
    spec = importlib.util.spec_from_file_location("_comfyui_peer", os.path.abspath(peer_path))
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    C = peer.import_comfy(comfy_path)
    import comfy.sample  # noqa: F401
    import latent_preview
    C.latent_preview = latent_preview
    return C


def make_unet_class(torch):
    class AnalyticUNetTorch(torch.nn.Module):
        """Torch twin of tests/runtime/analytic_unet.py (same formula, same op order)."""

        def __init__(self):
            super().__init__()
            self.register_buffer("w_t", torch.tensor(W_T, dtype=torch.float32))
            self.register_buffer("b_c", torch.tensor(B_C, dtype=torch.float32))
            self.dtype = torch.float32
            self.record = None  # a list to append inputs to, or None

        def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
            t = timesteps.to(torch.float32).reshape(-1)
            if self.record is not None:
                self.record.append({
                    "x": x.detach().clone().numpy(), "timestep": t.clone().numpy(),
                    "context": context.detach().clone().numpy(),
                    "y": None if y is None else y.detach().clone().numpy(),
                    "cond_or_uncond": list(transformer_options.get("cond_or_uncond", [])),
                })
            c = x.shape[1]
            out = 0.9 * x + 0.1 * torch.tanh(x)
            out = out + (t / 999.0)[:, None, None, None] * self.w_t[None, :c, None, None]
            out = out + 0.05 * context.mean(dim=(1, 2))[:, None, None, None]
            out = out + self.b_c[None, :c, None, None]
            if y is not None:
                out = out + 0.01 * y.mean(dim=1)[:, None, None, None]
            return out

    return AnalyticUNetTorch


def build_model(C, family: str):
    """A real ComfyUI model (BaseModel / SDXL) wrapped in a ModelPatcher, analytic UNet inside."""
    torch, comfy = C.torch, C.comfy
    sm, mb = comfy.supported_models, comfy.model_base
    unet_cfg = {"disable_unet_model_creation": True, "in_channels": 4}
    if family == "sd15":
        cfg = sm.SD15(unet_cfg)
        model = mb.BaseModel(cfg, model_type=mb.ModelType.EPS, device=torch.device("cpu"))
    elif family == "sd2-v":
        cfg = sm.SD20(unet_cfg)
        model = mb.BaseModel(cfg, model_type=mb.ModelType.V_PREDICTION, device=torch.device("cpu"))
    elif family == "sdxl":
        cfg = sm.SDXL(unet_cfg)
        model = mb.SDXL(cfg, model_type=mb.ModelType.EPS, device=torch.device("cpu"))
    else:
        raise ValueError(family)
    model.diffusion_model = C.Unet()
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


# ----------------------------------------------------------------------------- inputs
def make_inputs():
    rng = np.random.RandomState(20251011)
    f = np.float32
    inp = {
        # conditioning contexts [1, T=4, D=8] (pos2 has T=8: ComfyUI concatenates by LCM repeat)
        "cond/pos": (0.5 * rng.standard_normal((1, 4, 8)) + 0.3).astype(f),
        "cond/neg": (0.5 * rng.standard_normal((1, 4, 8)) - 0.2).astype(f),
        "cond/pos2": (0.5 * rng.standard_normal((1, 8, 8)) + 0.6).astype(f),
        "pooled/pos": (0.5 * rng.standard_normal((1, 1280)) + 0.4).astype(f),
        "pooled/neg": (0.5 * rng.standard_normal((1, 1280)) - 0.3).astype(f),
        "pooled/pos2": (0.5 * rng.standard_normal((1, 1280)) + 0.1).astype(f),
        # latents (unscaled VAE space, as LATENT["samples"])
        "latent/zeros1": np.zeros((1, 4, 8, 8), f),
        "latent/rand1": (2.0 * rng.standard_normal((1, 4, 8, 8))).astype(f),
        "latent/rand2": (2.0 * rng.standard_normal((2, 4, 8, 8))).astype(f),
        "latent/zeros2": np.zeros((2, 4, 8, 8), f),
    }
    return inp


def conditioning(C, inp, names, family):
    torch = C.torch
    out = []
    for n in names:
        d = {}
        if family == "sdxl":
            d["pooled_output"] = torch.from_numpy(inp["pooled/" + n].copy())
        out.append([torch.from_numpy(inp["cond/" + n].copy()), d])
    return out


# ----------------------------------------------------------------------------- cases
SAMPLERS_FEW_STEPS2 = ["euler", "heun", "dpm_2", "lms", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde",
                       "uni_pc", "uni_pc_bh2", "ipndm", "deis", "dpm_fast", "euler_ancestral",
                       "res_multistep", "er_sde", "sa_solver"]
CFG1 = ["euler", "euler_cfg_pp", "dpmpp_2m", "euler_ancestral", "dpmpp_2m_cfg_pp", "dpmpp_sde"]
KARRAS = ["euler", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2m", "dpmpp_sde", "dpmpp_2m_sde",
          "dpmpp_3m_sde", "uni_pc", "deis", "ipndm_v"]
IMG2IMG = ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_sde", "dpmpp_2m_sde", "uni_pc", "lcm", "ddpm", "heun"]
PERSTEP = {"euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_sde", "uni_pc", "lms"}
FAMILY_SAMPLERS = ["euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "uni_pc", "lcm", "euler_cfg_pp"]


def ks(cid, family="sd15", seed=42, steps=6, cfg=8.0, sampler="euler", scheduler="normal", latent="zeros1",
       positive=("pos",), negative=("neg",), denoise=1.0, perstep=False, record_unet=False):
    return {"id": cid, "kind": "ksampler", "family": family,
            "params": {"seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
                       "denoise": denoise},
            "latent": latent, "positive": list(positive), "negative": list(negative),
            "perstep": perstep, "record_unet": record_unet}


def ksa(cid, family="sd15", add_noise="enable", noise_seed=42, steps=6, cfg=8.0, sampler="euler",
        scheduler="normal", latent="zeros1", start=0, end=10000, leftover="disable", positive=("pos",),
        negative=("neg",)):
    return {"id": cid, "kind": "ksampler_advanced", "family": family,
            "params": {"add_noise": add_noise, "noise_seed": noise_seed, "steps": steps, "cfg": cfg,
                       "sampler_name": sampler, "scheduler": scheduler, "start_at_step": start,
                       "end_at_step": end, "return_with_leftover_noise": leftover},
            "latent": latent, "positive": list(positive), "negative": list(negative),
            "perstep": False, "record_unet": False}


def sampler_cases(sampler_names, scheduler_names):
    cases = []
    for s in sampler_names:  # every sampler, txt2img
        cases.append(ks(f"ks/{s}/s6_cfg8_normal", sampler=s, perstep=s in PERSTEP,
                        record_unet=(s == "euler")))
    for s in SAMPLERS_FEW_STEPS2:
        cases.append(ks(f"ks/{s}/s2_cfg8_normal", sampler=s, steps=2))
    for s in CFG1:
        cases.append(ks(f"ks/{s}/s6_cfg1_normal", sampler=s, cfg=1.0))
    for s in KARRAS:
        cases.append(ks(f"ks/{s}/s6_cfg8_karras", sampler=s, scheduler="karras"))
    for sch in scheduler_names:
        if sch not in ("normal", "karras"):
            cases.append(ks(f"ks/euler/s6_cfg8_{sch}", sampler="euler", scheduler=sch))
    cases.append(ks("ks/dpmpp_2m/s6_cfg8_ddim_uniform", sampler="dpmpp_2m", scheduler="ddim_uniform"))
    cases.append(ks("ks/uni_pc/s6_cfg8_beta", sampler="uni_pc", scheduler="beta"))
    for s in IMG2IMG:
        cases.append(ks(f"ks/{s}/img2img_b2_d0.6", sampler=s, latent="rand2", denoise=0.6, seed=7,
                        perstep=(s == "euler_ancestral")))
    cases.append(ks("ks/euler/txt2img_b2", sampler="euler", latent="zeros2"))
    cases.append(ks("ks/euler_ancestral/txt2img_b2", sampler="euler_ancestral", latent="zeros2"))
    # denoise 0 -> input returned unchanged
    cases.append(ks("ks/euler/img2img_d0", sampler="euler", latent="rand1", denoise=0.0))
    # multiple conditioning entries
    cases.append(ks("ks/euler/multicond_pos2", sampler="euler", positive=("pos", "pos2")))
    cases.append(ks("ks/dpmpp_2m/multicond_pos2", sampler="dpmpp_2m", positive=("pos", "pos2")))
    cases.append(ks("ks/euler/multicond_neg2_cfg1", sampler="euler", cfg=1.0, negative=("neg", "pos2"),
                    positive=("pos", "neg")))
    # big seeds
    cases.append(ks("ks/euler_ancestral/seed_2p32p42", sampler="euler_ancestral", seed=2**32 + 42))
    cases.append(ks("ks/dpmpp_sde/seed_2p64m1", sampler="dpmpp_sde", seed=2**64 - 1))
    cases.append(ks("ks/dpmpp_2m_sde/seed_2p32p42", sampler="dpmpp_2m_sde", seed=2**32 + 42))
    cases.append(ks("ks/euler_ancestral/seed_2p64m1", sampler="euler_ancestral", seed=2**64 - 1))

    # KSamplerAdvanced
    for s in ["euler", "dpmpp_2m", "euler_ancestral"]:
        cases.append(ksa(f"ksa/{s}/split_a_0_3_leftover", sampler=s, start=0, end=3, leftover="enable"))
        cases.append(ksa(f"ksa/{s}/split_b_3_6_nonoise", sampler=s, start=3, end=6, add_noise="disable",
                         latent=f"out:ksa/{s}/split_a_0_3_leftover"))
    cases.append(ksa("ksa/euler/add_noise_disable_rand1", sampler="euler", add_noise="disable", latent="rand1"))
    cases.append(ksa("ksa/dpmpp_2m/add_noise_disable_rand1", sampler="dpmpp_2m", add_noise="disable", latent="rand1"))
    cases.append(ksa("ksa/euler/start4_end3_early_return", sampler="euler", start=4, end=3, latent="rand1"))
    cases.append(ksa("ksa/euler/start6_early_return", sampler="euler", start=6, latent="rand1"))
    cases.append(ksa("ksa/euler/start2_end10000_noise", sampler="euler", start=2, latent="rand1"))
    cases.append(ksa("ksa/euler/end10_beyond_leftover_enable", sampler="euler", end=10, leftover="enable"))
    cases.append(ksa("ksa/euler/end10_beyond_leftover_disable", sampler="euler", end=10, leftover="disable"))
    for s in ["euler", "dpmpp_2m", "dpm_2", "uni_pc", "dpmpp_2m_sde"]:
        cases.append(ksa(f"ksa/{s}/end4_leftover_enable", sampler=s, end=4, leftover="enable"))
        cases.append(ksa(f"ksa/{s}/end4_leftover_disable", sampler=s, end=4, leftover="disable"))
    cases.append(ksa("ksa/heun/start1_end5_karras", sampler="heun", scheduler="karras", start=1, end=5,
                     latent="rand1"))

    # families
    for fam in ["sd2-v", "sdxl"]:
        for s in FAMILY_SAMPLERS:
            cases.append(ks(f"{fam}/ks/{s}/s6_cfg8_normal", family=fam, sampler=s,
                            record_unet=(s == "euler" and fam == "sdxl")))
        cases.append(ks(f"{fam}/ks/euler/img2img_b2_d0.6", family=fam, sampler="euler", latent="rand2",
                        denoise=0.6, seed=7))
        cases.append(ks(f"{fam}/ks/dpmpp_2m/s6_cfg1_karras", family=fam, sampler="dpmpp_2m", cfg=1.0,
                        scheduler="karras"))
        cases.append(ks(f"{fam}/ks/euler/multicond_pos2", family=fam, sampler="euler", positive=("pos", "pos2")))
        cases.append(ksa(f"{fam}/ksa/euler/split_a_0_3_leftover", family=fam, sampler="euler", start=0, end=3,
                         leftover="enable"))
        cases.append(ksa(f"{fam}/ksa/euler/split_b_3_6_nonoise", family=fam, sampler="euler", start=3, end=6,
                         add_noise="disable", latent=f"out:{fam}/ksa/euler/split_a_0_3_leftover"))
    return cases


# ----------------------------------------------------------------------------- runners
def run_schedulers(C, model, out):
    comfy = C.comfy
    data, meta = {}, []
    for sch in comfy.samplers.KSampler.SCHEDULERS:
        for sampler in ("euler", "dpm_2"):
            for steps in (1, 2, 3, 7, 10, 20, 30):
                for denoise in (1.0, 0.5, 0.3):
                    cid = f"{sch}/{sampler}/{steps}/{denoise}"
                    err = None
                    try:
                        ks_ = comfy.samplers.KSampler(model, steps, "cpu", sampler, sch, denoise)
                        sig = ks_.sigmas.detach().cpu().numpy().astype(np.float32)
                    except Exception as e:  # ComfyUI itself errors: record NaN
                        err = f"{type(e).__name__}: {e}"
                        sig = np.array([np.nan], np.float32)
                    data[cid] = sig
                    meta.append({"id": cid, "scheduler": sch, "sampler_name": sampler, "steps": steps,
                                 "denoise": denoise, "error": err})
    np.savez_compressed(os.path.join(out, "schedulers.npz"), **data)
    return meta


def run_case(C, models, inp, results, case):
    torch, nodes = C.torch, C.nodes
    fam = case["family"]
    model = models[fam]
    lat = case["latent"]
    if lat.startswith("out:"):
        lat_np = results["out/" + lat[4:]]
    else:
        lat_np = inp["latent/" + lat]
    latent = {"samples": torch.from_numpy(lat_np.copy())}
    pos = conditioning(C, inp, case["positive"], fam)
    neg = conditioning(C, inp, case["negative"], fam)
    p = case["params"]

    steps_x, steps_d = [], []
    orig_prepare = C.latent_preview.prepare_callback
    if case["perstep"]:
        def prepare_callback(model_, steps_, x0_output_dict=None):
            def cb(step, x0, x, total_steps):
                steps_x.append(x.detach().clone().numpy())
                steps_d.append(x0.detach().clone().numpy())
            return cb
        C.latent_preview.prepare_callback = prepare_callback
    unet = model.model.diffusion_model
    rec = [] if case["record_unet"] else None
    unet.record = rec
    try:
        if case["kind"] == "ksampler":
            (res,) = nodes.KSampler().sample(model, p["seed"], p["steps"], p["cfg"], p["sampler_name"],
                                             p["scheduler"], pos, neg, latent, denoise=p["denoise"])
        else:
            (res,) = nodes.KSamplerAdvanced().sample(model, p["add_noise"], p["noise_seed"], p["steps"], p["cfg"],
                                                     p["sampler_name"], p["scheduler"], pos, neg, latent,
                                                     p["start_at_step"], p["end_at_step"],
                                                     p["return_with_leftover_noise"], denoise=1.0)
    finally:
        C.latent_preview.prepare_callback = orig_prepare
        unet.record = None
    cid = case["id"]
    results["out/" + cid] = res["samples"].detach().cpu().numpy().astype(np.float32)
    if case["perstep"]:
        results["steps_x/" + cid] = np.stack(steps_x)
        results["steps_denoised/" + cid] = np.stack(steps_d)
        case["n_callback_steps"] = len(steps_x)
    if rec is not None:
        case["unet_calls"] = len(rec)
        results["unet/timestep/" + cid] = np.stack([r["timestep"] for r in rec])
        results["unet/x/" + cid] = np.stack([r["x"] for r in rec])
        results["unet/context_mean/" + cid] = np.stack([r["context"].mean(axis=(1, 2)) for r in rec])
        if rec[0]["y"] is not None:
            results["unet/y/" + cid] = np.stack([r["y"] for r in rec])
        case["unet_cond_or_uncond"] = rec[0]["cond_or_uncond"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("comfyui", help="path to a ComfyUI 0.3.64 work tree")
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--comfy-commit", default=None,
                    help="commit of the checkout (read with git if the tree has .git)")
    ap.add_argument("--only", default=None, help="run only sampler cases whose id contains this")
    ap.add_argument("--skip-schedulers", action="store_true")
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)

    C = import_comfy(args.comfyui)
    torch = C.torch
    C.Unet = make_unet_class(torch)
    commit = args.comfy_commit
    if commit is None:
        try:
            commit = subprocess.check_output(["git", "-C", args.comfyui, "rev-parse", "HEAD"], text=True,
                                             stderr=subprocess.DEVNULL).strip()
        except Exception:
            commit = "unknown"
    import comfyui_version
    env = {
        "torch": torch.__version__,
        "numpy": np.__version__,
        "comfyui_version": comfyui_version.__version__,
        "comfyui_commit": commit,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    try:
        import torchsde
        env["torchsde"] = torchsde.__version__
    except Exception:
        pass
    try:
        import scipy
        env["scipy"] = scipy.__version__
    except Exception:
        pass
    print(env, flush=True)

    models = {f: build_model(C, f) for f in ("sd15", "sd2-v", "sdxl")}
    samplers = list(C.comfy.samplers.KSampler.SAMPLERS)
    schedulers = list(C.comfy.samplers.KSampler.SCHEDULERS)
    meta = {"env": env, "samplers": samplers, "schedulers": schedulers,
            "analytic_unet": {"W_T": W_T, "B_C": B_C}}

    sched_path = os.path.join(out, "cases.json")
    if not args.skip_schedulers:
        t0 = time.time()
        meta["scheduler_cases"] = run_schedulers(C, models["sd15"], out)
        print(f"schedulers: {len(meta['scheduler_cases'])} cases in {time.time() - t0:.1f}s", flush=True)
    elif os.path.exists(sched_path):
        with open(sched_path) as fh:
            meta["scheduler_cases"] = json.load(fh).get("scheduler_cases", [])

    inp = make_inputs()
    results = dict(inp)
    cases = sampler_cases(samplers, schedulers)
    if args.only:
        cases = [c for c in cases if args.only in c["id"]]
    t0 = time.time()
    for i, case in enumerate(cases):
        t1 = time.time()
        try:
            run_case(C, models, inp, results, case)
            case["error"] = None
        except Exception as e:
            case["error"] = f"{type(e).__name__}: {e}"
            print("ERROR", case["id"], case["error"], flush=True)
        o = results.get("out/" + case["id"])
        print(f"[{i + 1}/{len(cases)}] {case['id']} {time.time() - t1:.2f}s "
              f"absmax={np.abs(o).max() if o is not None else None}", flush=True)
    print(f"sampler cases: {len(cases)} in {time.time() - t0:.1f}s", flush=True)
    meta["sampler_cases"] = cases
    np.savez_compressed(os.path.join(out, "samplers.npz"), **results)
    with open(sched_path, "w") as fh:
        json.dump(meta, fh, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
