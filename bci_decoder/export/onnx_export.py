"""Export the streaming step graphs to ONNX and check them before writing.

Four graphs (``bci_decoder.model.step``), float32, opset 17:
  causal_step.onnx    the partial group at t and the readout (run every step)
  causal_finish.onnx  a finished group's per-layer cache rows (run once per group)
  causal_batch.onnx   both for all queries of a group at once (offline decoding)
  window_step.onnx    window mode: latents recomputed from cached spike keys
The per-unit tables (encoder keys/values, embeddings, the <null> token, the output
query) are inputs, so a calibration changes data, not the graphs. The spike count is a
dynamic axis: the CPU engine passes exactly the spikes it has; a fixed-shape engine (CUDA
graphs) passes its whole capacity and masks the unused rows with ``spike_bias``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from bci_decoder.model.step import WINDOW_INPUTS, CausalKVStep, WindowKVStep, causal_inputs
from bci_decoder.train.checkpoint import Decoder

OPSET = 17
FORMAT = 2  # export.json "format": 1 was the states-cache graph of the first engine
GRAPHS = ("causal_step", "causal_finish", "causal_batch", "window_step")


def _dims(decoder: Decoder) -> dict[str, int]:
    c = decoder.config
    n = c.latents_per_group
    return {
        "Hc": c.cross_heads,
        "Hs": c.self_heads,
        "Dh": c.dim_head,
        "D": c.dim,
        "n": n,
        "L": max(c.context_groups - 1, 1) * n,
        "K": int(round(c.context / c.latent_step)),
        "depth": c.depth,
    }


def _phase(rng: np.random.Generator, shape: tuple[int, ...], half: int) -> np.ndarray:
    ang = rng.uniform(0, 2 * np.pi, (*shape, half))
    return np.concatenate([np.cos(ang), np.sin(ang)], -1).astype(np.float32)


def causal_feeds(
    decoder: Decoder, spikes: int, queries: int = 1, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random but well-formed inputs of the causal graphs: ``queries`` queries (B) in a
    group with ``spikes`` spikes; with B > 1 the masks are per row, as offline decoding
    builds them."""
    d = _dims(decoder)
    rng = np.random.default_rng(seed)
    f32 = np.float32
    Hc, Hs, Dh, D, n, L, B = d["Hc"], d["Hs"], d["Dh"], d["D"], d["n"], d["L"], queries
    T = L + B * n
    dt = np.full((B, T), np.inf, f32)
    dt[:, L // 5 : L] = rng.uniform(0, decoder.config.context, (B, L - L // 5))
    seen = np.full((B, B + spikes), -np.inf, f32)
    for b in range(B):
        dt[b, L + b * n : L + (b + 1) * n] = 0.0
        seen[b, b] = 0.0  # its own <null>
        seen[b, B : B + (b + 1) * spikes // (B + 1)] = 0.0  # the spikes before t_b
    rows = np.repeat(np.arange(B), n)
    feeds = {
        "spike_k": rng.normal(size=(spikes, Hc, Dh)).astype(f32),
        "spike_v": rng.normal(size=(spikes, Hc, Dh)).astype(f32),
        "spike_bias": seen[rows] if B > 1 else seen,
        "count_feat": np.concatenate(
            [rng.normal(size=(B, D)), rng.uniform(0, 1, (B, 1))], 1
        ).astype(f32),
        "phase": _phase(rng, (B,), Dh // 2),
        "dt": dt[rows] if B > 1 else dt,
        "dec_dt": dt,
        "null_k": rng.normal(size=(Hc, 1, Dh)).astype(f32),
        "null_v": rng.normal(size=(Hc, 1, Dh)).astype(f32),
        "dec_q": rng.normal(size=(Hc, 1, Dh)).astype(f32),
        "query": rng.normal(size=(1, D)).astype(f32),
        "dec_k": rng.normal(size=(Hc, L, Dh)).astype(f32),
        "dec_v": rng.normal(size=(Hc, L, Dh)).astype(f32),
    }
    for i in range(d["depth"]):
        feeds[f"cache_k{i}"] = rng.normal(size=(Hs, L, Dh)).astype(f32)
        feeds[f"cache_v{i}"] = rng.normal(size=(Hs, L, Dh)).astype(f32)
    return feeds


def window_feeds(decoder: Decoder, spikes: int, seed: int = 0) -> dict[str, np.ndarray]:
    d = _dims(decoder)
    rng = np.random.default_rng(seed)
    f32 = np.float32
    Hc, Dh, D, n, K = d["Hc"], d["Dh"], d["D"], d["n"], d["K"]
    lt = np.repeat(np.arange(1, K + 1) * decoder.config.latent_step, n)
    return {
        "spike_k": rng.normal(size=(spikes, Hc, Dh)).astype(f32),
        "spike_v": rng.normal(size=(spikes, Hc, Dh)).astype(f32),
        "group_sum": rng.normal(size=(K, D)).astype(f32),
        "lat_phase": _phase(rng, (K,), Dh // 2),
        "dec_phase": _phase(rng, (), Dh // 2),
        "self_dt": np.abs(lt[:, None] - lt[None, :]).astype(f32),
        "dec_dt": (lt[-1] - lt).astype(f32),
        "null_k": rng.normal(size=(Hc, 1, Dh)).astype(f32),
        "null_v": rng.normal(size=(Hc, 1, Dh)).astype(f32),
        "dec_q": rng.normal(size=(Hc, 1, Dh)).astype(f32),
        "query": rng.normal(size=(1, D)).astype(f32),
    }


def step_modules(decoder: Decoder) -> dict[str, tuple[torch.nn.Module, list[str], list[str]]]:
    """name -> (module, input names, output names) of the step graphs."""
    model = decoder.model.eval()
    out = {}
    for name, readout, emit in [
        ("causal_step", True, False),
        ("causal_finish", False, True),
        ("causal_batch", True, True),
    ]:
        m = CausalKVStep(model, readout=readout, emit=emit, fused_qkv=name != "causal_batch")
        m.eval()
        out[name] = (m, m.input_names, m.output_names)
    out["window_step"] = (WindowKVStep(model).eval(), WINDOW_INPUTS, ["prediction"])
    return out


def _to_onnx(module: torch.nn.Module, feeds: dict, names: list[str], outputs: list[str]) -> bytes:
    dynamic = {"spike_k": {0: "spikes"}, "spike_v": {0: "spikes"}}
    if isinstance(module, CausalKVStep):
        dynamic |= {
            "spike_bias": {0: "rows", 1: "null_and_spikes"},
            "count_feat": {0: "queries"},
            "phase": {0: "queries"},
            "dt": {0: "rows", 1: "keys"},
            "dec_dt": {0: "queries", 1: "keys"},
            "prediction": {0: "queries"},
            "new_k": {1: "rows"},
            "new_v": {1: "rows"},
            "new_dk": {1: "rows"},
            "new_dv": {1: "rows"},
        }
    dynamic = {k: v for k, v in dynamic.items() if k in names or k in outputs}
    buf = io.BytesIO()
    torch.onnx.export(
        module,
        tuple(torch.from_numpy(feeds[k]) for k in names),
        buf,
        input_names=names,
        output_names=outputs,
        dynamic_axes=dynamic,
        opset_version=OPSET,
        do_constant_folding=True,
        dynamo=False,
    )
    return buf.getvalue()


def _check(decoder: Decoder, name: str, module, names, graph: bytes, cases: list) -> None:
    """onnx.checker, then ONNX Runtime against torch on several (spikes, queries) cases."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(onnx.load_from_string(graph))
    sess = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    used = {i.name for i in sess.get_inputs()}  # the exporter drops unused inputs
    for seed, (spikes, queries) in enumerate(cases):
        if name == "window_step":
            feeds = window_feeds(decoder, spikes, seed)
        else:
            feeds = causal_feeds(decoder, spikes, queries, seed)
        got = sess.run(None, {k: v for k, v in feeds.items() if k in used})
        with torch.no_grad():
            want = module(*(torch.from_numpy(feeds[k]) for k in names))
        want = want if isinstance(want, tuple) else (want,)
        for g, w in zip(got, want, strict=True):
            err = float(np.abs(g - w.numpy()).max())
            if not err <= 1e-4 * max(1.0, float(w.abs().max())):
                raise RuntimeError(
                    f"{name}: ONNX differs from torch by {err} with {spikes} spikes, "
                    f"{queries} queries; not written"
                )


def build_graphs(decoder: Decoder, capacity: int = 2048, window_capacity: int = 8192) -> dict:
    """The checked step graphs as serialized ONNX bytes, keyed by name (in memory: an
    engine can load them without touching disk)."""
    out = {}
    for name, (module, names, outputs) in step_modules(decoder).items():
        if name == "window_step":
            example = window_feeds(decoder, max(window_capacity // 3, 1))
            cases = [(0, 1), (7, 1), (window_capacity, 1)]
        else:
            example = causal_feeds(decoder, max(capacity // 3, 1), 2 if "batch" in name else 1)
            cases = [(0, 1), (7, 1), (capacity, 1), (40, 3)]
        graph = _to_onnx(module, example, names, outputs)
        _check(decoder, name, module, names, graph, cases)
        out[name] = graph
    return out


def export_step(
    decoder: Decoder, out: str | Path, capacity: int = 2048, window_capacity: int = 8192
) -> Path:
    """Write ``out``/{causal_step, causal_finish, window_step}.onnx and export.json.

    The spike axis is dynamic; ``capacity`` (spikes per causal group) and
    ``window_capacity`` (spikes per window) are the sizes the parity check runs at and
    the defaults engines built on this folder use for their buffers.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    graphs = build_graphs(decoder, capacity, window_capacity)
    for name, graph in graphs.items():
        tmp = out / f"{name}.onnx.tmp"
        tmp.write_bytes(graph)
        tmp.replace(out / f"{name}.onnx")
    meta = {
        "format": FORMAT,
        "opset": OPSET,
        "capacity": capacity,
        "window_capacity": window_capacity,
        "causal_inputs": causal_inputs(decoder.config.depth),
        "window_inputs": WINDOW_INPUTS,
    }
    (out / "export.json").write_text(json.dumps(meta, indent=1))
    return out


def read_export(folder: str | Path) -> dict[str, bytes]:
    """The graphs of an export folder; a clear error for folders of an older format."""
    folder = Path(folder)
    meta_path = folder / "export.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{folder} holds ONNX graphs of export format {meta.get('format', 1)}, this "
            f"engine needs format {FORMAT}: re-export (bci-decoder export --out {folder})"
        )
    return {name: (folder / f"{name}.onnx").read_bytes() for name in GRAPHS}
