"""Runs the exported step graphs with ONNX Runtime: CUDA when present, else CPU.

CPU (tested here). Every input and output is bound once, by pointer, to an array the
engine owns and updates in place (``OrtValue``s never copied, no feed dict built per
run); only the inputs whose length changes (the group's spikes) are re-bound before a
run, again by pointer, and only when their row count changed (``run_rows``). One intra-op thread by default: on a 2-core machine the LSL
inlet and the API need the other core, and a 4-latent step is too small to split.

GPU (written for a lent GPU, not run on the 2-core CI machine). ``choose_providers``
picks the CUDA execution provider when this onnxruntime build lists it *and* the CUDA
driver reports a device (so a CPU-only machine with onnxruntime-gpu installed does not
print provider errors on every start). On CUDA the runner keeps a device copy of every
bound array: ``run(changed=...)`` uploads the arrays the engine changed since the last
run (``OrtValue.update_inplace``: the per-step phases and time differences, the spikes
after a push, the cache after a group finished), outputs stay on the device and are
copied into the engine's output arrays after the run. With ``cuda_graph=True`` the
engine keeps every shape fixed (spike buffers at full capacity, unused rows masked by
``spike_bias``), so ONNX Runtime captures the step once and replays it as one CUDA graph
(``enable_cuda_graph``); the window graph's spike axis varies, so it runs without.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable

import numpy as np


def cuda_device_count() -> int:
    """CUDA devices the driver reports (0 without a driver), without importing torch."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return int(count.value)
    return 0


