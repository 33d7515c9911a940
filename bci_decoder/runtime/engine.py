"""StreamingEngine: decode one stream step by step, exactly as the offline model does.

Per spike, on arrival (``push``, vectorised over the chunk): a lookup of its unit's
precomputed encoder key/value (``UnitTables``) and one rotation with float64-exact
phases (``model.phases``), into a buffer of the current group's spikes (causal) or a
window store (window).

Causal mode, per ``step(t)``: one run of the step graph (``CausalKVStep``, B = 1): the
partial group's latents (its spikes so far, latent time t) go through the layers
attending to a per-layer key/value cache of finished groups, then the readout. When t
crosses into a new group, the finished group is run once at its end time by the finish
graph, whose per-layer keys (rotated at the group's time) and values go into a ring of
the last ``context - step`` seconds of groups. Nothing already computed is recomputed.

Late spikes (``late_grace_s``): a spike stamped inside the group just finished, arriving
after the step that finished it (LSL delivers it late: at 1 kHz 22% of spikes came after
their group's first step past its end), joins that group while no step has gone past its
end by more than the grace. At the first step past it, the group is finished again with
all its spikes (one more finish run, only for groups that got late spikes) and its cache
rows replaced, so every later step sees what it would have had the spikes come in time;
steps within the grace saw the group as it was. Later than the grace, or for an older
group, a spike is counted ``late`` and dropped, as before.

Session readout (causal mode, where the tables carry one: ``model.session_readout``): the
finish run also reads out the group at its end time, and a GRU state advances on those
features once per finished group (a re-finish after late spikes redoes that step from
the state before it); each step's output is the readout's head on one more GRU cell over
the step's own features instead of the linear head. A readout that reads spike counts
gets each unit's count of the group's buffered spikes (at the finish: all of them; at a
step: those up to t), in the tables' unit order. New tables with another readout
restart the state from zero at the swap.

Window mode, per step: the window's cached spike keys, latents recomputed (reference
accuracy, the published POYO); it reads the linear heads only.

Offline, ``decode`` (``runtime/offline.py``) runs a whole recording through the same
engine state and graphs, a group at a time.

Threads: ``push``, ``step``, ``reset`` and ``decode`` belong to one thread (the decode
loop). ``set_units`` may be called from any thread: it stores a reference to an
immutable ``UnitTables``, which the next ``push`` / ``step`` picks up; spikes already
pushed keep the keys they were given.

What it runs: a model package (``model.package``: the exported graphs, tables and
dimensions; the daemon's case, no torch) or, for training, evaluation and tests, a torch
``Decoder``, whose package and graphs are then built in memory (``export``).
Backends: ``onnx`` (ONNX Runtime, every array bound once by pointer) or ``torch`` (the
eager reference, a ``Decoder`` only). On a GPU (``onnx_runner.choose_providers`` picks
CUDA when a device is present) the same engine keeps device copies of its arrays and
uploads what changed before each run; ``cuda_graph=True`` keeps the causal graphs'
shapes fixed (the group buffer at full capacity, unused rows masked by ``spike_bias``)
so ONNX Runtime replays each step as one captured CUDA graph. See ``onnx_runner``.

Measured (2-core EPYC VM, one thread): benchmarks/results/engine_latency_*.json and
offline_throughput_1h.json. Where a causal push + step goes (shipped size, 100 units,
10 ms hop, ~20 spikes a push, load average 5-6, median): ~300 µs in ONNX Runtime, ~120 µs
in Python and numpy (push ~90: the order check, two table lookups, the rotation, the
embedding sum; step ~25). ONNX Runtime dispatches a node in ~1.15 µs here (a chain of
150 Adds on 4x64 floats: 176 µs; one: 4 µs) and the step graph has 236 nodes, 135 after
its own fusions, so dispatch alone is ~150 µs: a step graph of fewer nodes
(``model/step.py``) is the lever left, not session options or binding (both already
minimal: fixed shapes on CPU, with memory patterns, measured 652 µs against 614).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bci_decoder.model import layout
from bci_decoder.model.normalizer import Normalizer
from bci_decoder.model.package import ModelPackage, PackageError
from bci_decoder.model.phases import PhaseScratch, RowRotation, angles
from bci_decoder.runtime.offline import OfflineDecoding
from bci_decoder.runtime.unit_tables import UnitTables
from bci_decoder.tokenizer import grid_index
from bci_decoder.tokenizer import grid_index_scalar as _grid_index

REJECT_REASONS = ("non_finite", "unknown_unit", "out_of_order", "late", "overflow")
GRAPH_HASH_KEY = "bci_decoder.graph_hash"  # written by export.onnx_export._stamp

__all__ = ["StreamingEngine", "EngineStats", "UnitTables", "REJECT_REASONS"]


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's counters; latency over the last ``window`` steps."""

    steps: int
    groups_finished: int
    spikes: int  # accepted
    late_accepted: int  # of which: arrived after their group was finished, within the grace
    rejected: dict[str, int]  # by reason: REJECT_REASONS
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    window: int
    tables_version: int


