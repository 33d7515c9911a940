"""StreamingEngine parity: step by step equals the offline torch model on the same spikes.

Tolerance everywhere: max |error| <= 1e-4 of the output's standard deviation, over
10,000 consecutive steps (hop 1 ms) or 2,500 (10 ms) on a simulated session, in both
modes, shifted to t = 36,000 s, after a mid-stream swap of the unit tables, through the
offline batch path, and on a real session with the shipped model.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bci_decoder.config import TrainConfig
from bci_decoder.data.session import Session
from bci_decoder.decode import (
    decode_causal,
    decode_session,
    decode_stream,
    decode_window,
    session_tokens,
    stream_start,
)
from bci_decoder.export.onnx_export import export_package
from bci_decoder.model.package import ModelPackage, PackageError
from bci_decoder.model.step import decoder_query
from bci_decoder.runtime import onnx_runner
from bci_decoder.runtime.engine import StreamingEngine, UnitTables, row_buckets
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
TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The torch references run single-threaded: on a loaded 2-core machine a second
    OpenMP thread spins more than it computes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_decoder():
    """The small model of CFG, with non-trivial weights on every path, and its sessions."""
    torch.manual_seed(0)
    sessions = gather_sessions(CFG)
    dec, _ = build_decoder(CFG, sessions)
    with torch.no_grad():
        for p in dec.model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return dec, sessions


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    dec, sessions = small_decoder()
    onnx_path = export_package(
        dec, tmp_path_factory.mktemp("onnx"), capacity=512, window_capacity=2048
    )
    return dec, sessions[0], str(onnx_path)


def engine(setup, **kw) -> StreamingEngine:
    dec, session, onnx_path = setup
    kw = {"backend": "onnx", "onnx_path": onnx_path, "max_spikes_per_group": 512} | kw
    return StreamingEngine(dec, session.session_id, "hand_vel", **kw)


def stream(
    eng: StreamingEngine, session: Session, queries: np.ndarray, offset: float = 0.0
) -> np.ndarray:
    """Push each spike before the first step at or after it; z-scored outputs."""
    t_sp = session.spike_times + offset
    out, j = [], 0
    for t in queries + offset:
        k = np.searchsorted(t_sp, t, side="right")
        eng.push(t_sp[j:k], session.spike_units[j:k])
        j = k
        out.append(eng.step(t))
    return (np.array(out) - eng.norm.mean) / eng.norm.std


def stream_upto(
    eng: StreamingEngine, session: Session, queries: np.ndarray, upto: np.ndarray,
    after: float = -1.0,
) -> np.ndarray:  # fmt: skip
    """Step at each query after pushing the spikes up to ``upto`` of it (those after
    ``after``: where an earlier call stopped); z-scored outputs."""
    t_sp, u_sp = session.spike_times, session.spike_units
    out, j = [], int(np.searchsorted(t_sp, after, side="right"))
    for t, up in zip(queries, upto, strict=True):
        k = np.searchsorted(t_sp, up, side="right")
        eng.push(t_sp[j:k], u_sp[j:k])
        j = k
        out.append(eng.step(t))
    return (np.array(out) - eng.norm.mean) / eng.norm.std


def chunk(queries: np.ndarray) -> int:
    """Groups per offline chunk: about 200 queries, so the reference's (rows x keys)
    attention masks stay small at a 1 ms hop."""
    hop, step = float(np.median(np.diff(queries))), 0.05  # both models: 50 ms groups
    return max(1, min(40, round(200 * hop / step)))


def offline(dec, session: Session, queries: np.ndarray) -> np.ndarray:
    times, units, sidx = session_tokens(dec, session)
    # the offline stream starts at t = 0, where the engine starts (the first spike)
    return decode_causal(
        dec,
        times,
        units,
        sidx,
        "hand_vel",
        queries,
        burn_in=queries[0],
        chunk_groups=chunk(queries),
    )


def assert_close(got: np.ndarray, ref: np.ndarray) -> None:
    assert ref.std() > 0.1  # a non-trivial output
    err = np.abs(got - ref).max()
    assert err <= TOL * ref.std(), f"max error {err:.3g} = {err / ref.std():.3g} of the std"


@pytest.mark.parametrize(
    "backend,hop,n", [("onnx", 0.001, 10_000), ("onnx", 0.01, 2_500), ("torch", 0.01, 300)]
)
def test_causal_matches_offline(setup, backend, hop, n):
    """10,000 consecutive 1 ms steps (and 10 ms steps) equal the offline model."""
    dec, session, _ = setup
    queries = 0.5 + hop * np.arange(n) + 0.0003
    eng = engine(setup, backend=backend)
    assert_close(stream(eng, session, queries), offline(dec, session, queries))
    st = eng.stats()
    assert st.steps == n and st.groups_finished > 0 and sum(st.rejected.values()) == 0
    assert 0 < st.p50_ms <= st.p99_ms <= st.p999_ms <= st.max_ms


@pytest.mark.parametrize("backend,n", [("onnx", 10_000), ("torch", 300)])
def test_window_matches_offline(setup, backend, n):
    """Window mode: cached spike keys, latents recomputed each step == offline windows."""
    dec, session, _ = setup
    queries = 1.0 + 0.001 * np.arange(n) + 0.0003
    times, units, sidx = session_tokens(dec, session)
    ref = decode_window(dec, times, units, sidx, "hand_vel", queries)
    eng = engine(setup, mode="window", backend=backend, max_spikes_per_window=2048)
    assert_close(stream(eng, session, queries), ref)
    assert eng.stats().rejected["overflow"] == 0


def test_decode_session_window_through_the_engine_equals_torch(setup, monkeypatch):
    """``decode_session`` (what ``evaluate`` runs) decodes window mode through the
    engine's ONNX window step (the torch windows are not called): equal to the torch
    windows it replaced."""
    import bci_decoder.decode as decode_module

    dec, session, _ = setup
    span = (4.0, 9.0)
    _, _, ref = decode_session(dec, session, "hand_vel", span, "window", backend="torch")

    def no_torch_windows(*args, **kwargs):
        raise AssertionError("the engine path decoded with torch windows")

    monkeypatch.setattr(decode_module, "decode_window", no_torch_windows)
    _, _, eng = decode_session(dec, session, "hand_vel", span, "window")
    assert_close(eng, ref)


@pytest.mark.parametrize("mode", ["causal", "window"])
def test_exact_after_36000_s_shift(setup, mode):
    """Float64 phases: the same spikes 10 hours later decode to the same outputs."""
    queries = 0.5 + 0.01 * np.arange(1000) + 0.0003
    _, session, _ = setup
    a = stream(engine(setup, mode=mode), session, queries)
    b = stream(engine(setup, mode=mode), session, queries, offset=36_000.0)
    assert np.abs(a - b).max() <= TOL * a.std()


@pytest.mark.parametrize("mode", ["causal", "window"])
def test_primed_steps_equal_plain_steps(setup, mode):
    """The decode loop's priming (push what has arrived 2 ms before the deadline, warm
    the step graph, push the rest at the deadline) leaves every output bit-identical to
    the same pushes without the warm-up runs, across group ends, and changes no counter."""
    dec, session, _ = setup
    queries = 0.5 + 0.01 * np.arange(600) + 0.0003
    t_sp = session.spike_times

    def split_pushes(eng: StreamingEngine, warm: bool) -> np.ndarray:
        out, j = [], 0
        for t in queries:
            k0 = np.searchsorted(t_sp, t - 0.002, side="right")
            k = np.searchsorted(t_sp, t, side="right")
            eng.push(t_sp[j:k0], session.spike_units[j:k0])
            if warm:
                eng.warm()
            eng.push(t_sp[k0:k], session.spike_units[k0:k])
            j = k
            out.append(eng.step(t))
        return (np.array(out) - eng.norm.mean) / eng.norm.std

    eng = engine(setup, mode=mode)
    eng.warm()  # before the first step: nothing to warm, no error
    primed = split_pushes(eng, warm=True)
    np.testing.assert_array_equal(primed, split_pushes(engine(setup, mode=mode), warm=False))
    # a push split in two sums the unit embeddings in another order: float32 rounding
    assert_close(primed, stream(engine(setup, mode=mode), session, queries))
    st = eng.stats()
    assert st.steps == len(queries) and sum(st.rejected.values()) == 0


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_late_spikes_within_the_grace_refinish_their_group(setup, backend):
    """Spikes delivered 4 ms late at a 1 ms hop. With ``late_grace_s`` every late spike
    joins its group, which is finished again at the first step past the grace: from
    then on each step equals an engine whose finished groups got every spike in time
    (its current group holding what had arrived). Without a grace they are dropped as
    ``late`` and the outputs differ."""
    dec, session, _ = setup
    hop, delay, grace, s = 0.001, 0.004, 0.01, 0.05
    queries = 0.5 + hop * np.arange(1500) + 0.0003
    prev_end = (np.ceil(queries / s) - 1) * s  # end of the group before each step's

    def run(eng: StreamingEngine, upto: np.ndarray) -> np.ndarray:
        return stream_upto(eng, session, queries, upto)

    late = engine(setup, backend=backend, late_grace_s=grace)
    got = run(late, queries - delay)
    st = late.stats()
    assert st.rejected["late"] == 0 and st.late_accepted > 30, st
    assert st.spikes == np.searchsorted(session.spike_times, queries[-1] - delay, side="right")
    # the reference: before stepping, each group before the step's is complete
    ref = run(engine(setup, backend=backend), np.maximum(queries - delay, prev_end))
    settled = queries > prev_end + grace
    assert settled.sum() > 500 and (~settled).sum() > 200
    assert_close(got[settled], ref[settled])
    assert np.abs(got[~settled] - ref[~settled]).max() > 1e-4  # the grace's steps differ
    # without a grace the late spikes are lost
    dropped = engine(setup, backend=backend)
    lost = run(dropped, queries - delay)
    assert dropped.stats().rejected["late"] == st.late_accepted
    assert np.abs(lost[settled] - ref[settled]).max() > 1e-3


def test_offline_decode_equals_streaming(setup):
    """``decode`` (the chunk graph: many groups' queries and finishes in one run) ==
    push + step."""
    dec, session, _ = setup
    queries = 0.5 + 0.01 * np.arange(2_000) + 0.0003
    ref = offline(dec, session, queries)
    eng = engine(setup)
    got = eng.decode(session.spike_times, session.spike_units, queries, normalised=True)
    assert_close(got, ref)
    z = decode_stream(dec, session, "hand_vel", queries, burn_in=queries[0])  # evaluate's path
    assert_close(z, ref)
    q2 = queries[::7] + 3.0  # a later start with the default 3 s burn-in
    times, units, sidx = session_tokens(dec, session)
    assert_close(
        decode_stream(dec, session, "hand_vel", q2),
        decode_causal(dec, times, units, sidx, "hand_vel", q2),
    )


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_chunked_decode_equals_streaming_at_any_chunk_size(setup, backend):
    """The chunk graph (G groups per run, the last Wb groups' rows carried to the next
    run) gives streaming's outputs and counters whatever G is, with irregular queries
    (groups with none, groups with several, one at a group's end), and leaves the
    streaming state: pushing and stepping on after ``decode`` continues one pass (its
    pushes of the last group's later spikes are refused as late: decode took them)."""
    dec, session, onnx_path = setup
    rng = np.random.default_rng(3)
    queries = np.sort(np.concatenate([rng.uniform(0.4, 9.0, 300), [2.0, 2.05, 4.5]]))
    queries = queries[(queries < 3.0) | (queries > 3.6)]  # 12 groups without a query
    kw = {} if backend == "onnx" else {"backend": "torch", "onnx_path": None}
    ref_eng = engine(setup, **kw)
    ref = stream(ref_eng, session, queries)
    ref_stats = ref_eng.stats()
    t, u = session.spike_times, session.spike_units
    j = int(np.searchsorted(t, queries[-1], side="right"))
    tq = float(t[j + 99])
    ref_eng.push(t[j : j + 100], u[j : j + 100])
    ref_next = ref_eng.step(tq)
    for chunk_spikes in (1, 700, 2**15):  # one group a run, ~3, the whole recording
        eng = engine(setup, **kw)
        eng.CHUNK_SPIKES = chunk_spikes
        got = eng.decode(t, u, queries, normalised=True)
        assert_close(got, ref)
        a, b = eng.stats(), ref_stats
        # decode also finishes the last query's group, with all of its spikes
        assert (a.steps, a.groups_finished) == (b.steps, b.groups_finished + 1)
        eng.push(t[j : j + 100], u[j : j + 100])
        assert np.abs(eng.step(tq) - ref_next).max() <= TOL * ref_eng.norm.std.max()


def test_chunked_decode_with_silence_and_overflow_equals_streaming(setup):
    """Chunks with no spikes at all (a silent second) and groups over the buffer's
    capacity (the first ``capacity`` spikes kept, the rest counted as overflow) decode
    as streaming does."""
    _, session, _ = setup
    t, u = session.spike_times, session.spike_units
    keep = (t < 3.0) | (t > 4.0)
    t, u = t[keep], u[keep]
    quiet = dataclasses.replace(session, spike_times=t, spike_units=u)
    queries = 0.5 + 0.02 * np.arange(400) + 0.0007
    ref_eng = engine(setup, max_spikes_per_group=12)
    ref = stream(ref_eng, quiet, queries)
    eng = engine(setup, max_spikes_per_group=12)
    eng.CHUNK_SPIKES = 40  # a few groups a run: some runs see only the silence
    got = eng.decode(t, u, queries, normalised=True)
    assert_close(got, ref)
    a, b = eng.stats(), ref_eng.stats()
    assert b.rejected["overflow"] > 0
    assert a.steps == b.steps and a.rejected["overflow"] >= b.rejected["overflow"]


def test_two_worker_decode_equals_one(setup):
    """``decode(workers=2)`` (a twin engine on the first half in a thread, this one on
    the second from its warm-up on) equals one pass: outputs, counters and end state."""
    _, session, _ = setup
    queries = 0.5 + 0.01 * np.arange(2_500) + 0.0003
    one, two = one_and_two_workers(setup, queries, "causal")
    t, u = session.spike_times, session.spike_units
    # the end state is one pass's: streaming on from the last query agrees
    j = np.searchsorted(t, queries[-1], side="right")
    for eng in (one, two):
        eng.push(t[j : j + 200], u[j : j + 200])
    tq = float(t[j + 199])
    assert np.abs(one.step(tq) - two.step(tq)).max() <= 1e-5 * one.norm.std.max()


def test_two_worker_window_decode_equals_one(setup):
    """Window mode's split (each engine half of the queries) equals one pass."""
    one_and_two_workers(setup, 1.0 + 0.013 * np.arange(600), "window")


def one_and_two_workers(setup, queries: np.ndarray, mode: str):
    """Two engines decode ``queries``, one worker and two: their outputs and counters
    agree, and the second did split. Returns both engines."""
    _, session, _ = setup
    one, two = engine(setup, mode=mode), engine(setup, mode=mode)
    two.MIN_SPLIT_GROUPS = 0  # the 30 s session is shorter than a split is worth
    t, u = session.spike_times, session.spike_units
    a = one.decode(t, u, queries, normalised=True, workers=1)
    b = two.decode(t, u, queries, normalised=True, workers=2)
    assert getattr(two, "_twin", None) is not None  # it did split
    assert np.abs(a - b).max() <= 1e-5 * a.std()
    sa, sb = one.stats(), two.stats()
    assert (sa.steps, sa.spikes, sa.groups_finished, sa.rejected) == (
        sb.steps,
        sb.spikes,
        sb.groups_finished,
        sb.rejected,
    )
    return one, two


def test_set_units_swaps_tables_mid_stream(setup):
    """Spikes pushed after ``set_units`` use the new table, earlier ones keep theirs:
    equal to offline decoding where the spikes after the swap have new vocabulary rows
    holding the new embeddings."""
    dec, session, _ = setup
    sid = session.session_id
    queries = 0.5 + 0.002 * np.arange(3_000) + 0.0003
    t_swap = queries[1_234]  # mid-group, mid-stream
    # the swapped-in tables: the same units with perturbed embeddings
    new = dec.clone()
    vocab = dec.units.session_units(sid, session.unit_ids)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        noise = torch.randn(len(vocab), dec.config.dim, generator=gen) * 0.5
        new.model.unit_emb.weight[torch.from_numpy(vocab)] += noise
    tables = UnitTables.from_decoder(new, sid, "hand_vel")

    eng = engine(setup)
    before = eng.tables.version
    t_sp, out, j = session.spike_times, [], 0
    for t in queries:
        if t == t_swap:
            eng.set_units(tables)  # what the calibration thread does
        k = np.searchsorted(t_sp, t, side="right")
        eng.push(t_sp[j:k], session.spike_units[j:k])
        j = k
        out.append(eng.step(t))
    assert eng.stats().tables_version == tables.version != before
    got = (np.array(out) - eng.norm.mean) / eng.norm.std

    # offline reference: one model whose vocabulary holds both tables' rows
    both = dec.clone()
    m = both.model
    with torch.no_grad():
        m.extend_units(len(vocab))
        m.unit_emb.weight[-len(vocab) :] = new.model.unit_emb.weight[torch.from_numpy(vocab)]
    times, units, sidx = session_tokens(dec, session)
    after = times > queries[1_233]  # pushed after the swap
    units = np.where(after, len(dec.units) + session.spike_units, units)
    ref = decode_causal(
        both, times, units, sidx, "hand_vel", queries, burn_in=queries[0], chunk_groups=10
    )
    assert_close(got, ref)
    # and the swap changed the outputs (it is not a no-op)
    assert np.abs(got[1_300:] - offline(dec, session, queries)[1_300:]).max() > 1e-2


def test_bad_spikes_are_counted_not_fatal(setup):
    eng = engine(setup)
    assert eng.push(np.array([1.0, 1.01]), np.array([0, 1])) == 2
    # late, NaN, unknown unit, and one good
    assert eng.push(np.array([0.5, np.nan, 1.02, 1.03]), np.array([0, 0, 999, 1])) == 1
    eng.step(1.2)  # finishes the group of 1.03
    assert eng.push(np.array([1.04]), np.array([2])) == 0  # its group is finished
    rej = eng.stats().rejected
    assert (rej["out_of_order"], rej["non_finite"], rej["unknown_unit"], rej["late"]) == (
        1,
        1,
        1,
        1,
    )
    assert np.all(np.isfinite(eng.step(1.25)))
    with pytest.raises(ValueError, match="before the current group"):
        eng.step(1.0)


def test_overflow_is_counted(setup):
    eng = engine(setup, max_spikes_per_group=8)
    t = 1.001 + 0.001 * np.arange(20)  # 20 spikes in one 50 ms group
    assert eng.push(t, np.zeros(20, np.int64)) == 8
    assert eng.stats().rejected["overflow"] == 12
    assert np.all(np.isfinite(eng.step(1.03)))


def test_row_buckets_bound_the_shapes_and_change_nothing(setup):
    """The group buffer is bound at a rung of ``row_buckets`` (masked rows past the
    count), so ONNX Runtime sees a bounded set of shapes (its memory-pattern cache,
    one entry per shape, grew the daemon without end under load) and decodes the same."""
    b = row_buckets(16384)
    counts = np.arange(16385)
    assert (b >= counts).all() and (np.diff(b) >= 0).all() and b[-1] == 16384
    assert (b[:33] == counts[:33]).all() and len(np.unique(b)) <= 100
    assert (b[33:] <= np.ceil(counts[33:] * 1.125 / 8) * 8 + 8).all()  # padding <= 12.5%+8
    dec, session, _ = setup
    queries = 0.5 + 0.01 * np.arange(1500) + 0.0003
    bucketed, exact = engine(setup), engine(setup)
    exact._rows = np.arange(exact.capacity + 1)
    bound: dict[str, list[int]] = {"bucketed": [], "exact": []}
    for name, eng in (("bucketed", bucketed), ("exact", exact)):
        runner = eng._runners["causal_step"]
        run_rows = runner.run_rows
        runner.run_rows = lambda rows, *a, f=run_rows, seen=bound[name]: (seen.append(rows),
                                                                          f(rows, *a))  # fmt: skip
    got, ref = stream(bucketed, session, queries), stream(exact, session, queries)
    rungs = set(row_buckets(bucketed.capacity).tolist())
    assert set(bound["bucketed"]) <= rungs  # every step bound at a rung
    assert set(bound["exact"]) - rungs  # and the exact counts were not all rungs
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * ref.std())
    assert bucketed.runner.session.get_session_options().enable_mem_pattern


def test_numpy_tables_equal_the_torch_projections(setup):
    """The package's numpy keys/values and decoder query (what the daemon computes
    without torch) equal the model's own torch projections."""
    dec, session, _ = setup
    sid = session.session_id
    tab = UnitTables.from_decoder(dec, sid, "hand_vel")
    m = dec.model
    with torch.no_grad():
        rows = torch.from_numpy(dec.units.session_units(sid, list(tab.unit_names)))
        k, v = m.enc_attn.keys_values(m.unit_emb.weight[rows])
        q = (
            m.session_emb.weight[dec.sessions[sid]]
            + m.output_emb.weight[dec.output_index("hand_vel")]
        )
        dq = decoder_query(m, q)
    np.testing.assert_allclose(tab.k, k.numpy(), atol=2e-6)
    np.testing.assert_allclose(tab.v, v.numpy(), atol=2e-6)
    np.testing.assert_allclose(tab.dec_q, dq.numpy(), atol=2e-6)


def test_package_on_disk_decodes_like_the_decoder_and_stale_is_refused(setup, tmp_path):
    """An engine on the written package (no torch objects) gives the decoder's outputs;
    weights changed after the export are refused with the export command."""
    dec, session, _ = setup
    folder = tmp_path / "m"
    dec.save(folder)
    with pytest.raises(PackageError, match="bci-decoder export"):  # tables, no graphs
        StreamingEngine(ModelPackage.load(folder), session.session_id, "hand_vel")
    export_package(dec, folder, capacity=512, window_capacity=2048)
    pkg = ModelPackage.load(folder)
    queries = 0.5 + 0.01 * np.arange(300) + 0.0003
    kw = {"max_spikes_per_group": 512}
    got = stream(StreamingEngine(pkg, session.session_id, "hand_vel", **kw), session, queries)
    assert_close(got, stream(engine(setup), session, queries))
    # retrained weights saved over it: the tables follow, the graphs are stale
    other = dec.clone()
    with torch.no_grad():
        other.model.dec_attn.to_q.weight.mul_(1.1)
    other.save(folder)
    with pytest.raises(PackageError, match="re-export"):
        StreamingEngine(ModelPackage.load(folder), session.session_id, "hand_vel", **kw)
    # weights replaced behind the package's back: stale at load
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes() + b" ")
    with pytest.raises(PackageError, match="stale"):
        ModelPackage.load(folder)


def test_choose_providers_prefers_cuda(monkeypatch):
    """CUDA first when onnxruntime lists it and the driver reports a device; else CPU."""
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnx_runner, "cuda_device_count", lambda: 1)
    assert onnx_runner.choose_providers(both) == both
    assert onnx_runner.choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: both)
    assert onnx_runner.choose_providers()[0] == "CUDAExecutionProvider"
    # listed by a GPU build, but no device: CPU, without provider errors on start
    monkeypatch.setattr(onnx_runner, "cuda_device_count", lambda: 0)
    assert onnx_runner.choose_providers(both) == ["CPUExecutionProvider"]


