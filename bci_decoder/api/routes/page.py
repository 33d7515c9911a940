"""The monitoring page: ``GET /`` (static files in the package, no build step, no CDN)
and its live feed, ``GET /live/events`` (server-sent events) and ``GET /live/snapshot``.

Watching must cost the decode loop nothing measurable. The loop runs on its own
SCHED_FIFO thread but shares the GIL with uvicorn's thread, which runs at normal priority:
on a loaded machine a GIL holder that the kernel preempts keeps the loop waiting until it
runs again (tens of ms at load 15 on 2 cores), so every millisecond the server thread
holds the GIL is a chance of a missed deadline. Measured with ``benchmarks/page_cost.py``
(uvicorn's thread CPU per second, 5 pages vs none): the first feed (20 Hz, a
StreamingResponse and an asyncio queue per page, float lists in JSON) cost 15 ms/s, of
which snapshots 6 (0.28 ms each), JSON about 2 (0.1-0.6 ms per message, floats dominate),
and the per-page path through StreamingResponse (queue wake-up, generator, str -> bytes
per page, send) about 75 us per page per message. So:

- one producer per app takes a snapshot of what the daemon already keeps (rings read
  through their own cursors, copies; the writer never waits; nothing calls into the
  loop), at ``RATE_HZ`` (12.5: the issue asks for 10 or more), only while a page watches;
- the snapshot is encoded once, to the SSE frame's bytes, and the same bytes object goes
  to every page: a page costs one ASGI ``send`` per message, no re-encoding;
- spike times and units travel as base64 int32 arrays (one C call each, no float repr);
- what changes slowly (model, config, histogram, engine counters, stream sources) is
  sent every ``SLOW_EVERY``-th message, and at once to a page that just connected.
- ticks are phase-locked to the loop's deadlines: each starts 2.5 ms after one (at 100
  Hz), when the step is done, so the feed's GIL holds sit in the loop's idle time.

After these (``benchmarks/results/page_cost.txt``, load 6-14): 2 ms/s with no page, 9-11
with 5; per message a snapshot 0.26 ms, encoding 0.08 ms (3.9 KB), and 0.14 ms per page to
send, which is now most of it. Every batch still showed a missed deadline or a few more
with 5 pages (within the runs' spread, not significant). uvicorn then parsed HTTP with
h11 (pure Python); with httptools (``serve.http_protocol``) uvicorn's thread took 9.9 ms/s
with 5 pages vs 10.4 on h11 at the same load (4): the sends are socket writes and ASGI
plumbing, not parsing. At load 3-4 both parsers showed 0 missed with 5 pages or none.

A slow page drops its oldest messages (it keeps the newest ``QUEUE``); it never holds the
producer or the other pages up.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections import deque
from importlib import resources

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from starlette.types import Receive, Scope, Send

from bci_decoder.runtime.daemon import Daemon, DaemonError
from bci_decoder.runtime.decode_loop import lsl_clock

log = logging.getLogger(__name__)

router = APIRouter(tags=["page"])

RATE_HZ = 12.5  # snapshots per second (the page redraws on each)
QUEUE = 8  # messages a page may fall behind before old ones are dropped
MAX_SPIKES = 2000  # spikes per snapshot (more in one tick: a uniform subset is sent)
MAX_BEHAVIOR = 200  # behaviour samples per snapshot
# ticks fall this far into one of the loop's hops (a quarter, at most 2.5 ms): after its
# step (p50 about 1 ms at 100 Hz), well before its next deadline
AFTER_DEADLINE, AFTER_DEADLINE_MAX_S = 0.25, 0.0025
SPIKE_TICK_S = 1e-4  # spike times are sent as int32 multiples of 0.1 ms before `t`
# output-latency histogram: log bins 0.05-500 ms (6% wide, so percentiles read from it are
# within 3%), one count vector per second over the last HIST_SECONDS
HIST_EDGES = np.geomspace(0.05, 500.0, 161)  # (161,) ms
HIST_SECONDS = 60
SLOW_EVERY = 10  # model, histogram, engine counters and sources every 10th (0.8 s)
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


class Page:
    """One watching page: its ASGI ``send`` and the frames it has not been sent yet."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.pending: deque[bytes] = deque(maxlen=QUEUE)
        self.wake = asyncio.Event()
        self.dropped = 0  # frames dropped because the page fell QUEUE behind
        self.sent = 0
        self.send_s = 0.0  # time in ``send`` (the per-page cost)

    def post(self, frame: bytes) -> None:
        if len(self.pending) == QUEUE:
            self.dropped += 1  # the deque drops the oldest itself
        self.pending.append(frame)
        self.wake.set()

    async def run(self) -> None:
        msg = {"type": "http.response.body", "body": b"", "more_body": True}
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.pending:
                msg["body"] = self.pending.popleft()
                t0 = time.perf_counter()
                await self.send(msg)  # the same bytes object every page gets
                self.send_s += time.perf_counter() - t0
                self.sent += 1


