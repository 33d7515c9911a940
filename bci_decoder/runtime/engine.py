"""StreamingEngine: decode one stream step by step, exactly as the offline model does.

Per spike, on arrival (``push``, vectorised over the chunk): a lookup of its unit's
precomputed encoder key/value (``UnitTables``) and one rotation with float64-exact
phases, into a buffer of the current group's spikes (causal) or a window store (window).

Causal mode, per ``step(t)``: one run of the step graph (``CausalKVStep``, B = 1): the
partial group's latents (its spikes so far, latent time t) go through the layers
attending to a per-layer key/value cache of finished groups, then the readout. When t
crosses into a new group, the finished group is run once at its end time by the finish
graph, whose per-layer keys (rotated at the group's time) and values go into a ring of
the last ``context - step`` seconds of groups. Nothing already computed is recomputed.

Window mode, per step: the window's cached spike keys, latents recomputed (reference
accuracy, the published POYO).

Offline, ``decode`` runs a whole recording through the same engine state and graphs, a
group at a time: all queries of a group plus the group's finish in one run of the batch
graph (the same computation with B queries as rows).

Threads: ``push``, ``step``, ``reset`` and ``decode`` belong to one thread (the decode
loop). ``set_units`` may be called from any thread: it stores a reference to an
immutable ``UnitTables``, which the next ``push`` / ``step`` picks up; spikes already
pushed keep the keys they were given.

Backends run the same step modules: ``onnx`` (ONNX Runtime, every array bound once by
pointer) or ``torch`` (the eager reference). On a GPU (``onnx_runner.choose_providers``
picks CUDA when a device is present) the same engine keeps device copies of its arrays
and uploads what changed before each run; ``cuda_graph=True`` keeps the causal graphs'
shapes fixed (the group buffer at full capacity, unused rows masked by ``spike_bias``) so
ONNX Runtime replays each step as one captured CUDA graph. See ``onnx_runner``.

Measured (2-core EPYC VM, one thread): benchmarks/results/engine_latency_*.json and
offline_throughput_1h.json.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bci_decoder.model.step import CausalKVStep, WindowKVStep, decoder_query
from bci_decoder.tokenizer import grid_index
from bci_decoder.train.checkpoint import Decoder, Normalizer

REJECT_REASONS = ("non_finite", "unknown_unit", "out_of_order", "late", "overflow")
_VERSIONS = itertools.count(1)


def _grid_index(t: float, step: float) -> int:
    """``tokenizer.grid_index`` for one float (same float64 products), without numpy."""
    k = math.ceil(t / step)
    if (k - 1) * step >= t:
        k -= 1
    if k * step < t:
        k += 1
    return k


# ---------------------------------------------------------------------- unit tables
@dataclass(frozen=True, eq=False)
class UnitTables:
    """Everything session- and unit-specific the engine reads: immutable, built off the
    hot path, swapped into a running engine with ``StreamingEngine.set_units``.

    Shapes: U session-local units, Hc encoder heads, Dh head dim, D model dim.
    """

    session_id: str
    output: str
    unit_names: tuple[str, ...]  # session-local index -> unit name
    k: np.ndarray  # (U, Hc, Dh) encoder key projection W_k·LN(e_u), unrotated
    v: np.ndarray  # (U, Hc, Dh) encoder value projection
    emb: np.ndarray  # (U, D) unit embeddings (the count path sums them)
    null_k: np.ndarray  # (Hc, 1, Dh) <null> token key
    null_v: np.ndarray  # (Hc, 1, Dh)
    query: np.ndarray  # (1, D) output query: session + output-kind embedding
    dec_q: np.ndarray  # (Hc, 1, Dh) its decoder projection, scaled, unrotated
    norm: Normalizer  # the output's normalisation (predictions are z-scores)
    out_slice: slice  # the output's columns in the concatenated heads
    version: int  # unique per build: stats() reports which tables are in use

    @property
    def num_units(self) -> int:
        return len(self.unit_names)

    @classmethod
    def from_decoder(
        cls,
        decoder: Decoder,
        session_id: str,
        output: str | None = None,
        unit_names: list[str] | None = None,
    ) -> UnitTables:
        """Tables of ``session_id`` (its units in vocabulary order unless ``unit_names``
        says otherwise) for ``output`` (default: the session's first normalised one)."""
        if session_id not in decoder.sessions:
            raise KeyError(f"session {session_id!r} is unknown to this model; calibrate it first")
        m = decoder.model.eval()
        norms = decoder.norms.get(session_id, {})
        output = output or next(iter(norms), m.output_names[0])
        if output not in norms:
            raise KeyError(
                f"session {session_id!r} has no normalisation for output {output!r} "
                f"(it has {sorted(norms)})"
            )
        prefix = f"{session_id}/"
        if unit_names is None:
            unit_names = [u[len(prefix) :] for u in decoder.units.names if u.startswith(prefix)]
        vocab = decoder.units.lookup(prefix + u for u in unit_names)
        with torch.no_grad():
            emb = m.unit_emb.weight[torch.from_numpy(vocab)]  # (U, D)
            k, v = m.enc_attn.keys_values(emb)  # (U, Hc, Dh)
            k0, v0 = m.enc_attn.keys_values(m.unit_emb.weight[:1])  # (1, Hc, Dh)
            q = (
                m.session_emb.weight[decoder.sessions[session_id]]
                + m.output_emb.weight[decoder.output_index(output)]
            )
            dec_q = decoder_query(m, q)  # (Hc, 1, Dh)
        offsets = np.cumsum([0] + [m.output_dims[o] for o in m.output_names])
        i = m.output_names.index(output)

        def frozen(x: torch.Tensor) -> np.ndarray:
            a = np.ascontiguousarray(x.detach().numpy(), dtype=np.float32)
            a.flags.writeable = False
            return a

        return cls(
            session_id=session_id,
            output=output,
            unit_names=tuple(unit_names),
            k=frozen(k),
            v=frozen(v),
            emb=frozen(emb),
            null_k=frozen(k0.transpose(0, 1)),
            null_v=frozen(v0.transpose(0, 1)),
            query=frozen(q[None]),
            dec_q=frozen(dec_q),
            norm=norms[output],
            out_slice=slice(int(offsets[i]), int(offsets[i + 1])),
            version=next(_VERSIONS),
        )


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's counters; latency over the last ``window`` steps."""

    steps: int
    groups_finished: int
    spikes: int  # accepted
    rejected: dict[str, int]  # by reason: REJECT_REASONS
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    window: int
    tables_version: int


class TorchStepRunner:
    """Runs a step module with torch (the reference), with the ONNX runner's interface."""

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

    def providers(self) -> list[str]:
        return ["torch"]


_GRAPHS: dict[tuple[str, int, int], dict[str, bytes]] = {}


def graphs_for(decoder: Decoder, capacity: int = 2048, window_capacity: int = 8192) -> dict:
    """The decoder's ONNX step graphs, built in memory once per set of graph weights
    (unit, session and output embeddings are not in the graphs: a calibrated copy of a
    model reuses its base model's graphs)."""
    from bci_decoder.export.onnx_export import build_graphs

    h = hashlib.sha1()
    for name, t in decoder.model.state_dict().items():
        if name not in ("unit_emb.weight", "session_emb.weight", "output_emb.weight"):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    key = (h.hexdigest(), capacity, window_capacity)
    if key not in _GRAPHS:
        _GRAPHS[key] = build_graphs(decoder, capacity, window_capacity)
    return _GRAPHS[key]


# ---------------------------------------------------------------------- the engine
class StreamingEngine:
    """Decode one session's stream: ``push`` spikes (float64 times, session-local unit
    indices), then ``step(t)`` returns the behaviour at t (in the behaviour's units).

    ``mode="causal"``: cached latent groups (the fast path). ``mode="window"``: a store
    of the window's spike keys, latents recomputed every step.
    ``backend="onnx"`` runs the graphs in ``onnx_path`` (a ``bci-decoder export``
    folder) or, without it, graphs exported in memory; ``backend="torch"`` the eager
    modules. ``cuda_graph``: fixed shapes for CUDA graph capture (GPU only).
    """

    def __init__(
        self,
        decoder: Decoder,
        session_id: str,
        output: str | None = None,
        *,
        mode: str = "causal",
        backend: str = "torch",
        max_spikes_per_group: int = 2048,
        max_spikes_per_window: int = 8192,
        onnx_path: str | Path | None = None,
        intra_op_threads: int = 1,
        providers: list[str] | None = None,
        cuda_graph: bool = False,
        latency_window: int = 16384,
    ) -> None:
        if mode not in ("causal", "window"):
            raise ValueError(f"mode must be 'causal' or 'window', not {mode!r}")
        if backend not in ("torch", "onnx"):
            raise ValueError(f"backend must be 'torch' or 'onnx', not {backend!r}")
        self.mode, self.backend, self.decoder = mode, backend, decoder
        model = decoder.model.eval()
        c = self.config = decoder.config
        self.step_s = float(c.latent_step)
        self.n, self.depth, self.dim, self.Dh = c.latents_per_group, c.depth, c.dim, c.dim_head
        self.half, self.Hc, self.Hs = c.dim_head // 2, c.cross_heads, c.self_heads
        self.W = c.context_groups
        self.L = max(self.W - 1, 1) * self.n  # cache rows: the last W-1 finished groups
        self.K = int(round(c.context / c.latent_step))
        self.periods = model.periods.numpy()  # (F,) float64
        self.F = self.periods.size
        self.rotate_values = c.rotate_values
        self.capacity, self.ring_capacity = max_spikes_per_group, max_spikes_per_window
        self.P = sum(model.output_dims.values())
        self._tables = UnitTables.from_decoder(decoder, session_id, output)
        self._bound_tables: UnitTables | None = None

        names = ["causal_step", "causal_finish"] if mode == "causal" else ["window_step"]
        if backend == "torch":
            mods = {
                "causal_step": lambda: CausalKVStep(model, readout=True, emit=False),
                "causal_finish": lambda: CausalKVStep(model, readout=False, emit=True),
                "causal_batch": lambda: CausalKVStep(model, True, True, fused_qkv=False),
                "window_step": lambda: WindowKVStep(model),
            }
            self._make_runner = lambda name: TorchStepRunner(mods[name]())
        else:
            from bci_decoder.runtime.onnx_runner import OnnxStepRunner

            if onnx_path is not None:
                from bci_decoder.export.onnx_export import read_export

                graphs = read_export(onnx_path)
            else:
                graphs = graphs_for(decoder, max_spikes_per_group, max_spikes_per_window)
            self._make_runner = lambda name: OnnxStepRunner(
                graphs[name],
                intra_op_threads,
                providers,
                # fixed shapes only in the streaming causal graphs
                cuda_graph and name in ("causal_step", "causal_finish"),
            )
        self._runners = {name: self._make_runner(name) for name in names}
        self.runner = self._runners[names[0]]  # the per-step runner (providers, session)
        self.fixed_shapes = cuda_graph and getattr(self.runner, "device", "cpu") == "cuda"
        self._lat = np.full(latency_window, np.nan)
        self._lat_i = 0
        self._steps = self._spikes = self._groups_finished = 0
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
        self._phase64 = np.zeros(self.F)  # scratch: float64 phases of one time
        self._trig64 = np.zeros(self.F)
        if self.mode == "causal":
            cap = self.capacity
            self._k = np.zeros((cap, Hc, Dh), f32)  # the current group's rotated keys
            self._v = np.zeros((cap, Hc, Dh), f32)
            self._bias = np.full((1, cap + 1), -np.inf, f32)  # [<null> | spikes] visible
            self._bias[0, 0] = 0.0
            self._count_feat = np.zeros((1, D + 1), f32)  # [unit-embedding sum | elapsed]
            self._phase = self._unit_phase((1,))  # (1, Dh) [cos | sin] of the step time
            self._dt = np.zeros((1, L + n), f32)  # t - key time; own rows 0
            self._dt64 = np.zeros(L)
            self._cache_k = np.zeros((self.depth, Hs, L, Dh), f32)  # rotated at their time
            self._cache_v = np.zeros((self.depth, Hs, L, Dh), f32)
            self._dec_k = np.zeros((Hc, L, Dh), f32)
            self._dec_v = np.zeros((Hc, L, Dh), f32)
            self._cache_time = np.full(L, -np.inf)  # float64 group times; -inf: empty row
            self._pred = np.zeros((1, self.P), f32)
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
            self._runners["causal_finish"].bind(persistent, self._new)
            # the group's spikes: prefixes of fixed buffers, shapes updated in place
            self._spike_shapes = {
                "spike_k": [0, Hc, Dh],
                "spike_v": [0, Hc, Dh],
                "spike_bias": [1, 1],
            }
            for r in self._runners.values():
                r.bind_prefix("spike_k", self._k)
                r.bind_prefix("spike_v", self._v)
                r.bind_prefix("spike_bias", self._bias)
            self._dirty = set(persistent)
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
            self._dec_dt = np.abs(self.config.context - lt).astype(f32)  # t - latent time
            self._wpred = np.zeros(self.P, f32)
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
        if getattr(self, "_batch", None) is not None:
            self._batch.bind(arrays, {})
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
        """Decode another known session (or output): new tables from the decoder."""
        self.set_units(UnitTables.from_decoder(self.decoder, session_id, output))

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
            and (t.size == 1 or (np.diff(t) >= 0).all())
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
        """Rotate rows x (m, H, Dh) in place at times t (m,): ``rotate`` in numpy, with
        the float64 phase of ``rotary_phases``."""
        ang = np.remainder(t[:, None], self.periods) / self.periods
        ang *= 2 * math.pi
        cos = np.cos(ang).astype(np.float32)[:, None, :]  # (m, 1, F)
        sin = np.sin(ang).astype(np.float32)[:, None, :]
        a = x[..., : self.F]
        b = x[..., self.half : self.half + self.F]
        new_a = a * cos - b * sin
        b *= cos
        b += a * sin
        a[...] = new_a

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
        if t[0] <= start:  # their group has been finished (a step moved past it)
            i = int(np.searchsorted(t, start, side="right"))
            self._rejected["late"] += i
            t, u = t[i:], u[i:]
            if t.size == 0:
                return 0
        end = self._group * s
        if t[-1] <= end:  # the usual case: all in the current group
            return self._append(t, u, tab)
        i = int(np.searchsorted(t, end, side="right"))
        accepted = self._append(t[:i], u[:i], tab) if i else 0
        t, u = t[i:], u[i:]
        g = grid_index(t, s)
        cuts = [0, *(np.flatnonzero(np.diff(g)) + 1).tolist(), t.size]
        for a, b in itertools.pairwise(cuts):
            self._advance_to(int(g[a]), tab)
            accepted += self._append(t[a:b], u[a:b], tab)
        return accepted

    def _append(self, t: np.ndarray, u: np.ndarray, tab: UnitTables) -> int:
        """Spikes of the current group: rotated keys/values into the group buffer."""
        c0 = self._count
        t, u = self._clip(t, u, self.capacity - c0)
        if t.size == 0:
            return 0
        c1 = c0 + t.size
        self._keys_values(self._k[c0:c1], self._v[c0:c1], t, u, tab)
        self._count_feat[0, : self.dim] += tab.emb[u].sum(0)
        self._bias[0, c0 + 1 : c1 + 1] = 0.0
        self._count = c1
        self._dirty.update(("count_feat", "spike_k", "spike_v", "spike_bias"))
        return t.size

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
        keep = int(np.searchsorted(self._wt[:end], self._last_step - self.config.context, "right"))
        if keep == 0:
            return
        n = end - keep
        self._wk[:n] = self._wk[keep:end]
        self._wv[:n] = self._wv[keep:end]
        self._wt[:n] = self._wt[keep:end]
        self._wcs[: n + 1] = self._wcs[keep : end + 1] - self._wcs[keep]
        self._w_end = n

    # ------------------------------------------------------------------ steps
    def _phase_into(self, t: float, out: np.ndarray) -> None:
        """[cos | sin] (float32) of time t into out (Dh,): float64 (t mod P) first."""
        ph, trig, F, h = self._phase64, self._trig64, self.F, self.half
        np.remainder(t, self.periods, out=ph)
        np.divide(ph, self.periods, out=ph)
        np.multiply(ph, 2 * math.pi, out=ph)
        np.cos(ph, out=trig)
        out[:F] = trig
        np.sin(ph, out=trig)
        out[h : h + F] = trig

    def _set_time(self, t: float, elapsed: float) -> None:
        self._count_feat[0, self.dim] = elapsed
        self._phase_into(t, self._phase[0])
        np.subtract(t, self._cache_time, out=self._dt64)  # float64 differences first
        self._dt[0, : self.L] = self._dt64
        self._dirty.update(("count_feat", "phase", "dt", "dec_dt"))

    def _run(self, name: str) -> None:
        shapes = None
        if not self.fixed_shapes:
            shapes, c = self._spike_shapes, self._count
            shapes["spike_k"][0] = shapes["spike_v"][0] = c
            shapes["spike_bias"][1] = c + 1
        self._runners[name].run(None, self._dirty, shapes)
        self._dirty.clear()

    def _write_cache(self, g: int, new: dict[str, np.ndarray]) -> None:
        """Cache rows of finished group g (the last n rows of ``new``) into the ring."""
        s, n = self._slot, self.n
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
        self._set_time(g * self.step_s, 1.0)
        self._run("causal_finish")
        self._write_cache(g, self._new)
        self._clear_group()

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

    def _step_causal(self, t: float, tab: UnitTables) -> np.ndarray:
        s = self.step_s
        g = _grid_index(t, s)
        if self._group is None:
            self._group = g
        elif g < self._group:
            raise ValueError(f"step time {t} is before the current group; steps must move forward")
        elif g > self._group:
            self._advance_to(g, tab)
        self._set_time(t, (t - (g - 1) * s) / s)
        self._run("causal_step")
        self._last_step = t
        return self._pred[0]

    def _step_window(self, t: float) -> np.ndarray:
        W, s, K = self.config.context, self.step_s, self.K
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
        ph = self._lat_phase64
        np.remainder(lt[:, None], self.periods, out=ph)
        ph /= self.periods
        ph *= 2 * math.pi
        self._lat_phase[:, : self.F] = np.cos(ph)
        self._lat_phase[:, self.half : self.half + self.F] = np.sin(ph)
        self._phase_into(t, self._dec_phase)
        self._dirty.update(("group_sum", "lat_phase", "dec_phase"))
        self._runners["window_step"].run(
            {"spike_k": self._wk[lo:hi], "spike_v": self._wv[lo:hi]}, self._dirty
        )
        self._dirty.clear()
        self._last_step = t
        return self._wpred

    # ------------------------------------------------------------------ offline
    def decode(
        self,
        spike_times: np.ndarray,
        spike_units: np.ndarray,
        query_times: np.ndarray,
        *,
        start: float | None = None,
        normalised: bool = False,
    ) -> np.ndarray:
        """Predictions (Q, D) at sorted ``query_times`` from a whole recording, equal to
        pushing every spike up to each query and calling ``step`` (the engine is reset
        first, to ``start`` if given). Causal mode runs each group's queries and its
        finish as one batch; window mode steps. ``normalised``: z-scores."""
        tab = self._tables
        q = np.asarray(query_times, dtype=np.float64).reshape(-1)
        if np.any(np.diff(q) < 0):
            raise ValueError("query times must be sorted")
        self.reset(start)
        out = np.zeros((q.size, tab.out_slice.stop - tab.out_slice.start), np.float32)
        if q.size == 0:
            return out
        times = np.asarray(spike_times, dtype=np.float64)
        units = np.asarray(spike_units)
        if self.mode == "window":
            ends = np.searchsorted(times, q, side="right")
            j = int(np.searchsorted(times, q[0] - self.config.context, side="right"))
            for i, t in enumerate(q):
                if ends[i] > j:
                    self.push(times[j : ends[i]], units[j : ends[i]])
                    j = ends[i]
                out[i] = self.step(t)
        else:
            self._decode_causal(times, units, q, out)
        return tab.norm.forward(out) if normalised else out

    def _decode_causal(
        self, times: np.ndarray, units: np.ndarray, q: np.ndarray, out: np.ndarray
    ) -> None:
        """``decode`` in causal mode. Spikes are rotated a chunk of groups at a time (the
        same ``_rotate``, vectorised over ~10^4 spikes); then per group one run of the
        batch graph computes its queries and, as its last row block, the group's finish,
        whose cache rows go into the ring as in streaming."""
        tab = self._tables
        if tab is not self._bound_tables:
            self._bind_tables(tab)
        s, n, L, D, f32 = self.step_s, self.n, self.L, self.dim, np.float32
        t_all, u_all = self._accept(times, units, tab)
        g_q = grid_index(q, s)
        first = self._group
        if first is None:
            first = int(g_q[0]) if not t_all.size else min(int(g_q[0]), _grid_index(t_all[0], s))
        if g_q[0] < first:
            raise ValueError(f"query time {q[0]} is before the first decoded group")
        keep = int(np.searchsorted(t_all, (first - 1) * s, side="right"))
        t_all, u_all = t_all[keep:], u_all[keep:]  # earlier spikes: groups never decoded
        last = int(g_q[-1])
        groups = np.arange(first, last + 2)
        sp_edges = np.searchsorted(grid_index(t_all, s), groups).tolist()
        q_edges = np.searchsorted(g_q, groups).tolist()
        batch = self._batch_runner()
        per_b: dict[int, tuple] = {}  # B -> outputs and mask templates, made once
        bound_b = 0
        ar = np.arange(self.capacity)
        ngroups = last - first + 1
        chunk_groups = max(1, 2**14 // max(1, len(t_all) // ngroups))
        for c0 in range(0, ngroups, chunk_groups):
            c1 = min(c0 + chunk_groups, ngroups)
            a0, a1 = sp_edges[c0], sp_edges[c1]
            tc, uc = t_all[a0:a1], u_all[a0:a1]
            kc, vc = np.take(tab.k, uc, axis=0), np.take(tab.v, uc, axis=0)  # (m, Hc, Dh)
            self._rotate(kc, tc)
            if self.rotate_values:
                self._rotate(vc, tc)
            # every row of the chunk's batches at once: each group's queries, then its
            # finish at the group's end time (float64 times, phases and counts)
            g = np.arange(first + c0, first + c1)
            nq = np.diff(q_edges[c0 : c1 + 1])  # queries per group
            rows = np.repeat(np.arange(c1 - c0), nq + 1)  # row -> group (chunk-relative)
            is_q = np.ones(rows.size, bool)
            ends = np.cumsum(nq + 1) - 1  # each group's finish row
            is_q[ends] = False
            tq = np.empty(rows.size)
            tq[is_q] = q[q_edges[c0] : q_edges[c1]]
            tq[ends] = g * s
            ga = np.asarray(sp_edges[c0 : c1 + 1]) - a0  # each group's first spike
            cnt = np.minimum(np.diff(ga), self.capacity)  # as streaming: first `capacity`
            self._rejected["overflow"] += int((np.diff(ga) - cnt).sum())
            self._spikes += int(cnt.sum())
            seen = np.minimum(np.searchsorted(tc, tq, side="right") - ga[rows], cnt[rows])
            seen[ends] = cnt
            # unit-embedding sum of each row's spikes: float64 segment sums between the
            # sorted points (group start, then each row's end), summed within the group
            points = np.empty(rows.size + (c1 - c0), np.int64)
            starts = np.arange(c1 - c0) + np.concatenate([[0], ends[:-1] + 1])
            points[starts] = ga[:-1]
            mask = np.ones(points.size, bool)
            mask[starts] = False
            points[mask] = ga[rows] + seen
            emb = np.zeros((uc.size + 1, D))
            emb[:-1] = tab.emb[uc]
            seg = np.add.reduceat(emb, points[:-1], axis=0)
            seg[points[:-1] == points[1:]] = 0.0  # empty segments (reduceat gives a row)
            prefix = np.zeros((points.size, D))
            np.cumsum(seg, axis=0, out=prefix[1:])
            feat = np.empty((rows.size, D + 1), f32)
            feat[:, :D] = prefix[mask] - prefix[starts][rows]
            feat[:, D] = (tq - (g[rows] - 1) * s) / s
            feat[ends, D] = 1.0
            ph = np.remainder(tq[:, None], self.periods) / self.periods
            ph *= 2 * math.pi
            phase = self._unit_phase((rows.size,))
            phase[:, : self.F] = np.cos(ph)
            phase[:, self.half : self.half + self.F] = np.sin(ph)
            seen_rows = np.repeat(seen, n)
            r0 = 0
            for i in range(c1 - c0):
                B, a, c = int(nq[i]) + 1, int(ga[i]), int(cnt[i])
                r1 = r0 + B
                if B not in per_b:
                    per_b[B] = self._batch_arrays(B)
                pred, new, null_rows, dt = per_b[B]
                if B != bound_b:
                    batch.bind({}, {"prediction": pred, **new})
                    bound_b = B
                visible = ar[:c] < seen_rows[r0 * n : r1 * n, None]  # (B·n, c)
                dt[:, :L] = tq[r0:r1, None] - self._cache_time[None, :]
                feeds = {
                    "spike_k": kc[a : a + c],
                    "spike_v": vc[a : a + c],
                    # (B·n, B+c): each row sees its <null> and its query's spikes so far
                    "spike_bias": np.concatenate(
                        [null_rows, np.where(visible, f32(0), f32(-np.inf))], 1
                    ),
                    "count_feat": feat[r0:r1],
                    "phase": phase[r0:r1],
                    "dt": np.repeat(dt, n, axis=0),  # (B·n, L+B·n)
                    "dec_dt": dt,
                }
                batch.run(feeds, self._dirty)
                self._dirty.clear()
                qa = q_edges[c0 + i]
                out[qa : qa + B - 1] = pred[:-1, tab.out_slice] * tab.norm.std + tab.norm.mean
                self._steps += B - 1
                self._write_cache(int(g[i]), new)
                self._groups_finished += 1
                r0 = r1
        self._group, self._count = last + 1, 0
        self._last_step = float(q[-1])

    def _batch_arrays(self, B: int) -> tuple:
        """Outputs and mask templates of a batch of B queries (B-1 and a finish)."""
        f32, n, L = np.float32, self.n, self.L
        pred = np.zeros((B, self.P), f32)
        new = {
            "new_k": np.zeros((self.depth * self.Hs, B * n, self.Dh), f32),
            "new_v": np.zeros((self.depth * self.Hs, B * n, self.Dh), f32),
            "new_dk": np.zeros((self.Hc, B * n, self.Dh), f32),
            "new_dv": np.zeros((self.Hc, B * n, self.Dh), f32),
        }
        own = np.repeat(np.eye(B, dtype=bool), n, axis=0)  # (B·n, B): each row's <null>
        null_rows = np.where(own, f32(0), f32(-np.inf))
        dt = np.full((B, L + B * n), np.inf, f32)  # rows of other queries: never seen
        for j in range(B):
            dt[j, L + j * n : L + (j + 1) * n] = 0.0  # its own rows
        return pred, new, null_rows, dt

    def _batch_runner(self) -> TorchStepRunner:
        """The batch graph's runner, made on first use (offline decoding only)."""
        if getattr(self, "_batch", None) is None:
            self._batch = self._make_runner("causal_batch")
            self._batch.bind(
                {
                    k: v
                    for k, v in self._persistent.items()
                    if k.startswith(("cache_", "dec_k", "dec_v"))
                },
                {},
            )
            tab = self._tables
            self._batch.bind(
                {
                    "null_k": tab.null_k,
                    "null_v": tab.null_v,
                    "dec_q": tab.dec_q,
                    "query": tab.query,
                },
                {},
            )
        return self._batch

    # ------------------------------------------------------------------ stats
    def stats(self) -> EngineStats:
        """Counters and step-latency percentiles (ms, over the last steps)."""
        lat = self._lat[np.isfinite(self._lat)]
        pct = np.percentile(lat, [50, 99, 99.9]) if lat.size else [np.nan] * 3
        return EngineStats(
            steps=self._steps,
            groups_finished=self._groups_finished,
            spikes=self._spikes,
            rejected=dict(self._rejected),
            p50_ms=float(pct[0]),
            p99_ms=float(pct[1]),
            p999_ms=float(pct[2]),
            max_ms=float(lat.max()) if lat.size else float("nan"),
            window=int(lat.size),
            tables_version=self._tables.version,
        )
