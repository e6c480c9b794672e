"""ONNX Runtime backends: CPU here; CUDA (IO binding + CUDA graphs) and the TensorRT execution provider in
``ort_cuda`` (``OrtCudaEngine``, importable from this module too).

``onnxruntime`` (CPU build) is a core dependency; the CUDA / TensorRT providers need the
``onnxruntime-gpu`` wheel *instead of* it (``pip uninstall -y onnxruntime && pip install
onnxruntime-gpu==1.31.1``). A session is created with exactly the providers asked for and
``session.get_providers()`` is checked afterwards: a GPU request never silently runs on the CPU.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .base import Engine, check_io_matches
from .spec import EngineError, TensorSpec

CPU_EP, CUDA_EP, TRT_EP = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
GPU_SWAP = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu==1.31.1"


def _ort():
    import onnxruntime

    return onnxruntime


def default_cpu_threads() -> int:
    """Intra-op threads for CPU sessions: ``$KSAMPLER_RT_ORT_THREADS``, else the usable cores.

    Only one model runs at a time in a sampling loop (CLIP, then the UNet, then the VAE), so each
    session may use every core, as long as idle sessions do not spin (see ``cpu_session_options``).
    """
    env = os.environ.get("KSAMPLER_RT_ORT_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def cpu_session_options(threads: int | None = None, spinning: bool = False, level: str = "all",
                        optimized_model_path: str | None = None, external_data_min_bytes: int | None = None):
    """SessionOptions for the CPU backend.

    ``spinning=False`` sets ``session.intra_op.allow_spinning=0``: worker threads sleep instead of
    busy-waiting after each op, so the three sessions of a pipeline (and other processes) do not steal
    cores from whichever one is running. Measured (``python -m ksampler_rt.bench.engines``): on a
    shared machine spinning buys nothing measurable per UNet call and costs idle CPU, hence the default.
    """
    ort = _ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[level]
    so.intra_op_num_threads = int(threads or default_cpu_threads())
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3
    if optimized_model_path:
        so.optimized_model_filepath = str(optimized_model_path)
        if external_data_min_bytes is not None:  # models > 2 GiB cannot be one protobuf
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                        Path(optimized_model_path).name + ".data")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                        str(int(external_data_min_bytes)))
    return so


def check_providers(session, requested: Sequence[str], model: str) -> None:
    """Refuse a session that dropped a GPU provider that was asked for."""
    got = list(session.get_providers())
    for p in requested:
        if p != CPU_EP and p not in got:
            raise EngineError(
                f"{model}: asked ONNX Runtime for {p} but the session runs on {got}; refusing to fall back "
                f"to the CPU silently. Install the GPU build ({GPU_SWAP}) with a matching CUDA/cuDNN, or "
                f"choose --backend onnxruntime-cpu")


def session_specs(session) -> tuple[list[TensorSpec], list[TensorSpec]]:
    def conv(args):
        return [TensorSpec(a.name, a.type, tuple(d if isinstance(d, int) else d for d in a.shape)) for a in args]

    return conv(session.get_inputs()), conv(session.get_outputs())


def export_onnx_path(export_dir, model: str) -> Path:
    """The export's own (unoptimized) ONNX file of ``model``: the one whose initializer names are those of
    ``manifest["initializer_map"]``."""
    import json

    if not export_dir:
        raise EngineError(f"{model}: this engine does not know its export directory; weights cannot be swapped")
    manifest = json.loads((Path(export_dir) / "manifest.json").read_text(encoding="utf-8"))
    return Path(export_dir) / manifest["models"][model]["file"]


def session_source(onnx_path: Path, overrides: dict[str, np.ndarray], so):
    """What to hand ``InferenceSession`` so that ``overrides`` replace initializers *before* graph optimization.

    ``SessionOptions.add_initializer`` is applied after the optimizer ran (constant folding of a weight's
    Transpose, conv layout reordering and fusions already consumed the file's values, measured with ONNX
    Runtime 1.31), so it cannot be used to swap weights of an optimized session. Instead:

    * initializers stored as external data (every export above 2 GB, i.e. real SD checkpoints): the file is
      opened from disk and ``SessionOptions.add_external_initializers`` supplies the new values in place of
      the external bytes, which ORT reads while loading the graph, before optimization; nothing is copied;
    * inline initializers (exports below 2 GB): the ModelProto is loaded once per call, the overridden
      tensors are replaced and the session is created from the serialized bytes.

    Returns ``(path_or_bytes, keep_alive)``; ``keep_alive`` must live as long as the session.
    """
    if not overrides:
        return str(onnx_path), None
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    by_name = {t.name: t for t in model.graph.initializer}
    missing = sorted(set(overrides) - set(by_name))
    if missing:
        raise EngineError(f"{onnx_path.name} has no initializer(s) {missing[:8]}")
    external = {n for n in overrides if by_name[n].data_location == onnx.TensorProto.EXTERNAL}
    inline = set(overrides) - external
    if external and inline:
        raise EngineError(f"{onnx_path.name}: cannot override inline initializers {sorted(inline)[:4]} of a model "
                          f"with external data")
    if external:
        ort = _ort()
        names = sorted(external)
        values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(overrides[n])) for n in names]
        so.add_external_initializers(names, values)
        return str(onnx_path), (values, overrides)
    for n in inline:
        t = by_name[n]
        arr = np.ascontiguousarray(overrides[n], dtype=onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
        t.CopyFrom(numpy_helper.from_array(arr, n))
    blob = model.SerializeToString()
    del model
    return blob, None


class OrtCpuEngine(Engine):
    """ONNX Runtime on the CPU. ``path`` is the cached optimized model (or a raw ONNX file).

    ``overrides`` ({initializer name: array}, e.g. LoRA-merged weights): the session is created from the
    export's own ONNX file (``onnx_path``) with those initializers replaced and every optimization pass on;
    see :meth:`with_weights`.
    """

    backend = "onnxruntime-cpu"

    def __init__(self, model, inputs, outputs, profiles=None, *, path, threads: int | None = None,
                 spinning: bool = False, optimized: bool = True, overrides: dict | None = None, **kw):
        super().__init__(model, inputs, outputs, profiles, source=str(path), **kw)
        self.path = Path(path)
        self.threads = threads
        self.spinning = spinning
        # An optimized model from the cache already had every pass applied (and holds ORT's CPU layout
        # ops); running them again costs load time for nothing.
        self.level = "disable" if optimized else "all"
        self.overrides = dict(overrides or {})
        self.session = None
        self._keep = None

    def with_weights(self, overrides: dict[str, np.ndarray]) -> "OrtCpuEngine":
        """A new engine running the same export with ``overrides`` ({ONNX initializer name: array}) in place
        of those weights. This engine (and its cached optimized model) is untouched and stays usable; nothing
        is written to the engine cache. The new session is created on first use (or ``load()``)."""
        if not overrides:
            return self
        raw = export_onnx_path(self.export_dir, self.model)
        eng = OrtCpuEngine(self.model, self.inputs, self.outputs, self.profiles, path=raw, threads=self.threads,
                           spinning=self.spinning, optimized=False, overrides=overrides, request=self.request,
                           export_dir=self.export_dir)
        eng.source = f"{raw} (+{len(overrides)} overridden weights)"
        return eng

    def _load(self):
        ort = _ort()
        so = cpu_session_options(self.threads, self.spinning, self.level)
        source, self._keep = session_source(self.path, self.overrides, so)
        self.session = ort.InferenceSession(source, sess_options=so, providers=[CPU_EP])
        check_providers(self.session, [CPU_EP], self.model)
        ins, outs = session_specs(self.session)
        check_io_matches(self.model, self.inputs, ins, "inputs", str(self.path))
        check_io_matches(self.model, self.outputs, outs, "outputs", str(self.path))

    def _release(self):
        self.session = None
        self._keep = None

    def _run(self, feeds, profile_index):
        results = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, results))


def __getattr__(name: str):
    # The CUDA / TensorRT EP engine lives in ort_cuda (IO binding, graphs, copies); importable from here too.
    if name in ("OrtCudaEngine", "WeightSessions", "preload_cuda_libraries"):
        from . import ort_cuda

        return getattr(ort_cuda, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
