"""Conditioning nodes: ComfyUI's ConditioningCombine / ConditioningZeroOut / ConditioningSetTimestepRange, and
``ConditioningSetStepRange``, ksampler-rt's per-step prompt scheduling.

``ConditioningSetStepRange(conditioning, start_step, end_step)`` makes the conditioning apply to
steps ``start_step <= i < end_step`` of the KSampler's schedule only. Combined with another
conditioning for the other steps it switches prompts *inside one sampler call* -- what ComfyUI
needs a chain of KSamplerAdvanced windows (or custom nodes) for -- and gives exactly the result of
that chain joined with exact continuation (A1111's ``[from:to:when]`` with ``when`` a step).
"""
from __future__ import annotations

import numpy as np

from .spec import Input, NodeSpec


def set_values(conditioning: list, values: dict) -> list:
    """node_helpers.conditioning_set_values: copy each entry's options and set the values."""
    return [[context, {**options, **values}] for context, options in conditioning]


def conditioning_combine(ctx, node_id, conditioning_1, conditioning_2):
    return (list(conditioning_1) + list(conditioning_2),)


def conditioning_zero_out(ctx, node_id, conditioning):
    """ComfyUI's ConditioningZeroOut (nodes.py): zeros of the context and of the pooled output, other options kept
    (SD3.5's negative: ``ConditioningZeroOut`` of the positive, often over a timestep range)."""
    out = []
    for context, options in conditioning:
        options = dict(options)
        for key in ("pooled_output", "conditioning_lyrics"):
            if options.get(key) is not None:
                options[key] = np.zeros_like(options[key])
        out.append([np.zeros_like(context), options])
    return (out,)


def conditioning_set_timestep_range(ctx, node_id, conditioning, start, end):
    return (set_values(conditioning, {"start_percent": start, "end_percent": end}),)


def conditioning_set_step_range(ctx, node_id, conditioning, start_step, end_step):
    if end_step <= start_step:
        raise ValueError(f"node {node_id} ConditioningSetStepRange: received start_step={start_step}, "
                         f"end_step={end_step}; expected start_step < end_step")
    return (set_values(conditioning, {"start_step": start_step, "end_step": end_step}),)


def prompt_schedule(clip, text_from: str, text_to: str, when: int) -> list:
    """A1111's ``[from:to:when]`` as CONDITIONING: ``text_from`` for steps < when, ``text_to`` after."""
    return (set_values(clip.encode(text_from), {"end_step": when})
            + set_values(clip.encode(text_to), {"start_step": when}))


CONDITIONING_NODE_SPECS = {
    spec.class_type: spec for spec in (
        NodeSpec("ConditioningCombine", {"conditioning_1": Input("CONDITIONING"),
                                         "conditioning_2": Input("CONDITIONING")},
                 ("CONDITIONING",), category="conditioning", run=conditioning_combine),
        NodeSpec("ConditioningZeroOut", {"conditioning": Input("CONDITIONING")}, ("CONDITIONING",),
                 category="advanced/conditioning", run=conditioning_zero_out),
        NodeSpec("ConditioningSetTimestepRange", {"conditioning": Input("CONDITIONING"),
                                                  "start": Input("FLOAT", 0.0, 0.0, 1.0, 0.001),
                                                  "end": Input("FLOAT", 1.0, 0.0, 1.0, 0.001)},
                 ("CONDITIONING",), category="advanced/conditioning", run=conditioning_set_timestep_range),
        NodeSpec("ConditioningSetStepRange", {"conditioning": Input("CONDITIONING"),
                                              "start_step": Input("INT", 0, 0, 10000),
                                              "end_step": Input("INT", 10000, 1, 10000)},
                 ("CONDITIONING",), category="advanced/conditioning",
                 description="ksampler-rt: use this conditioning for steps start_step <= i < end_step only",
                 python_module="custom_nodes.ksampler_rt", run=conditioning_set_step_range),
    )
}
