"""What the sampler modules and the KSampler share about samplers, with no sampler imported.

The sampler modules (classic, dpmpp, multistep, stochastic, unipc) build their tables from
:class:`SamplerSpec`; :mod:`.registry` imports those modules to collect them; the schedulers need
only the names. Keeping these here means nothing imports in a circle.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# ComfyUI 0.3.64 KSampler.SAMPLERS order, with the two names newer ComfyUI inserts after heunpp2.
SAMPLER_NAMES: tuple[str, ...] = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2",
    "exp_heun_2_x0", "exp_heun_2_x0_sde",
    "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
    "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp",
    "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver",
    "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
)

# KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS: the schedule is made for steps + 1 and its
# second-to-last sigma dropped, before the denoise tail and the start/end window are cut.
DISCARD_PENULTIMATE_SIGMA_SAMPLERS = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler function plus what the KSampler must do around it."""

    fn: Callable
    cfg_pp: bool = False  # evaluates uncond even at cfg == 1 (disable_cfg1_optimization)
    # Whether the sampler matches ComfyUI 0.3.64 on flow (CONST) models; a sampler whose rectified-flow
    # branch is not written yet is refused for them rather than silently sampling the VP maths.
    flow: bool = True