def test_real_session_parity(real_data):
    """The shipped model on a real recording: 10,000 steps at 1 ms and at 10 ms, causal
    mode, and window mode on a 1 ms stretch, equal the offline torch model (its linear
    head: the session's recurrent readout is held to offline decoding below)."""
    from bci_decoder.data.nwb import read_nwb
    from bci_decoder.train.checkpoint import Decoder

    dec = Decoder.load("models/poyo-mp-small")
    session = read_nwb(real_data / "chewie_20131003_co.nwb")
    sid, out = session.session_id, "hand_vel"
    with_readout = UnitTables.from_decoder(dec, sid, out, list(session.unit_ids))
    assert with_readout.readout is not None  # the shipped model has one for this session
    tables = dataclasses.replace(with_readout, readout=None)
    times, units, sidx = session_tokens(dec, session)
    for hop in (0.001, 0.01):
        queries = 20.0 + hop * np.arange(10_000) + 0.0004
        ref = decode_causal(dec, times, units, sidx, out, queries, chunk_groups=chunk(queries))
        eng = StreamingEngine(dec, sid, out, backend="onnx")
        eng.set_units(tables)
        eng.reset(start=stream_start(queries[0], 3.0, dec.config.latent_step))
        j = int(np.searchsorted(times, queries[0] - 3.0 - 0.1))
        got = []
        for t in queries:
            k = np.searchsorted(times, t, side="right")
            eng.push(times[j:k], session.spike_units[j:k])
            j = k
            got.append(eng.step(t))
        got = (np.array(got) - eng.norm.mean) / eng.norm.std
        assert eng.stats().rejected["overflow"] == 0
        assert_close(got, ref)
    # with the session's readout: streaming == offline decoding (chunk graph + scan)
    queries = 20.0 + 0.01 * np.arange(3_000) + 0.0004
    start = stream_start(queries[0], 3.0, dec.config.latent_step)
    eng = StreamingEngine(dec, sid, out, backend="onnx")
    eng.set_units(with_readout)
    ref = eng.decode(times, session.spike_units, queries, start=start, normalised=True)
    eng.reset(start=start)
    j, got = int(np.searchsorted(times, queries[0] - 3.0 - 0.1)), []
    for t in queries:
        k = np.searchsorted(times, t, side="right")
        eng.push(times[j:k], session.spike_units[j:k])
        j = k
        got.append(eng.step(t))
    assert_close((np.array(got) - eng.norm.mean) / eng.norm.std, ref)
    queries = 40.0 + 0.001 * np.arange(1_000) + 0.0004
    ref = decode_window(dec, times, units, sidx, out, queries)
    eng = StreamingEngine(dec, sid, out, mode="window", backend="onnx")
    eng.set_units(tables)
    assert_close(eng.decode(times, session.spike_units, queries, normalised=True), ref)


