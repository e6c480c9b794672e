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
        is_text = str(source).lstrip().startswith("{")
        if is_text:
            text = str(source)
        else:
            path = Path(source)
            if path.is_dir():
                raise WorkflowError(f"workflow: received {str(source)!r}, a folder; expected a workflow JSON file",
                                    error_type="invalid_prompt")
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise WorkflowError(f"workflow: received {str(source)!r}, expected an existing JSON file (it does "
                                    "not exist)", error_type="invalid_prompt") from None
            except (OSError, UnicodeDecodeError) as exc:
                raise WorkflowError(f"workflow: received {str(source)!r}, expected a readable UTF-8 JSON file "
                                    f"({type(exc).__name__})", error_type="invalid_prompt") from None
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise WorkflowError(f"workflow: {source if not is_text else 'the text'} is not valid JSON ({exc})",
                                error_type="invalid_prompt") from None
    if not isinstance(data, Mapping):
        raise WorkflowError(f"workflow: received a JSON {type(data).__name__}, expected an object", error_type="invalid_prompt")
    if "nodes" in data and "links" in data:
        return ui_to_api(data, specs)
    if "prompt" in data and isinstance(data["prompt"], Mapping):
        data = data["prompt"]
    return {str(k): v for k, v in data.items()}


def _ui_error(message: str) -> WorkflowError:
    return WorkflowError(f"workflow (UI format): {message}", error_type="invalid_prompt")


def _ui_links(workflow: Mapping) -> dict:
    """link id -> [source node id, output slot] of the UI format's ``links`` list."""
    raw = workflow.get("links") or []
    if not isinstance(raw, list):
        raise _ui_error(f"links: received a JSON {type(raw).__name__}, expected a list of "
                        "[id, from_node, from_slot, to_node, to_slot, type]")
    links = {}
    for i, link in enumerate(raw):
        if isinstance(link, Mapping):  # the newer object form {id, origin_id, origin_slot, ...}
            link = [link.get("id"), link.get("origin_id"), link.get("origin_slot")]
        if (not isinstance(link, list) or len(link) < 3 or not isinstance(link[1], (int, str))
                or isinstance(link[2], bool) or not isinstance(link[2], int) or not isinstance(link[0], (int, str))):
            shown = repr(link) if len(repr(link)) <= 80 else repr(link)[:80] + "..."
            raise _ui_error(f"links[{i}]: received {shown}, expected [id, from_node, from_slot, to_node, to_slot, type]")
        links[link[0]] = [str(link[1]), int(link[2])]
    return links


def ui_to_api(workflow: Mapping, specs: Mapping[str, NodeSpec]) -> dict:
    """Convert the frontend's format: links become [src, slot], widgets_values become named inputs."""
    nodes = workflow.get("nodes")
    if not isinstance(nodes, list):
        raise _ui_error(f"nodes: received a JSON {type(nodes).__name__}, expected a list of node objects")
    for i, node in enumerate(nodes):
        if not isinstance(node, Mapping):
            raise _ui_error(f"nodes[{i}]: received a JSON {type(node).__name__}, expected a node object")
        if not isinstance(node.get("id"), (int, str)) or isinstance(node.get("id"), bool):
            raise _ui_error(f"nodes[{i}] ({node.get('type', '?')}): id: received {node.get('id')!r}, expected a "
                            "node id (an integer)")
    links = _ui_links(workflow)
    # A PrimitiveNode only feeds its value into the widget it is linked to; the frontend keeps that
    # value in the target's widgets_values, so its links are dropped and the widget value is used.
    primitives = {str(n["id"]) for n in nodes if n.get("type") == "PrimitiveNode"}
    prompt = {}
    for node in nodes:
        node_id, class_type = str(node["id"]), node.get("type")
        if node.get("mode", 0) in (2, 4):  # muted / bypassed nodes do not run
            if node.get("mode") == 4:
                raise WorkflowError(f"node {node_id} ({class_type}): mode: received 4 (bypassed), expected 0 (or 2, "
                                    "muted); bypassed nodes are not supported", error_type="invalid_prompt")
            continue
        if class_type in ("Note", "MarkdownNote", "Reroute", "PrimitiveNode"):
            if class_type == "Reroute":
                raise WorkflowError(f"node {node_id}: Reroute nodes are not supported; export the workflow in API format")
            continue
        spec = specs.get(class_type) if isinstance(class_type, str) else None
        if spec is None:
            prompt[node_id] = {"class_type": class_type, "inputs": {}}
            continue
        inputs: dict[str, Any] = {}
        linked = set()
        node_inputs = node.get("inputs") or []
        if not isinstance(node_inputs, list):
            raise _ui_error(f"node {node_id} ({class_type}) inputs: received a JSON {type(node_inputs).__name__}, "
                            "expected a list of {name, type, link}")
        for j, item in enumerate(node_inputs):
            if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
                raise _ui_error(f"node {node_id} ({class_type}) inputs[{j}]: received {item!r}, expected an object "
                                "with a 'name' string and a 'link'")
            link = item.get("link")
            if link is not None:
                if not isinstance(link, (int, str)) or isinstance(link, bool) or link not in links:
                    raise WorkflowError(f"node {node_id} ({class_type}) input {item['name']!r}: link: received "
                                        f"{link!r}, expected the id of one of the workflow's links",
                                        error_type="invalid_prompt")
                if links[link][0] in primitives:
                    continue
                inputs[item["name"]] = links[link]
                linked.add(item["name"])
        values = node.get("widgets_values") or []
        if isinstance(values, Mapping):  # the frontend's object form for some nodes: {name: value}
            values = [values[name] for name in spec.widget_names() if name in values]
        if not isinstance(values, list):
            raise _ui_error(f"node {node_id} ({class_type}) widgets_values: received a JSON {type(values).__name__}, "
                            "expected a list")
        values = list(values)
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


