"""StreamingEngine parity: step by step equals the offline causal model on the same spikes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bci_decoder.config import TrainConfig
from bci_decoder.decode import decode_causal, decode_window, session_tokens
from bci_decoder.export.onnx_export import export_step
from bci_decoder.runtime.engine import StreamingEngine
from bci_decoder.train.loop import build_decoder, gather_sessions

CFG = TrainConfig(
    model={
        "dim": 32,
        "depth": 2,
        "dim_head": 16,
        "cross_heads": 2,
        "self_heads": 2,
        "latents_per_group": 4,
        "latent_step": 0.05,
        "context": 0.5,
    },
    data={"simulate": {"seed": 5, "num_sessions": 1, "duration_s": 30, "num_units": 40}},
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    sessions = gather_sessions(CFG)
    dec, _ = build_decoder(CFG, sessions)
    with torch.no_grad():  # non-trivial weights on every path
        for p in dec.model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    onnx_path = export_step(
        dec, tmp_path_factory.mktemp("onnx"), capacity=512, window_capacity=2048
    )
    return dec, sessions[0], str(onnx_path)


def stream(
    engine: StreamingEngine, session, queries: np.ndarray, offset: float = 0.0
) -> np.ndarray:
    """Push each spike before the first step at or after it; z-scored outputs."""
    t_sp = session.spike_times + offset
    out, j = [], 0
    for t in queries + offset:
        k = np.searchsorted(t_sp, t, side="right")
        engine.push(t_sp[j:k], session.spike_units[j:k])
        j = k
        out.append(engine.step(t))
    return (np.array(out) - engine.norm.mean) / engine.norm.std


def offline(dec, session, queries: np.ndarray) -> np.ndarray:
    times, units, sidx = session_tokens(dec, session)
    # the offline stream starts at t = 0, where the engine starts (the first spike)
    return decode_causal(dec, times, units, sidx, "hand_vel", queries, burn_in=queries[0])


@pytest.mark.parametrize(
    "backend,hop,n", [("onnx", 0.001, 10_000), ("onnx", 0.01, 2_500), ("torch", 0.01, 1_000)]
)
def test_engine_matches_offline(setup, backend, hop, n):
    """10,000 consecutive 1 ms steps (and 10 ms steps) equal the offline model."""
    dec, session, onnx_path = setup
    queries = 0.5 + hop * np.arange(n) + 0.0003
    ref = offline(dec, session, queries)
    eng = StreamingEngine(
        dec,
        session.session_id,
        "hand_vel",
        backend=backend,
        onnx_path=onnx_path,
        max_spikes_per_group=512,
    )
    got = stream(eng, session, queries)
    err = np.abs(got - ref).max()
    assert ref.std() > 0.1
    assert err <= 1e-4 * ref.std(), err


def test_engine_exact_after_36000_s_shift(setup):
    dec, session, onnx_path = setup
    queries = 0.5 + 0.01 * np.arange(1000) + 0.0003
    a = stream(
        StreamingEngine(
            dec, session.session_id, backend="onnx", onnx_path=onnx_path, max_spikes_per_group=512
        ),
        session,
        queries,
    )
    b = stream(
        StreamingEngine(
            dec, session.session_id, backend="onnx", onnx_path=onnx_path, max_spikes_per_group=512
        ),
        session,
        queries,
        offset=36_000.0,
    )
    assert np.abs(a - b).max() <= 1e-4 * a.std()


def test_bad_spikes_are_counted_not_fatal(setup):
    dec, session, onnx_path = setup
    eng = StreamingEngine(
        dec, session.session_id, backend="onnx", onnx_path=onnx_path, max_spikes_per_group=512
    )
    eng.push(np.array([1.0, 1.01]), np.array([0, 1]))
    eng.push(np.array([0.5, np.nan, 1.02]), np.array([0, 0, 999]))  # late, NaN, unknown
    assert eng.stats.rejected_out_of_order == 1
    assert eng.stats.rejected_unknown_unit == 1
    assert np.all(np.isfinite(eng.step(1.05)))


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_window_mode_matches_offline(setup, backend):
    """Window mode: cached spike keys, latents recomputed each step == offline windows."""
    dec, session, onnx_path = setup
    queries = 1.0 + 0.001 * np.arange(10_000 if backend == "onnx" else 500) + 0.0003
    times, units, sidx = session_tokens(dec, session)
    ref = decode_window(dec, times, units, sidx, "hand_vel", queries)
    eng = StreamingEngine(
        dec,
        session.session_id,
        mode="window",
        backend=backend,
        onnx_path=onnx_path,
        max_spikes_per_window=2048,
    )
    got = stream(eng, session, queries)
    assert eng.stats.rejected_overflow == 0
    assert np.abs(got - ref).max() <= 1e-4 * ref.std()
