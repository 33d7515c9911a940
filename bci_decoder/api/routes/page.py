"""The monitoring page: ``GET /`` (static files in the package, no build step, no CDN)
and its live feed, ``GET /live/events`` (server-sent events) and ``GET /live/snapshot``.

One producer per app takes a snapshot of what the daemon already keeps (the spike and
behaviour rings, the loop's last output, its latency log and counters) at ``RATE_HZ``,
serialises it once and hands the same message to every page that is watching, so a
fifth page costs a queue put, not a fifth snapshot. It runs only while a page is
connected. A snapshot reads rings through their own reader cursors (copies, the writer
never waits) and never calls into the loop: watching adds no work to the decode step.

A slow page drops old messages (its queue keeps the newest ``QUEUE``), it never holds
the producer up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from importlib import resources

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response, StreamingResponse

from bci_decoder.runtime.daemon import Daemon, DaemonError
from bci_decoder.runtime.decode_loop import lsl_clock

log = logging.getLogger(__name__)

router = APIRouter(tags=["page"])

RATE_HZ = 20.0  # snapshots per second (the page redraws on each)
QUEUE = 8  # messages a page may fall behind before old ones are dropped
MAX_SPIKES = 3000  # spikes per snapshot (more in one tick: a uniform subset is sent)
MAX_BEHAVIOR = 200  # behaviour samples per snapshot
# output-latency histogram: log bins 0.05-500 ms (6% wide, so percentiles read from it are
# within 3%), one count vector per second over the last HIST_SECONDS
HIST_EDGES = np.geomspace(0.05, 500.0, 161)  # (161,) ms
HIST_SECONDS = 60
SLOW_EVERY = 5  # histogram, engine counters and stream names every 5th snapshot
STATIC = resources.files("bci_decoder.api") / "static"
PAGE_FILES = {"index.html": "text/html", "live.js": "text/javascript", "live.css": "text/css"}


class LatencyWindow:
    """Counts of output latencies per histogram bin over the last ``seconds``: one
    vector per second, so adding a value is a bincount and the window a sum."""

    def __init__(self, edges: np.ndarray = HIST_EDGES, seconds: int = HIST_SECONDS) -> None:
        self.edges = edges
        self.slots = np.zeros((seconds, len(edges) + 1), np.int64)  # (S, B+2): under, bins, over
        self.second = -1

    def add(self, ms: np.ndarray, now: float) -> None:
        sec = int(now)
        if sec != self.second:
            gone = min(sec - self.second, len(self.slots)) if self.second >= 0 else 0
            for k in range(1, gone + 1):
                self.slots[(self.second + k) % len(self.slots)] = 0
            self.second = sec
        if len(ms):
            idx = np.searchsorted(self.edges, ms, side="right")  # 0: under, B+1: over
            self.slots[sec % len(self.slots)] += np.bincount(idx, minlength=self.slots.shape[1])

    def counts(self) -> np.ndarray:
        return self.slots.sum(0)  # (B+2,)

    def percentiles(self, counts: np.ndarray, qs=(50.0, 99.0, 99.9)) -> list[float | None]:
        """Percentiles read at the geometric centre of the bin they fall in."""
        total = int(counts.sum())
        if total == 0:
            return [None] * len(qs)
        cum = np.cumsum(counts)
        e = self.edges
        centre = np.concatenate([[e[0]], np.sqrt(e[:-1] * e[1:]), [e[-1]]])  # (B+2,)
        return [float(centre[int(np.searchsorted(cum, q / 100 * total))]) for q in qs]


class LiveFeed:
    """Snapshots of one daemon for any number of pages (see the module docstring)."""

    def __init__(self, daemon: Daemon, rate_hz: float = RATE_HZ) -> None:
        self.daemon = daemon
        self.period = 1.0 / rate_hz
        self.queues: set[asyncio.Queue] = set()
        self.task: asyncio.Task | None = None
        self.snapshots = 0
        self.snapshot_ms = 0.0  # time spent taking snapshots (the feed's own cost)
        self.last: str | None = None  # the newest message
        self._loop_id = 0
        self._spike_cursor: int | None = None
        self._beh_ring = None
        self._beh_cursor = 0
        self._lat_n = 0
        self._hist = LatencyWindow()
        self._rate = (None, 0)  # (clock, ring.written) a second ago
        self._spikes_per_s = 0.0
        self._slow: dict = {}

    # ---------------------------------------------------------------- fan-out
    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(QUEUE)
        self.queues.add(q)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._produce())
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self.queues.discard(q)

    async def _produce(self) -> None:
        clock = asyncio.get_running_loop().time
        due = clock()
        while self.queues:
            try:
                msg = json.dumps(self.snapshot(), allow_nan=False, separators=(",", ":"))
            except Exception:  # noqa: BLE001 - a page must not end the feed
                log.exception("live snapshot failed")
                msg = json.dumps({"error": "snapshot failed; see the daemon log"})
            self.last = msg
            for q in list(self.queues):
                if q.full():
                    q.get_nowait()  # drop the oldest: a slow page never holds us up
                q.put_nowait(msg)
            due += self.period
            wait = due - clock()
            if wait < 0:  # fell behind (a busy machine): keep the grid, skip what passed
                due, wait = clock(), 0.0
            await asyncio.sleep(wait)
        self.task = None

    # ---------------------------------------------------------------- snapshot
    def snapshot(self) -> dict:
        """What the page shows, from copies of what the daemon already keeps."""
        t0 = time.perf_counter()
        d = self.daemon
        now = lsl_clock()
        loop, inlet, binlet = d.loop, d.spike_inlet, d.behavior_inlet
        if loop is not None and id(loop) != self._loop_id:  # a new loop: new latency log
            self._loop_id, self._lat_n = id(loop), 0
        slow = self.snapshots % SLOW_EVERY == 0
        msg: dict = {"t": now, "state": d.state, "model": d.describe_model()}
        msg["config"] = {"mode": d.cfg.mode, "backend": d.cfg.backend,
                         "cadence_hz": d.cfg.cadence_hz, "providers": d.providers}  # fmt: skip
        msg["spikes"] = self._spikes(now)
        msg["behavior"] = self._behavior(binlet)
        if loop is not None:
            st = loop.stats
            act = loop.active
            msg["output"] = {"labels": act.labels, "name": act.output, "t": now,
                             "y": _finite(loop.last_output)}  # fmt: skip
            msg["counters"] = {"steps": st.steps, "missed": st.missed, "late": st.late,
                               "errors": st.errors, "safe_steps": st.safe_steps,
                               "swaps": st.swaps, "spikes_in": st.spikes_in}  # fmt: skip
            self._latency(loop, now)
        msg["discards"] = {
            "nan_time": inlet.stats.nan_time if inlet else 0,
            "out_of_order": inlet.stats.out_of_order if inlet else 0,
            "bad_unit": inlet.stats.bad_unit if inlet else 0,
            "lsl_gaps": inlet.stats.seq_gaps if inlet else 0,
            "ring_overflow": loop.stats.ring_lost if loop else 0,
            "unknown_unit": loop.stats.unknown_unit_spikes if loop else 0,
            "behavior_nan": binlet.stats.nan_time if binlet else 0,
        }
        if slow:
            self._slow = self._slow_part(loop, inlet, binlet)
        msg.update(self._slow)
        self.snapshots += 1
        self.snapshot_ms += (time.perf_counter() - t0) * 1e3
        return msg

    def _spikes(self, now: float) -> dict:
        ring = self.daemon.ring
        end = ring.written
        if self._spike_cursor is None or self._spike_cursor > end:
            self._spike_cursor = end  # start watching from now
        cursor = max(self._spike_cursor, end - 4 * MAX_SPIKES)  # after a gap: the newest
        times, units, self._spike_cursor, _ = ring.read_spikes(cursor)
        t_prev, n_prev = self._rate
        if t_prev is None:
            self._rate = (now, end)
        elif now - t_prev >= 1.0:
            self._spikes_per_s = (end - n_prev) / (now - t_prev)
            self._rate = (now, end)
        if len(times) > MAX_SPIKES:  # a uniform subset (the raster says so)
            pick = np.linspace(0, len(times) - 1, MAX_SPIKES).astype(np.int64)
            times, units = times[pick], units[pick]
        return {"n": int(end - cursor), "per_s": self._spikes_per_s,
                "dt": np.round(times - now, 4).tolist(), "u": units.tolist()}  # fmt: skip

    def _behavior(self, binlet) -> dict | None:
        ring = binlet.ring if binlet is not None else None
        if ring is None:
            return None
        if ring is not self._beh_ring:
            self._beh_ring, self._beh_cursor = ring, max(0, ring.written - MAX_BEHAVIOR)
        cursor = max(self._beh_cursor, ring.written - MAX_BEHAVIOR)
        times, data, self._beh_cursor, _ = ring.read(cursor)
        ok = np.isfinite(data).all(1)
        return {"labels": binlet.labels, "output": binlet.output, "t": times[ok].tolist(),
                "y": np.round(data[ok].astype(np.float64), 4).tolist()}  # fmt: skip

    def _latency(self, loop, now: float) -> None:
        log_ = loop.output_ms
        n, cap = log_.n, len(log_.values)
        if self._lat_n == 0:  # first look at this loop: backfill the window's worth only
            self._lat_n = max(0, n - int(self.daemon.cfg.cadence_hz * HIST_SECONDS))
        start = max(self._lat_n, n - cap)
        if n > start:
            idx = np.arange(start, n) % cap
            self._hist.add(log_.values[idx], now)
        else:
            self._hist.add(log_.values[:0], now)
        self._lat_n = n

    def _slow_part(self, loop, inlet, binlet) -> dict:
        """Every SLOW_EVERY snapshots: the histogram, engine counters, stream sources."""
        counts = self._hist.counts()
        p50, p99, p999 = self._hist.percentiles(counts)
        out: dict = {"latency": {"edges_ms": self._edges, "counts": counts.tolist(),
                                 "p50": p50, "p99": p99, "p999": p999,
                                 "window_s": HIST_SECONDS}}  # fmt: skip
        rejected = {}
        if loop is not None:
            try:
                rejected = dict(loop.active.engine.stats().rejected)
            except Exception:  # noqa: BLE001 - whatever the engine is, the page answers
                rejected = {}
        out["engine_rejected"] = rejected
        n = max(self.snapshots, 1)
        out["feed"] = {"pages": len(self.queues), "snapshots": self.snapshots,
                       "snapshot_ms_mean": self.snapshot_ms / n}  # fmt: skip
        d = self.daemon
        out["sources"] = {
            "spikes": _stream(inlet, d.cfg.spikes),
            "behavior": _stream(binlet, d.cfg.behavior) if d.cfg.behavior else None,
            "control": {"name": d.cfg.control_name, "source_id": d.cfg.control_source_id,
                        "state": "open" if d.outlet is not None else "not declared"},
        }  # fmt: skip
        return out

    @property
    def _edges(self) -> list[float]:
        return np.round(self._hist.edges, 4).tolist()


def _finite(y: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in y]


def _stream(inlet, query) -> dict:
    """A stream's source as the inlet sees it (or what it is waiting for)."""
    want = {"type": query.type, "name": query.name, "source_id": query.source_id}
    if inlet is None:
        return {"state": "closed", "query": want}
    info = inlet.info
    s = inlet.stats
    return {
        "state": inlet.state,
        "query": want,
        "name": info.name() if info is not None else None,
        "source_id": info.source_id() if info is not None else None,
        "hostname": info.hostname() if info is not None else None,
        "received": s.received,
        "connects": s.connects,
        "losses": s.losses,
    }


