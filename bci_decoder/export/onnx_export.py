"""Export the causal group-step graph to ONNX and check it before writing.

The per-unit tables (keys, values, embeddings) stay outside the graph: a calibration
changes data, not the graph.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from bci_decoder.model.step import CausalStep
from bci_decoder.train.checkpoint import Decoder

INPUTS = [
    "spike_k",
    "spike_v",
    "spike_mask",
    "unit_sum",
    "elapsed",
    "q_cos",
    "q_sin",
    "cache_states",
    "cache_cos",
    "cache_sin",
    "cache_dt",
    "cache_mask",
    "query",
]
OPSET = 17


def example_feeds(decoder: Decoder, capacity: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random but well-formed inputs of the step graph's fixed shapes."""
    c = decoder.config
    rng = np.random.default_rng(seed)
    H, Dh, D, n = c.cross_heads, c.dim_head, c.dim, c.latents_per_group
    L = max(c.context_groups - 1, 1) * n
    half = Dh // 2
    ang = rng.uniform(0, 2 * np.pi, (L + 1, half))
    f32 = np.float32
    return {
        "spike_k": rng.normal(size=(capacity, H, Dh)).astype(f32),
        "spike_v": rng.normal(size=(capacity, H, Dh)).astype(f32),
        "spike_mask": np.arange(capacity) < capacity // 3,
        "unit_sum": rng.normal(size=D).astype(f32),
        "elapsed": np.array([0.4], f32),
        "q_cos": np.cos(ang[0]).astype(f32),
        "q_sin": np.sin(ang[0]).astype(f32),
        "cache_states": rng.normal(size=(c.depth + 1, L, D)).astype(f32),
        "cache_cos": np.cos(ang[1:]).astype(f32),
        "cache_sin": np.sin(ang[1:]).astype(f32),
        "cache_dt": rng.uniform(0.0, c.context, L).astype(f32),
        "cache_mask": rng.random(L) < 0.8,
        "query": rng.normal(size=D).astype(f32),
    }


def export_step(decoder: Decoder, out: str | Path, capacity: int = 2048) -> Path:
    """Write ``out``/causal_step.onnx (+ export.json); validated by onnx.checker and a
    parity run against torch before anything is written."""
    import onnx
    import onnxruntime as ort

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    step = CausalStep(decoder.model.eval()).eval()
    feeds = example_feeds(decoder, capacity)
    args = tuple(torch.from_numpy(feeds[k]) for k in INPUTS)
    tmp = out / "causal_step.onnx.tmp"
    torch.onnx.export(
        step,
        args,
        str(tmp),
        input_names=INPUTS,
        output_names=["prediction", "states"],
        opset_version=OPSET,
        dynamo=False,
    )
    model = onnx.load(str(tmp))
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)
    with torch.no_grad():
        want = step(*args)
    for g, w in zip(got, want, strict=True):
        err = float(np.abs(g - w.numpy()).max())
        if err > 1e-4 * max(1.0, float(w.abs().max())):
            tmp.unlink()
            raise RuntimeError(f"ONNX export differs from torch by {err}: not written")
    final = out / "causal_step.onnx"
    tmp.replace(final)
    (out / "export.json").write_text(
        json.dumps({"opset": OPSET, "capacity": capacity, "inputs": INPUTS}, indent=1)
    )
    return final
