"""Input specs of the supported ComfyUI nodes, in ComfyUI's own terms.

Each node declares its inputs in ComfyUI's ``INPUT_TYPES`` order (that order maps a UI-format
``widgets_values`` list onto names), its output types, and whether it is an output node.
Ranges and defaults are ComfyUI 0.3.64's (nodes.py); ``object_info`` describes a node as ComfyUI's
``server.py`` ``node_info`` does (display name, category, ``python_module``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

SEED_MAX = 0xFFFFFFFFFFFFFFFF
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


@dataclass(frozen=True)
class Input:
    """One input: a linked type (MODEL, LATENT, ...) or a widget (INT, FLOAT, STRING, COMBO)."""

    type: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    round: float | None = None
    options: Sequence[str] | Callable[[], Sequence[str]] | None = None  # COMBO values
    optional: bool = False
    multiline: bool = False
    control_after_generate: bool = False  # the UI puts a "fixed/randomize/..." string after it

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES

    def combo_values(self) -> list[str]:
        values = self.options() if callable(self.options) else self.options
        return list(values or ())

    def coerce(self, value):
        """The value ComfyUI's validation would accept, or a ValueError saying why not."""
        if self.type == "INT":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"received {value!r} ({type(value).__name__}), expected an integer")
            value = int(value)
        elif self.type == "FLOAT":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ValueError(f"received {value!r} ({type(value).__name__}), expected a number")
            value = float(value)
        elif self.type == "STRING":
            if not isinstance(value, str):
                raise ValueError(f"received {value!r} ({type(value).__name__}), expected a string")
        elif self.type == "BOOLEAN":
            if not isinstance(value, bool):
                raise ValueError(f"received {value!r}, expected true or false")
        elif self.type == "COMBO":
            values = self.combo_values()
            if value not in values:
                shown = ", ".join(map(repr, values[:50])) or "(none available)"
                raise ValueError(f"received {value!r}, expected one of: {shown}")
            return value
        if self.min is not None and value < self.min:
            raise ValueError(f"received {value}, expected at least {self.min}")
        if self.max is not None and value > self.max:
            raise ValueError(f"received {value}, expected at most {self.max}")
        return value

    def object_info(self) -> list:
        """This input as ComfyUI's /object_info describes it."""
        if self.type == "COMBO":
            return [self.combo_values(), {}] if self.default is None else [self.combo_values(), {"default": self.default}]
        if not self.is_widget:
            return [self.type]
        opts = {k: getattr(self, k) for k in ("default", "min", "max", "step", "round") if getattr(self, k) is not None}
        if self.multiline:
            opts["multiline"] = True
        if self.control_after_generate:
            opts["control_after_generate"] = True
        return [self.type, opts]


@dataclass(frozen=True)
class NodeSpec:
    class_type: str
    inputs: dict[str, Input]
    outputs: tuple[str, ...]
    output_names: tuple[str, ...] = ()
    output_node: bool = False
    category: str = ""
    description: str = ""
    run: Callable[..., tuple] | None = field(default=None, compare=False)
    display_name: str = ""               # ComfyUI's NODE_DISPLAY_NAME_MAPPINGS entry ("" = the class name)
    python_module: str = "nodes"         # where ComfyUI defines it: "nodes", "comfy_extras....", "custom_nodes...."
    # Why this product cannot run the node (None: it can). Such nodes are listed -- the frontend looks the
    # standard loaders up by name -- and every prompt using one fails validation with this reason.
    unsupported: str | None = None
    deprecated: bool = False

    def widget_names(self) -> list[str]:
        return [name for name, spec in self.inputs.items() if spec.is_widget]

    def object_info(self) -> dict:
        required = {n: s.object_info() for n, s in self.inputs.items() if not s.optional}
        optional = {n: s.object_info() for n, s in self.inputs.items() if s.optional}
        info = {
            "input": {"required": required, **({"optional": optional} if optional else {})},
            "input_order": {"required": list(required), **({"optional": list(optional)} if optional else {})},
            "output": list(self.outputs),
            "output_is_list": [False] * len(self.outputs),
            "output_name": list(self.output_names or self.outputs),
            "name": self.class_type,
            "display_name": self.display_name or self.class_type,
            "description": self.description,
            "python_module": self.python_module,
            "category": self.category,
            "output_node": self.output_node,
        }
        if self.deprecated:
            info["deprecated"] = True
        return info
