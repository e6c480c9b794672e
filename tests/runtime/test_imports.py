"""The runtime must drive engines without torch: importing it may not load torch, export or engines."""
import subprocess
import sys


def test_runtime_imports_without_torch():
    code = (
        "import sys, ksampler_rt.runtime as rt\n"
        "from ksampler_rt.runtime import (Model, ksampler, ksampler_advanced, prepare_noise, calculate_sigmas,"
        " SAMPLER_NAMES, SCHEDULER_NAMES)\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'ksampler_rt.export', 'ksampler_rt.engines'))]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing ksampler_rt.runtime loaded: {out.stdout.strip()}"


def test_public_names_are_comfyui_ordered_tuples():
    from ksampler_rt.runtime import SAMPLER_NAMES, SCHEDULER_NAMES

    assert isinstance(SAMPLER_NAMES, tuple) and isinstance(SCHEDULER_NAMES, tuple)
    assert SAMPLER_NAMES[:4] == ("euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp")
    assert SAMPLER_NAMES[-3:] == ("ddim", "uni_pc", "uni_pc_bh2")
    assert SCHEDULER_NAMES == ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta",
                               "normal", "linear_quadratic", "kl_optimal")