class LiveFeed:
    """Snapshots of one daemon for any number of pages (see the module docstring)."""

    def __init__(self, daemon: Daemon, rate_hz: float = RATE_HZ) -> None:
        self.daemon = daemon
        self.period = 1.0 / rate_hz
        self.pages: set[Page] = set()
        self.task: asyncio.Task | None = None
        self.snapshots = 0
        self.snapshot_s = 0.0  # time spent taking snapshots (the feed's own cost)
        self.encode_s = 0.0  # time spent encoding them (once for all pages)
        self.bytes_out = 0  # frame bytes produced (each sent once per page)
        self.last: bytes | None = None  # the newest message (JSON)
        self._loop_id = 0
        self._spike_cursor: int | None = None
        self._beh_ring = None
        self._beh_cursor = 0
        self._lat_n = 0
        self._hist = LatencyWindow()
        self._rate = (None, 0)  # (clock, ring.written) a second ago
        self._spikes_per_s = 0.0
        self._slow_due = True  # the next snapshot carries the slow part
        self._seen: tuple = ()  # (state, loop, swaps) at the last snapshot
        self._closed_sent = {"sent": 0, "dropped": 0, "send_s": 0.0}  # of pages gone

    # ---------------------------------------------------------------- fan-out
    def subscribe(self, send: Send) -> Page:
        page = Page(send)
        self.pages.add(page)
        self._slow_due = True  # its first frame has everything
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._produce())
        return page

    def unsubscribe(self, page: Page) -> None:
        if page in self.pages:
            self.pages.discard(page)
            c = self._closed_sent
            c["sent"] += page.sent
            c["dropped"] += page.dropped
            c["send_s"] += page.send_s

    def encode(self, msg: dict) -> bytes:
        t0 = time.perf_counter()
        body = json.dumps(msg, allow_nan=False, separators=(",", ":")).encode()
        self.encode_s += time.perf_counter() - t0
        return body

    def _next_tick(self, now: float) -> float:
        """The next tick on the LSL clock: a whole number of the loop's hops, just after
        one of its deadlines (``k * hop``), so the feed's GIL holds fall in the loop's
        idle time and a preemption of this thread has most of a hop to end before the
        loop needs the GIL again."""
        hop = 1.0 / self.daemon.cfg.cadence_hz
        period = hop * max(1, round(self.period / hop))
        after = min(AFTER_DEADLINE * hop, AFTER_DEADLINE_MAX_S)
        return (np.floor((now - after) / period) + 1) * period + after

    async def _produce(self) -> None:
        while self.pages:
            try:
                body = self.encode(self.snapshot())
            except Exception:  # noqa: BLE001 - a page must not end the feed
                log.exception("live snapshot failed")
                body = json.dumps({"error": "snapshot failed; see the daemon log"}).encode()
            self.last = body
            frame = b"data: " + body + b"\n\n"  # one bytes object for every page
            self.bytes_out += len(frame)
            for page in self.pages:
                page.post(frame)
            now = lsl_clock()
            await asyncio.sleep(max(0.0, self._next_tick(now) - now))
        self.task = None

    def costs(self) -> dict:
        """What watching has cost this process so far, for the page and benchmarks."""
        n = max(self.snapshots, 1)
        c = self._closed_sent
        sent = c["sent"] + sum(p.sent for p in self.pages)
        send_s = c["send_s"] + sum(p.send_s for p in self.pages)
        return {
            "pages": len(self.pages),
            "snapshots": self.snapshots,
            "snapshot_ms_mean": 1e3 * self.snapshot_s / n,
            "encode_ms_mean": 1e3 * self.encode_s / n,
            "bytes_mean": self.bytes_out / n,
            "sends": sent,
            "send_ms_mean": 1e3 * send_s / max(sent, 1),
            "dropped": c["dropped"] + sum(p.dropped for p in self.pages),
        }

    # ---------------------------------------------------------------- snapshot
    def snapshot(self) -> dict:
        """What the page shows, from copies of what the daemon already keeps: every
        time the state, new spikes and behaviour, the last output and the counters; every
        SLOW_EVERY-th time (and for a page that just connected) the rest."""
        t0 = time.perf_counter()
        d = self.daemon
        now = lsl_clock()
        loop, inlet, binlet = d.loop, d.spike_inlet, d.behavior_inlet
        if loop is not None and id(loop) != self._loop_id:  # a new loop: new latency log
            self._loop_id, self._lat_n = id(loop), 0
        msg: dict = {"t": now, "state": d.state}
        swaps = loop.stats.swaps if loop is not None else -1
        if (d.state, self._loop_id, swaps) != self._seen:  # what the slow part shows changed
            self._seen, self._slow_due = (d.state, self._loop_id, swaps), True
        msg["spikes"] = self._spikes(now)
        msg["behavior"] = self._behavior(binlet)
        if loop is not None:
            st = loop.stats
            msg["output"] = {"t": now, "y": _finite(loop.last_output)}
            msg["counters"] = {"steps": st.steps, "missed": st.missed, "late": st.late,
                               "errors": st.errors, "safe_steps": st.safe_steps,
                               "swaps": st.swaps, "spikes_in": st.spikes_in}  # fmt: skip
            self._latency(loop, now)
        msg["discards"] = {
            "nan_time": inlet.stats.nan_time if inlet else 0,
            "future_time": inlet.stats.future if inlet else 0,
            "out_of_order": inlet.stats.out_of_order if inlet else 0,
            "bad_unit": inlet.stats.bad_unit if inlet else 0,
            "lsl_gaps": inlet.stats.seq_gaps if inlet else 0,
            "ring_overflow": loop.stats.ring_lost if loop else 0,
            "unknown_unit": loop.stats.unknown_unit_spikes if loop else 0,
            "behavior_nan": binlet.stats.nan_time if binlet else 0,
        }
        if self._slow_due or self.snapshots % SLOW_EVERY == 0:
            msg.update(self._slow_part(loop, inlet, binlet))
            self._slow_due = False
        self.snapshots += 1
        self.snapshot_s += time.perf_counter() - t0
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
        # (S,) float64 s -> int32 ticks of 0.1 ms before `now`, little-endian, base64
        ago = np.rint((now - times) / SPIKE_TICK_S).clip(-(2**31), 2**31 - 1).astype("<i4")
        return {"n": int(end - cursor), "shown": len(times), "per_s": self._spikes_per_s,
                "ago": _b64(ago), "u": _b64(units.astype("<i4"))}  # fmt: skip

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
        d = self.daemon
        counts = self._hist.counts()
        p50, p99, p999 = self._hist.percentiles(counts)
        e = self._hist.edges  # log-spaced: the page rebuilds them from lo, hi and bins
        out: dict = {"latency": {"lo_ms": float(e[0]), "hi_ms": float(e[-1]),
                                 "bins": len(e) - 1, "counts": counts.tolist(),
                                 "p50": p50, "p99": p99, "p999": p999,
                                 "window_s": HIST_SECONDS}}  # fmt: skip
        out["model"] = d.describe_model()
        out["config"] = {"mode": d.cfg.mode, "backend": d.cfg.backend,
                         "cadence_hz": d.cfg.cadence_hz, "providers": d.providers}  # fmt: skip
        if loop is not None:
            out["outputs"] = {"labels": loop.active.labels, "name": loop.active.output}
        rejected = {}
        if loop is not None:
            try:
                rejected = dict(loop.active.engine.stats().rejected)
            except Exception:  # noqa: BLE001 - whatever the engine is, the page answers
                rejected = {}
        out["engine_rejected"] = rejected
        out["feed"] = self.costs()
        out["sources"] = {
            "spikes": _stream(inlet, d.cfg.spikes),
            "behavior": _stream(binlet, d.cfg.behavior) if d.cfg.behavior else None,
            "control": {"name": d.cfg.control_name, "source_id": d.cfg.control_source_id,
                        "state": "open" if d.outlet is not None else "not declared"},
        }  # fmt: skip
        return out


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(a.tobytes()).decode("ascii")


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
    else a fresh one with everything (taken on the event loop, like the feed's, so the
    two never race over the feed's ring cursors)."""
    feed = feed_of(request)
    body = feed.last if feed.task is not None else None
    if body is None:
        feed._slow_due = True
        body = feed.encode(feed.snapshot())
    return Response(body, media_type="application/json")


class EventStream(Response):
    """``text/event-stream`` written straight to the ASGI ``send``: the feed hands every
    page the same encoded frame, and the page's task sends it as it is (no generator,
    no per-page encoding; see the module docstring for what that saved)."""

    media_type = "text/event-stream"

    def __init__(self, feed: LiveFeed) -> None:
        self.feed = feed
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        hello = json.dumps({"rate_hz": 1.0 / self.feed.period})
        await send({"type": "http.response.body", "more_body": True,
                    "body": f"retry: 1000\nevent: hello\ndata: {hello}\n\n".encode()})  # fmt: skip
        page = self.feed.subscribe(send)
        sender = asyncio.get_running_loop().create_task(page.run())
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        finally:
            self.feed.unsubscribe(page)
            sender.cancel()


@router.get("/live/events")
async def events(request: Request) -> EventStream:
    """Server-sent events: one snapshot message every 1/RATE_HZ s while connected."""
    return EventStream(feed_of(request))
