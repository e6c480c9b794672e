"""Workflow files: API and UI formats, validation before anything runs, topological execution.

API format (ComfyUI's ``/prompt`` body): ``{node_id: {"class_type", "inputs": {name: value |
[src_id, output_index]}}}``, optionally wrapped as ``{"prompt": {...}, ...}``.
UI format (the frontend's saved workflow): ``{"nodes": [...], "links": [...]}``, widget values in
``widgets_values`` in the node's input order, with the ``control_after_generate`` mode string
after each seed.

Validation follows ComfyUI's rules (execution.py ``validate_prompt``/``validate_inputs``): only
output nodes and their ancestors run; every link must name an existing node and output index of
the right type; widget values must have the right type and lie in range. Every problem is
reported with the node id, its class and the input name, in ComfyUI's ``node_errors`` shape.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .spec import NodeSpec


class WorkflowError(ValueError):
    """A workflow that cannot run; ``node_errors`` has ComfyUI's /prompt 400 shape."""

    def __init__(self, message: str, node_errors: dict | None = None, error_type: str = "prompt_outputs_failed_validation"):
        super().__init__(message)
        self.node_errors = node_errors or {}
        self.error_type = error_type

    def comfy_error(self) -> dict:
        # ComfyUI's client-facing messages for its error types (execution.py); ours go in details
        messages = {"prompt_outputs_failed_validation": "Prompt outputs failed validation",
                    "prompt_no_outputs": "Prompt has no outputs"}
        message = messages.get(self.error_type, str(self).splitlines()[0])
        return {"error": {"type": self.error_type, "message": message, "details": str(self), "extra_info": {}},
                "node_errors": self.node_errors}


def is_link(value) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def load_workflow(source: str | Path | Mapping, specs: Mapping[str, NodeSpec]) -> dict:
    """A workflow (path, JSON text or dict; API or UI format) as an API-format prompt dict."""
    if isinstance(source, Mapping):
        data = source
    else:
        text = Path(source).read_text(encoding="utf-8") if not str(source).lstrip().startswith("{") else str(source)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WorkflowError(f"workflow: {source} is not valid JSON ({exc})", error_type="invalid_prompt") from None
    if not isinstance(data, Mapping):
        raise WorkflowError(f"workflow: received a JSON {type(data).__name__}, expected an object", error_type="invalid_prompt")
    if "nodes" in data and "links" in data:
        return ui_to_api(data, specs)
    if "prompt" in data and isinstance(data["prompt"], Mapping):
        data = data["prompt"]
    return {str(k): v for k, v in data.items()}


def ui_to_api(workflow: Mapping, specs: Mapping[str, NodeSpec]) -> dict:
    """Convert the frontend's format: links become [src, slot], widgets_values become named inputs."""
    links = {}
    for link in workflow.get("links") or []:
        link_id, src, src_slot = link[0], link[1], link[2]
        links[link_id] = [str(src), int(src_slot)]
    # A PrimitiveNode only feeds its value into the widget it is linked to; the frontend keeps that
    # value in the target's widgets_values, so its links are dropped and the widget value is used.
    primitives = {str(n["id"]) for n in workflow["nodes"] if n.get("type") == "PrimitiveNode"}
    prompt = {}
    for node in workflow["nodes"]:
        node_id, class_type = str(node["id"]), node.get("type")
        if node.get("mode", 0) in (2, 4):  # muted / bypassed nodes do not run
            if node.get("mode") == 4:
                raise WorkflowError(f"node {node_id} ({class_type}): bypassed nodes are not supported; "
                                    "received mode 4, expected 0 (or 2, muted)", error_type="invalid_prompt")
            continue
        if class_type in ("Note", "MarkdownNote", "Reroute", "PrimitiveNode"):
            if class_type == "Reroute":
                raise WorkflowError(f"node {node_id}: Reroute nodes are not supported; export the workflow in API format")
            continue
        spec = specs.get(class_type)
        if spec is None:
            prompt[node_id] = {"class_type": class_type, "inputs": {}}
            continue
        inputs: dict[str, Any] = {}
        linked = set()
        for item in node.get("inputs") or []:
            if item.get("link") is not None:
                if item["link"] not in links:
                    raise WorkflowError(f"node {node_id} ({class_type}) input {item['name']!r}: link "
                                        f"{item['link']} is not in the workflow's links")
                if links[item["link"]][0] in primitives:
                    continue
                inputs[item["name"]] = links[item["link"]]
                linked.add(item["name"])
        values = list(node.get("widgets_values") or [])
        for name in spec.widget_names():
            if not values:
                break
            value = values.pop(0)
            if spec.inputs[name].control_after_generate and values and values[0] in (
                    "fixed", "increment", "decrement", "randomize"):
                values.pop(0)
            if name not in linked:
                inputs[name] = value
        prompt[node_id] = {"class_type": class_type, "inputs": inputs}
    return prompt


@dataclass
class Plan:
    """A validated prompt: the nodes to run, in order, with coerced widget values."""

    prompt: dict
    order: list[str]
    outputs: list[str]
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)