def row_buckets(capacity: int, exact: int = 32, ratio: float = 1.125) -> np.ndarray:
    """(capacity + 1,) the rows of the group buffer a step binds for each spike count:
    the count itself up to ``exact``, then the next rung of a ladder growing by ``ratio``
    (multiples of 8), at most ``capacity``. The rows past the count are masked (their
    ``spike_bias`` is -inf, so they get exactly zero weight), so the result is the same;
    what changes is that ONNX Runtime sees ~90 distinct input shapes instead of one per
    count. It caches a memory pattern per shape and never evicts one: at 100k spikes/s
    with exact counts the daemon grew by ~1.5 MB a minute (benchmarks/load_soak.py)."""
    rungs = list(range(min(exact, capacity) + 1))
    r = float(exact)
    while rungs[-1] < capacity:
        r *= ratio
        rungs.append(min(capacity, int(math.ceil(r / 8.0)) * 8))
    rungs_arr = np.unique(np.asarray(rungs))
    return rungs_arr[np.searchsorted(rungs_arr, np.arange(capacity + 1))]


# ---------------------------------------------------------------------- the engine
class StreamingEngine(OfflineDecoding):
    """Decode one session's stream: ``push`` spikes (float64 times, session-local unit
    indices), then ``step(t)`` returns the behaviour at t (in the behaviour's units).

    ``model``: a ``ModelPackage`` (graphs from its folder) or a torch ``Decoder`` (graphs
    from ``onnx_path``, a folder ``export`` wrote, or built in memory).
    ``mode="causal"``: cached latent groups (the fast path). ``mode="window"``: a store
    of the window's spike keys, latents recomputed every step.
    ``backend="onnx"`` runs the exported graphs; ``backend="torch"`` the eager modules
    (a ``Decoder`` only). ``cuda_graph``: fixed shapes for CUDA graph capture (GPU only).
    ``tables``: start with these unit tables instead of the package's for ``session_id``.
    """

    def __init__(
        self,
        model,
        session_id: str,
        output: str | None = None,
        *,
        mode: str = "causal",
        backend: str = "onnx",
        max_spikes_per_group: int = layout.GROUP_SPIKES,
        max_spikes_per_window: int = layout.WINDOW_SPIKES,
        onnx_path: str | Path | None = None,
        intra_op_threads: int = 1,
        providers: list[str] | None = None,
        cuda_graph: bool = False,
        latency_window: int = 16384,
        tables: UnitTables | None = None,
        late_grace_s: float = 0.0,
    ) -> None:
        if mode not in ("causal", "window"):
            raise ValueError(f"mode must be 'causal' or 'window', not {mode!r}")
        if backend not in ("torch", "onnx"):
            raise ValueError(f"backend must be 'torch' or 'onnx', not {backend!r}")
        self.mode, self.backend = mode, backend
        pkg = model if isinstance(model, ModelPackage) else None
        if pkg is None:  # a torch Decoder: its package (and graphs) in memory
            from bci_decoder.export.onnx_export import in_memory_package
            from bci_decoder.model.decoder import package_of

            if backend == "onnx" and onnx_path is None:
                # graphs built once per model (their spike axes are dynamic; the buffer
                # sizes are this engine's own)
                pkg = in_memory_package(model)
            else:
                pkg = package_of(model)
                pkg.graphs_dir = Path(onnx_path) if onnx_path is not None else None
        elif backend == "torch":
            raise ValueError("backend 'torch' needs the torch Decoder, not a model package")
        self.package = pkg
        d = pkg.dims
        self.step_s, self.context = float(d["latent_step"]), float(d["context"])
        self.n, self.depth, self.dim, self.Dh = d["n"], d["depth"], d["D"], d["Dh"]
        self.half, self.Hc, self.Hs = d["Dh"] // 2, d["Hc"], d["Hs"]
        self.W = d["W"]
        self.L = d["L"]  # cache rows: the last W-1 finished groups
        self.K = d["K"]
        self.periods = pkg.periods  # (F,) float64
        self.F = self.periods.size
        self.rotate_values = d["rotate_values"]
        self.capacity, self.ring_capacity = max_spikes_per_group, max_spikes_per_window
        if not late_grace_s >= 0:
            raise ValueError(f"late_grace_s must be >= 0 seconds, not {late_grace_s}")
        # a group of a one-group context is never read once finished: nothing to redo
        self.late_grace = float(late_grace_s) if d["W"] > 1 else 0.0
        self.P = d["P"]
        self._tables = tables if tables is not None else UnitTables.build(pkg, session_id, output)
        self._intra_op_threads, self._providers = intra_op_threads, providers
        self._bound_tables: UnitTables | None = None

        names = ["causal_step", "causal_finish"] if mode == "causal" else ["window_step"]
        if backend == "torch":
            from bci_decoder.export.torch_runner import torch_runner

            self._make_runner = lambda name: torch_runner(model, name)
        else:
            from bci_decoder.runtime.onnx_runner import OnnxStepRunner

            def make(name: str):
                graph = pkg.graph(name)
                runner = OnnxStepRunner(
                    str(graph) if isinstance(graph, Path) else graph,
                    intra_op_threads,
                    providers,
                    # fixed shapes only in the streaming causal graphs
                    cuda_graph and name in ("causal_step", "causal_finish"),
                    # their row counts are bucketed (row_buckets): a bounded set of shapes
                    mem_pattern=name in ("causal_step", "causal_finish"),
                )
                meta = runner.session.get_modelmeta().custom_metadata_map
                if meta.get(GRAPH_HASH_KEY) != pkg.graph_hash:
                    raise PackageError(
                        f"the step graph {name} in {pkg.graphs_dir} was exported from other "
                        f"weights (graph hash {meta.get(GRAPH_HASH_KEY)}, the tables' is "
                        f"{pkg.graph_hash}): re-export (bci-decoder export --model "
                        f"{pkg.graphs_dir})"
                    )
                return runner

            self._make_runner = make
        self._runners = {name: self._make_runner(name) for name in names}
        self.runner = self._runners[names[0]]  # the per-step runner (providers, session)
        self.fixed_shapes = cuda_graph and getattr(self.runner, "device", "cpu") == "cuda"
        self._lat = np.full(latency_window, np.nan)
        self._lat_i = 0
        self._steps = self._spikes = self._groups_finished = self._late_accepted = 0
        self._rejected = dict.fromkeys(REJECT_REASONS, 0)
        self._allocate()
        self.reset()

    # ------------------------------------------------------------------ properties
    @property
    def tables(self) -> UnitTables:
        return self._tables

    @property
    def norm(self) -> Normalizer:
        return self._tables.norm

    @property
    def output(self) -> str:
        return self._tables.output

    @property
    def unit_names(self) -> list[str]:
        return list(self._tables.unit_names)

    def providers(self) -> list[str]:
        return self.runner.providers()

    # ------------------------------------------------------------------ set-up
    def _allocate(self) -> None:
        """Preallocate every array the graphs read or write; bind them once."""
        f32 = np.float32
        Hc, Hs, Dh, D, n, L = self.Hc, self.Hs, self.Dh, self.dim, self.n, self.L
        self._phases = PhaseScratch(self.periods, self.Dh)  # per-step phases, no allocation
        self._rot = RowRotation(self.periods, self.Dh)  # per-push spike rotations
        if self.mode == "causal":
            cap = self.capacity
            self._k = np.zeros((cap, Hc, Dh), f32)  # the current group's rotated keys
            self._v = np.zeros((cap, Hc, Dh), f32)
            self._units = np.zeros(cap, np.intp)  # and units (a readout's spike counts)
            self._bias = np.full((1, cap + 1), -np.inf, f32)  # [<null> | spikes] visible
            self._bias[0, 0] = 0.0
            self._count_feat = np.zeros((1, D + 1), f32)  # [unit-embedding sum | elapsed]
            self._phase = self._unit_phase((1,))  # (1, Dh) [cos | sin] of the step time
            self._dt = np.zeros((1, L + n), f32)  # t - key time; own rows 0
            self._dt_rows = self._dt[0, :L]  # the cache rows' time differences (a view)
            self._cache_k = np.zeros((self.depth, Hs, L, Dh), f32)  # rotated at their time
            self._cache_v = np.zeros((self.depth, Hs, L, Dh), f32)
            self._dec_k = np.zeros((Hc, L, Dh), f32)
            self._dec_v = np.zeros((Hc, L, Dh), f32)
            self._cache_time = np.full(L, -np.inf)  # float64 group times; -inf: empty row
            self._pred = np.zeros((1, self.P + D), f32)  # [heads | their features]
            self._fin_pred = np.zeros((1, self.P + D), f32)  # the same at a group's end
            # the session readout's state: after the finished groups, and before the
            # last one (a late-spike re-finish recomputes from there)
            self._h = self._h_before_last = np.zeros(0, f32)
            self._h_owner = None  # the readout the state belongs to
            self._readout_out = np.zeros(self.P, f32)  # what a step with a readout returns
            # the last finished group, kept for late spikes (late_grace_s): its spikes,
            # their embedding sum, and the ring rows its finish overwrote
            self._last_k = np.zeros((cap, Hc, Dh), f32)
            self._last_v = np.zeros((cap, Hc, Dh), f32)
            self._last_units = np.zeros(cap, np.intp)
            self._last_feat = np.zeros(D, f32)
            self._evicted = {
                "k": np.zeros((self.depth, Hs, n, Dh), f32),
                "v": np.zeros((self.depth, Hs, n, Dh), f32),
                "dk": np.zeros((Hc, n, Dh), f32),
                "dv": np.zeros((Hc, n, Dh), f32),
                "time": np.full(n, -np.inf),
            }
            self._new = {
                "new_k": np.zeros((self.depth * Hs, n, Dh), f32),
                "new_v": np.zeros((self.depth * Hs, n, Dh), f32),
                "new_dk": np.zeros((Hc, n, Dh), f32),
                "new_dv": np.zeros((Hc, n, Dh), f32),
            }
            persistent = {
                "count_feat": self._count_feat,
                "phase": self._phase,
                "dt": self._dt,
                "dec_dt": self._dt,  # one query: the readout sees what its rows see
                "dec_k": self._dec_k,
                "dec_v": self._dec_v,
            }
            for i in range(self.depth):
                persistent[f"cache_k{i}"] = self._cache_k[i]
                persistent[f"cache_v{i}"] = self._cache_v[i]
            if self.fixed_shapes:
                persistent |= {"spike_k": self._k, "spike_v": self._v, "spike_bias": self._bias}
            self._persistent = persistent
            self._runners["causal_step"].bind(persistent, {"prediction": self._pred})
            self._runners["causal_finish"].bind(
                persistent, self._new | {"prediction": self._fin_pred}
            )
            # the group's spikes: prefixes of fixed buffers, bound by row count
            for r in self._runners.values():
                r.bind_prefix("spike_k", self._k)
                r.bind_prefix("spike_v", self._v)
                r.bind_prefix("spike_bias", self._bias)
            self._spike_rows = {  # name -> (shape, axis, offset): axis = count + offset
                "spike_k": ((0, Hc, Dh), 0, 0),
                "spike_v": ((0, Hc, Dh), 0, 0),
                "spike_bias": ((1, 1), 1, 1),  # [<null> | spikes]
            }
            for r in self._runners.values():
                if hasattr(r, "set_rows"):
                    r.set_rows(self._spike_rows)
            self._dirty = set(persistent)
            self._rows = row_buckets(cap)  # spike count -> rows bound (masked past the count)
        else:
            cap2 = 2 * self.ring_capacity  # room to append between compactions
            self._wk = np.zeros((cap2, Hc, Dh), f32)
            self._wv = np.zeros((cap2, Hc, Dh), f32)
            self._wt = np.zeros(cap2)  # float64 spike times, sorted
            self._wcs = np.zeros((cap2 + 1, D))  # float64 prefix sums of unit embeddings
            K, s = self.K, self.step_s
            self._kk = np.arange(1, K + 1, dtype=np.float64)
            self._k_edges = np.arange(K + 1)
            self._group_sum = np.zeros((K, D), f32)
            self._lat_phase = self._unit_phase((K,))
            self._lat_phase64 = np.zeros((K, self.F))
            self._dec_phase = self._unit_phase(())
            lt = np.repeat(s * self._kk, n)  # latent times relative to t - W
            self._self_dt = np.abs(lt[:, None] - lt[None, :]).astype(f32)
            self._dec_dt = np.abs(self.context - lt).astype(f32)  # t - latent time
            self._wpred = np.zeros(self.P + D, f32)  # [heads | their features]
            persistent = {
                "group_sum": self._group_sum,
                "lat_phase": self._lat_phase,
                "dec_phase": self._dec_phase,
                "self_dt": self._self_dt,
                "dec_dt": self._dec_dt,
            }
            self._persistent = persistent
            self._runners["window_step"].bind(persistent, {"prediction": self._wpred})
            self._dirty = set(persistent)

    def _unit_phase(self, shape: tuple[int, ...]) -> np.ndarray:
        """(*shape, Dh) [cos | sin] filled with angle 0 (the unrotated channel pairs)."""
        a = np.zeros((*shape, self.Dh), np.float32)
        a[..., : self.half] = 1.0
        return a

    def _bind_tables(self, tab: UnitTables) -> None:
        arrays = {
            "null_k": tab.null_k,
            "null_v": tab.null_v,
            "dec_q": tab.dec_q,
            "query": tab.query,
        }
        for r in self._runners.values():
            r.bind(arrays, {})
        self._bound_tables = tab

    def set_units(self, tables: UnitTables) -> None:
        """Swap in new unit tables (atomic: one reference assignment; any thread). The
        next push/step uses them; spikes already pushed keep their keys."""
        t0 = self._tables
        if tables.k.shape[1:] != t0.k.shape[1:] or tables.emb.shape[1] != t0.emb.shape[1]:
            raise ValueError(
                f"tables of shape {tables.k.shape}/{tables.emb.shape} do not fit this model "
                f"({t0.k.shape[1:]}, dim {t0.emb.shape[1]})"
            )
        self._tables = tables

    def set_session(self, session_id: str, output: str | None = None) -> None:
        """Decode another known session (or output): new tables from the package."""
        self.set_units(UnitTables.build(self.package, session_id, output))

    def reset(self, start: float | None = None) -> None:
        """Forget the stream (spikes, cached groups); counters are kept. With ``start``,
        decoding begins with the group that owns ``start``; otherwise with the group of
        the first spike or step."""
        self._group = None if start is None else _grid_index(float(start), self.step_s)
        self._last_time = -np.inf
        self._last_step = -np.inf
        if self.mode == "causal":
            self._count = 0
            self._bias[0, 1:] = -np.inf
            self._count_feat[:] = 0.0
            self._cache_k[:] = 0.0
            self._cache_v[:] = 0.0
            self._dec_k[:] = 0.0
            self._dec_v[:] = 0.0
            self._cache_time[:] = -np.inf
            self._slot = 0
            self._last_group: int | None = None  # open to late spikes (late_grace_s)
            self._last_count = 0
            self._late_pending = False  # late spikes joined it: finish it again
            self._reset_readout(self._tables)
        else:
            self._w_end = 0
            self._wcs[0] = 0.0
        self._dirty |= set(self._persistent)

    # ------------------------------------------------------------------ spikes
    def _accept(
        self, times: np.ndarray, units: np.ndarray, tab: UnitTables
    ) -> tuple[np.ndarray, np.ndarray]:
        """Valid spikes in time order; the rest counted by reason, never silently."""
        t = np.asarray(times, dtype=np.float64).reshape(-1)
        u = np.asarray(units).reshape(-1)
        if t.size != u.size:
            raise ValueError(f"{t.size} spike times but {u.size} unit indices")
        if t.size == 0:
            return t, u.astype(np.intp)
        # the usual chunk, checked in few calls: finite first and last times and
        # non-decreasing differences (a NaN fails the comparison) mean all are finite
        if (
            t[0] >= self._last_time
            and math.isfinite(t[0])
            and math.isfinite(t[-1])
            and (t.size == 1 or (t[1:] >= t[:-1]).all())  # not np.diff: 13 µs, this 3
            and u.min() >= 0
            and u.max() < tab.num_units
        ):
            self._last_time = float(t[-1])
            return t, u.astype(np.intp, copy=False)
        finite = np.isfinite(t)
        known = (u >= 0) & (u < tab.num_units)
        if not (finite.all() and known.all()):
            self._rejected["non_finite"] += int((~finite).sum())
            self._rejected["unknown_unit"] += int((finite & ~known).sum())
            t, u = t[finite & known], u[finite & known]
            if t.size == 0:
                return t, u.astype(np.intp)
        if t[0] < self._last_time or not (t[1:] >= t[:-1]).all():
            prior = np.maximum.accumulate(np.concatenate(([self._last_time], t[:-1])))
            ok = t >= prior
            self._rejected["out_of_order"] += int((~ok).sum())
            t, u = t[ok], u[ok]
            if t.size == 0:
                return t, u.astype(np.intp)
        self._last_time = float(t[-1])
        return t, u.astype(np.intp, copy=False)

    def _clip(self, t: np.ndarray, u: np.ndarray, room: int) -> tuple[np.ndarray, np.ndarray]:
        """The spikes that fit in ``room`` buffer rows; the rest count as overflow."""
        if t.size > room:
            self._rejected["overflow"] += t.size - room
            t, u = t[:room], u[:room]
        return t, u

    def _keys_values(
        self, k: np.ndarray, v: np.ndarray, t: np.ndarray, u: np.ndarray, tab: UnitTables
    ) -> None:
        """Rotated spike keys/values written into the buffer rows k, v (S, H, Dh) in place."""
        np.take(tab.k, u, axis=0, out=k)
        np.take(tab.v, u, axis=0, out=v)
        self._rotate(k, t)
        if self.rotate_values:
            self._rotate(v, t)

    def _rotate(self, x: np.ndarray, t: np.ndarray) -> None:
        """Rotate rows x (m, H, Dh) in place at times t (m,) (``phases.rotate_rows``)."""
        self._rot(x, t)

    def push(self, times: np.ndarray, units: np.ndarray) -> int:
        """Add spikes (float64 times, session-local unit indices), in time order.

        Non-finite times, unknown units, spikes older than one already pushed, spikes
        of an already finished group and spikes beyond a buffer's capacity are counted
        (``stats().rejected``) and dropped. Returns the number accepted.
        """
        tab = self._tables
        t, u = self._accept(times, units, tab)
        if t.size == 0:
            return 0
        accepted = (
            self._push_causal(t, u, tab) if self.mode == "causal" else self._push_window(t, u, tab)
        )
        self._spikes += accepted
        return accepted

    def _push_causal(self, t: np.ndarray, u: np.ndarray, tab: UnitTables) -> int:
        s = self.step_s
        if self._group is None:
            self._group = _grid_index(float(t[0]), s)
        start = (self._group - 1) * s
        late_accepted = 0
        if t[0] <= start:  # their group has been finished (a step moved past it)
            i = int(np.searchsorted(t, start, side="right"))
            late_accepted = self._append_late(t[:i], u[:i], tab)
            t, u = t[i:], u[i:]
            if t.size == 0:
                return late_accepted
        end = self._group * s
        if t[-1] <= end:  # the usual case: all in the current group
            return late_accepted + self._append(t, u, tab)
        i = int(np.searchsorted(t, end, side="right"))
        accepted = late_accepted + (self._append(t[:i], u[:i], tab) if i else 0)
        t, u = t[i:], u[i:]
        g = grid_index(t, s)
        cuts = [0, *(np.flatnonzero(np.diff(g)) + 1).tolist(), t.size]
        for a, b in itertools.pairwise(cuts):
            self._advance_to(int(g[a]), tab)
            accepted += self._append(t[a:b], u[a:b], tab)
        return accepted

    def _fill(
        self, k: np.ndarray, v: np.ndarray, c0: int, t: np.ndarray, u: np.ndarray, tab
    ) -> np.ndarray:
        """Rotated keys/values of the spikes that fit (the rest count as overflow) into
        the group buffers k, v (capacity, H, Dh) from row c0; returns their units."""
        t, u = self._clip(t, u, self.capacity - c0)
        if t.size:
            self._keys_values(k[c0 : c0 + t.size], v[c0 : c0 + t.size], t, u, tab)
        return u

    def _append(self, t: np.ndarray, u: np.ndarray, tab: UnitTables) -> int:
        """Spikes of the current group: rotated keys/values into the group buffer."""
        c0 = self._count
        u = self._fill(self._k, self._v, c0, t, u, tab)
        if u.size == 0:
            return 0
        c1 = c0 + u.size
        self._units[c0:c1] = u
        self._count_feat[0, : self.dim] += tab.emb[u].sum(0)
        self._bias[0, c0 + 1 : c1 + 1] = 0.0
        self._count = c1
        self._dirty.update(("count_feat", "spike_k", "spike_v", "spike_bias"))
        return u.size

    def _append_late(self, t: np.ndarray, u: np.ndarray, tab: UnitTables) -> int:
        """Late spikes (time order, all before the current group): those of the group
        just finished join it while the grace lasts (module doc), the rest count as
        ``late``; returns how many joined."""
        g, s = self._last_group, self.step_s
        if g is None or g != self._group - 1 or self._last_step > g * s + self.late_grace:
            self._rejected["late"] += t.size
            return 0
        i = int(np.searchsorted(t, (g - 1) * s, side="right"))  # older groups: late
        self._rejected["late"] += i
        u = self._fill(self._last_k, self._last_v, self._last_count, t[i:], u[i:], tab)
        if u.size == 0:
            return 0
        self._last_feat += tab.emb[u].sum(0)
        self._last_units[self._last_count : self._last_count + u.size] = u
        self._last_count += u.size
        self._late_pending = True
        self._late_accepted += u.size
        return u.size

    def _close_late(self) -> None:
        """The grace of the last finished group is over (a step past it, or another
        group about to finish): finish it again if late spikes joined it."""
        if self._late_pending:
            self._refinish()
        self._last_group = None

    def _refinish(self) -> None:
        """Finish the last finished group again with its late spikes: the current
        group's buffer lends its rows for the run, and the ring gets back the rows that
        group's first finish overwrote, so the run sees what the first one saw."""
        g, c, lc = self._last_group, self._count, self._last_count
        n, s = self.n, (self._slot - self.n) % self.L
        cur = (self._k[:c].copy(), self._v[:c].copy(), self._units[:c].copy(),
               self._count_feat[0].copy())  # fmt: skip
        self._k[:lc], self._v[:lc] = self._last_k[:lc], self._last_v[:lc]
        self._units[:lc] = self._last_units[:lc]
        self._bias[0, 1 : max(c, lc) + 1] = -np.inf
        self._bias[0, 1 : lc + 1] = 0.0
        self._count_feat[0, : self.dim] = self._last_feat
        self._count = lc
        ev = self._evicted
        self._cache_k[:, :, s : s + n], self._cache_v[:, :, s : s + n] = ev["k"], ev["v"]
        self._dec_k[:, s : s + n], self._dec_v[:, s : s + n] = ev["dk"], ev["dv"]
        self._cache_time[s : s + n] = ev["time"]
        self._dirty.update(("count_feat", "spike_k", "spike_v", "spike_bias"))
        self._dirty.update(self._persistent)
        self._set_time(g * self.step_s, 1.0)
        self._run("causal_finish")
        self._slot = s
        self._write_cache(g, self._new, keep_evicted=False)
        if self._h.size:  # the readout's step at this group again, from the state before
            self._h = self._h_before_last
            self._advance_readout()
        # the current group back as it was
        self._k[:c], self._v[:c], self._units[:c], self._count_feat[0] = cur
        self._bias[0, 1 : max(c, lc) + 1] = -np.inf
        self._bias[0, 1 : c + 1] = 0.0
        self._count = c
        self._dirty.update(("count_feat", "spike_k", "spike_v", "spike_bias"))
        self._late_pending = False

    def _push_window(self, t: np.ndarray, u: np.ndarray, tab: UnitTables) -> int:
        if self._w_end + t.size > self._wt.size:
            self._compact()
        t, u = self._clip(t, u, self._wt.size - self._w_end)
        if t.size == 0:
            return 0
        e0, e1 = self._w_end, self._w_end + t.size
        self._keys_values(self._wk[e0:e1], self._wv[e0:e1], t, u, tab)
        self._wt[e0:e1] = t
        cs = self._wcs[e0 + 1 : e1 + 1]
        np.cumsum(tab.emb[u], axis=0, dtype=np.float64, out=cs)
        cs += self._wcs[e0]
        self._w_end = e1
        return t.size

    def _compact(self) -> None:
        """Drop window spikes no later step can see (older than last step - W)."""
        end = self._w_end
        keep = int(np.searchsorted(self._wt[:end], self._last_step - self.context, "right"))
        if keep == 0:
            return
        n = end - keep
        self._wk[:n] = self._wk[keep:end]
        self._wv[:n] = self._wv[keep:end]
        self._wt[:n] = self._wt[keep:end]
        self._wcs[: n + 1] = self._wcs[keep : end + 1] - self._wcs[keep]
        self._w_end = n

    # ------------------------------------------------------------------ steps
    def _set_time(self, t: float, elapsed: float) -> None:
        self._count_feat[0, self.dim] = elapsed
        self._phases.into(t, self._phase[0])
        # float64 differences, cast into the float32 row by the same ufunc
        np.subtract(t, self._cache_time, out=self._dt_rows)
        self._dirty.update(("count_feat", "phase", "dt", "dec_dt"))

    def _run(self, name: str) -> None:
        runner = self._runners[name]
        if self.fixed_shapes:
            runner.run(None, self._dirty)
        elif hasattr(runner, "run_rows"):  # ONNX Runtime: re-bound when the rows changed
            runner.run_rows(int(self._rows[self._count]), self._dirty)
        else:  # the torch reference
            shapes = {}
            for key, (shape, axis, offset) in self._spike_rows.items():
                shapes[key] = list(shape)
                shapes[key][axis] = self._count + offset
            runner.run(None, self._dirty, shapes)
        self._dirty.clear()

    def _write_cache(self, g: int, new: dict[str, np.ndarray], keep_evicted: bool = True) -> None:
        """Cache rows of finished group g (the last n rows of ``new``) into the ring;
        ``keep_evicted``: keep the rows they replace (for a later ``_refinish``)."""
        s, n = self._slot, self.n
        if keep_evicted and self.late_grace > 0:
            ev = self._evicted
            ev["k"][:], ev["v"][:] = self._cache_k[:, :, s : s + n], self._cache_v[:, :, s : s + n]
            ev["dk"][:], ev["dv"][:] = self._dec_k[:, s : s + n], self._dec_v[:, s : s + n]
            ev["time"][:] = self._cache_time[s : s + n]
        self._cache_k[:, :, s : s + n] = new["new_k"][:, -n:].reshape(self.depth, self.Hs, n, -1)
        self._cache_v[:, :, s : s + n] = new["new_v"][:, -n:].reshape(self.depth, self.Hs, n, -1)
        self._dec_k[:, s : s + n] = new["new_dk"][:, -n:]
        self._dec_v[:, s : s + n] = new["new_dv"][:, -n:]
        if self.W > 1:  # with a context of one group, finished groups are never seen
            self._cache_time[s : s + n] = g * self.step_s
        self._slot = (s + n) % self.L
        self._dirty.update(self._persistent)  # the caches (uploads on CUDA)

    def _clear_group(self) -> None:
        self._bias[0, 1 : self._count + 1] = -np.inf
        self._count = 0
        self._count_feat[0, : self.dim] = 0.0
        self._groups_finished += 1

    def _finish(self, g: int) -> None:
        """Run group g at its end time and cache its per-layer keys and values."""
        if self.late_grace > 0:
            self._close_late()  # the group before: its rows are read by this finish
        self._set_time(g * self.step_s, 1.0)
        self._run("causal_finish")
        self._write_cache(g, self._new)
        self._advance_readout()
        if self.late_grace > 0:  # open to late spikes until a step passes the grace
            c = self._count
            self._last_k[:c], self._last_v[:c] = self._k[:c], self._v[:c]
            self._last_units[:c] = self._units[:c]
            self._last_feat[:] = self._count_feat[0, : self.dim]
            self._last_group, self._last_count = g, c
        self._clear_group()

    def _reset_readout(self, tab: UnitTables) -> None:
        """The session readout's state back to its start (no group seen)."""
        r = tab.readout
        self._h = r.zero_state() if r is not None else np.zeros(0, np.float32)
        self._h_before_last = self._h
        self._h_owner = r

    def _advance_readout(self) -> None:
        """A group just finished: the session readout steps on its end-time features."""
        r = self._bound_tables.readout if self._bound_tables is not None else None
        if r is None:
            return
        if r is not self._h_owner:
            self._reset_readout(self._bound_tables)
        self._h_before_last = self._h
        self._h = r.cell(self._h, r.inputs(self._fin_pred[0, self.P :], self._group_counts(r)))

    def _group_counts(self, r) -> np.ndarray | None:
        """Each unit's spikes in the current group so far (C,), where the readout reads
        spike counts (units past its C, after a swap to other tables, are left out)."""
        if not r.units:
            return None
        return np.bincount(self._units[: self._count], minlength=r.units)[: r.units]

    def _advance_to(self, g: int, tab: UnitTables) -> None:
        """Make ``g`` the current group, finishing every group before it (with the
        tables the calling push/step took: a swap lands between calls, never inside)."""
        if tab is not self._bound_tables:
            self._bind_tables(tab)
        while self._group < g:
            self._finish(self._group)
            self._group += 1

    def step(self, t: float) -> np.ndarray:
        """Behaviour at time t (D,) from every spike pushed so far with time <= t."""
        t0 = time.perf_counter()
        tab = self._tables
        if tab is not self._bound_tables:
            self._bind_tables(tab)
        t = float(t)
        z = self._step_window(t) if self.mode == "window" else self._step_causal(t, tab)
        y = z[tab.out_slice] * tab.norm.std + tab.norm.mean
        self._steps += 1
        self._lat[self._lat_i] = (time.perf_counter() - t0) * 1e3
        self._lat_i = (self._lat_i + 1) % self._lat.size
        return y

    def warm(self) -> None:
        """Run the step graph once on the present state and throw its output away: the
        weights and buffers a step reads are in the CPU caches for the next step (the
        decode loop primes each deadline this way at 100 Hz). No state or counter changes,
        so the next ``step`` returns what it would have; a no-op before the first step."""
        if self._steps == 0:
            return
        tab = self._tables
        if tab is not self._bound_tables:
            self._bind_tables(tab)
        if self.mode == "causal":
            self._run("causal_step")
        else:
            self._step_window(self._last_step)

    def _step_causal(self, t: float, tab: UnitTables) -> np.ndarray:
        s = self.step_s
        g = _grid_index(t, s)
        if self._group is None:
            self._group = g
        elif g < self._group:
            raise ValueError(f"step time {t} is before the current group; steps must move forward")
        elif g > self._group:
            self._advance_to(g, tab)
        if self._last_group is not None and t > self._last_group * s + self.late_grace:
            self._close_late()
        self._set_time(t, (t - (g - 1) * s) / s)
        self._run("causal_step")
        self._last_step = t
        r = tab.readout
        if r is None:
            return self._pred[0]
        if r is not self._h_owner:  # tables with another readout were swapped in
            self._reset_readout(tab)
        # the heads' columns of _pred, the readout's output in this output's columns
        self._readout_out[tab.out_slice] = r.outputs_at(
            self._h, self._pred[0, self.P :], self._group_counts(r)
        )
        return self._readout_out

    def _step_window(self, t: float) -> np.ndarray:
        W, s, K = self.context, self.step_s, self.K
        ts = self._wt[: self._w_end]
        lo = int(np.searchsorted(ts, t - W, side="right"))
        hi = int(np.searchsorted(ts, t, side="right"))
        # the same float64 expressions as tokenize_window / forward_window
        lt = t - W + s * self._kk  # (K,) latent times
        slot = np.ceil((ts[lo:hi] - (lt[0] - s)) / s).astype(np.int64) - 1
        np.clip(slot, 0, K - 1, out=slot)
        edges = lo + np.searchsorted(slot, self._k_edges)  # (K+1,) each group's first spike
        np.subtract(
            self._wcs[edges[1:]], self._wcs[edges[:-1]], out=self._group_sum, casting="unsafe"
        )
        ph = angles(lt, self.periods, out=self._lat_phase64)
        self._lat_phase[:, : self.F] = np.cos(ph)
        self._lat_phase[:, self.half : self.half + self.F] = np.sin(ph)
        self._phases.into(t, self._dec_phase)
        self._dirty.update(("group_sum", "lat_phase", "dec_phase"))
        self._runners["window_step"].run(
            {"spike_k": self._wk[lo:hi], "spike_v": self._wv[lo:hi]}, self._dirty
        )
        self._dirty.clear()
        self._last_step = t
        return self._wpred

    # ------------------------------------------------------------------ stats
    def stats(self) -> EngineStats:
        """Counters and step-latency percentiles (ms, over the last steps)."""
        lat = self._lat[np.isfinite(self._lat)]
        pct = np.percentile(lat, [50, 99, 99.9]) if lat.size else [np.nan] * 3
        return EngineStats(
            steps=self._steps,
            groups_finished=self._groups_finished,
            spikes=self._spikes,
            late_accepted=self._late_accepted,
            rejected=dict(self._rejected),
            p50_ms=float(pct[0]),
            p99_ms=float(pct[1]),
            p999_ms=float(pct[2]),
            max_ms=float(lat.max()) if lat.size else float("nan"),
            window=int(lat.size),
            tables_version=self._tables.version,
        )
