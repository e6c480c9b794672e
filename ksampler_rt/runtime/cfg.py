"""Classifier-free guidance on denoised predictions, one batched UNet call per evaluation.

Reproduces ComfyUI 0.3.64 ``comfy/samplers.py`` (``sampling_function``, ``_calc_cond_batch``,
``cfg_function``) for plain ``[cond, {}]`` conditioning lists:

* conditioning entries are queued cond-first, then batched in *reverse* queue order, so one
  call carries ``[uncond rows..., cond rows...]``; entries whose contexts cannot be
  concatenated (token lengths whose LCM is more than 4x the shorter) go in separate calls;
* contexts of different token lengths are repeated up to their LCM (this does not change
  attention's result);
* each conditioning's rows are repeated / truncated to the latent batch size;
* several entries of one list are summed in batch order and divided by their count;
* ``cfg == 1`` (``math.isclose``) drops the uncond rows, unless the sampler is a CFG++ one;
* the result is ``uncond + (cond - uncond) * cfg``, always in that form;
* entries carrying a ControlNet (``options["control"]``, runtime/control.py) are batched only with
  entries carrying the *same* control object (``can_concat_cond``), and each such call evaluates the
  control chain on the call's rows and hands the residuals to the UNet (``_calc_cond_batch``);
  ControlNetApply's ``control_apply_to_uncond`` copies the positive's control onto the negative
  (``apply_empty_x_to_equal_area``).

Everything that depends only on the conditioning is laid out once, at construction, so a
step costs one ``np.concatenate`` of the latent plus the UNet call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import cfg_jit
from .control import ControlCall, PreparedControl, controls_for_uncond, prepare_controls
from .model import Model, UNetOutputError

COND, UNCOND = 0, 1


def repeat_to_batch_size(array: np.ndarray, batch_size: int) -> np.ndarray:
    """ComfyUI's ``comfy.utils.repeat_to_batch_size`` on axis 0."""
    n = array.shape[0]
    if n > batch_size:
        return array[:batch_size]
    if n < batch_size:
        return np.concatenate([array] * math.ceil(batch_size / n))[:batch_size]
    return array


@dataclass
class _Entry:
    kind: int                 # COND or UNCOND
    context: np.ndarray       # [B, T, D]
    y: np.ndarray | None      # [B, adm] for SDXL, [B, pooled] for the flow families
    sigma_start: np.float32 | None = None  # active only while sigma <= sigma_start (start_percent)
    sigma_end: np.float32 | None = None    # ... and sigma >= sigma_end (end_percent)
    guidance: np.ndarray | None = None     # [B] float32, FLUX.1 dev's distilled guidance
    control: PreparedControl | None = None  # its ControlNet chain, prepared for this run

    def active(self, sigma: np.float32) -> bool:
        """comfy/samplers.py get_area_and_mult's timestep_start / timestep_end test."""
        if self.sigma_start is not None and sigma > self.sigma_start:
            return False
        return not (self.sigma_end is not None and sigma < self.sigma_end)


def _can_concat(a: _Entry, b: _Entry) -> bool:
    """CONDCrossAttn.can_concat (+ CONDRegular for y and guidance): same width, token LCM at most 4x."""
    ta, tb = a.context.shape[1], b.context.shape[1]
    if ta != tb and math.lcm(ta, tb) // min(ta, tb) > 4:
        return False
    for u, v in ((a.y, b.y), (a.guidance, b.guidance)):
        if (u is None) != (v is None) or (u is not None and u.shape != v.shape):
            return False
    return a.control is b.control  # can_concat_cond: the same control object, or none on both


@dataclass
class _Call:
    """One UNet call: which entry kinds its row groups belong to and their fixed inputs."""

    kinds: list[int]
    context: np.ndarray
    y: np.ndarray | None
    guidance: np.ndarray | None = None
    control: ControlCall | None = None

    def kwargs(self) -> dict:
        """The extra inputs of the network (ComfyUI's extra_conds) and of Model.apply_model (control)."""
        out = {}
        if self.y is not None:
            out["y"] = self.y
        if self.guidance is not None:
            out["guidance"] = self.guidance
        if self.control is not None:
            out["control"] = self.control
        return out


