"""Runs a step module with torch: the eager reference of the engine's ``backend="torch"``,
with the ONNX runner's interface (bind once, run per step). Tests and parity checks only;
the serving path runs ONNX Runtime and never imports this."""

from __future__ import annotations

import numpy as np
import torch

from bci_decoder.model.step import CausalChunk, CausalKVStep, WindowKVStep


class TorchStepRunner:
    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module.eval()
        self.input_names = module.input_names
        self.output_names = module.output_names
        self._inputs: dict[str, np.ndarray] = {}
        self._outputs: dict[str, np.ndarray] = {}

    def bind(
        self, inputs: dict[str, np.ndarray] | None = None, outputs: dict | None = None
    ) -> None:
        for k, v in (inputs or {}).items():
            if k in self.input_names:  # torch wants writable arrays: copy read-only tables
                self._inputs[k] = v if v.flags.writeable else v.copy()
        for name, arr in (outputs or {}).items():
            self.bind_output(name, arr)

    def bind_output(self, name: str, arr: np.ndarray) -> None:
        if name in self.output_names:
            self._outputs[name] = arr

    def bind_prefix(self, name: str, base: np.ndarray) -> None:
        self._inputs[f"prefix:{name}"] = base

    @torch.no_grad()
    def run(self, dynamic: dict | None = None, changed=(), prefix: dict | None = None) -> None:
        feeds = {**self._inputs, **(dynamic or {})}
        for name, shape in (prefix or {}).items():
            base = self._inputs[f"prefix:{name}"]
            feeds[name] = base.reshape(-1)[: int(np.prod(shape))].reshape(shape)
        out = self.module(*(torch.from_numpy(np.asarray(feeds[k])) for k in self.input_names))
        out = out if isinstance(out, tuple) else (out,)
        for name, o in zip(self.output_names, out, strict=True):
            np.copyto(self._outputs[name], o.numpy().reshape(self._outputs[name].shape))

    @torch.no_grad()
    def call(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One run with every input fed; the outputs as new arrays."""
        arrays = (np.asarray(feeds[k]) for k in self.input_names)
        # torch wants writable arrays: copy read-only tables
        out = self.module(*(torch.from_numpy(a if a.flags.writeable else a.copy()) for a in arrays))
        return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]

    def providers(self) -> list[str]:
        return ["torch"]


def torch_runner(decoder, name: str) -> TorchStepRunner:
    """The eager runner of step graph ``name`` of ``decoder``."""
    model = decoder.model.eval()
    make = {
        "causal_step": lambda: CausalKVStep(model, readout=True, emit=False),
        "causal_finish": lambda: CausalKVStep(model, readout=True, emit=True),
        "causal_chunk": lambda: CausalChunk(model),
        "window_step": lambda: WindowKVStep(model),
    }
    return TorchStepRunner(make[name]())
