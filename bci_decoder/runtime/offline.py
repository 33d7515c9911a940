"""Offline decoding through the streaming engine: a whole recording, a group at a time.

``decode`` gives what pushing every spike up to each query and calling ``step`` would,
with the same engine state and graphs. Causal mode runs all queries of a group plus the
group's finish in one run of the batch graph (the same computation with B queries as
rows); window mode steps. A mixin of ``StreamingEngine`` (its buffers, tables and
runners), kept apart because streaming never runs it.

Both cores (``workers=2``): a long recording is cut in two at a group boundary; a twin
engine decodes the first half in a thread while this engine decodes the second, started
``warm_up_groups`` earlier. A finished
group's layer-l cache rows depend only on the spikes of itself and the l·(W-1) groups
before it (each layer sees W-1 finished groups), and a query reads the last layer's rows
of the W-1 groups before its own, so after (depth+1)·(W-1) groups the second half's
state equals the one-pass state and its outputs equal one pass's (to float rounding:
only the ring's slot order differs). ONNX Runtime releases the GIL while it runs, which
is most of the time. ``tests/test_engine.py`` holds the two-worker output equal to one.
Measured on the shared 2-core VM (shipped size, 200 units, 10 ms hop): 120-150 s
decoded, interleaved, load average 5.5-12 (both cores busy with other work): two workers
took 1.0-1.7x one worker's wall time, ONNX Runtime's two intra-op threads 3.7x; the whole
hour at load 3.6-4.8 (benchmarks/results/offline_throughput_1h.json): one worker 141 s,
two 129 s. So one worker stays the default and the split is asked for where a core is
free (``benchmarks/offline_throughput.py --workers 1 2`` measures both on the machine).
"""

from __future__ import annotations

import threading

import numpy as np

from bci_decoder.model.phases import angles
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
        first, to ``start`` if given). Causal mode runs each group's queries and its
        finish as one batch; window mode steps. ``normalised``: z-scores.
        ``workers``: 2 decodes a causal recording of at least ``MIN_SPLIT_GROUPS``
        groups on two threads (module docstring)."""
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
            j = int(np.searchsorted(times, q[0] - self.context, side="right"))
            for i, t in enumerate(q):
                if ends[i] > j:
                    self.push(times[j : ends[i]], units[j : ends[i]])
                    j = ends[i]
                out[i] = self.step(t)
        elif not self._decode_split(times, units, q, out, start, workers):
            self._decode_causal(times, units, q, out)
        return tab.norm.forward(out) if normalised else out

    # a split costs a twin engine (~0.3 s) and warm_up_groups more groups: worth it from
    # about 100 s of recording on
    MIN_SPLIT_GROUPS = 2000

    @property
    def warm_up_groups(self) -> int:
        """Groups before a later start after which its state equals one pass's."""
        return (self.depth + 1) * max(self.W - 1, 1) + 1

    def _decode_split(self, times, units, q, out, start, workers) -> bool:
        """``decode`` in causal mode on two threads (module docstring); False (nothing
        done) when one worker is asked for or the recording is too short to gain."""
        if workers < 2 or self.backend != "onnx" or self.fixed_shapes:
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
        twin = getattr(self, "_twin", None)
        if twin is not None:
            twin.set_units(self._tables)
        else:
            twin = type(self)(
                self.package,
                self._tables.session_id,
                mode="causal",
                max_spikes_per_group=self.capacity,
                max_spikes_per_window=self.ring_capacity,
                intra_op_threads=self._intra_op_threads,
                providers=self._providers,
                tables=self._tables,
            )
            self._twin = twin
        failed: list[BaseException] = []

        def first_half() -> None:
            try:
                twin.reset(start)
                twin._decode_causal(times, units, q[:i_mid], out[:i_mid])
            except BaseException as e:  # raised again in the calling thread
                failed.append(e)

        twin._steps = twin._spikes = twin._groups_finished = 0
        twin._rejected = dict.fromkeys(twin._rejected, 0)
        thread = threading.Thread(target=first_half, name="decode-first-half")
        thread.start()
        try:
            # this engine: the second half, from its warm-up on (its end state is the
            # one-pass end state); the warm-up's spikes and groups are the twin's to count
            self.reset((g_mid - warm) * s - 0.5 * s)
            self._decode_causal(times, units, q[i_mid:], out[i_mid:], count_from=g_mid)
        finally:
            thread.join()
        if failed:
            raise failed[0]
        self._steps += twin._steps
        self._spikes += twin._spikes
        self._groups_finished += twin._groups_finished
        for k, v in twin._rejected.items():
            self._rejected[k] += v
        return True

    def _decode_causal(
        self,
        times: np.ndarray,
        units: np.ndarray,
        q: np.ndarray,
        out: np.ndarray,
        count_from: int | None = None,
    ) -> None:
        """``decode`` in causal mode. Spikes are rotated a chunk of groups at a time (the
        same ``_rotate``, vectorised over ~10^4 spikes); then per group one run of the
        batch graph computes its queries and, as its last row block, the group's finish,
        whose cache rows go into the ring as in streaming. ``count_from``: the first
        group whose spikes and finish the counters count (a warm-up's are not)."""
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
            counted = slice(None) if count_from is None else g >= count_from
            self._rejected["overflow"] += int((np.diff(ga) - cnt)[counted].sum())
            self._spikes += int(cnt[counted].sum())
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
            ph = angles(tq, self.periods)
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
                self._groups_finished += count_from is None or int(g[i]) >= count_from
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

    def _batch_runner(self):
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
