"""The ComfyUI side of ``sampler_overhead --level full``: a script run in ComfyUI's own Python.

    /path/to/comfy-python comfyui_peer.py --comfyui /path/to/ComfyUI

It imports real ComfyUI (``--cpu``, one torch thread), builds an SD1.5 ``BaseModel`` (EPS) in a
``ModelPatcher`` whose ``diffusion_model`` is a zero-cost torch module (it returns a cached
``torch.zeros_like(x)``), and times ComfyUI's own ``nodes.KSampler().sample(model, 42, steps,
8.0, sampler, "normal", pos, neg, latent, denoise=1.0)`` with one ``[1,77,768]`` conditioning
entry each side and a zero latent ``[1,4,size,size]``: CFGGuider, cond batching, model sampling
(c_in, timestep, denoised), prepare_noise, the scheduler and the sampler all run untouched.

Only the standard library, torch and ComfyUI are imported (numpy only as ComfyUI does): this
file must not import ``ksampler_rt``, since it runs in a different interpreter.

Protocol (one JSON object per line): requests on stdin, replies on the process's *original*
stdout, each prefixed with :data:`MARKER`; everything else ComfyUI or torch print (fd 1 is
pointed at stderr once the reply channel is saved) is not a reply, and the parent skips any
line without the marker.

* first reply, once ComfyUI is imported: ``{"ready": true, "python": ..., "torch": ...,
  "comfyui": ..., "samplers": [...]}`` or ``{"error": "..."}`` (then the process exits 1);
* request ``{"sampler": name, "size": 64, "steps": 20[, "family": "flux"]}`` -> ``{"ms_per_step":
  float}`` (one whole node call / steps) or ``{"error": "..."}``. The first request for a (sampler,
  size, steps, family) runs the node once untimed (warm-up) before the timed call. ``family``
  (default sd15) picks the model: ``sd3`` (model_base.SD3, ModelSamplingDiscreteFlow shift 3,
  [1,154,4096] context + pooled 2048), ``flux`` (model_base.Flux, ModelSamplingFlux, [1,77,4096] +
  pooled 768, guidance 3.5) or ``flux-schnell``; their latents have 16 channels;
* end of input, or ``{"quit": true}``, ends the process.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import json
import os
import sys
import time
import traceback
import types

if __name__ == "__main__":
    # run by path, sys.path[0] is ksampler_rt/bench, whose modules (noise, models, server, ray, ...)
    # would shadow top-level modules of ComfyUI or its dependencies
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

MARKER = "@@ksampler_rt-comfyui-peer@@ "
SEED = 42
CFG = 8.0


def _open_reply_channel():
    """Keep the real stdout for replies; send fd 1 (prints, C-level writes) to stderr."""
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(fd, "w", buffering=1, encoding="utf-8")


def _reply(chan, obj) -> None:
    chan.write(MARKER + json.dumps(obj) + "\n")
    chan.flush()


def import_comfy(comfy_path: str):
    """Import ComfyUI from ``comfy_path`` in --cpu mode with one torch thread (as
    tests/runtime/golden/make_comfyui_golden.py does; torchvision is stubbed when missing)."""
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, os.path.abspath(comfy_path))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torchvision  # noqa: F401
    except Exception:
        for k in [k for k in sys.modules if k.startswith("torchvision")]:
            del sys.modules[k]
        tv = types.ModuleType("torchvision")
        tvt = types.ModuleType("torchvision.transforms")
        tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
        tvt.__spec__ = importlib.machinery.ModuleSpec("torchvision.transforms", None)
        tv.transforms = tvt
        sys.modules["torchvision"] = tv
        sys.modules["torchvision.transforms"] = tvt
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import torch
    torch.set_num_threads(1)
    import comfy.model_base
    import comfy.model_management  # noqa: F401
    import comfy.model_patcher
    import comfy.samplers
    import comfy.supported_models
    import comfy.utils
    import nodes
    comfy.utils.PROGRESS_BAR_ENABLED = False
    try:
        import comfyui_version
        version = comfyui_version.__version__
    except Exception:  # noqa: BLE001 - older checkouts
        version = "unknown"
    return types.SimpleNamespace(torch=torch, comfy=comfy, nodes=nodes, version=version)


# family -> (supported_models config, model_base class, ModelType, latent channels, context [T, D], pooled width)
FAMILIES = {
    "sd15": ("SD15", "BaseModel", "EPS", 4, (77, 768), None),
    "sd3": ("SD3", "SD3", "FLOW", 16, (154, 4096), 2048),
    "flux": ("Flux", "Flux", "FLUX", 16, (77, 4096), 768),
    "flux-schnell": ("FluxSchnell", "Flux", "FLOW", 16, (77, 4096), 768),
}


def build_model(C, family: str = "sd15"):
    """A real ComfyUI model of ``family`` (SD1.5 BaseModel EPS; SD3 / Flux / FluxSchnell with their own
    model samplings and extra conds) in a ModelPatcher with a zero-cost diffusion model."""
    torch, comfy = C.torch, C.comfy
    config_name, model_class, model_type, channels, _, _ = FAMILIES[family]

    class ZeroUNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dtype = torch.float32
            self._zeros = {}

        def forward(self, x, timesteps=None, context=None, y=None, guidance=None, **kwargs):
            key = (tuple(x.shape), x.dtype)
            z = self._zeros.get(key)
            if z is None:
                z = self._zeros[key] = torch.zeros_like(x)
            return z

    sm, mb = comfy.supported_models, comfy.model_base
    unet_config = {"disable_unet_model_creation": True, "in_channels": channels}
    if family != "sd15":
        unet_config["out_channels"] = channels  # Flux's concat_cond reads it
    cfg = getattr(sm, config_name)(unet_config)
    model = getattr(mb, model_class)(cfg, model_type=getattr(mb.ModelType, model_type), device=torch.device("cpu"))
    model.diffusion_model = ZeroUNet()
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


class Peer:
    def __init__(self, C):
        self.C = C
        self.models = {}
        self.samplers = list(C.comfy.samplers.KSampler.SAMPLERS)
        self.warm = set()

    def model(self, family: str):
        """(ModelPatcher, positive, negative) of a family: one [1, T, D] entry each side, with the pooled
        output of the flow families (FLUX.1 dev's guidance stays ComfyUI's default 3.5)."""
        if family not in self.models:
            torch = self.C.torch
            _, _, _, _, (tokens, width), pooled = FAMILIES[family]
            g = torch.Generator().manual_seed(0)

            def cond():
                extra = {} if pooled is None else {
                    "pooled_output": torch.randn((1, pooled), generator=g, dtype=torch.float32)}
                return [[torch.randn((1, tokens, width), generator=g, dtype=torch.float32), extra]]

            self.models[family] = (build_model(self.C, family), cond(), cond())
        return self.models[family]

    def run_once(self, sampler: str, size: int, steps: int, family: str = "sd15") -> None:
        torch = self.C.torch
        model, pos, neg = self.model(family)
        latent = {"samples": torch.zeros((1, FAMILIES[family][3], size, size), dtype=torch.float32)}
        with torch.inference_mode():
            self.C.nodes.KSampler().sample(model, SEED, steps, CFG, sampler, "normal", pos, neg, latent,
                                           denoise=1.0)

    def handle(self, req: dict) -> dict:
        sampler, size, steps = str(req["sampler"]), int(req["size"]), int(req["steps"])
        family = str(req.get("family", "sd15"))
        if family not in FAMILIES:
            return {"error": f"family: received {family!r}, expected one of {tuple(FAMILIES)}"}
        if sampler not in self.samplers:
            return {"error": f"{sampler} is not in ComfyUI {self.C.version}'s KSampler.SAMPLERS"}
        key = (sampler, size, steps, family)
        if key not in self.warm:
            self.run_once(sampler, size, steps, family)  # warm-up, not timed
            self.warm.add(key)
        t = time.perf_counter()
        self.run_once(sampler, size, steps, family)
        return {"ms_per_step": (time.perf_counter() - t) / steps * 1e3}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", required=True, help="ComfyUI checkout")
    args = ap.parse_args(argv)
    chan = _open_reply_channel()
    try:
        C = import_comfy(args.comfyui)
        peer = Peer(C)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        traceback.print_exc()
        _reply(chan, {"error": f"importing ComfyUI from {args.comfyui} failed: {type(e).__name__}: {e}"[:500]})
        return 1
    _reply(chan, {"ready": True, "python": sys.version.split()[0], "torch": C.torch.__version__,
                  "torch_threads": C.torch.get_num_threads(), "comfyui": C.version,
                  "comfyui_path": os.path.abspath(args.comfyui), "samplers": peer.samplers})
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
        except ValueError as e:
            _reply(chan, {"error": f"bad request {line[:100]!r}: {e}"})
            continue
        if req.get("quit"):
            break
        try:
            out = peer.handle(req)
        except Exception as e:  # noqa: BLE001 - one sampler failing must not end the peer
            traceback.print_exc()
            out = {"error": f"{type(e).__name__}: {e}"[:500]}
        _reply(chan, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