def test_real_session_counts_readout(real_data):
    """A shipped readout that reads spike counts (millerlab's, chosen on its validation
    tail): streaming step by step equals offline decoding, with the stream's units in the
    session's order and reversed."""
    from bci_decoder.data.nwb import read_nwb
    from bci_decoder.train.checkpoint import Decoder

    dec = Decoder.load("models/poyo-mp-small")
    session = read_nwb(real_data / "millerlab_s1_area2.nwb")
    sid, out = session.session_id, session.default_output()
    names = list(session.unit_ids)
    tables = UnitTables.from_decoder(dec, sid, out, names)
    assert tables.readout is not None and tables.readout.units == len(names)
    queries = 30.0 + 0.01 * np.arange(3_000) + 0.0004
    start = stream_start(queries[0], 3.0, dec.config.latent_step)
    eng = StreamingEngine(dec, sid, out, backend="onnx")
    eng.set_units(tables)
    ref = eng.decode(session.spike_times, session.spike_units, queries, start=start,
                     normalised=True)  # fmt: skip
    flipped = UnitTables.from_decoder(dec, sid, out, names[::-1])
    reversed_units = dataclasses.replace(session, spike_units=len(names) - 1 - session.spike_units)
    for tab, stream in ((tables, session), (flipped, reversed_units)):
        eng = StreamingEngine(dec, sid, out, backend="onnx")
        eng.set_units(tab)
        eng.reset(start=start)
        assert_close(stream_upto(eng, stream, queries, queries, after=queries[0] - 3.1), ref)