def _node_error(errors: dict, node_id: str, class_type: str, kind: str, message: str, name: str | None = None,
                received=None):
    entry = errors.setdefault(node_id, {"errors": [], "dependent_outputs": [], "class_type": class_type})
    details = f"{name}: {message}" if name else message
    extra = {"input_name": name} if name else {}
    if received is not None:
        extra["received_value"] = received
    entry["errors"].append({"type": kind, "message": message, "details": details, "extra_info": extra})


def validate(prompt: Mapping, specs: Mapping[str, NodeSpec],
             check: Callable[[str, str, NodeSpec, dict], list[tuple[str, str]]] | None = None) -> Plan:
    """Check the whole prompt before anything runs; raise WorkflowError listing every problem."""
    errors: dict = {}
    if not prompt:
        raise WorkflowError("workflow: it has no nodes", error_type="invalid_prompt")
    for node_id, node in prompt.items():
        if not isinstance(node, Mapping) or "class_type" not in node:
            raise WorkflowError(f"node {node_id}: received {node!r}, expected an object with 'class_type' and 'inputs'",
                                error_type="invalid_prompt")
        if node["class_type"] not in specs:
            raise WorkflowError(
                f"node {node_id}: unknown node type {node['class_type']!r}; supported types: {', '.join(sorted(specs))}",
                {node_id: {"errors": [{"type": "invalid_prompt", "message": f"Cannot execute because node "
                           f"{node['class_type']} does not exist.", "details": f"Node ID '#{node_id}'",
                           "extra_info": {}}], "dependent_outputs": [], "class_type": node["class_type"]}},
                error_type="invalid_prompt")
    outputs = [nid for nid, node in prompt.items() if specs[node["class_type"]].output_node]
    if not outputs:
        raise WorkflowError("workflow: it has no output node (e.g. SaveImage, PreviewImage)",
                            error_type="prompt_no_outputs")

    needed, order, visiting = set(), [], set()

    def visit(node_id: str):
        if node_id in needed:
            return
        if node_id in visiting:
            raise WorkflowError(f"node {node_id}: the workflow has a cycle through it", error_type="invalid_prompt")
        visiting.add(node_id)
        node = prompt[node_id]
        spec = specs[node["class_type"]]
        for name, value in (node.get("inputs") or {}).items():
            if is_link(value) and name in spec.inputs:
                src = str(value[0])
                if src in prompt:
                    visit(src)  # raises on a cycle (src still being visited)
        visiting.discard(node_id)
        needed.add(node_id)
        order.append(node_id)

    for out in outputs:
        visit(out)

    coerced: dict[str, dict] = {}
    for node_id in order:
        node = prompt[node_id]
        class_type = node["class_type"]
        spec = specs[class_type]
        given = node.get("inputs") or {}
        values: dict[str, Any] = {}
        for name, inp in spec.inputs.items():
            if name not in given:
                if inp.optional:
                    continue
                _node_error(errors, node_id, class_type, "required_input_missing", "Required input is missing", name)
                continue
            value = given[name]
            if is_link(value):
                src, slot = str(value[0]), value[1]
                if src not in prompt:
                    _node_error(errors, node_id, class_type, "bad_linked_input",
                                f"linked to node {src}, which is not in the workflow", name, value)
                    continue
                src_spec = specs[prompt[src]["class_type"]]
                if not 0 <= slot < len(src_spec.outputs):
                    _node_error(errors, node_id, class_type, "bad_linked_input",
                                f"linked to output {slot} of node {src} ({src_spec.class_type}), which has outputs "
                                f"0..{len(src_spec.outputs) - 1} {list(src_spec.outputs)}", name, value)
                    continue
                got = src_spec.outputs[slot]
                want = "COMBO" if inp.type == "COMBO" else inp.type
                if got != want and not (inp.is_widget and got in ("INT", "FLOAT", "STRING")):
                    _node_error(errors, node_id, class_type, "return_type_mismatch",
                                f"received {got} from node {src} output {slot}, expected {want}", name, value)
                    continue
                values[name] = value
            elif not inp.is_widget:
                _node_error(errors, node_id, class_type, "bad_linked_input",
                            f"received {value!r}, expected a link [node_id, output_index] to a {inp.type}", name, value)
            else:
                try:
                    values[name] = inp.coerce(value)
                except ValueError as exc:
                    _node_error(errors, node_id, class_type, "value_not_valid", str(exc), name, value)
        if check is not None and node_id not in errors:
            for name, message in check(node_id, class_type, spec, values):
                _node_error(errors, node_id, class_type, "value_not_valid", message, name)
        coerced[node_id] = values
    if errors:
        lines = [f"node {nid} ({e['class_type']}) input {err['extra_info'].get('input_name', '-')!s}: {err['message']}"
                 for nid, e in errors.items() for err in e["errors"]]
        for e in errors.values():
            e["dependent_outputs"] = outputs
        raise WorkflowError("workflow failed validation:\n  " + "\n  ".join(lines), errors)
    return Plan(dict(prompt), order, outputs, coerced)
