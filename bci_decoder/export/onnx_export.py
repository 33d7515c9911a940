"""Export the causal group-step graph to ONNX and check it before writing.

The per-unit tables (keys, values, embeddings) stay outside the graph: a calibration
changes data, not the graph.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from bci_decoder.model.step import CausalStep, WindowStep
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
WINDOW_INPUTS = [
    "spike_k",
    "spike_v",
    "spike_mask",
    "group_sum",
    "lat_cos",
    "lat_sin",
    "self_dt",
    "dec_dt",
    "dec_cos",
    "dec_sin",
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


def window_feeds(decoder: Decoder, capacity: int, seed: int = 0) -> dict[str, np.ndarray]:
    c = decoder.config
    rng = np.random.default_rng(seed)
    H, Dh, D, n = c.cross_heads, c.dim_head, c.dim, c.latents_per_group
    K = int(round(c.context / c.latent_step))
    half = Dh // 2
    ang = rng.uniform(0, 2 * np.pi, (K + 1, half))
    lt = np.repeat(np.arange(K) * c.latent_step, n)
    f32 = np.float32
    return {
        "spike_k": rng.normal(size=(capacity, H, Dh)).astype(f32),
        "spike_v": rng.normal(size=(capacity, H, Dh)).astype(f32),
        "spike_mask": np.arange(capacity) < capacity // 3,
        "group_sum": rng.normal(size=(K, D)).astype(f32),
        "lat_cos": np.cos(ang[1:]).astype(f32),
        "lat_sin": np.sin(ang[1:]).astype(f32),
        "self_dt": np.abs(lt[:, None] - lt[None, :]).astype(f32),
        "dec_dt": (lt[-1] - lt).astype(f32),
        "dec_cos": np.cos(ang[0]).astype(f32),
        "dec_sin": np.sin(ang[0]).astype(f32),
        "query": rng.normal(size=D).astype(f32),
    }


def _export_checked(
    module: torch.nn.Module, feeds: dict, names: list[str], outputs: list[str], path: Path
) -> Path:
    """Export, run onnx.checker and a parity run against torch; write only if all pass."""
    import onnx
    import onnxruntime as ort

    args = tuple(torch.from_numpy(feeds[k]) for k in names)
    tmp = path.with_suffix(".onnx.tmp")
    torch.onnx.export(
        module,
        args,
        str(tmp),
        input_names=names,
        output_names=outputs,
        opset_version=OPSET,
        dynamo=False,
    )
    onnx.checker.check_model(onnx.load(str(tmp)))
    sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)
    with torch.no_grad():
        want = module(*args)
    want = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got, want, strict=True):
        err = float(np.abs(g - w.numpy()).max())
        if err > 1e-4 * max(1.0, float(w.abs().max())):
            tmp.unlink()
            raise RuntimeError(f"{path.name}: ONNX differs from torch by {err}; not written")
    tmp.replace(path)
    return path


def export_step(
    decoder: Decoder, out: str | Path, capacity: int = 2048, window_capacity: int = 8192
) -> Path:
    """Write ``out``/{causal_step.onnx, window_step.onnx, export.json}; returns ``out``.

    Shapes are fixed: ``capacity`` spikes per causal group, ``window_capacity`` spikes
    in the window ring.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = decoder.model.eval()
    _export_checked(
        CausalStep(model).eval(),
        example_feeds(decoder, capacity),
        INPUTS,
        ["prediction", "states"],
        out / "causal_step.onnx",
    )
    _export_checked(
        WindowStep(model).eval(),
        window_feeds(decoder, window_capacity),
        WINDOW_INPUTS,
        ["prediction"],
        out / "window_step.onnx",
    )
    meta = {"opset": OPSET, "capacity": capacity, "window_capacity": window_capacity}
    (out / "export.json").write_text(json.dumps(meta, indent=1))
    return out
