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
    torch, comfy = C.torch, C.comfy
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("comfyui")
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args()
    C = import_comfy(args.comfyui)
    torch = C.torch
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
