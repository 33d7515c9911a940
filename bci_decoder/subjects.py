"""Subjects and stable channels: where a new day of a known subject starts from.

A chronic Utah array records the same channels day after day while the units on them
drift. The model's unit vocabulary is per session (``"{session}/{unit}"``), but the
pretraining sessions keep their subject and recording date (``info["session_meta"]``),
so a new session of a known subject can start each unit's embedding from the most
recent pretraining day that recorded the same channel, and its session embedding from
the nearest earlier day of that subject, instead of from the mean of all units of every
animal. New channel names start as before (the mean); a session of an unknown subject
gets no warm start at all.

Channel names differ between a subject's files (Jango: ``ch01_u0`` in 2016, ``ee001u0``
in 2014), so units are matched by the channel and unit numbers parsed from the names
(:func:`channel_key`), not by the raw strings.

This module is numpy-only: the daemon can plan a zero-shot start without torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

WarmStartMode = Literal["name", "name+rate", "off"]

# "ch01_u0", "ee001u0", "elec12-u1", "chan7": a channel number, optionally a unit number
_CHANNEL = re.compile(r"^(?:ch|ee|elec|chan|channel|e)?[_-]?0*(\d+)(?:[_-]?u0*(\d+))?$", re.I)


def channel_key(name: str) -> str | None:
    """A unit name's channel identity across a subject's files: ``"ch12/u0"`` for
    ``ch12_u0``, ``ee012u0`` and ``ee12u0``; None for names that are not channel labels
    (``unit003``: a spike-sorted unit of one day is no unit of another day)."""
    m = _CHANNEL.match(name.strip())
    if not m or name.lower().startswith("unit"):
        return None
    return f"ch{int(m.group(1))}/u{int(m.group(2) or 0)}"


@dataclass
class WarmStart:
    """Where each new unit's embedding (and the session's) starts.

    ``unit_rows[i]`` is the vocabulary row copied for the session's unit i, or -1 for a
    unit that starts at the mean as before.
    """

    subject: str
    mode: WarmStartMode
    unit_rows: np.ndarray  # (U,) int64 vocabulary row or -1
    unit_sources: list[str]  # (U,) session each row came from ("" where none)
    session_row: int  # session-vocabulary row of the nearest earlier day, -1 if none
    nearest_session: str  # that day's id ("" if none); its normalisation serves zero-shot
    rate_rejected: int = 0  # same-named units skipped because their rate did not match
    notes: list[str] = field(default_factory=list)

    @property
    def matched(self) -> int:
        return int((self.unit_rows >= 0).sum())

    def summary(self) -> dict:
        """What ``/status`` and calibration reports say about the tables in use."""
        sources: dict[str, int] = {}
        for s in self.unit_sources:
            if s:
                sources[s] = sources.get(s, 0) + 1
        return {
            "subject": self.subject,
            "mode": self.mode,
            "units_matched": self.matched,
            "units_new": int(len(self.unit_rows) - self.matched),
            "rate_rejected": self.rate_rejected,
            "unit_sources": sources,
            "session_from": self.nearest_session or None,
            "notes": list(self.notes),
        }


def subject_sessions(info: dict, subject: str, before: str = "") -> list[str]:
    """The model's sessions of ``subject``, most recent first; with ``before`` (an ISO
    date-time), only those recorded earlier (a later day must not learn from the future
    when the dates say otherwise; sessions without a date come last)."""
    meta: dict = info.get("session_meta", {})
    days = [
        (m.get("recorded_at", ""), sid)
        for sid, m in meta.items()
        if m.get("subject") == subject and subject not in ("", "unknown")
    ]
    if before:
        dated = [d for d in days if d[0] and d[0][:10] < before[:10]]
        days = dated or days  # nothing earlier: the nearest days of the subject anyway
    days.sort(key=lambda d: (d[0] != "", d[0]), reverse=True)
    return [sid for _, sid in days]


def plan_warm_start(
    unit_names: list[str],
    session_names: list[str],
    info: dict,
    subject: str,
    unit_ids: list[str],
    recorded_at: str = "",
    mode: WarmStartMode = "name",
    unit_rates: np.ndarray | None = None,
    rate_ratio: float = 2.0,
) -> WarmStart | None:
    """Plan the warm start of a new session (``unit_ids``, of ``subject``) on a model
    with vocabularies ``unit_names`` / ``session_names`` and metadata ``info``.

    Each unit takes the row of the same channel on the most recent earlier day of the
    subject that recorded it. With ``mode="name+rate"`` a candidate whose firing rate
    (``info["unit_rates"]``) differs from the new unit's (``unit_rates``, Hz, (U,)) by
    more than ``rate_ratio`` x is passed over for an older day, else the unit starts
    at the mean. Returns None when the mode is off or the subject is unknown to the model.
    """
    if mode == "off":
        return None
    days = subject_sessions(info, subject, recorded_at)
    if not days:
        return None
    index = {n: i for i, n in enumerate(unit_names)}
    by_day: list[tuple[str, dict[str, int]]] = []
    for sid in days:
        prefix = f"{sid}/"
        keys = {}
        for n in unit_names:
            if n.startswith(prefix) and (k := channel_key(n[len(prefix) :])) is not None:
                keys[k] = index[n]
        by_day.append((sid, keys))
    known_rates: dict = info.get("unit_rates", {})
    use_rates = mode == "name+rate" and unit_rates is not None and bool(known_rates)
    notes = []
    if mode == "name+rate" and not use_rates:
        notes.append("no firing rates recorded in the model or given: matched by name only")
    rows = np.full(len(unit_ids), -1, dtype=np.int64)
    sources = [""] * len(unit_ids)
    rejected = 0
    for i, uid in enumerate(unit_ids):
        key = channel_key(uid)
        for sid, keys in by_day if key is not None else ():
            row = keys.get(key)
            if row is None:
                continue
            if use_rates:
                old = known_rates.get(unit_names[row])
                if old is not None:
                    ratio = (float(unit_rates[i]) + 0.5) / (float(old) + 0.5)
                    if abs(math.log(ratio)) > math.log(rate_ratio):
                        rejected += 1
                        continue
            rows[i], sources[i] = row, sid
            break
    nearest = days[0]
    session_row = session_names.index(nearest) if nearest in session_names else -1
    return WarmStart(
        subject=subject,
        mode=mode,
        unit_rows=rows,
        unit_sources=sources,
        session_row=session_row,
        nearest_session=nearest,
        rate_rejected=rejected,
        notes=notes,
    )


def session_unit_rates(session, span: tuple[float, float]) -> dict[str, float]:
    """``{"session/unit": Hz}`` over ``span``: what a model records of its pretraining
    units, so that a later day can be matched by rate as well as by name."""
    rates = unit_rates_hz(session.spike_times, session.spike_units, session.num_units, span)
    return {
        f"{session.session_id}/{u}": round(float(r), 3)
        for u, r in zip(session.unit_ids, rates, strict=True)
    }


def unit_rates_hz(
    spike_times: np.ndarray, spike_units: np.ndarray, num_units: int, span: tuple[float, float]
) -> np.ndarray:
    """(U,) firing rate of each unit over ``span`` (s), from spikes sorted by time."""
    lo, hi = np.searchsorted(spike_times, span, side="right")
    counts = np.bincount(spike_units[lo:hi], minlength=num_units)[:num_units]
    return counts / max(span[1] - span[0], 1e-9)
