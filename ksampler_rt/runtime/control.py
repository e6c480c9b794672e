"""ControlNet residuals over any network callables, as ComfyUI 0.3.64 computes them.

Reference: ComfyUI 0.3.64 ``comfy/controlnet.py`` (``ControlBase.set_cond_hint`` / ``pre_run`` /
``control_merge``, ``ControlNet.get_control``, ``broadcast_image_to``), ``comfy/samplers.py``
(``pre_run_control``, ``apply_empty_x_to_equal_area``, ``can_concat_cond``, ``_calc_cond_batch``) and
``nodes.py`` (``ControlNetApply`` / ``ControlNetApplyAdvanced``).

* A :class:`ControlNet` is one application of a ControlNet network: the network, the hint image
  [B,C,H,W] float32 (channels first, in [0, 1]), ``strength``, the ``start_percent`` / ``end_percent``
  window and the ``previous`` application it chains onto (what ComfyUI's ``previous_controlnet`` is).
  Conditioning entries carry it under ``options["control"]``.
* At sampling time (:func:`prepare_controls`) the window becomes sigmas through the model's
  ``percent_to_sigma`` (ComfyUI's ``pre_run``) and the hint is resized to the latent's pixel size by the
  injected ``resize(hint, width, height)`` callable (ComfyUI: ``common_upscale(.., "nearest-exact",
  "center")``; the workflow passes its own ``latent_ops.common_upscale`` so the runtime imports no
  workflow code).
* Per UNet call (:class:`ControlCall`): the previous application's residuals first, then -- unless sigma
  lies outside this one's window, where the previous residuals pass through unchanged -- the network on
  the c_in-scaled latent, the UNet's timestep, the call's context and ``y``; every output is multiplied by
  ``strength`` (float32) and added to the previous residuals as ``previous + current``.
* Entries whose control objects differ are never batched into one UNet call (``can_concat_cond``
  compares control objects by identity), and ``ControlNetApply`` (``control_apply_to_uncond``) hands the
  positive's control to the negative entries that have none (:func:`controls_for_uncond`).

Network contract: ``network(x, timestep, context, hint, y=None) -> {"down": [arrays], "mid": array}``
with ``down`` in diffusers' ``down_block_res_samples`` order (ComfyUI's ``control["output"]``).
Optional attributes: ``family`` (UNet family it fits), ``kind`` ("controlnet"), ``global_average_pooling``
(ComfyUI's shuffle ControlNets: each output replaced by its spatial mean).

Device-resident outputs (issue #21): an engine may return residuals that stay in GPU memory (ONNX Runtime
CUDA's ``DeviceTensor``). The runtime treats such a value as opaque -- not an ``np.ndarray``, with ``shape``,
``dtype`` and ``device_resident = True`` -- and never imports the engine type. In the common case (one
ControlNet, strength 1, no pooling, inside its window) it goes to the UNet untouched, its shape checked from
its metadata and its finiteness left to the UNet's output check. Every other case (strength != 1, stacked
ControlNets, global average pooling) copies it to the host with ``np.asarray`` (the engine's explicit,
counted D2H) and does the arithmetic in numpy; there is no GPU math here.

T2I-Adapters (``kind == "t2i_adapter"``, comfy/controlnet.py ``T2IAdapter``): ``adapter(hint) -> [features]``
in down-block order (ComfyUI's ``control["input"]`` reversed, its ``None`` placeholders allowed). The hint is
resized to the latent's pixel size rounded *up* to a multiple of ``adapter.unshuffle_amount`` (default 8;
16 for SDXL adapters), averaged to one channel when ``adapter.channels_in == 1``; the features depend on
the hint only, so they are computed once per row count and reused at every step. The UNet gets them,
strength-scaled and summed over the chain, as ``control["adapter"]``.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .model import UNetOutputError

F32 = np.float32
COMPRESSION_RATIO = 8  # ControlBase.compression_ratio: hint pixels per latent pixel
KINDS = ("controlnet", "t2i_adapter")


class ControlOutputError(UNetOutputError):
    """The ControlNet network returned something the UNet cannot use."""


def _number(name: str, value, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(value)) or value < low or (high is not None and value > high):
        span = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}: received {value!r}, expected a finite number {span}")
    return float(value)


def _hint_array(hint) -> np.ndarray:
    arr = np.asarray(hint)
    if arr.ndim != 4 or 0 in arr.shape or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"hint: received an array of shape {arr.shape} ({arr.dtype}), expected a float "
                         "[B, C, H, W] image (channels first)")
    arr = arr.astype(F32)
    if not np.isfinite(arr).all():
        raise ValueError("hint: contains NaN or infinite values, expected finite pixel values")
    return arr


class ControlNet:
    """One ControlNet application (ComfyUI: ``control_net.copy().set_cond_hint(...)``)."""

    def __init__(self, network: Callable, hint, strength: float = 1.0, start_percent: float = 0.0,
                 end_percent: float = 1.0, previous: "ControlNet | None" = None,
                 resize: Callable[[np.ndarray, int, int], np.ndarray] | None = None):
        if not callable(network):
            raise TypeError(f"network: received {type(network).__name__}, expected a callable "
                            "network(x, timestep, context, hint, y=None)")
        if previous is not None and not isinstance(previous, ControlNet):
            raise TypeError(f"previous: received {type(previous).__name__}, expected a ControlNet or None")
        kind = getattr(network, "kind", "controlnet")
        if kind not in KINDS:
            raise ValueError(f"network.kind: received {kind!r}, expected one of {KINDS}")
        self.kind = kind
        self.network = network
        self.hint = _hint_array(hint)
        self.strength = _number("strength", strength, 0.0)
        self.start_percent = _number("start_percent", start_percent, 0.0, 1.0)
        self.end_percent = _number("end_percent", end_percent, 0.0, 1.0)
        self.previous = previous
        self.resize = resize
        self._resized: dict[tuple[int, int], np.ndarray] = {}

    @property
    def family(self) -> str | None:
        return getattr(self.network, "family", None)

    def chain(self) -> list["ControlNet"]:
        """This application and the ones it chains onto, the first applied first."""
        out, node = [], self
        while node is not None:
            out.append(node)
            node = node.previous
        return out[::-1]

    def hint_at(self, height: int, width: int) -> np.ndarray:
        """The hint at ``height`` x ``width`` pixels (cached per size, like ComfyUI's ``cond_hint``)."""
        key = (height, width)
        if key not in self._resized:
            if self.hint.shape[-2:] == key:
                resized = self.hint
            elif self.resize is None:
                raise ValueError(f"hint: received {self.hint.shape[-2]}x{self.hint.shape[-1]} pixels, expected "
                                 f"{height}x{width} (the latent's size x {COMPRESSION_RATIO}) or a resize callable")
            else:
                resized = np.asarray(self.resize(self.hint, width, height), dtype=F32)
                if resized.shape != self.hint.shape[:2] + key:
                    raise ValueError(f"resize: returned shape {resized.shape}, expected "
                                     f"{self.hint.shape[:2] + key}")
            self._resized[key] = resized
        return self._resized[key]

    def __repr__(self) -> str:
        return (f"ControlNet(network={self.network!r}, hint={self.hint.shape}, strength={self.strength}, "
                f"percent=({self.start_percent}, {self.end_percent}), previous={self.previous!r})")


def _family_group(name: str | None) -> str | None:
    # SD2 ControlNets fit both SD2 checkpoints (eps and v share the UNet)
    return "sd2" if name == "sd2-v" else name


def check_network_family(network_family: str | None, family) -> None:
    """Refuse a ControlNet made for another UNet family (``family``: the model's Family)."""
    if family.is_flow:
        raise ValueError(f"control_net: received a ControlNet for a model of family {family.name!r}, expected "
                         "a UNet family (sd15, sd2, sdxl); flow-family ControlNets are not supported")
    if network_family is not None and _family_group(network_family) != _family_group(family.name):
        raise ValueError(f"control_net: received a ControlNet for family {network_family!r}, expected one for "
                         f"the model's family {family.name!r}")


def check_family(control: ControlNet, family) -> None:
    """:func:`check_network_family` for every application of a chain."""
    for node in control.chain():
        check_network_family(node.family, family)


class PreparedControl:
    """One ControlNet application for one sampling run (ComfyUI's state after ``pre_run``)."""

    def __init__(self, control: ControlNet, model_sampling, latent_hw: tuple[int, int],
                 previous: "PreparedControl | None"):
        self.control = control
        self.previous = previous
        self.strength = F32(control.strength)
        # comfy/controlnet.py ControlBase.pre_run: timestep_range = (percent_to_sigma(start), (end))
        self.sigma_start = F32(model_sampling.percent_to_sigma(control.start_percent))
        self.sigma_end = F32(model_sampling.percent_to_sigma(control.end_percent))
        net = control.network
        height, width = latent_hw[0] * COMPRESSION_RATIO, latent_hw[1] * COMPRESSION_RATIO
        self.adapter = control.kind == "t2i_adapter"
        if self.adapter:  # T2IAdapter.scale_image_to: up to a multiple of the adapter's pixel unshuffle
            unshuffle = int(getattr(net, "unshuffle_amount", 8))
            height, width = (-(-height // unshuffle) * unshuffle, -(-width // unshuffle) * unshuffle)
        self.hint = control.hint_at(height, width)
        if self.adapter and getattr(net, "channels_in", 3) == 1 and self.hint.shape[1] > 1:
            self.hint = self.hint.mean(axis=1, keepdims=True, dtype=F32)
        self.pooling = bool(getattr(net, "global_average_pooling", False))
        self._features: dict[int, list] = {}  # rows -> adapter features (they depend on the hint only)

    def active(self, sigma: np.float32) -> bool:
        """ControlNet.get_control: skipped when t > timestep_range[0] or t < timestep_range[1]."""
        return not (sigma > self.sigma_start or sigma < self.sigma_end)

    def residuals(self, x_in, timestep, sigma, context, y, batched_number: int, last: bool = False) -> dict | None:
        """The chain's summed residuals for one UNet call; ``last``: this application is the chain's top."""
        previous = None
        if self.previous is not None:
            previous = self.previous.residuals(x_in, timestep, sigma, context, y, batched_number)
        if not self.active(F32(sigma)):
            return previous
        hint = broadcast_image_to(self.hint, x_in.shape[0], batched_number)
        if self.adapter:
            rows = x_in.shape[0]
            if rows not in self._features:
                self._features[rows] = _checked_adapter(self.control.network(hint), rows)
            return merge({"adapter": [self._one(a) for a in self._features[rows]]}, previous)
        kwargs = {} if y is None else {"y": y}
        out = _checked(self.control.network(x_in, timestep, context, hint, **kwargs), x_in.shape[0])
        if last and previous is None and self.strength == 1 and not self.pooling:
            # x * 1.0 == x: the outputs go to the UNet as they are (device-resident ones stay on the device).
            # Anywhere else they are copied (scaled, on the host),
            # so a network reusing its output buffers (an engine) cannot overwrite residuals still to be summed.
            return out
        return merge({"down": [self._one(a) for a in out["down"]], "mid": self._one(out["mid"])}, previous)

    def _one(self, a):
        """control_merge's per-output part: global average pooling, then ``x *= strength``; a device-resident
        output comes to the host first (``np.asarray``: its engine's D2H)."""
        if a is None:
            return None
        if device_resident(a):
            a = np.asarray(a, dtype=F32)
        if self.pooling:
            a = np.broadcast_to(a.mean(axis=(2, 3), keepdims=True, dtype=F32), a.shape)
        return a * self.strength


def device_resident(a) -> bool:
    """An engine output left in device memory (e.g. ``ksampler_rt.engines.device.DeviceTensor``), by duck
    type: not an ``np.ndarray``, ``device_resident`` is True, and it has ``shape`` and ``dtype``."""
    return (not isinstance(a, np.ndarray) and getattr(a, "device_resident", False) is True
            and hasattr(a, "shape") and hasattr(a, "dtype"))


def _checked_output(name: str, a, rows: int):
    """One ControlNet output as float32 numpy, checked; a device-resident one is checked from its metadata
    and kept on the device (no copy: its finiteness is left to the UNet's output check)."""
    if device_resident(a):
        shape = tuple(a.shape)
    else:
        a = np.asarray(a, dtype=F32)
        shape = a.shape
    if len(shape) != 4 or shape[0] != rows:
        raise ControlOutputError(f"the ControlNet returned {name} of shape {shape}, expected [{rows}, C, H, W]")
    if isinstance(a, np.ndarray) and not np.isfinite(a).all():
        raise ControlOutputError(f"the ControlNet returned non-finite values (NaN or inf) in {name}")
    return a


def _checked(out, rows: int) -> dict:
    if not isinstance(out, dict) or "down" not in out or "mid" not in out:
        raise ControlOutputError(f"the ControlNet returned {type(out).__name__}, expected a dict with 'down' "
                                 "(list of arrays) and 'mid' (array)")
    down = [_checked_output(f"down[{i}]", a, rows) for i, a in enumerate(out["down"])]
    return {"down": down, "mid": _checked_output("mid", out["mid"], rows)}


def _checked_adapter(out, rows: int) -> list:
    if not isinstance(out, (list, tuple)):
        raise ControlOutputError(f"the T2I-Adapter returned {type(out).__name__}, expected a list of feature arrays")
    features = [None if a is None else np.asarray(a, dtype=F32) for a in out]
    for i, a in enumerate(features):
        if a is None:
            continue
        # a one-image hint gives one row; ComfyUI's UNet broadcasts it over the batch, engines get every row
        if a.ndim != 4 or a.shape[0] not in (1, rows):
            raise ControlOutputError(f"the T2I-Adapter returned feature {i} of shape {a.shape}, expected "
                                     f"[{rows}, C, H, W] or [1, C, H, W]")
        if not np.isfinite(a).all():
            raise ControlOutputError(f"the T2I-Adapter returned non-finite values (NaN or inf) in feature {i}")
        features[i] = np.broadcast_to(a, (rows,) + a.shape[1:])
    return features


def _add(previous: np.ndarray, current: np.ndarray) -> np.ndarray:
    """``previous + current``, into ``current`` when it can (it is always a fresh scaled copy here)."""
    if previous.shape == current.shape and current.flags.writeable:
        return np.add(previous, current, out=current)
    return previous + current


def _merge_lists(current: list, previous: list) -> list:
    out = list(current)
    for i, p in enumerate(previous):
        if i >= len(out):
            out.append(p)
        elif p is not None:
            out[i] = p if out[i] is None else _add(p, out[i])
    return out


def merge(current: dict, previous: dict | None) -> dict:
    """control_merge's chaining: ``previous + current`` per output (``None`` outputs skipped), extra previous
    outputs appended, outputs of kinds only one side has kept. ``current``'s arrays are consumed: the sums
    may be written into them."""
    if previous is None:
        return current
    out = dict(previous)
    for key, value in current.items():
        if key not in previous:
            out[key] = value
        elif key == "mid":
            out[key] = _add(previous[key], value)
        else:
            out[key] = _merge_lists(value, previous[key])
    return out


def broadcast_image_to(hint: np.ndarray, rows: int, batched_number: int) -> np.ndarray:
    """comfy/controlnet.py broadcast_image_to: the hint's rows repeated per row group of the call."""
    if hint.shape[0] == 1:
        return hint
    per_batch = rows // batched_number
    hint = hint[:per_batch]
    if per_batch > hint.shape[0]:
        hint = np.concatenate([hint] * (per_batch // hint.shape[0]) + [hint[:per_batch % hint.shape[0]]])
    if hint.shape[0] == rows:
        return hint
    return np.concatenate([hint] * batched_number)


class ControlCall:
    """The control of one batched UNet call: ``self(x_in, timestep, sigma)`` -> residuals or None.

    ``Model.apply_model(..., control=ControlCall)`` calls it on the c_in-scaled batch and hands the result
    to the UNet as ``control={"down": [...], "mid": m}`` (nothing when every ControlNet is outside its window).
    """

    def __init__(self, prepared: PreparedControl, context: np.ndarray, y: np.ndarray | None, batched_number: int):
        self.prepared, self.context, self.y, self.batched_number = prepared, context, y, batched_number

    def __call__(self, x_in: np.ndarray, timestep: np.ndarray, sigma) -> dict | None:
        s = np.asarray(sigma, dtype=F32).reshape(-1)[0]
        return self.prepared.residuals(x_in, timestep, s, self.context, self.y, self.batched_number, last=True)


def prepare_controls(conditioning_lists: list[list], model_sampling, family, latent_hw: tuple[int, int]) -> dict:
    """id(ControlNet) -> PreparedControl for every control on the entries (shared chains prepared once)."""
    prepared: dict[int, PreparedControl] = {}

    def prepare(control: ControlNet) -> PreparedControl:
        if id(control) not in prepared:
            previous = None if control.previous is None else prepare(control.previous)
            prepared[id(control)] = PreparedControl(control, model_sampling, latent_hw, previous)
        return prepared[id(control)]

    for conditioning in conditioning_lists:
        for _, options in conditioning:
            control = options.get("control")
            if control is None:
                continue
            if not isinstance(control, ControlNet):
                raise ValueError(f"conditioning 'control': received {type(control).__name__}, expected a "
                                 "ksampler_rt.runtime.control.ControlNet (what ControlNetApply produces)")
            check_family(control, family)
            prepare(control)
    return prepared


def controls_for_uncond(positive: list, negative: list) -> list:
    """comfy/samplers.py apply_empty_x_to_equal_area for ``control`` (areas aside: none are supported).

    ControlNetApply marks its entries ``control_apply_to_uncond``; when no negative entry has a control,
    the i-th such positive control goes onto negative entry ``i % n`` of those without one (a copy of the
    original entry each time, so with more controls than entries the last one wins)."""
    cond_controls = [o["control"] for _, o in positive
                     if o.get("control_apply_to_uncond", False) == True  # noqa: E712 -- ComfyUI compares with ==
                     and o.get("control") is not None]
    if not cond_controls or any(o.get("control") is not None for _, o in negative):
        return negative
    others = [(i, entry) for i, entry in enumerate(negative) if entry[1].get("control") is None]
    if not others:
        return negative
    out = list(negative)
    for k, control in enumerate(cond_controls):
        i, (context, options) = others[k % len(others)]
        out[i] = [context, {**options, "control": control}]
    return out
