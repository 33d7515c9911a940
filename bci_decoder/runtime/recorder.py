"""The recorder: everything in and out of the daemon, appended to one HDF5 file.

What: every spike received (LSL timestamp, stream unit index) as the inlet kept it
(``spikes/``), every spike the inlet rejected, with its raw timestamp and unit as received
and the reason (``rejected/``: ``reason`` is a code, ``rejected.attrs["reasons"]`` its
names, the same as ``/status.dropped``: nan_time, future_time, bad_unit, out_of_order;
so spikes + rejected = all received), every behaviour sample, every output sent (decode time t, the LSL clock when it left, the
step's compute time, whether it was the safe value), and every model swap, calibration
and state change (events, JSON).

Why HDF5 (h5py) and not XDF: XDF is the LSL ecosystem's format, but it is written as a
stream of chunks by LabRecorder and has no writer in our dependencies; appending to it
from Python means hand-writing its chunk format, and a reader must parse the whole file.
HDF5 is what NWB is built on (``bci-decoder recording FILE --nwb OUT`` converts), opens in
h5py, MATLAB, pynwb tooling, and above all has SWMR (single writer, multiple readers): the
file is opened with ``libver='latest'`` and switched to SWMR mode once its datasets exist,
after which every flush leaves it consistent on disk, so after a SIGKILL (or while the
daemon runs) it opens and holds everything up to the last flush. A plain HDF5 file
killed mid-write can be left unreadable.

How, off the hot path: the inlet threads and the decode loop only copy records into
preallocated rings (``SampleRing``: a few numpy stores, no allocation, no lock the
loop can wait on); a background thread reads the rings every ``flush_s / 2`` (so a kill
loses less than ``flush_s``), appends to resizable datasets and flushes. Records overwritten before the writer read
them (it fell a whole ring behind) are counted in the file's ``lost_*`` attributes.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from pathlib import Path

import numpy as np

from bci_decoder.runtime.ring import SampleRing

log = logging.getLogger(__name__)

WIDTH = 8  # columns kept per behaviour sample / output (NaN-padded; labels in events)
EVENT_BYTES = 2048


class Recorder:
    def __init__(
        self,
        path: str | Path,
        *,
        flush_s: float = 1.0,
        queue_spikes: int = 4_000_000,
        queue_outputs: int = 65_536,
        queue_behavior: int = 1_000_000,
        queue_rejected: int = 1_000_000,
    ) -> None:
        import h5py

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.flush_s = float(flush_s)
        self.spikes = SampleRing(queue_spikes, 1, np.int32)  # (t, unit)
        self.behavior = SampleRing(queue_behavior, WIDTH, np.float32)  # (t, values)
        self.rejected = SampleRing(queue_rejected, 2, np.int32)  # (raw t, [unit, reason])
        self._rrow = np.empty((4096, 2), np.int32)  # reused by rejected_in()
        # outputs: (t, [sent clock, step ms, safe, values...]) in float64
        self.outputs = SampleRing(queue_outputs, 3 + WIDTH, np.float64)
        self._row = np.full(3 + WIDTH, np.nan, np.float64)  # reused by output()
        self._brow = np.full((4096, WIDTH), np.nan, np.float32)
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._cursors = {"spikes": 0, "rejected": 0, "behavior": 0, "outputs": 0}
        self.lost = {"spikes": 0, "rejected": 0, "behavior": 0, "outputs": 0}
        self.written = {"spikes": 0, "rejected": 0, "behavior": 0, "outputs": 0, "events": 0}
        self._stop = threading.Event()
        self.error: str | None = None
        f = h5py.File(self.path, "w", libver="latest")
        f.attrs["format"] = "bci_decoder-recording-1"
        f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        f.attrs["clock"] = "LSL local_clock (s)"

        def ds(name: str, dtype, width: int | None = None) -> None:
            shape, maxshape = ((0,), (None,)) if width is None else ((0, width), (None, width))
            # chunks of 64 KB: HDF5 writes a whole chunk when it is first touched, and
            # 65,536 rows of 2 KB events made one of 128 MB (every recording was 133 MB
            # after 15 s); 8,192 spike times are 64 KB (a tenth of a second at 100k/s)
            rows = max(16, 2**16 // (np.dtype(dtype).itemsize * (width or 1)))
            chunks = (rows,) if width is None else (rows, width)
            f.create_dataset(name, shape, dtype=dtype, maxshape=maxshape, chunks=chunks)

        ds("spikes/time", "f8")
        ds("spikes/unit", "i4")
        # rejected at the inlet: the timestamp as received (NaN, inf, far future, out of
        # order), the unit as received (may be out of range), why (code i + 1 = reasons[i])
        from bci_decoder.runtime.lsl_io import REJECTION_REASONS

        ds("rejected/time", "f8")
        ds("rejected/unit", "i4")
        ds("rejected/reason", "u1")
        f["rejected"].attrs["reasons"] = json.dumps(list(REJECTION_REASONS))
        ds("behavior/time", "f8")
        ds("behavior/data", "f4", WIDTH)
        ds("outputs/time", "f8")  # the decode time t (also the LSL timestamp sent)
        ds("outputs/sent", "f8")  # LSL clock when the sample left: latency = sent - time
        ds("outputs/step_ms", "f4")  # the step's compute time
        ds("outputs/safe", "u1")  # 1: the safe value was sent (stalled or failed step)
        ds("outputs/values", "f4", WIDTH)
        ds("events/time", "f8")
        ds("events/kind", "S32")
        ds("events/data", f"S{EVENT_BYTES}")
        for k in self.lost:
            f.attrs[f"lost_{k}"] = 0
        f.swmr_mode = True  # from here on each flush leaves the file readable
        self._file = f
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ producers (any thread)
    def spikes_in(self, times: np.ndarray, units: np.ndarray) -> None:
        self.spikes.write(times, units)

    def rejected_in(self, times: np.ndarray, units: np.ndarray, reasons: np.ndarray) -> None:
        """Spikes the inlet rejected, as received, with their reason codes."""
        n = len(times)
        for i in range(0, n, len(self._rrow)):
            part = self._rrow[: min(len(self._rrow), n - i)]
            part[:, 0] = units[i : i + len(part)]
            part[:, 1] = reasons[i : i + len(part)]
            self.rejected.write(times[i : i + len(part)], part)

    def behavior_in(self, times: np.ndarray, data: np.ndarray) -> None:
        n, c = data.shape
        for i in range(0, n, len(self._brow)):  # NaN-padded to WIDTH columns
            part = self._brow[: min(len(self._brow), n - i)]
            part[:, : min(c, WIDTH)] = data[i : i + len(part), :WIDTH]
            part[:, c:] = np.nan
            self.behavior.write(times[i : i + len(part)], part)

    def output(self, t: float, values: np.ndarray, sent: float, step_ms: float, safe: bool) -> None:
        """From the decode loop: a few stores into a preallocated row, then one ring write."""
        row = self._row
        row[0], row[1], row[2] = sent, step_ms, safe
        d = min(len(values), WIDTH)
        row[3 : 3 + d] = values[:d]
        self.outputs.write_one(t, row)

    def event(self, kind: str, **data) -> None:
        self._events.put((time.monotonic(), kind, data))

    # ------------------------------------------------------------ the writer thread
    def _append(self, name: str, ring: SampleRing, columns) -> None:
        times, data, self._cursors[name], lost = ring.read(self._cursors[name])
        self.lost[name] += lost
        if not len(times):
            return
        f = self._file
        for key, values in [("time", times), *columns(data)]:
            d = f[f"{name}/{key}"]
            n = d.shape[0]
            d.resize(n + len(times), axis=0)
            d[n:] = values
        self.written[name] += len(times)

    def _flush(self) -> None:
        from bci_decoder.runtime.decode_loop import lsl_clock

        self._append("spikes", self.spikes, lambda d: [("unit", d[:, 0])])
        self._append("rejected", self.rejected, lambda d: [("unit", d[:, 0]), ("reason", d[:, 1])])
        self._append("behavior", self.behavior, lambda d: [("data", d)])
        self._append(
            "outputs",
            self.outputs,
            lambda d: [
                ("sent", d[:, 0]),
                ("step_ms", d[:, 1]),
                ("safe", d[:, 2]),
                ("values", d[:, 3:]),
            ],  # fmt: skip
        )
        rows = []
        offset = lsl_clock() - time.monotonic()
        while True:
            try:
                rows.append(self._events.get_nowait())
            except queue.Empty:
                break
        if rows:
            f = self._file
            n = f["events/time"].shape[0]
            for key in ("time", "kind", "data"):
                f[f"events/{key}"].resize(n + len(rows), axis=0)
            f["events/time"][n:] = [r[0] + offset for r in rows]
            f["events/kind"][n:] = [r[1].encode()[:32] for r in rows]
            f["events/data"][n:] = [
                json.dumps(r[2], default=str).encode()[:EVENT_BYTES] for r in rows
            ]
            self.written["events"] += len(rows)
        for k, v in self.lost.items():
            self._file.attrs[f"lost_{k}"] = v
        self._file.flush()

    def _run(self) -> None:
        # Every flush_s / 2 on an absolute grid: what a SIGKILL loses is what arrived since
        # the last flush began reading, so waiting flush_s *after* each flush lost
        # flush_s plus the flush's own time (1.003-1.008 s measured with flush_s = 1 when
        # killed just before a flush landed); half the period keeps it under flush_s
        period = self.flush_s / 2
        next_at = time.monotonic() + period
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at = max(next_at + period, time.monotonic())
            try:
                self._flush()
            except Exception as e:  # noqa: BLE001 - recording must never stop decoding
                self.error = f"{type(e).__name__}: {e}"[:300]
                log.exception("recorder: writing %s failed", self.path)

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            self._flush()
        finally:
            self._file.close()

    def public(self) -> dict:
        return {
            "path": str(self.path),
            "written": dict(self.written),
            "lost": dict(self.lost),
            "error": self.error,
        }


# ---------------------------------------------------------------- reading
def open_recording(path: str | Path):
    """Open a recording, including one whose writer was killed (SWMR keeps it whole)."""
    import h5py

    try:
        return h5py.File(path, "r", swmr=True)
    except OSError:
        return h5py.File(path, "r")


def summary(path: str | Path) -> dict:
    with open_recording(path) as f:
        out = {"path": str(path), "format": f.attrs.get("format", "")}
        for group in ("spikes", "behavior", "outputs", "events"):
            t = f[f"{group}/time"][:]
            out[group] = {
                "count": int(len(t)),
                "first": float(t[0]) if len(t) else None,
                "last": float(t[-1]) if len(t) else None,
            }
        out["rejected"] = rejected_summary(f)
        sent, t = f["outputs/sent"][:], f["outputs/time"][:]
        if len(t):
            lat = (sent - t) * 1e3
            out["outputs"]["latency_ms"] = {
                "p50": float(np.percentile(lat, 50)),
                "p99": float(np.percentile(lat, 99)),
            }
            out["outputs"]["safe"] = int(f["outputs/safe"][:].sum())
        out["lost"] = {k[5:]: int(v) for k, v in f.attrs.items() if k.startswith("lost_")}
        kinds = [k.decode() for k in f["events/kind"][:]]
        out["events"]["kinds"] = {k: kinds.count(k) for k in sorted(set(kinds))}
    return out


def rejected_summary(f) -> dict:
    """How many spikes the inlet rejected, by reason (``/status.dropped``'s names); a
    recording made before rejected spikes were kept has none."""
    if "rejected" not in f:
        return {"count": 0, "by_reason": {}, "recorded": False}
    names = json.loads(f["rejected"].attrs["reasons"])
    codes = np.bincount(f["rejected/reason"][:], minlength=len(names) + 1)
    return {
        "count": int(codes.sum()),
        "by_reason": {name: int(codes[i + 1]) for i, name in enumerate(names)},
        "recorded": True,
    }


def read_rejected(f) -> dict[str, np.ndarray]:
    """The rejected spikes as arrays: ``time`` and ``unit`` as received, ``reason`` as
    names (``/status.dropped``'s)."""
    if "rejected" not in f:
        return {"time": np.zeros(0), "unit": np.zeros(0, np.int32), "reason": np.zeros(0, str)}
    names = np.array(["kept", *json.loads(f["rejected"].attrs["reasons"])])
    return {
        "time": f["rejected/time"][:],
        "unit": f["rejected/unit"][:],
        "reason": names[f["rejected/reason"][:]],
    }


def _last_labels(f, kind: str) -> list[str]:
    labels: list[str] = []
    for k, d in zip(f["events/kind"][:], f["events/data"][:], strict=True):
        if k.decode() == kind:
            labels = json.loads(d.decode()).get("labels", labels)
    return labels


def export_nwb(path: str | Path, out: str | Path) -> Path:
    """Spikes as the units table, outputs and behaviour as TimeSeries (NWB 2)."""
    from datetime import UTC, datetime

    from pynwb import NWBHDF5IO, NWBFile, TimeSeries

    with open_recording(path) as f:
        nwb = NWBFile(
            session_description=f"bci_decoder recording {Path(path).name}",
            identifier=Path(path).stem,
            session_start_time=datetime.now(UTC),
        )
        st, su = f["spikes/time"][:], f["spikes/unit"][:]
        labels = _last_labels(f, "spike-stream")
        nwb.add_unit_column("label", "the unit's label in the spike stream")
        for u in np.unique(su):
            name = labels[u] if 0 <= u < len(labels) else str(int(u))
            nwb.add_unit(spike_times=st[su == u], label=name)
        ot = f["outputs/time"][:]
        if len(ot):
            vals = f["outputs/values"][:]
            cols = ~np.all(np.isnan(vals), axis=0)
            nwb.add_acquisition(
                TimeSeries(
                    name="decoded", data=vals[:, cols], timestamps=ot, unit="a.u.",
                    description="outputs sent on the Control outlet (timestamp = decode time)",
                )
            )  # fmt: skip
            nwb.add_acquisition(
                TimeSeries(
                    name="output_latency", data=(f["outputs/sent"][:] - ot), timestamps=ot,
                    unit="s", description="LSL clock when the output left minus decode time",
                )
            )  # fmt: skip
        bt = f["behavior/time"][:]
        if len(bt):
            vals = f["behavior/data"][:]
            cols = ~np.all(np.isnan(vals), axis=0)
            nwb.add_acquisition(
                TimeSeries(name="behavior", data=vals[:, cols], timestamps=bt, unit="a.u.",
                           description="the behaviour stream as received")
            )  # fmt: skip
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with NWBHDF5IO(str(out), "w") as io:
            io.write(nwb)
    return out
