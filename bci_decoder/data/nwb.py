"""Read and write sessions in NWB, in the layout NLB/DANDI motor-cortex files use.

- ``units``: one row per unit, ``spike_times`` (float64 s), ``unit_name``, ``brain_area``;
- ``processing/behavior``: one ``TimeSeries`` per behaviour, with ``timestamps``;
- ``trials`` (optional) with any extra columns.

Binned files (the pretraining corpus) have no ``spike_times`` column; their counts are in
``processing/ecephys/spike_counts`` (T, U), stamped at bin *start* times, column j being
row j of ``units``. They are read into the same :class:`Session`: each bin's spikes are
placed uniformly at random inside the bin with a seed fixed by the file's identifier, as
the spike-time files of ``shared/data/real`` were made, so timing finer than the bin
means nothing and decoding is judged at the bin scale.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bci_decoder.data.session import Behavior, Session


@contextlib.contextmanager
def _quiet_hdmf() -> Iterator[None]:
    """hdmf warns about namespace versions on every open; they say nothing actionable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def read_nwb(path: str | Path) -> Session:
    """Open an NWB file as a :class:`Session`; the session id is the file's identifier."""
    import pynwb

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no NWB file at {path}")
    with _quiet_hdmf(), pynwb.NWBHDF5IO(str(path), "r", load_namespaces=True) as io:
        nwb = io.read()
        if nwb.units is None or len(nwb.units) == 0:
            raise ValueError(f"{path}: the file has no units table with spike_times")
        units = nwb.units
        cols = units.colnames
        n = len(units)
        names = (
            [str(x) for x in units["unit_name"][:]]
            if "unit_name" in cols
            else [f"unit{int(i):03d}" for i in units.id[:]]
        )
        areas = (
            [str(x) for x in units["brain_area"][:]] if "brain_area" in cols else (["unknown"] * n)
        )
        session_id = _session_id(str(nwb.identifier), path)
        if "spike_times" in cols:
            st = units["spike_times"]
            per_unit = [np.asarray(st[i], dtype=np.float64) for i in range(n)]
            times = np.concatenate(per_unit) if n else np.zeros(0)
            idx = np.concatenate(
                [np.full(len(p), i, dtype=np.int32) for i, p in enumerate(per_unit)]
            )
        elif (
            "ecephys" in nwb.processing
            and "spike_counts" in nwb.processing["ecephys"].data_interfaces
        ):
            counts_ts = nwb.processing["ecephys"]["spike_counts"]
            times, idx = spikes_from_counts(
                np.asarray(counts_ts.data[:]),
                np.asarray(counts_ts.timestamps[:], dtype=np.float64),
                _bin_width(counts_ts),
                seed=zlib.crc32(session_id.encode()),
            )
            if counts_ts.data.shape[1] != n:
                raise ValueError(
                    f"{path}: spike_counts has {counts_ts.data.shape[1]} columns for {n} units"
                )
        else:
            raise ValueError(
                f"{path}: units have no spike_times and there is no "
                "processing/ecephys/spike_counts: no spikes to read"
            )
        behavior: dict[str, Behavior] = {}
        if "behavior" in nwb.processing:
            for name, ts in nwb.processing["behavior"].data_interfaces.items():
                if not hasattr(ts, "data"):
                    continue
                data = np.asarray(ts.data[:], dtype=np.float32)
                if ts.timestamps is not None:
                    stamps = np.asarray(ts.timestamps[:], dtype=np.float64)
                else:
                    rate = float(ts.rate)
                    stamps = float(ts.starting_time or 0.0) + np.arange(len(data)) / rate
                behavior[name] = Behavior(name, stamps, data, str(ts.unit or ""))
        trials: dict[str, np.ndarray] = {}
        if nwb.trials is not None:
            for c in nwb.trials.colnames:
                trials[c] = np.asarray(nwb.trials[c][:])
        domain = _domain(times, behavior)
        subject = nwb.subject.subject_id if nwb.subject is not None else "unknown"
        recorded = nwb.session_start_time.isoformat() if nwb.session_start_time else ""
        return Session(
            session_id=session_id,
            subject=str(subject),
            spike_times=times,
            spike_units=idx,
            unit_ids=names,
            brain_areas=areas,
            behavior=behavior,
            domain=domain,
            trials=trials,
            description=str(nwb.session_description),
            recorded_at=recorded,
        )


_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)


def _session_id(identifier: str, path: Path) -> str:
    """The file's identifier, unless it is a bare UUID (DANDI/NLB files): then the file
    name, so that session ids stay readable and stable across copies of a file."""
    return path.stem if _UUID.match(identifier) else identifier


def _bin_width(ts) -> float:
    """A binned series' bin width: from its description (\"bins of 0.05 s\"), else the
    median step of its timestamps."""
    m = re.search(r"bins? of ([0-9.]+) ?s", str(ts.description or ""))
    if m:
        return float(m.group(1))
    stamps = np.asarray(ts.timestamps[:], dtype=np.float64)
    if len(stamps) < 2:
        raise ValueError(f"{ts.name}: cannot tell the bin width of a single bin")
    return float(np.median(np.diff(stamps)))


