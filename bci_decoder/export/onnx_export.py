"""Export the streaming step graphs to ONNX and check them before writing.

Four graphs (``bci_decoder.model.step``), float32, opset 17:
  causal_step.onnx    the partial group at t and the readout (run every step)
  causal_finish.onnx  a finished group's cache rows and its end-time readout (once a group)
  causal_chunk.onnx   both for every query and finish of G groups at once (offline)
  window_step.onnx    window mode: latents recomputed from cached spike keys
The per-unit tables (encoder keys/values, embeddings, the <null> token, the output
query) are inputs, so a calibration changes data, not the graphs. Each graph carries the
``graph_hash`` of the weights it holds in its ONNX metadata; the package (``model.package``)
records the same hash, so a graph older than its weights is refused at load. The spike count is a
dynamic axis: the CPU engine passes exactly the spikes it has; a fixed-shape engine (CUDA
graphs) passes its whole capacity and masks the unused rows with ``spike_bias``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from bci_decoder.model import layout
from bci_decoder.model.decoder import Decoder, package_of
from bci_decoder.model.package import ModelPackage, file_sha256
from bci_decoder.model.phases import angles, rotation_rows
from bci_decoder.model.step import WINDOW_INPUTS, CausalChunk, CausalKVStep, WindowKVStep

OPSET = 17
GRAPHS = layout.GRAPHS
GRAPH_HASH_KEY = "bci_decoder.graph_hash"  # ONNX metadata_props key


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
    Hc, Dh, D, n, L, B = d["Hc"], d["Dh"], d["D"], d["n"], d["L"], queries
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
        **_table_feeds(rng, d),
        **_cache_feeds(rng, d, "cache_k", "cache_v", "dec_k", "dec_v"),
    }
    return feeds


def _table_feeds(rng: np.random.Generator, d: dict[str, int]) -> dict[str, np.ndarray]:
    """Random unit-table inputs: <null> key and value, decoder query, output query."""
    Hc, Dh = d["Hc"], d["Dh"]
    return {
        "null_k": rng.normal(size=(Hc, 1, Dh)).astype(np.float32),
        "null_v": rng.normal(size=(Hc, 1, Dh)).astype(np.float32),
        "dec_q": rng.normal(size=(Hc, 1, Dh)).astype(np.float32),
        "query": rng.normal(size=(1, d["D"])).astype(np.float32),
    }


def _cache_feeds(
    rng: np.random.Generator, d: dict[str, int], k: str, v: str, dk: str, dv: str
) -> dict[str, np.ndarray]:
    """Random cached rows: per-layer keys ``k{i}`` / values ``v{i}`` (Hs, L, Dh) and the
    decoder's keys ``dk`` / values ``dv`` (Hc, L, Dh)."""
    Hc, Hs, Dh, L = d["Hc"], d["Hs"], d["Dh"], d["L"]
    out = {
        dk: rng.normal(size=(Hc, L, Dh)).astype(np.float32),
        dv: rng.normal(size=(Hc, L, Dh)).astype(np.float32),
    }
    for i in range(d["depth"]):
        out[f"{k}{i}"] = rng.normal(size=(Hs, L, Dh)).astype(np.float32)
        out[f"{v}{i}"] = rng.normal(size=(Hs, L, Dh)).astype(np.float32)
    return out


