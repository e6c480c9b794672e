"""ksampler-rt: ComfyUI KSampler on ONNX Runtime / TensorRT engines, orchestrated in numpy."""
__version__ = "0.1.0"
