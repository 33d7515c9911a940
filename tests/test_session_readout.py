"""Session readouts (a GRU over the decoder's features, ``model.session_readout``):
the numpy cell equals torch's GRU, streaming equals offline decoding (both split and
one-pass, late spikes re-finished), the package carries them, and the fit learns what a
linear head cannot. Each engine test runs twice: a readout of the features only, and one
that also reads each unit's spike counts (whose order follows the stream's units).

Tolerance as in test_engine: max |error| <= 1e-4 of the output's standard deviation.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bci_decoder.export.onnx_export import export_package
from bci_decoder.model.decoder import Decoder
from bci_decoder.model.normalizer import Normalizer
from bci_decoder.model.package import ModelPackage, PackageError
from bci_decoder.model.session_readout import SessionReadout
from bci_decoder.runtime.engine import StreamingEngine, UnitTables
from bci_decoder.train.session_readout_fit import (
    ReadoutSettings,
    _Readout,
    fit_readout,
    fit_session_readout,
    without_counts,
)
from tests.test_engine import assert_close, small_decoder  # the 1e-4-of-std check
from tests.test_engine import stream_upto as run


def random_readout(
    rng: np.random.Generator, D: int, H: int, n_out: int, units: int = 0
) -> SessionReadout:
    """Random weights; ``units`` > 0: it reads that many units' spike counts too."""

    def w(*shape: int, scale: float = 0.3) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    n = D + units
    return SessionReadout(
        w(3 * H, n), w(3 * H, H), w(3 * H), w(3 * H), w(n_out, H, scale=1.0), w(n_out),
        w(n), (1.0 + rng.random(n)).astype(np.float32), units,
    )  # fmt: skip