def feed_of(request: Request) -> LiveFeed:
    feed = getattr(request.app.state, "live_feed", None)
    if feed is None or feed.daemon is not request.app.state.daemon:
        feed = request.app.state.live_feed = LiveFeed(request.app.state.daemon)
    return feed


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    """The monitoring page."""
    return FileResponse(str(STATIC / "index.html"), media_type="text/html")


@router.get("/static/{name}", include_in_schema=False)
def static(name: str) -> FileResponse:
    if name not in PAGE_FILES:
        raise DaemonError(f"no page file {name!r} (have {sorted(PAGE_FILES)})", 404)
    return FileResponse(str(STATIC / name), media_type=PAGE_FILES[name])


@router.get("/live/snapshot")
async def snapshot(request: Request) -> Response:
    """What the page shows, as one JSON message: the feed's newest while pages watch,
    else a fresh snapshot (taken on the event loop, like the feed's, so the two never
    race over the feed's ring cursors)."""
    feed = feed_of(request)
    msg = feed.last if feed.task is not None else None
    if msg is None:
        msg = json.dumps(feed.snapshot(), allow_nan=False)
    return Response(msg, media_type="application/json")


@router.get("/live/events")
async def events(request: Request) -> StreamingResponse:
    """Server-sent events: one snapshot message every 1/RATE_HZ s while connected."""
    feed = feed_of(request)

    async def stream() -> AsyncIterator[str]:
        q = feed.subscribe()
        try:
            yield f"retry: 1000\nevent: hello\ndata: {json.dumps({'rate_hz': RATE_HZ})}\n\n"
            while True:
                msg = await q.get()
                yield f"data: {msg}\n\n"
        finally:
            feed.unsubscribe(q)

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)
