"""Offline decoding through the streaming engine: a whole recording, many groups a run.

``decode`` gives what pushing every spike up to each query and calling ``step`` would,
with the same engine state and graphs. Causal mode runs the chunk graph
(``model.step.CausalChunk``): ~40 groups per run, each with its queries and its finish,
the finished rows of the last W-1 groups carried from run to run and left in the ring
at the end. Window mode steps (windows are independent). A mixin of
``StreamingEngine`` (its buffers, tables and runners), kept apart because streaming
never runs it.

Both cores (``workers=2``). Window mode: a twin engine decodes the first half of the
queries in a thread while this engine decodes the second. Causal mode: the recording is
cut in two at a group boundary and this engine starts its half ``warm_up_groups``
earlier. A finished group's layer-l cache rows depend only on the spikes of itself and
the l·(W-1) groups before it (each layer sees W-1 finished groups), and a query reads
the last layer's rows of the W-1 groups before its own, so after (depth+1)·(W-1) groups
the second half's state equals the one-pass state and its outputs equal one pass's (to
float rounding). ONNX Runtime releases the GIL while it runs, which is most of the time.

A session readout (``model.session_readout``, causal mode): the chunk graph's finish
blocks give every group's end-time features, the queries' rows their own (and, for a
readout of spike counts, each block's count per unit of the spikes it sees); after the
decode (one pass or split: the twin then finishes every group before the split) one scan
over the groups in order gives the GRU's states and each query's output.
``tests/test_engine.py`` holds both splits equal to one pass.

Measured on the 2-core VM (shipped size, 1 h of 200 units at 20 Hz, 10 ms hop;
benchmarks/results/offline_throughput_1h.json, a quiet hour): one worker 47.1 s, two
workers 24.0 s; on busier hours 56-64 s and 31 s. The group-per-run graph the chunk
graph replaced took 104 s with one worker; float32 spike phases (``cos_sin_float32``)
took 10% off (5 min decoded 10 times interleaved, one worker: 67.9 -> 61.1 s per hour,
medians). ``decode`` defaults to one worker, which is what
a caller sharing the machine wants; ``evaluate`` asks for two where there are two cores.
"""

from __future__ import annotations

import threading

import numpy as np

from bci_decoder.model.phases import cos_sin_float32, rotation_rows
from bci_decoder.tokenizer import grid_index
from bci_decoder.tokenizer import grid_index_scalar as _grid_index