@pytest.fixture(scope="module", params=["features", "counts"])
def setup(request, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dec, sessions = small_decoder()
    session = sessions[0]
    units = len(session.unit_ids) if request.param == "counts" else 0
    readout = random_readout(np.random.default_rng(1), dec.config.dim, 24, 2, units)
    dec.readouts[(session.session_id, "hand_vel")] = readout
    folder = export_package(dec, tmp_path_factory.mktemp("onnx"), capacity=512)
    yield dec, session, str(folder), readout
    torch.set_num_threads(threads)


def engine(setup, **kw) -> StreamingEngine:
    dec, session, folder, _ = setup
    kw = {"onnx_path": folder, "max_spikes_per_group": 512} | kw
    return StreamingEngine(dec, session.session_id, "hand_vel", **kw)


@pytest.mark.parametrize("units", [0, 5])
def test_numpy_cell_equals_torch_gru(units):
    """``SessionReadout`` (numpy) computes torch's nn.GRU equations, as the fit trains
    (on the counts' square roots, which the readout takes itself)."""
    torch.manual_seed(0)
    m = _Readout(12 + units, 16, 3)
    r = m.export(np.zeros(12 + units, np.float32), np.ones(12 + units, np.float32), units)
    y, c = torch.randn(50, 12), torch.randint(0, 6, (50, units)).float()
    qy, qc = torch.randn(50, 12), torch.randint(0, 6, (50, units)).float()
    with torch.no_grad():
        states = m.states(torch.cat([y, c.sqrt()], 1)[None])[0]  # (51, 16)
        out = m.head(m.cell(states[:-1], torch.cat([qy, qc.sqrt()], 1))).numpy()
    np_states = r.scan(y.numpy(), c.numpy())
    assert np.abs(np_states - states.numpy()).max() < 1e-5
    assert np.abs(r.outputs_at(np_states[:-1], qy.numpy(), qc.numpy()) - out).max() < 1e-5
    if units:
        with pytest.raises(ValueError, match="reads spike counts"):
            r.inputs(y.numpy())


def test_a_readout_follows_the_units_order():
    """``for_units``: counts in another unit order give the same inputs; a unit left out
    counts as silent (its constant input folded into the bias)."""
    rng = np.random.default_rng(3)
    r = random_readout(rng, 6, 8, 2, units=5)
    y, c = rng.standard_normal((7, 6)), rng.integers(0, 4, (7, 5)).astype(np.float32)
    order = np.array([4, 2, 0, 1, 3])
    assert np.allclose(r.for_units(order).inputs(y, c[:, order]), r.inputs(y, c), atol=1e-5)
    silent = c.copy()
    silent[:, [1, 3]] = 0
    sub = r.for_units(np.array([4, 0, 2]))
    assert sub.units == 3
    assert np.allclose(sub.inputs(y, c[:, [4, 0, 2]]), r.inputs(y, silent), atol=1e-5)
    with pytest.raises(ValueError, match="distinct units"):
        r.for_units(np.array([0, 0]))


def test_streaming_equals_offline_with_a_readout(setup):
    """Step by step (the finish graph's end-time features drive the GRU, one cell per
    step on the step's features) == ``decode`` in one pass and split over two workers
    (the chunk graph's finish blocks, then one scan); and the readout does change the
    output (it is not the linear head)."""
    dec, session, _, _ = setup
    queries = 0.5 + 0.01 * np.arange(2_000) + 0.0003
    t, u = session.spike_times, session.spike_units
    live = run(engine(setup), session, queries, queries)
    one = engine(setup).decode(t, u, queries, normalised=True)
    two_engine = engine(setup)
    two_engine.MIN_SPLIT_GROUPS = 0  # the 30 s session is shorter than a split is worth
    two = two_engine.decode(t, u, queries, normalised=True, workers=2)
    # both start with the group of the first spike (the first push holds it)
    assert_close(live, one)
    assert_close(two, one)
    # sparse queries (the split's first half ends groups before the split): its twin
    # finishes them with one more query, so no group's features are missing
    sparse = queries[::60]
    one_s = engine(setup).decode(t, u, sparse, normalised=True)
    assert_close(two_engine.decode(t, u, sparse, normalised=True, workers=2), one_s)
    plain = dataclasses.replace(
        UnitTables.from_decoder(dec, session.session_id, "hand_vel"), readout=None
    )
    lin = engine(setup)
    lin.set_units(plain)
    head = run(lin, session, queries, queries)
    assert np.abs(head - live).max() > 0.1  # the readout is what decodes


def test_late_spikes_refinish_the_readout_too(setup):
    """Spikes 4 ms late at a 1 ms hop with a grace: after the grace every step equals an
    engine whose groups got every spike in time, the GRU's step at the re-finished
    group included."""
    _, session, _, _ = setup
    hop, delay, grace, s = 0.001, 0.004, 0.01, 0.05
    queries = 0.5 + hop * np.arange(1500) + 0.0003
    prev_end = (np.ceil(queries / s) - 1) * s
    late = engine(setup, late_grace_s=grace)
    got = run(late, session, queries, queries - delay)
    assert late.stats().late_accepted > 30
    ref = run(engine(setup), session, queries, np.maximum(queries - delay, prev_end))
    settled = queries > prev_end + grace
    assert_close(got[settled], ref[settled])


def test_swapping_tables_restarts_the_readout(setup):
    """New tables with another readout: its state starts from zero at the swap, so the
    steps after equal an engine that had those tables from the swap's group on."""
    dec, session, _, readout = setup
    D = dec.config.dim
    queries = 0.5 + 0.01 * np.arange(600) + 0.0003
    other = random_readout(np.random.default_rng(7), D, 24, 2, readout.units)
    tables = UnitTables.from_decoder(dec, session.session_id, "hand_vel")
    swapped = dataclasses.replace(tables, readout=other, version=tables.version + 1000)
    eng = engine(setup)
    a = run(eng, session, queries[:300], queries[:300])
    eng.set_units(swapped)
    b = run(eng, session, queries[300:], queries[300:], after=queries[299])
    assert np.isfinite(a).all() and np.isfinite(b).all()
    # by hand: the other readout from a zero state at the swap, on this engine's features
    feats = engine(setup)
    feats.set_units(swapped)
    qf, first, gf = feats.decode_features(
        session.spike_times, session.spike_units, queries, counts=other.units
    )
    # the swap's step finishes the group of the step before it: from that group on,
    # finished groups feed the new state
    g0 = int(np.ceil(queries[299] / 0.05))
    g_q = np.ceil(queries[300:] / 0.05).astype(int)
    gf = gf[g0 - first : g_q.max() - first]
    states = other.scan(gf[:, :D], gf[:, D:])
    want = other.outputs_at(states[g_q - g0], qf[300:, :D], qf[300:, D:])
    assert_close(b, want)


def test_package_carries_readouts(setup, tmp_path):
    """Decoder.save -> the package's tables hold the readout; both loaders read it back
    bit for bit; a malformed readout is a clear package error."""
    dec, session, _, readout = setup
    folder = dec.save(tmp_path / "m")
    pkg = ModelPackage.load(folder)
    got = pkg.readout(session.session_id, "hand_vel")
    assert got is not None and np.array_equal(got.w_hh, readout.w_hh)
    assert pkg.readout(session.session_id, "force") is None
    back = Decoder.load(folder)
    assert np.array_equal(back.readouts[(session.session_id, "hand_vel")].head_w, readout.head_w)
    tables = UnitTables.build(pkg, session.session_id, "hand_vel")
    assert tables.readout is not None
    # a readout whose arrays do not fit each other
    from safetensors.numpy import load_file, save_file

    arrays = load_file(str(folder / "tables.safetensors"))
    key = f"readout/{session.session_id}/hand_vel/w_hh"
    arrays[key] = arrays[key][:, :5]
    save_file(arrays, str(folder / "tables.safetensors"))
    with pytest.raises(PackageError, match="session readout: w_ih has shape"):
        ModelPackage.load(folder)
    if readout.units:  # counts of more units than the session has
        wide = random_readout(np.random.default_rng(2), dec.config.dim, 24, 2, readout.units + 1)
        arrays |= wide.to_arrays(f"readout/{session.session_id}/hand_vel/")
        save_file(arrays, str(folder / "tables.safetensors"))
        with pytest.raises(PackageError, match=f"reads {readout.units + 1} units' spike counts"):
            ModelPackage.load(folder)


def test_the_stream_units_order_does_not_matter(setup):
    """Tables listing the session's units in reverse, spikes indexed that way: the same
    outputs (a readout of counts reads each unit's count in its own column)."""
    dec, session, _, _ = setup
    queries = 0.5 + 0.01 * np.arange(400) + 0.0003
    ref = run(engine(setup), session, queries, queries)
    names = list(UnitTables.from_decoder(dec, session.session_id, "hand_vel").unit_names)
    eng = engine(setup)
    eng.set_units(UnitTables.from_decoder(dec, session.session_id, "hand_vel", names[::-1]))
    flipped = dataclasses.replace(session, spike_units=len(names) - 1 - session.spike_units)
    assert_close(run(eng, flipped, queries, queries), ref)


def test_fit_learns_what_the_linear_head_cannot():
    """Targets that integrate the features over time (a velocity's position, say): the
    fitted GRU beats the linear head on the validation tail and is kept."""
    rng = np.random.default_rng(0)
    G, D, step = 4000, 8, 0.05
    gf = rng.standard_normal((G, D)).astype(np.float32)
    # queries at every group end: the query's features are its group's end features
    times = step * np.arange(1, G + 1)
    drive = gf[:, :2]
    y = np.zeros((G, 2))
    for i in range(1, G):  # a leaky integral of the features
        y[i] = 0.9 * y[i - 1] + drive[i]
    feats = {"times": times, "target": y, "qfeat": gf, "first": 1, "gfeat": gf}
    norm = Normalizer(y[:2800].mean(0), y[:2800].std(0))
    w = np.linalg.lstsq(gf[:2800], norm.forward(y[:2800]), rcond=None)[0]
    st = ReadoutSettings(hidden=16, max_epochs=12, patience=4, window=40, burn_in=10)
    readout, report = fit_readout(
        feats, norm, lambda f: f @ w, step, times[2800], (times[2800], times[3200]), st,
        progress=False,
    )  # fmt: skip
    assert report["kept"] and report["valid_r2_readout"] > report["valid_r2_head"] + 0.2, report
    assert readout.hidden == 16 and readout.outputs == 2


def test_fit_reads_spike_counts_the_features_lack():
    """Targets driven by one unit's spike counts, which the features do not carry: a
    readout of counts learns them, one of the features alone cannot."""
    rng = np.random.default_rng(0)
    G, D, C, step = 3000, 6, 3, 0.05
    gf = rng.standard_normal((G, D)).astype(np.float32)
    counts = rng.poisson(2.0, (G, C)).astype(np.float32)
    times = step * np.arange(1, G + 1)
    y = np.zeros((G, 1))
    for i in range(1, G):  # a leaky integral of unit 1's rate
        y[i] = 0.8 * y[i - 1] + np.sqrt(counts[i, 1])
    feats = {"times": times, "target": y, "qfeat": np.concatenate([gf, counts], 1),
             "first": 1, "gfeat": np.concatenate([gf, counts], 1), "units": C}  # fmt: skip
    norm = Normalizer(y[:2100].mean(0), y[:2100].std(0))
    st = ReadoutSettings(hidden=16, max_epochs=10, patience=4, window=40, burn_in=10)
    cuts = (times[2100], (times[2100], times[2500]))

    def fit(f):
        return fit_readout(f, norm, lambda f: np.zeros((len(f), 1)), step, *cuts, st,
                           progress=False)  # fmt: skip

    readout, report = fit(feats)
    assert readout.units == C and report["counts"] == C
    assert report["valid_r2_readout"] > 0.8, report
    _, plain = fit(without_counts(feats))
    assert plain["counts"] == 0 and plain["valid_r2_readout"] < 0.3, plain


def test_fit_session_readout_chooses_on_the_tail():
    """``fit_session_readout`` fits a readout with and one without counts and keeps the
    better on 63-70%; or only the one asked for."""
    dec, sessions = small_decoder()
    session = sessions[0]
    st = ReadoutSettings(hidden=8, max_epochs=2, patience=2, min_windows=32, workers=1)
    readout, report = fit_session_readout(dec, session, "hand_vel", st, progress=False)
    tried = report["valid_r2_tried"]
    assert set(tried) == {"counts=0", f"counts={len(session.unit_ids)}"}
    assert report["valid_r2_readout"] == max(tried.values())
    assert readout.units == report["counts"]
    only = st.model_copy(update={"counts": "no"})
    r_no, rep_no = fit_session_readout(dec, session, "hand_vel", only, progress=False)
    assert r_no.units == 0 and set(rep_no["valid_r2_tried"]) == {"counts=0"}


def test_fit_starts_from_a_given_readout():
    """``init``: the fit starts from another readout's weights (with lr 0 it returns them);
    a readout of other inputs or size is refused."""
    rng = np.random.default_rng(1)
    G, D, step = 600, 6, 0.05
    gf = rng.standard_normal((G, D)).astype(np.float32)
    times = step * np.arange(1, G + 1)
    y = gf[:, :2].cumsum(0) * 0.1
    feats = {"times": times, "target": y, "qfeat": gf, "first": 1, "gfeat": gf}
    norm = Normalizer(y.mean(0), y.std(0))
    start = random_readout(rng, D, 16, 2)
    st = ReadoutSettings(hidden=16, max_epochs=1, window=40, burn_in=10, lr=0.0, dropout=0.0)
    cuts = (times[400], (times[400], times[500]))
    got, _ = fit_readout(feats, norm, lambda f: f[:, :2], step, *cuts, st, progress=False,
                         init=start)  # fmt: skip
    for name in ("w_ih", "w_hh", "b_ih", "b_hh", "head_w", "head_b"):
        assert np.array_equal(getattr(got, name), getattr(start, name)), name
    with pytest.raises(ValueError, match="cannot start a fit"):
        fit_readout(feats, norm, lambda f: f[:, :2], step, *cuts, st, progress=False,
                    init=random_readout(rng, D, 8, 2))  # fmt: skip
