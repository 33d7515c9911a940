"""Offline decoding through the streaming engine: a whole recording, a group at a time.

``decode`` gives what pushing every spike up to each query and calling ``step`` would,
with the same engine state and graphs. Causal mode runs all queries of a group plus the
group's finish in one run of the batch graph (the same computation with B queries as
rows); window mode steps. A mixin of ``StreamingEngine`` (its buffers, tables and
runners), kept apart because streaming never runs it.
"""

from __future__ import annotations

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
            j = int(np.searchsorted(times, q[0] - self.context, side="right"))
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