def chunk_feeds(
    decoder: Decoder, groups: int, blocks: int, spikes: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random but well-formed inputs of the chunk graph: ``groups`` groups of ``blocks``
    row blocks, up to ``spikes`` spikes each, some cached groups before the chunk unseen."""
    d = _dims(decoder)
    rng = np.random.default_rng(seed)
    f32 = np.float32
    Hc, Dh, D, n, L = d["Hc"], d["Dh"], d["D"], d["n"], d["L"]
    G, B, S, Wb = groups, blocks, spikes, L // n
    seen = rng.integers(0, S + 1, (G, B))
    periods = package_of(decoder).periods
    ts, tb = rng.uniform(0, 100, (G, S)), rng.uniform(0, 100, (G, B))  # spike, block times
    dt = rng.uniform(0, decoder.config.context, (G, B, Wb))
    dt[: G // 2, :, : Wb // 3] = np.inf  # early groups: cache rows before the stream
    feeds = {
        "spike_k": rng.normal(size=(Hc, G, S, Dh)).astype(f32),
        "spike_v": rng.normal(size=(Hc, G, S, Dh)).astype(f32),
        "spike_cos": np.cos(angles(ts, periods)).astype(f32),
        "spike_sin": np.sin(angles(ts, periods)).astype(f32),
        "spike_bias": np.where(np.arange(S) < seen[..., None], f32(0), f32(-np.inf)),
        "count_feat": np.concatenate(
            [rng.normal(size=(G, B, D)), rng.uniform(0, 1, (G, B, 1))], 2
        ).astype(f32),
        **dict(zip(("rot_cos", "rot_sin"), rotation_rows(tb, periods, Dh), strict=True)),
        "band_dt": np.repeat(dt, n, axis=2).astype(f32),
        "band_idx": np.arange(G)[:, None] + np.arange(Wb),
        **_table_feeds(rng, d),
        **_cache_feeds(rng, d, "prev_k", "prev_v", "prev_dk", "prev_dv"),
    }
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
    for name, readout, emit in [("causal_step", True, False), ("causal_finish", True, True)]:
        m = CausalKVStep(model, readout=readout, emit=emit).eval()
        out[name] = (m, m.input_names, m.output_names)
    chunk = CausalChunk(model).eval()
    out["causal_chunk"] = (chunk, chunk.input_names, chunk.output_names)
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
    if isinstance(module, CausalChunk):
        dynamic = {
            "spike_k": {1: "groups", 2: "spikes"},
            "spike_v": {1: "groups", 2: "spikes"},
            "spike_cos": {0: "groups", 1: "spikes"},
            "spike_sin": {0: "groups", 1: "spikes"},
            "spike_bias": {0: "groups", 1: "blocks", 2: "spikes"},
            "count_feat": {0: "groups", 1: "blocks"},
            "rot_cos": {0: "groups", 1: "blocks"},
            "rot_sin": {0: "groups", 1: "blocks"},
            "band_dt": {0: "groups", 1: "blocks"},
            "band_idx": {0: "groups"},
            "prediction": {0: "groups", 1: "blocks"},
            "new_k": {1: "groups"},
            "new_v": {1: "groups"},
            "new_dk": {1: "groups"},
            "new_dv": {1: "groups"},
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
        elif name == "causal_chunk":
            feeds = chunk_feeds(decoder, *spikes, seed=seed)
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


def _stamp(graph: bytes, digest: str) -> bytes:
    """The graph with ``graph_hash`` in its metadata (read back by ONNX Runtime)."""
    import onnx

    model = onnx.load_from_string(graph)
    prop = model.metadata_props.add()
    prop.key, prop.value = GRAPH_HASH_KEY, digest
    return model.SerializeToString()


def build_graphs(
    decoder: Decoder,
    capacity: int = layout.GROUP_SPIKES,
    window_capacity: int = layout.WINDOW_SPIKES,
) -> dict:
    """The checked step graphs as serialized ONNX bytes, keyed by name (in memory: an
    engine can load them without touching disk), stamped with the weights' graph hash."""
    digest = package_of(decoder).graph_hash
    out = {}
    for name, (module, names, outputs) in step_modules(decoder).items():
        if name == "window_step":
            example = window_feeds(decoder, max(window_capacity // 3, 1))
            cases = [(0, 1), (7, 1), (window_capacity, 1)]
        elif name == "causal_chunk":  # cases: ((groups, blocks, spikes), unused)
            example = chunk_feeds(decoder, 5, 3, 11)
            cases = [((1, 1, 1), 0), ((9, 4, 30), 0), ((40, 6, 7), 0)]
        else:
            example = causal_feeds(decoder, max(capacity // 3, 1))
            cases = [(0, 1), (7, 1), (capacity, 1), (40, 3)]
        graph = _to_onnx(module, example, names, outputs)
        _check(decoder, name, module, names, graph, cases)
        out[name] = _stamp(graph, digest)
    return out


_GRAPHS: dict[tuple[str, int, int], dict[str, bytes]] = {}


def in_memory_package(
    decoder: Decoder,
    capacity: int = layout.GROUP_SPIKES,
    window_capacity: int = layout.WINDOW_SPIKES,
) -> ModelPackage:
    """The decoder's package with its graphs in memory (tests, offline evaluation,
    benchmarks); graphs are built once per set of graph weights, so a calibrated copy of
    a model reuses its base model's."""
    pkg = package_of(decoder, capacity=capacity, window_capacity=window_capacity)
    key = (pkg.graph_hash, capacity, window_capacity)
    if key not in _GRAPHS:
        _GRAPHS[key] = build_graphs(decoder, capacity, window_capacity)
    pkg.graph_bytes = _GRAPHS[key]
    return pkg


def export_package(
    decoder: Decoder,
    out: str | Path,
    capacity: int = layout.GROUP_SPIKES,
    window_capacity: int = layout.WINDOW_SPIKES,
    weights_sha256: str | None = None,
) -> Path:
    """Write the decoder's whole package into ``out``: package.json, tables.safetensors
    and the step graphs (``layout.GRAPHS``), each written to a temporary name first.

    The spike axis is dynamic; ``capacity`` (spikes per causal group) and
    ``window_capacity`` (spikes per window) are the sizes the parity check runs at and
    the defaults engines built on this package use for their buffers.
    ``weights_sha256``: of the model.safetensors beside it (default: read from ``out``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if weights_sha256 is None:
        w = out / layout.WEIGHTS
        weights_sha256 = file_sha256(w) if w.exists() else ""
    graphs = build_graphs(decoder, capacity, window_capacity)
    for name, graph in graphs.items():
        tmp = out / f"{name}.onnx.tmp"
        tmp.write_bytes(graph)
        tmp.replace(layout.graph_file(out, name))
    package_of(decoder, weights_sha256, capacity, window_capacity).write(out)
    (out / "export.json").unlink(missing_ok=True)  # the pre-package format's index
    # the offline graph before causal_chunk (one group per run)
    layout.graph_file(out, "causal_batch").unlink(missing_ok=True)
    return out


def export_model(
    folder: str | Path,
    capacity: int = layout.GROUP_SPIKES,
    window_capacity: int = layout.WINDOW_SPIKES,
) -> list:
    """Export the model in ``folder`` and re-write the tables of each of its stored
    calibrations (which share its graphs; one with graphs of its own, a second stage that
    fine-tuned shared weights, is exported whole). Returns the folders written."""
    folder = Path(folder)
    done = [export_package(Decoder.load(folder), folder, capacity, window_capacity)]
    for name in layout.stored_calibrations(folder):
        cal = layout.calibration_dir(folder, name)
        if (cal / layout.WEIGHTS).exists() and layout.graph_file(cal, GRAPHS[0]).exists():
            done.append(export_package(Decoder.load(cal), cal, capacity, window_capacity))
        elif (cal / layout.WEIGHTS).exists():
            package_of(Decoder.load(cal), file_sha256(cal / layout.WEIGHTS)).write(cal)
            done.append(cal)
    return done


# the pre-package name, kept for callers that export into a folder of their own
export_step = export_package