def _topological_order(prompt: Mapping, specs: Mapping[str, NodeSpec], outputs: list[str]) -> list[str]:
    """The output nodes and their ancestors, each after its inputs (depth-first from each output, as ComfyUI);
    iterative, so a chain of thousands of nodes needs no recursion. Raises WorkflowError on a cycle."""
    done: set[str] = set()
    order: list[str] = []
    for out in outputs:
        if out in done:
            continue
        on_path = {out}
        stack = [(out, iter(_link_sources(prompt, specs, out)))]
        while stack:
            node_id, sources = stack[-1]
            for src in sources:
                if src in done:
                    continue
                if src in on_path:
                    raise WorkflowError(f"node {src}: the workflow has a cycle through it", error_type="invalid_prompt")
                on_path.add(src)
                stack.append((src, iter(_link_sources(prompt, specs, src))))
                break
            else:
                stack.pop()
                on_path.discard(node_id)
                done.add(node_id)
                order.append(node_id)
    return order


def _link_sources(prompt: Mapping, specs: Mapping[str, NodeSpec], node_id: str) -> list[str]:
    node = prompt[node_id]
    spec = specs[node["class_type"]]
    inputs = node.get("inputs")
    if not isinstance(inputs, Mapping):
        return []
    return [str(value[0]) for name, value in inputs.items()
            if is_link(value) and name in spec.inputs and str(value[0]) in prompt]


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
    if not prompt:  # ComfyUI 0.3.64 answers an empty graph with prompt_no_outputs
        raise WorkflowError("workflow: it has no nodes, expected at least one output node (e.g. SaveImage)",
                            error_type="prompt_no_outputs")
    for node_id, node in prompt.items():
        if not isinstance(node, Mapping) or not isinstance(node.get("class_type"), str):
            shown = repr(node) if len(repr(node)) <= 200 else repr(node)[:200] + "..."
            raise WorkflowError(f"node {node_id}: received {shown}, expected an object with a 'class_type' string "
                                "and 'inputs'", error_type="invalid_prompt")
        if node["class_type"] not in specs:
            raise WorkflowError(
                f"node {node_id}: class_type: received {node['class_type']!r}, expected one of: "
                f"{', '.join(sorted(specs))}",
                {node_id: {"errors": [{"type": "invalid_prompt", "message": f"Cannot execute because node "
                           f"{node['class_type']} does not exist.", "details": f"Node ID '#{node_id}'",
                           "extra_info": {}}], "dependent_outputs": [], "class_type": node["class_type"]}},
                error_type="invalid_prompt")
    outputs = [nid for nid, node in prompt.items() if specs[node["class_type"]].output_node]
    if not outputs:
        raise WorkflowError("workflow: it has no output node (e.g. SaveImage, PreviewImage)",
                            error_type="prompt_no_outputs")

    order = _topological_order(prompt, specs, outputs)

    coerced: dict[str, dict] = {}
    for node_id in order:
        node = prompt[node_id]
        class_type = node["class_type"]
        spec = specs[class_type]
        if spec.unsupported:
            _node_error(errors, node_id, class_type, "node_not_supported",
                        f"{spec.display_name or class_type} cannot run here: {spec.unsupported}")
            continue
        given = node.get("inputs") or {}
        if not isinstance(given, Mapping):
            _node_error(errors, node_id, class_type, "invalid_input",
                        f"inputs: received a JSON {type(given).__name__}, expected an object {{name: value}}")
            continue
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