def spikes_from_counts(
    counts: np.ndarray, bin_starts: np.ndarray, bin_width: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(T, U) counts in bins [start, start + width) -> spike times (S,) float64 and unit
    indices (S,) int32, sorted by time; each spike uniform inside its bin (fixed seed)."""
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[0] != len(bin_starts):
        raise ValueError(f"counts {counts.shape} do not match {len(bin_starts)} bin starts")
    if counts.size and counts.min() < 0:
        raise ValueError("negative spike counts")
    rows, cols = np.nonzero(counts)
    reps = counts[rows, cols].astype(np.int64)
    rows, cols = np.repeat(rows, reps), np.repeat(cols, reps)
    rng = np.random.default_rng(seed)
    times = bin_starts[rows] + rng.uniform(0.0, bin_width, size=rows.size)
    order = np.argsort(times, kind="stable")
    return times[order], cols[order].astype(np.int32)


def _domain(times: np.ndarray, behavior: dict[str, Behavior]) -> tuple[float, float]:
    """Valid time: the span the behaviour samples cover (each sample owns half a step
    either side), else the spikes' span."""
    spans = []
    for b in behavior.values():
        if len(b.timestamps) >= 2:
            half = 0.5 * float(np.median(np.diff(b.timestamps)))
            spans.append((b.timestamps[0] - half, b.timestamps[-1] + half))
    if spans:
        return (min(s[0] for s in spans), max(s[1] for s in spans))
    if times.size:
        return (float(times.min()), float(np.nextafter(times.max(), np.inf)))
    return (0.0, 0.0)


def write_nwb(session: Session, path: str | Path) -> Path:
    """Write a :class:`Session` in the layout :func:`read_nwb` reads."""
    import pynwb
    from pynwb.file import Subject

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_hdmf():
        nwb = pynwb.NWBFile(
            session_description=session.description or "bci_decoder session",
            identifier=session.session_id,
            session_start_time=(
                dt.datetime.fromisoformat(session.recorded_at)
                if session.recorded_at
                else dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
            ),
            subject=Subject(subject_id=session.subject, species="Macaca mulatta"),
        )
        nwb.add_unit_column("unit_name", "unit label in the recording")
        nwb.add_unit_column("brain_area", "recorded brain area")
        order = np.argsort(session.spike_units, kind="stable")
        units_sorted = session.spike_units[order]
        times_sorted = session.spike_times[order]
        bounds = np.searchsorted(units_sorted, np.arange(session.num_units + 1))
        for u in range(session.num_units):
            nwb.add_unit(
                spike_times=times_sorted[bounds[u] : bounds[u + 1]],
                unit_name=session.unit_ids[u],
                brain_area=session.brain_areas[u],
            )
        mod = nwb.create_processing_module("behavior", "behaviour series")
        for name, b in session.behavior.items():
            mod.add(
                pynwb.TimeSeries(
                    name=name, data=b.data, timestamps=b.timestamps, unit=b.unit or "a.u."
                )
            )
        if session.trials and "start_time" in session.trials:
            extra = [c for c in session.trials if c not in ("start_time", "stop_time")]
            for c in extra:
                nwb.add_trial_column(c, c)
            for i in range(len(session.trials["start_time"])):
                row = {c: session.trials[c][i] for c in session.trials}
                nwb.add_trial(**row)
        with pynwb.NWBHDF5IO(str(path), "w") as io:
            io.write(nwb)
    return path


def write_binned_nwb(
    path: str | Path,
    counts: np.ndarray,
    bin_starts: np.ndarray,
    bin_width: float,
    unit_names: list[str],
    brain_areas: list[str],
    behavior: dict[str, Behavior],
    identifier: str,
    subject: str,
    recorded_at: str = "2020-01-01T00:00:00+00:00",
) -> Path:
    """Write counts (T, U) in the corpus layout (``processing/ecephys/spike_counts``, bin
    start times, units without spike_times) that :func:`read_nwb` reads back."""
    import pynwb
    from pynwb.file import Subject

    counts = np.asarray(counts)
    if counts.shape != (len(bin_starts), len(unit_names)):
        raise ValueError(f"counts {counts.shape} vs {len(bin_starts)} bins x {len(unit_names)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_hdmf():
        nwb = pynwb.NWBFile(
            session_description="binned counts",
            identifier=identifier,
            session_start_time=dt.datetime.fromisoformat(recorded_at),
            subject=Subject(subject_id=subject, species="Macaca mulatta"),
        )
        nwb.add_unit_column("unit_name", "unit label in the recording")
        nwb.add_unit_column("brain_area", "recorded brain area")
        for name, area in zip(unit_names, brain_areas, strict=True):
            nwb.add_unit(unit_name=name, brain_area=area)
        ecephys = nwb.create_processing_module("ecephys", "binned spike counts")
        ecephys.add(
            pynwb.TimeSeries(
                name="spike_counts",
                data=counts.astype(np.uint8),
                timestamps=np.asarray(bin_starts, dtype=np.float64),
                unit="spikes",
                description=f"Spike counts in bins of {bin_width:g} s. timestamps are bin "
                "START times. Column j is row j of nwb.units.",
            )
        )
        mod = nwb.create_processing_module("behavior", "behaviour series")
        for name, b in behavior.items():
            mod.add(pynwb.TimeSeries(name=name, data=b.data, timestamps=b.timestamps, unit="a.u."))
        with pynwb.NWBHDF5IO(str(path), "w") as io:
            io.write(nwb)
    return path


def load_sessions(path: str | Path) -> list[Session]:
    """One NWB file, or every ``*.nwb`` in a folder (sorted by name)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.nwb"))
        if not files:
            raise FileNotFoundError(f"no .nwb files in {path}")
        return [read_nwb(f) for f in files]
    return [read_nwb(path)]