class OfflineDecoding:
    def decode(
        self,
        spike_times: np.ndarray,
        spike_units: np.ndarray,
        query_times: np.ndarray,
        *,
        start: float | None = None,
        normalised: bool = False,
        workers: int = 1,
    ) -> np.ndarray:
        """Predictions (Q, D) at sorted ``query_times`` from a whole recording, equal to
        pushing every spike up to each query and calling ``step`` (the engine is reset
        first, to ``start`` if given; the last query's group is finished with all its
        spikes, later spikes are left for a later push). Causal mode runs the chunk
        graph; window mode steps. ``normalised``: z-scores. ``workers``: 2 decodes on
        two threads (module docstring): a causal recording of at least
        ``MIN_SPLIT_GROUPS`` groups, or at least ``MIN_SPLIT_WINDOWS`` window queries."""
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
            if workers < 2 or q.size < self.MIN_SPLIT_WINDOWS or not self._can_split():
                self._decode_window(times, units, q, out)
            else:  # windows are independent: each engine decodes half of the queries
                mid, twin = q.size // 2, self._twin_engine()
                twin.reset(start)
                self._two_threads(
                    twin,
                    lambda: twin._decode_window(times, units, q[:mid], out[:mid]),
                    lambda: self._decode_window(times, units, q[mid:], out[mid:]),
                )
                # the spikes both pushed (this half's first window, up to the twin's
                # last query) count once
                both = np.searchsorted(times, [q[mid] - self.context, q[mid - 1]], "right")
                self._spikes -= max(0, int(both[1] - both[0]))
        elif tab.readout is None:
            if not self._decode_split(times, units, q, out, start, workers):
                self._decode_causal(times, units, q, out)
        else:  # the session readout over the features, the groups in order
            r, D = tab.readout, self.dim
            qfeat, first, gfeat = self._features(times, units, q, out, start, workers, r.units)
            states = r.scan(gfeat[:, :D], gfeat[:, D:])  # (G+1, H): after 0, 1, ... G groups
            prev = grid_index(q, self.step_s) - first
            z = r.outputs_at(states[prev], qfeat[:, :D], qfeat[:, D:])  # (Q, O)
            out[:] = tab.norm.inverse(z)
            # the end state, as streaming would have it
            self._h, self._h_before_last, self._h_owner = states[-1], states[-2], r
        return tab.norm.forward(out) if normalised else out

    def decode_features(
        self,
        spike_times: np.ndarray,
        spike_units: np.ndarray,
        query_times: np.ndarray,
        *,
        start: float | None = None,
        workers: int = 1,
        counts: int = 0,
    ) -> tuple[np.ndarray, int, np.ndarray]:
        """Causal mode: the features the heads read (``model.step``) at each sorted
        query (Q, D), the index of the first group decoded, and the end-time features
        of every group from it to the last query's (G, D): a session readout's inputs
        (``train/session_readout_fit.py``). ``counts`` C > 0: C more columns, the spike
        counts of units 0..C-1 in the group up to the query's time (the group's end).
        The engine is reset first, as by ``decode``."""
        if self.mode != "causal":
            raise ValueError("features for a session readout come from causal mode")
        q = np.asarray(query_times, dtype=np.float64).reshape(-1)
        if q.size == 0 or np.any(np.diff(q) < 0):
            raise ValueError("query times must be sorted, and at least one")
        self.reset(start)
        out = np.zeros((q.size, self._tables.out_slice.stop - self._tables.out_slice.start))
        times = np.asarray(spike_times, dtype=np.float64)
        return self._features(times, np.asarray(spike_units), q, out.astype(np.float32),
                              start, workers, counts)  # fmt: skip

    def _features(self, times, units, q, out, start, workers, counts=0):
        qfeat = np.zeros((q.size, self.dim + counts), np.float32)
        gfeat: dict[int, np.ndarray] = {}
        if not self._decode_split(times, units, q, out, start, workers, qfeat, gfeat):
            self._decode_causal(times, units, q, out, qfeat=qfeat, gfeat=gfeat)
        first, last = min(gfeat), max(gfeat)
        if len(gfeat) != last - first + 1:
            raise RuntimeError("offline decoding lost a group's end-time features")
        return qfeat, first, np.stack([gfeat[g] for g in range(first, last + 1)])

    def _decode_window(self, times, units, q, out) -> None:
        """``decode`` in window mode: push each query's new spikes, step."""
        ends = np.searchsorted(times, q, side="right")
        j = int(np.searchsorted(times, q[0] - self.context, side="right"))
        for i, t in enumerate(q):
            if ends[i] > j:
                self.push(times[j : ends[i]], units[j : ends[i]])
                j = ends[i]
            out[i] = self.step(t)

    # window mode splits from this many queries on (a twin engine costs ~0.3 s)
    MIN_SPLIT_WINDOWS = 500

    def _can_split(self) -> bool:
        return self.backend == "onnx" and not self.fixed_shapes

    def _twin_engine(self):
        """A second engine of this one's package, mode, sizes and tables (made once),
        its counters zeroed: the other worker of a split decode."""
        twin = getattr(self, "_twin", None)
        if twin is not None:
            twin.set_units(self._tables)
        else:
            twin = type(self)(
                self.package,
                self._tables.session_id,
                mode=self.mode,
                max_spikes_per_group=self.capacity,
                max_spikes_per_window=self.ring_capacity,
                intra_op_threads=self._intra_op_threads,
                providers=self._providers,
                tables=self._tables,
            )
            self._twin = twin
        twin._steps = twin._spikes = twin._groups_finished = 0
        twin._rejected = dict.fromkeys(twin._rejected, 0)
        return twin

    def _two_threads(self, twin, first_half, second_half) -> None:
        """Run ``first_half`` (the twin's) in a thread and ``second_half`` (this
        engine's) here; then count the twin's steps, spikes and rejections as ours."""
        failed: list[BaseException] = []

        def run() -> None:
            try:
                first_half()
            except BaseException as e:  # raised again in the calling thread
                failed.append(e)

        thread = threading.Thread(target=run, name="decode-first-half")
        thread.start()
        try:
            second_half()
        finally:
            thread.join()
        if failed:
            raise failed[0]
        self._steps += twin._steps
        self._spikes += twin._spikes
        self._groups_finished += twin._groups_finished
        for k, v in twin._rejected.items():
            self._rejected[k] += v

    # a split costs a twin engine (~0.3 s) and warm_up_groups more groups: worth it from
    # about 100 s of recording on
    MIN_SPLIT_GROUPS = 2000

    @property
    def warm_up_groups(self) -> int:
        """Groups before a later start after which its state equals one pass's."""
        return (self.depth + 1) * max(self.W - 1, 1) + 1

    def _decode_split(self, times, units, q, out, start, workers, qfeat=None, gfeat=None) -> bool:
        """``decode`` in causal mode on two threads (module docstring); False (nothing
        done) when one worker is asked for or the recording is too short to gain."""
        if workers < 2 or not self._can_split():
            return False
        s, warm = self.step_s, self.warm_up_groups
        g_q = grid_index(q, s)
        first = self._group  # set by reset(start), else the first spike's or query's group
        if first is None:
            first = int(g_q[0]) if not len(times) else min(int(g_q[0]), _grid_index(times[0], s))
        ngroups = int(g_q[-1]) - first + 1
        if ngroups < max(self.MIN_SPLIT_GROUPS, 4 * warm):
            return False
        g_mid = first + (ngroups + warm) // 2  # the second half also runs its warm-up
        i_mid = int(np.searchsorted(g_q, g_mid))
        if i_mid == 0 or i_mid == q.size:
            return False
        twin = self._twin_engine()
        # with a session readout the twin finishes every group before g_mid (whose
        # end-time features it reads): one more query at the end of group g_mid - 1
        q1, out1, qf1 = q[:i_mid], out[:i_mid], None if qfeat is None else qfeat[:i_mid]
        extra = gfeat is not None and int(g_q[i_mid - 1]) < g_mid - 1
        if extra:
            q1 = np.append(q1, (g_mid - 1) * s)
            out1 = np.zeros((q1.size, out.shape[1]), out.dtype)
            qf1 = np.zeros((q1.size, qfeat.shape[1]), qfeat.dtype)

        def first_half() -> None:
            twin.reset(start)
            twin._decode_causal(times, units, q1, out1, qfeat=qf1, gfeat=gfeat)

        def second_half() -> None:
            # this engine: the second half, from its warm-up on (its end state is the
            # one-pass end state); the warm-up's spikes and groups are the twin's to count
            self.reset((g_mid - warm) * s - 0.5 * s)
            qf2 = None if qfeat is None else qfeat[i_mid:]
            self._decode_causal(
                times, units, q[i_mid:], out[i_mid:], count_from=g_mid, qfeat=qf2, gfeat=gfeat
            )

        self._two_threads(twin, first_half, second_half)
        if extra:
            out[:i_mid], qfeat[:i_mid] = out1[:i_mid], qf1[:i_mid]
            twin._steps -= 1  # the extra query is not one of the caller's
        return True

    # spike rows per chunk run (~40 groups at 200 units): large enough that the graph's
    # per-node cost is small next to its arithmetic, small enough that a run's arrays
    # stay in cache (1 h at 200 units, quiet VM: 2^12 55.8 s, 2^13 53.9-58.1 s,
    # 2^14 59.7 s, 2^15 67.8 s, 2^16 77.2 s extrapolated from 15 min)
    CHUNK_SPIKES = 2**13
    MAX_CHUNK_GROUPS = 512

    def _decode_causal(
        self,
        times: np.ndarray,
        units: np.ndarray,
        q: np.ndarray,
        out: np.ndarray,
        count_from: int | None = None,
        qfeat: np.ndarray | None = None,
        gfeat: dict[int, np.ndarray] | None = None,
    ) -> None:
        """``decode`` in causal mode: G groups per run of the chunk graph
        (``model.step.CausalChunk``), each with its queries and its finish; the finished
        rows of the last Wb groups carry over to the next run and, at the end, into the
        ring, so streaming can go on from there. ``count_from``: the first group whose
        spikes and finish the counters count (a warm-up's are not). ``qfeat`` (Q, D):
        filled with each query's features; ``gfeat``: filled with each counted group's
        end-time features (its finish block's), by group index (a session readout's
        inputs); where qfeat has C columns more than D, they get each block's spike
        counts of units 0..C-1 (the spikes the block sees, as ``step`` counts them)."""
        tab = self._tables
        s, n, D, f32 = self.step_s, self.n, self.dim, np.float32
        Wb, depth = self.L // n, self.depth  # L = max(W-1, 1)·n
        prior_last = self._last_time
        t_all, u_all = self._accept(times, units, tab)
        g_q = grid_index(q, s)
        first = self._group
        if first is None:
            first = int(g_q[0]) if not t_all.size else min(int(g_q[0]), _grid_index(t_all[0], s))
        if g_q[0] < first:
            raise ValueError(f"query time {q[0]} is before the first decoded group")
        keep = int(np.searchsorted(t_all, (first - 1) * s, side="right"))
        last = int(g_q[-1])
        end = int(np.searchsorted(t_all, last * s, side="right"))
        if end < t_all.size:  # spikes after the last query's group are left to a later push
            self._last_time = float(t_all[end - 1]) if end else prior_last
        # earlier spikes: groups never decoded; later ones: not consumed
        t_all, u_all = t_all[keep:end], u_all[keep:end]
        groups = np.arange(first, last + 2)
        sp_edges = np.searchsorted(grid_index(t_all, s), groups)
        q_edges = np.searchsorted(g_q, groups)
        runner = self._chunk_runner()
        fixed = {"null_k": tab.null_k, "null_v": tab.null_v, "dec_q": tab.dec_q, "query": tab.query}
        prev, prev_time = self._ring_in_order()
        ngroups = last - first + 1
        per_group = max(1, t_all.size // ngroups)
        step = max(1, min(self.MAX_CHUNK_GROUPS, self.CHUNK_SPIKES // per_group))
        C = 0 if qfeat is None else qfeat.shape[1] - D  # spike-count columns (a readout's)
        for c0 in range(0, ngroups, step):
            c1 = min(c0 + step, ngroups)
            G = c1 - c0
            g = np.arange(first + c0, first + c1)  # the chunk's groups
            a0, a1 = int(sp_edges[c0]), int(sp_edges[c1])
            tc, uc = t_all[a0:a1], u_all[a0:a1]
            ga = sp_edges[c0 : c1 + 1] - a0  # each group's first spike in the chunk
            cnt = np.minimum(np.diff(ga), self.capacity)  # as streaming: first `capacity`
            counted = slice(None) if count_from is None else g >= count_from
            self._rejected["overflow"] += int((np.diff(ga) - cnt)[counted].sum())
            self._spikes += int(cnt[counted].sum())
            # each group's spikes in (G, S) rows (padding: a spike never seen)
            S = max(1, int(cnt.max()))
            col = np.arange(S)
            valid = col < cnt[:, None]  # (G, S)
            pos = np.where(valid, ga[:-1, None] + col, 0)
            u_pad = uc[pos] if tc.size else np.zeros((G, S), np.intp)
            t_pad = tc[pos] if tc.size else np.zeros((G, S))
            # row blocks: 0 the group's finish at its end time, 1.. its queries
            nq = np.diff(q_edges[c0 : c1 + 1])
            B = 1 + int(nq.max())
            qg = np.repeat(np.arange(G), nq)  # each query's group (chunk-relative)
            qb = 1 + np.arange(qg.size) - np.repeat(np.cumsum(nq) - nq, nq)  # its block
            tq = np.repeat((g * s)[:, None], B, 1)  # padding blocks: the end time too
            tq[qg, qb] = q[q_edges[c0] : q_edges[c1]]
            seen = np.zeros((G, B), np.int64)
            seen[:, 0] = cnt
            seen[qg, qb] = np.minimum(
                np.searchsorted(tc, tq[qg, qb], side="right") - ga[qg], cnt[qg]
            )
            visible = col < seen[..., None]  # (G, B, S)
            feat = np.empty((G, B, D + 1), f32)
            # unit-embedding sums of the spikes each block sees
            np.matmul(visible.astype(f32), np.take(tab.emb, u_pad, axis=0), out=feat[..., :D])
            feat[..., D] = (tq - ((g - 1) * s)[:, None]) / s
            feat[:, 0, D] = 1.0
            if C:  # each block's spike counts per unit (G, B, C)
                onehot = np.zeros((G, S, C), f32)
                gi, si = np.nonzero(valid & (u_pad < C))
                onehot[gi, si, u_pad[gi, si]] = 1.0
                block_counts = np.matmul(visible.astype(f32), onehot)
            k_t, v_t = self._heads_first(tab)
            spike_cos, spike_sin = cos_sin_float32(t_pad, self.periods)  # (G, S, F)
            rot_cos, rot_sin = rotation_rows(tq, self.periods, self.Dh)
            band_idx = np.arange(G)[:, None] + np.arange(Wb)  # (G, Wb) into the bank
            bank_time = np.concatenate([prev_time, g * s if self.W > 1 else np.full(G, -np.inf)])
            dt = tq[:, :, None] - bank_time[band_idx][:, None, :]  # (G, B, Wb) float64
            feeds = {
                "spike_k": np.take(k_t, u_pad, axis=1),  # (Hc, G, S, Dh) unrotated
                "spike_v": np.take(v_t, u_pad, axis=1),
                "spike_cos": spike_cos,
                "spike_sin": spike_sin,
                "spike_bias": np.where(visible, f32(0), f32(-np.inf)),
                "count_feat": feat,
                "rot_cos": rot_cos,
                "rot_sin": rot_sin,
                "band_dt": np.repeat(dt.astype(f32), n, axis=2),  # (G, B, Wb·n)
                "band_idx": band_idx,
                **fixed,
                **prev,
            }
            pred, new_k, new_v, new_dk, new_dv = runner.call(feeds)
            out[q_edges[c0] : q_edges[c1]] = (
                pred[qg, qb][:, tab.out_slice] * tab.norm.std + tab.norm.mean
            )
            if qfeat is not None:
                qfeat[q_edges[c0] : q_edges[c1], :D] = pred[qg, qb][:, self.P :]
                if C:
                    qfeat[q_edges[c0] : q_edges[c1], D:] = block_counts[qg, qb]
            if gfeat is not None:
                for j in np.flatnonzero(counted if count_from is not None else np.ones(G, bool)):
                    row = pred[j, 0, self.P :]
                    gfeat[int(g[j])] = np.concatenate([row, block_counts[j, 0]]) if C else row
            self._steps += qg.size
            self._groups_finished += (
                G if count_from is None else int(np.count_nonzero(g >= count_from))
            )
            # the Wb groups before the next chunk: [prev | this chunk's finishes][-Wb:]
            for i in range(depth):
                for name, new in ((f"prev_k{i}", new_k), (f"prev_v{i}", new_v)):
                    rows = new[i * self.Hs : (i + 1) * self.Hs].reshape(self.Hs, G * n, -1)
                    prev[name] = _last_rows(prev[name], rows, Wb * n)
            prev["prev_dk"] = _last_rows(
                prev["prev_dk"], new_dk.reshape(self.Hc, G * n, -1), Wb * n
            )
            prev["prev_dv"] = _last_rows(
                prev["prev_dv"], new_dv.reshape(self.Hc, G * n, -1), Wb * n
            )
            prev_time = bank_time[-Wb:]
        self._ring_from_order(prev, prev_time)
        self._group, self._count = last + 1, 0
        self._last_step = float(q[-1])

    def _heads_first(self, tab) -> tuple[np.ndarray, np.ndarray]:
        """The tables' keys and values heads first, (Hc, units, Dh), made once per table."""
        cached = getattr(self, "_tables_t", None)
        if cached is None or cached[0] is not tab:
            k_t = np.ascontiguousarray(tab.k.transpose(1, 0, 2))
            v_t = np.ascontiguousarray(tab.v.transpose(1, 0, 2))
            self._tables_t = cached = (tab, k_t, v_t)
        return cached[1], cached[2]

    def _ring_in_order(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The ring's cached rows as the chunk graph's ``prev_*`` inputs (oldest group
        first) and their groups' times (Wb,) (-inf: empty)."""
        order = (self._slot + np.arange(self.L)) % self.L
        prev = {}
        for i in range(self.depth):
            prev[f"prev_k{i}"] = np.ascontiguousarray(self._cache_k[i][:, order])
            prev[f"prev_v{i}"] = np.ascontiguousarray(self._cache_v[i][:, order])
        prev["prev_dk"] = np.ascontiguousarray(self._dec_k[:, order])
        prev["prev_dv"] = np.ascontiguousarray(self._dec_v[:, order])
        return prev, self._cache_time[order][:: self.n].copy()

    def _ring_from_order(self, prev: dict[str, np.ndarray], prev_time: np.ndarray) -> None:
        """Write ``_ring_in_order``'s arrays back into the ring (from slot 0)."""
        for i in range(self.depth):
            self._cache_k[i] = prev[f"prev_k{i}"]
            self._cache_v[i] = prev[f"prev_v{i}"]
        self._dec_k[:] = prev["prev_dk"]
        self._dec_v[:] = prev["prev_dv"]
        self._cache_time[:] = np.repeat(prev_time, self.n)
        self._slot = 0
        self._dirty |= set(self._persistent)

    def _chunk_runner(self):
        """The chunk graph's runner, made on first use (offline decoding only)."""
        if getattr(self, "_chunk", None) is None:
            self._chunk = self._make_runner("causal_chunk")
        return self._chunk


def _last_rows(prev: np.ndarray, new: np.ndarray, rows: int) -> np.ndarray:
    """The last ``rows`` rows (axis 1) of [prev | new]."""
    if new.shape[1] >= rows:
        return np.ascontiguousarray(new[:, -rows:])
    return np.concatenate([prev[:, new.shape[1] - rows :], new], 1)
