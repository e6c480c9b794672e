"""The sampler table: ComfyUI name -> function and the flags the KSampler needs.

The names and :class:`SamplerSpec` live in :mod:`.spec` (re-exported here), so that the sampler
modules this table is collected from never import it back.
"""
from __future__ import annotations

from . import classic, dpmpp, multistep, stochastic, unipc
from .spec import DISCARD_PENULTIMATE_SIGMA_SAMPLERS, SAMPLER_NAMES, SamplerSpec

__all__ = ["DISCARD_PENULTIMATE_SIGMA_SAMPLERS", "SAMPLER_NAMES", "SAMPLERS", "SamplerSpec", "get_sampler"]


def _collect() -> dict[str, SamplerSpec]:
    table: dict[str, SamplerSpec] = {}
    for module in (classic, dpmpp, multistep, stochastic, unipc):
        for name, spec in module.SAMPLERS.items():
            if name in table:
                raise RuntimeError(f"{module.__name__}.SAMPLERS: received {name!r} a second time, expected each "
                                   "sampler name in one module only")
            table[name] = spec
    return {name: table[name] for name in SAMPLER_NAMES if name in table}


SAMPLERS: dict[str, SamplerSpec] = _collect()


def get_sampler(name: str) -> SamplerSpec:
    """The spec for a ComfyUI sampler name; an unknown name lists the valid ones."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"sampler_name: received {name!r}, expected one of: {', '.join(SAMPLER_NAMES)}") from None
