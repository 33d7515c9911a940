"""Runs the exported causal step with ONNX Runtime: CUDA when present, else CPU."""

from __future__ import annotations

import numpy as np


def choose_providers() -> list[str]:
    """CUDA if this onnxruntime build and machine have it, else CPU (no error spam)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxStepRunner:
    def __init__(self, path: str, intra_op_threads: int = 1) -> None:
        import onnxruntime as ort

        if path is None:
            raise ValueError("the onnx backend needs the exported graph's path")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(path, opts, providers=choose_providers())
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, feeds)