def choose_providers(available: list[str] | None = None) -> list[str]:
    """CUDA (with CPU fallback) if onnxruntime lists it and a device is present, else CPU."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available and cuda_device_count() > 0:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxStepRunner:
    """One step graph in one ONNX Runtime session, with IO binding.

    ``bind(inputs, outputs)`` once with arrays the caller owns (C-contiguous; the
    caller keeps them alive and updates them in place); then ``run(dynamic, changed)``
    per step, ``dynamic`` holding inputs whose shape changes between runs.
    """

    def __init__(
        self,
        graph: bytes | str,
        intra_op_threads: int = 1,
        providers: list[str] | None = None,
        cuda_graph: bool = False,
        mem_pattern: bool = False,
    ) -> None:
        import onnxruntime as ort

        if graph is None:
            raise ValueError("the onnx backend needs the exported graph (bytes or a path)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # ONNX Runtime caches a memory pattern per distinct set of input shapes and never
        # evicts one: with a row count that changes from run to run the cache grows for as
        # long as new counts appear (~1.5 MB a minute at 100k spikes/s, exact counts).
        # On only where the caller bounds the shapes (engine.row_buckets, CUDA graphs).
        opts.enable_mem_pattern = mem_pattern or cuda_graph
        providers = providers or choose_providers()
        if providers[0] == "CUDAExecutionProvider":
            cuda_opts = {"enable_cuda_graph": "1"} if cuda_graph else {}
            providers = [("CUDAExecutionProvider", cuda_opts), *providers[1:]]
        self.session = ort.InferenceSession(graph, opts, providers=providers)
        self.device = (
            "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.binding = self.session.io_binding()
        self._raw_bind = None  # binding by raw pointer with a cached device: ~1 µs, not ~4
        if self.device == "cpu":
            try:
                from onnxruntime.capi import _pybind_state as C

                dev = C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)
                raw, raw_out = (
                    self.binding._iobinding.bind_input,
                    self.binding._iobinding.bind_output,
                )
                self._raw_bind = lambda name, dtype, shape, ptr: raw(name, dev, dtype, shape, ptr)
                self._raw_bind_out = lambda name, dtype, shape, ptr: raw_out(
                    name, dev, dtype, shape, ptr
                )
            except (ImportError, AttributeError):  # another onnxruntime layout: public API
                pass
        self._prefix: dict[str, tuple[np.ndarray, int]] = {}  # name -> (base, pointer)
        self._rows: list[tuple[str, list[int], int, int]] = []  # set_rows
        self._bound_rows = -1  # the row count the prefixes are bound with
        self._run_raw = None  # the binding's run without the Python wrapper (~2 µs)
        if self.device == "cpu":
            try:
                sess, iob = self.session._sess, self.binding._iobinding
                self._run_raw = lambda: sess.run_with_iobinding(iob, None)
            except AttributeError:
                pass
        self._host: dict[str, np.ndarray] = {}  # name -> the caller's array
        self._device: dict[str, object] = {}  # name -> device OrtValue (cuda only)
        self._outputs: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ binding
    def _bind_input(self, name: str, arr: np.ndarray) -> None:
        if not arr.flags.c_contiguous:
            raise ValueError(f"input {name!r} must be C-contiguous")
        self._host[name] = arr
        if self.device == "cpu":
            self.binding.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
            return
        import onnxruntime as ort

        old = self._device.get(name)
        if old is not None and list(old.shape()) == list(arr.shape):
            old.update_inplace(arr)  # same device buffer: a captured CUDA graph stays valid
            return
        ov = ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0)
        self._device[name] = ov
        self.binding.bind_ortvalue_input(name, ov)

    def bind(
        self, inputs: dict[str, np.ndarray] | None = None, outputs: dict | None = None
    ) -> None:
        """Bind the graph's inputs found in ``inputs`` (others are ignored: the exporter
        drops inputs a graph does not use) and its outputs found in ``outputs``."""
        for name in self.input_names:
            if inputs and name in inputs:
                self._bind_input(name, inputs[name])
        for name in self.output_names:
            if outputs and name in outputs:
                self.bind_output(name, outputs[name])

    def bind_output(self, name: str, arr: np.ndarray) -> None:
        """Bind an output to ``arr`` (again, e.g. with another batch size)."""
        self._outputs[name] = arr
        if self._raw_bind is not None:
            self._raw_bind_out(name, arr.dtype, list(arr.shape), arr.ctypes.data)
            return
        if self.device == "cpu":
            self.binding.bind_output(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
            return
        import onnxruntime as ort

        # preallocated on the device: a captured CUDA graph writes to fixed addresses
        ov = ort.OrtValue.ortvalue_from_shape_and_type(list(arr.shape), arr.dtype, "cuda", 0)
        self._device[f"out:{name}"] = ov
        self.binding.bind_ortvalue_output(name, ov)

    def bind_prefix(self, name: str, base: np.ndarray) -> None:
        """Register ``base`` for an input whose rows vary: ``run(prefix={name: shape})``
        binds the first prod(shape) elements of its memory, without building a view."""
        if not base.flags.c_contiguous:
            raise ValueError(f"input {name!r} must be C-contiguous")
        self._prefix[name] = (base, base.ctypes.data)

    def set_rows(self, rows: dict[str, tuple[tuple[int, ...], int, int]]) -> None:
        """Declare the ``bind_prefix`` inputs that ``run_rows(count)`` binds: name ->
        (shape, axis, offset), bound with ``shape[axis] = count + offset``."""
        self._rows = [(name, list(shape), axis, off) for name, (shape, axis, off) in rows.items()]
        self._bound_rows = -1

    # ------------------------------------------------------------------ running
    def run(
        self,
        dynamic: dict[str, np.ndarray] | None = None,
        changed: Iterable[str] = (),
        prefix: dict[str, list[int]] | None = None,
    ) -> None:
        """Run once. ``dynamic``: inputs to (re)bind now; ``prefix``: shapes of
        ``bind_prefix`` inputs for this run; ``changed``: names of bound arrays modified
        in place since the last run (uploaded on CUDA, nothing to do on CPU)."""
        if prefix:
            for name, shape in prefix.items():
                base, ptr = self._prefix[name]
                if self._raw_bind is not None:
                    self._raw_bind(name, base.dtype, shape, ptr)
                elif self.device == "cpu":
                    self.binding.bind_input(name, "cpu", 0, base.dtype, shape, ptr)
                else:
                    rows = base.reshape(-1)[: int(np.prod(shape))].reshape(shape)
                    self.binding.bind_cpu_input(name, rows)
        if dynamic:
            for name, arr in dynamic.items():
                if not arr.flags.c_contiguous:
                    raise ValueError(f"input {name!r} must be C-contiguous")
                if self._raw_bind is not None:
                    self._raw_bind(name, arr.dtype, list(arr.shape), arr.ctypes.data)
                elif self.device == "cpu":
                    self.binding.bind_input(
                        name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data
                    )
                else:
                    self.binding.bind_cpu_input(name, np.ascontiguousarray(arr))
        if self.device != "cpu":
            for name in changed:
                ov = self._device.get(name)
                if ov is not None:
                    ov.update_inplace(self._host[name])
        if self._run_raw is not None:
            self._run_raw()
        else:
            self.session.run_with_iobinding(self.binding)
        if self.device != "cpu":
            for name in self.output_names:
                np.copyto(self._outputs[name], self._device[f"out:{name}"].numpy())

    def run_rows(self, count: int, changed: Iterable[str] = ()) -> None:
        """``run`` with the ``set_rows`` inputs bound at ``count`` rows; on CPU they are
        re-bound only when the count changed since the last run (a step without new
        spikes binds nothing)."""
        if self._raw_bind is None or self.device != "cpu":
            prefix = {}
            for name, shape, axis, offset in self._rows:
                shape[axis] = count + offset
                prefix[name] = shape
            self.run(None, changed, prefix)
            return
        if count != self._bound_rows:
            for name, shape, axis, offset in self._rows:
                base, ptr = self._prefix[name]
                shape[axis] = count + offset
                self._raw_bind(name, base.dtype, shape, ptr)
            self._bound_rows = count
        if self._run_raw is not None:
            self._run_raw()
        else:
            self.session.run_with_iobinding(self.binding)

    def call(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One run with every input fed and the outputs returned (new arrays): for a
        graph whose shapes change at every run (offline decoding's chunk graph)."""
        used = self.input_names
        return self.session.run(None, {k: feeds[k] for k in used})

    def providers(self) -> list[str]:
        return list(self.session.get_providers())
