"""The model's time handling: shift invariance, causality, chunking, vocabularies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bci_decoder.decode import CAUSAL_KEYS, WINDOW_KEYS, to_torch
from bci_decoder.model.poyo import POYO, POYOConfig
from bci_decoder.model.rotary import rotary_periods, rotary_phases, rotate
from bci_decoder.model.vocab import UnitVocab, Vocab
from bci_decoder.tokenizer import (
    collate_causal,
    collate_window,
    grid_index,
    tokenize_causal,
    tokenize_window,
)
from bci_decoder.train.checkpoint import Decoder, Normalizer

STEP = 0.05
CFG = POYOConfig(
    dim=32,
    depth=2,
    dim_head=16,
    cross_heads=2,
    self_heads=2,
    latents_per_group=4,
    latent_step=STEP,
    context=0.5,
)


@pytest.fixture(scope="module")
def model() -> POYO:
    torch.manual_seed(0)
    m = POYO(CFG, num_units=21, num_sessions=2, outputs={"hand_vel": 2, "force": 2})
    # random, non-trivial weights everywhere (fresh init leaves some paths near zero)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


@pytest.fixture(scope="module")
def spikes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.sort(rng.uniform(0, 3, 700))
    u = rng.integers(1, 21, 700)
    q = np.sort(rng.uniform(0.01, 3.0, 40))
    return t, u, q


def run_causal(model, t, u, q, offset=0.0, chunk=None):
    """Decode spikes (t, u) at queries q, with every time shifted by ``offset``."""
    k0 = int(grid_index(offset, STEP))
    G = 60
    chunk = chunk or G
    cache, outs = None, []
    for c in range(0, G, chunk):
        s = tokenize_causal(t + offset, u, k0 + 1 + c, chunk, STEP, q + offset)
        b = to_torch(collate_causal([s]), CAUSAL_KEYS)
        with torch.no_grad():
            p, cache = model.forward_causal(**b, cache=cache, return_cache=True)
        outs.append(p[0, : len(s.query_time)].numpy())
    return np.concatenate(outs)


def run_window(model, t, u, q, offset=0.0):
    samples = [tokenize_window(t + offset, u, x + offset, CFG.context, STEP) for x in q]
    b = to_torch(collate_window(samples), WINDOW_KEYS)
    with torch.no_grad():
        return model.forward_window(**b)[:, 0].numpy()


def test_time_shift_invariance_causal(model, spikes):
    t, u, q = spikes
    a = run_causal(model, t, u, q)
    b = run_causal(model, t, u, q, offset=36_000.0)
    assert a.std() > 0.05  # a real signal, not a constant
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_time_shift_invariance_window(model, spikes):
    t, u, q = spikes
    q = q[q > CFG.context]
    np.testing.assert_allclose(
        run_window(model, t, u, q), run_window(model, t, u, q, offset=36_000.0), atol=1e-5
    )


def test_float32_times_would_fail(spikes):
    """The float64 phase path matters: float32 times at 36,000 s lose the fine periods."""
    periods = rotary_periods(8, 2e-3, 8.0)
    t = torch.tensor([36_000.0123], dtype=torch.float64)
    c64, _ = rotary_phases(t, periods)
    c32, _ = rotary_phases(t.to(torch.float32).to(torch.float64), periods)
    assert (c64 - c32).abs().max() > 1e-2


def test_causal_ignores_future_spikes(model, spikes):
    t, u, q = spikes
    a = run_causal(model, t, u, q)
    i = 20
    rng = np.random.default_rng(1)
    t2 = t.copy()
    future = t2 > q[i]
    t2[future] = np.sort(rng.uniform(q[i] + 1e-9, 3.0, future.sum()))
    u2 = u.copy()
    u2[future] = rng.integers(1, 21, future.sum())
    b = run_causal(model, t2, u2, q)
    np.testing.assert_array_equal(a[: i + 1], b[: i + 1])
    assert np.abs(a[i + 1 :] - b[i + 1 :]).max() > 1e-3  # the change is visible later


def test_spike_exactly_at_query_counts(model, spikes):
    """A spike at exactly t belongs to the prediction at t (the window is (t - W, t])."""
    t, u, q = spikes
    a = run_causal(model, t, u, q)
    t2 = np.sort(np.append(t, q[10]))
    u2 = np.insert(u, np.searchsorted(t, q[10], side="right"), 5)
    b = run_causal(model, t2, u2, q)
    assert np.abs(a[10] - b[10]).max() > 1e-6
    np.testing.assert_array_equal(a[:10], b[:10])


def test_chunked_equals_whole(model, spikes):
    t, u, q = spikes
    np.testing.assert_allclose(
        run_causal(model, t, u, q), run_causal(model, t, u, q, chunk=7), atol=1e-5
    )


def test_empty_groups_are_defined(model):
    t = np.array([0.5, 0.51, 2.2])
    u = np.array([1, 2, 3])
    q = np.array([0.3, 1.0, 2.5])
    out = run_causal(model, t, u, q)
    assert np.all(np.isfinite(out))


def test_rotation_preserves_relative_scores():
    periods = rotary_periods(4, 2e-3, 8.0)
    x = torch.randn(1, 1, 16)
    y = torch.randn(1, 1, 16)

    def score(tx: float, ty: float) -> float:
        cx, sx = rotary_phases(torch.tensor([tx], dtype=torch.float64), periods, 8)
        cy, sy = rotary_phases(torch.tensor([ty], dtype=torch.float64), periods, 8)
        return float((rotate(x, cx, sx) * rotate(y, cy, sy)).sum())

    assert abs(score(1.0, 0.7) - score(7201.0, 7200.7)) < 1e-4
    assert abs(score(1.0, 0.7) - score(1.0, 0.2)) > 1e-3


def test_grid_index_is_exact():
    step = 0.05
    k = np.arange(-5, 200000, 997)
    t = k * step
    np.testing.assert_array_equal(grid_index(t, step), k)  # a time on the grid owns itself
    np.testing.assert_array_equal(grid_index(np.nextafter(t, np.inf), step), k + 1)


def test_vocab_roundtrip_through_checkpoint(tmp_path, model, spikes):
    units = UnitVocab([f"s{i // 10}/u{i}" for i in range(20)])
    sessions = Vocab(["s0", "s1"])
    norms = {"s0": {"hand_vel": Normalizer(np.array([1.0, 2.0]), np.array([3.0, 4.0]))}}
    dec = Decoder(model, units, sessions, norms, modes=["causal", "window"], info={"x": 1})
    dec.save(tmp_path / "m")
    back = Decoder.load(tmp_path / "m")
    assert back.units.names == units.names and back.units["s1/u13"] == units["s1/u13"]
    assert back.sessions.names == ["s0", "s1"]
    np.testing.assert_array_equal(back.norms["s0"]["hand_vel"].std, [3.0, 4.0])
    t, u, q = spikes
    np.testing.assert_array_equal(run_causal(model, t, u, q), run_causal(back.model, t, u, q))


def test_extend_units_keeps_old_rows(model):
    import copy

    m = copy.deepcopy(model)
    old = m.unit_emb.weight.detach().clone()
    m.extend_units(5)
    assert m.unit_emb.weight.shape[0] == old.shape[0] + 5
    torch.testing.assert_close(m.unit_emb.weight[: old.shape[0]], old)


def test_corrupt_checkpoint_gives_clear_error(tmp_path, model):
    dec = Decoder(model, UnitVocab([f"s/u{i}" for i in range(20)]), Vocab(["s0", "s1"]), {})
    dec.save(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="corrupt"):
        Decoder.load(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        Decoder.load(tmp_path / "nothing")


def test_bursty_rows_are_encoded_in_buckets_with_the_same_result(model):
    """A burst (one group of 400 spikes among groups of ~10) pads every group of the
    batch to 400 in one encode call; encode_rows buckets rows by width instead. Outputs
    and gradients equal the single padded call's, and the bucketed path is the one taken."""
    rng = np.random.default_rng(3)
    t = np.sort(np.concatenate([rng.uniform(0, 3, 300), rng.uniform(1.01, 1.04, 400)]))
    u = rng.integers(1, 21, t.size)
    q = np.sort(rng.uniform(0.5, 3.0, 20))
    b = to_torch(collate_causal([tokenize_causal(t, u, 1, 60, STEP, q)]), CAUSAL_KEYS)
    assert b["spike_unit"].shape[-1] >= 400 and b["spike_mask"].float().mean() < 0.2

    calls = []
    encode = POYO.encode

    def counting(self, *a, **kw):
        calls.append(a[1].shape)  # k (1, R, S, H, Dh)
        return encode(self, *a, **kw)

    def padded(self, units, times, mask, row_time, elapsed):  # one call, every row padded
        B, R, S = units.shape
        k, v = self.spike_keys(units, times)
        usum = self._unit_sum(units.flatten(0, 1), mask.flatten(0, 1)).unflatten(0, (B, R))
        return self.encode(self.phases(row_time), k, v, mask, usum, elapsed)

    results = {}
    for name in ("bucketed", "padded"):
        m = POYO(CFG, num_units=21, num_sessions=2, outputs={"hand_vel": 2, "force": 2})
        m.load_state_dict(model.state_dict())
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(POYO, "encode", counting)
            if name == "padded":
                mp.setattr(POYO, "encode_rows", padded)
            calls.clear()
            pred = m.forward_causal(**b)[0]
            (pred**2).sum().backward()
        results[name] = (
            pred.detach(),
            m.unit_emb.weight.grad,
            len(calls),
            max(c[2] for c in calls),
        )
    (pb, gb, nb, wb), (pp, gp, npad, wp) = results["bucketed"], results["padded"]
    assert nb > 1 and npad == 1 and wb == wp  # only the burst's bucket is that wide
    torch.testing.assert_close(pb, pp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb, gp, rtol=1e-4, atol=1e-6)