class CFGDenoiser:
    """D(x, sigma) with classifier-free guidance, as ComfyUI's CFGGuider presents it to samplers."""

    def __init__(self, model: Model, positive: list, negative: list, cfg: float, batch_size: int,
                 latent_hw: tuple[int, int], *, cfg_pp: bool = False, sigmas: np.ndarray | None = None):
        self.inner = model
        self.model_sampling = model.model_sampling
        self.cfg = float(cfg)
        self.batch_size = batch_size
        self.uses_uncond = cfg_pp or not math.isclose(self.cfg, 1.0)
        self.sigmas = sigmas  # the schedule, only to name the step in error messages
        negative = controls_for_uncond(positive, negative)
        self._controls = prepare_controls([positive, negative], self.model_sampling, model.family, latent_hw)
        self.entries = self._entries(positive, COND, latent_hw)
        if self.uses_uncond:
            self.entries += self._entries(negative, UNCOND, latent_hw)
        self.ranged = any(e.sigma_start is not None or e.sigma_end is not None for e in self.entries)
        self._plans: dict[tuple[int, ...], tuple[list[_Call], dict[int, int]]] = {}
        self._everything = self._plan_for(tuple(range(len(self.entries))))
        # The common case -- one call over [uncond, cond] of an eps model -- has a compiled head
        # (runtime/cfg_jit.py: both rows' denoised values and the guidance in one pass, same floats).
        # The flow families' CONST has the same denoised formula, x - out * sigma (ComfyUI
        # model_sampling.py), and no c_in: the head serves it too.
        calls, counts = self._everything
        # Only for Model itself: a subclass or wrapper that overrides apply_model keeps its override.
        self._fusable = (not self._controls and not self.ranged and len(calls) == 1
                         and sorted(calls[0].kinds) == [COND, UNCOND]
                         and self.model_sampling.prediction in ("eps", "const")
                         and getattr(type(model), "apply_model", None) is Model.apply_model)

    # -- layout, once per sampling run -----------------------------------------------------
    def _entries(self, conditioning: list, kind: int, latent_hw: tuple[int, int]) -> list[_Entry]:
        family = self.inner.family
        out = []
        ms = self.model_sampling
        for context, options in conditioning:
            context = repeat_to_batch_size(np.asarray(context, dtype=np.float32), self.batch_size)
            y = guidance = None
            if family.adm_channels:
                y = self._adm(options, latent_hw)
            elif family.is_flow:
                y = self._pooled(options)
                if family.guidance:  # model_base.Flux.extra_conds: kwargs.get("guidance", 3.5)
                    g = options.get("guidance", 3.5)
                    guidance = None if g is None else repeat_to_batch_size(self._guidance(g), self.batch_size)
            # ConditioningSetTimestepRange: percents become sigma bounds (calculate_start_end_timesteps)
            start = options.get("start_percent")
            end = options.get("end_percent")
            control = options.get("control")
            out.append(_Entry(kind, context, y,
                              None if start is None else np.float32(ms.percent_to_sigma(start)),
                              None if end is None else np.float32(ms.percent_to_sigma(end)), guidance,
                              None if control is None else self._controls[id(control)]))
        return out

    def _pooled(self, options: dict) -> np.ndarray:
        """A flow family's ``y``: the pooled text vector itself (model_base.SD3 / Flux.encode_adm)."""
        pooled = options.get("pooled_output")
        if pooled is None:
            raise ValueError(f"conditioning: family {self.inner.family.name!r} needs a 'pooled_output' in each "
                             "conditioning entry's options (its text encoders' pooled vector)")
        pooled = np.asarray(pooled, dtype=np.float32)
        if pooled.ndim != 2:
            raise ValueError(f"conditioning 'pooled_output': received shape {pooled.shape}, expected [N, P]")
        return repeat_to_batch_size(pooled, self.batch_size)

    @staticmethod
    def _guidance(value) -> np.ndarray:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not math.isfinite(float(value)):
            raise ValueError(f"conditioning 'guidance': received {value!r}, expected a finite number "
                             "(FluxGuidance's value)")
        return np.asarray([value], dtype=np.float32)

    def _adm(self, options: dict, latent_hw: tuple[int, int]) -> np.ndarray:
        """SDXL's ``y``: ComfyUI's encode_adm with width/height defaulting to the latent size x 8
        (comfy/samplers.py encode_model_conds)."""
        from .conditioning import sdxl_adm

        pooled = options.get("pooled_output")
        if pooled is None:
            raise ValueError(f"conditioning: family {self.inner.family.name!r} needs a 'pooled_output' in each "
                             "conditioning entry's options (what CLIPTextEncode of an SDXL checkpoint produces)")
        height = options.get("height", latent_hw[0] * 8)
        width = options.get("width", latent_hw[1] * 8)
        y = sdxl_adm(np.asarray(pooled, dtype=np.float32), width=width, height=height,
                     crop_w=options.get("crop_w", 0), crop_h=options.get("crop_h", 0),
                     target_width=options.get("target_width", width),
                     target_height=options.get("target_height", height))
        return repeat_to_batch_size(y, self.batch_size)

    def _plan_for(self, active: tuple[int, ...]) -> tuple[list[_Call], dict[int, int]]:
        """The batched calls for a set of active entries (cached: it only changes at range edges)."""
        if active not in self._plans:
            calls = self._plan([self.entries[i] for i in active])
            counts = {kind: sum(c.kinds.count(kind) for c in calls) for kind in (COND, UNCOND)}
            self._plans[active] = (calls, counts)
        return self._plans[active]

    @staticmethod
    def _plan(entries: list[_Entry]) -> list[_Call]:
        queue, calls = list(entries), []
        while queue:
            first = queue[0]
            picked = [i for i in range(len(queue)) if _can_concat(queue[i], first)]
            picked.reverse()  # ComfyUI batches the concatenable entries in reverse queue order
            group = [queue[i] for i in picked]
            for i in picked:  # descending indices: popping keeps the rest valid
                queue.pop(i)
            tokens = math.lcm(*(e.context.shape[1] for e in group))
            context = np.concatenate([np.tile(e.context, (1, tokens // e.context.shape[1], 1)) for e in group])
            y = None if group[0].y is None else np.concatenate([e.y for e in group])
            guidance = None if group[0].guidance is None else np.concatenate([e.guidance for e in group])
            context = np.ascontiguousarray(context)
            control = None if group[0].control is None else ControlCall(group[0].control, context, y, len(group))
            calls.append(_Call([e.kind for e in group], context, y, guidance, control))
        return calls

    # -- evaluation, every step ---------------------------------------------------------------
    def _predictions(self, x: np.ndarray, sigma) -> dict[int, np.ndarray]:
        sums: dict[int, np.ndarray] = {}
        b = self.batch_size
        calls, counts = self._everything
        if self.ranged:
            s = np.float32(sigma)
            calls, counts = self._plan_for(tuple(i for i, e in enumerate(self.entries) if e.active(s)))
        for call in calls:
            rows = len(call.kinds)
            x_in = x if rows == 1 else np.concatenate([x] * rows)
            sigmas = np.full(x_in.shape[0], sigma, dtype=np.float32)
            try:
                out = self.inner.apply_model(x_in, sigmas, call.context, **call.kwargs())
            except UNetOutputError as exc:
                raise UNetOutputError(f"{self._where(sigma)}: {exc}") from exc
            for j, kind in enumerate(call.kinds):
                chunk = out[j * b:(j + 1) * b]
                # ``out`` is a fresh array (calculate_denoised's result): a view is safe to hand on
                sums[kind] = chunk if kind not in sums else sums[kind] + chunk
        for kind, total in sums.items():
            if counts[kind] > 1:
                sums[kind] = total / np.float32(counts[kind])
        return sums

    def _where(self, sigma) -> str:
        if self.sigmas is None or len(self.sigmas) < 2:
            return f"sigma={float(sigma):.6g}"
        step = max(int(np.count_nonzero(self.sigmas >= np.float32(sigma))) - 1, 0)
        return f"step {step + 1} of {len(self.sigmas) - 1} (sigma={float(sigma):.6g})"

    def with_uncond(self, x: np.ndarray, sigma) -> tuple[np.ndarray, np.ndarray]:
        """(CFG result, uncond denoised); uncond is zeros when cfg == 1 skipped it (as ComfyUI)."""
        if self._fusable and cfg_jit.available():
            return self._with_uncond_compiled(x, sigma)
        preds = self._predictions(x, sigma)
        # a list with no entry active at this sigma contributes zeros, as in ComfyUI
        cond = preds[COND] if COND in preds else np.zeros_like(x)
        uncond = preds[UNCOND] if UNCOND in preds else np.zeros_like(cond)
        guided = cond - uncond  # in place from here: the same floats as uncond + (cond - uncond) * cfg
        guided *= np.float32(self.cfg)
        guided += uncond
        return guided, uncond

    def _with_uncond_compiled(self, x: np.ndarray, sigma, keep_uncond: bool = True) -> tuple:
        """with_uncond for the one-call [uncond, cond] eps case, same values as the numpy path (the
        uncond part None with ``keep_uncond=False``: nothing reads it then)."""
        call = self._everything[0][0]
        s = np.float32(sigma)
        x = np.ascontiguousarray(x, dtype=np.float32)
        b = x.shape[0]
        x_in = np.empty((2 * b,) + x.shape[1:], np.float32)
        self.model_sampling.calculate_input(s, x, out=x_in[:b])  # both row groups see the same c_in * x
        x_in[b:] = x_in[:b]
        kwargs = call.kwargs()
        try:
            out = self.inner.unet_output(x_in, np.full(x_in.shape[0], s, dtype=np.float32), call.context,
                                         check_finite=False, **kwargs)
            return cfg_jit.cfg_eps(x, np.ascontiguousarray(out), s, self.cfg, uncond_first=call.kinds[0] == UNCOND,
                                   keep_uncond=keep_uncond)
        except cfg_jit.NonFiniteOutput as exc:
            raise UNetOutputError(f"{self._where(sigma)}: the UNet returned {exc.count} non-finite values "
                                  "(NaN or inf)") from None
        except UNetOutputError as exc:
            raise UNetOutputError(f"{self._where(sigma)}: {exc}") from exc

    def __call__(self, x: np.ndarray, sigma) -> np.ndarray:
        if self._fusable and cfg_jit.available():
            return self._with_uncond_compiled(x, sigma, keep_uncond=False)[0]
        return self.with_uncond(x, sigma)[0]
