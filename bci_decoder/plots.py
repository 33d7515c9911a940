"""Pictures a person reads in five seconds: one PNG per command that produces figures.

``calibrate`` and ``recording`` write theirs here (``evaluate`` and the benchmarks draw
their own next to their tables). Each figure's title says what was measured and on what,
every axis has its unit, and where there is a baseline it is drawn beside ours. Rendering
uses matplotlib's Agg backend (a declared dependency; no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

OURS = "tab:red"
BASELINE = {"wiener": "tab:green", "gru": "tab:blue"}
NAMES = {"wiener": "Wiener", "gru": "GRU"}
TRUE = "0.25"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path


# ---------------------------------------------------------------- calibrate
def calibration_traces(
    decoder, session, output: str, fit_span: tuple[float, float] | None, seconds: float = 20.0
) -> dict[str, np.ndarray]:
    """The first ``seconds`` of the held-out part (the last 30%): the behaviour, ours
    (the streaming engine, as it runs live) and, when ``fit_span`` is given, a Wiener
    filter fitted on the same span (the calibration's own seconds)."""
    from bci_decoder.data.session import time_split
    from bci_decoder.decode import decode_session

    test = time_split(session).test
    span = (test[0], min(test[1], test[0] + seconds))
    t, target, ours = decode_session(decoder, session, output, span, "causal")
    traces = {"t": t - span[0], "target": target, "ours": ours}
    if fit_span is not None and fit_span[1] > fit_span[0]:
        from bci_decoder.baselines import evaluate_baselines

        try:
            base = evaluate_baselines(session, output, fit_span, span, ("wiener",))
            traces["wiener"] = base["wiener"]["pred"]
        except ValueError:  # too few samples in the span to fit it: no baseline trace
            pass
    return traces


def calibration_png(report: dict[str, Any], decoder, session, path: str | Path) -> Path:
    """``calibrate``'s picture: the report's R² bars and, when the session has the
    decoded behaviour, held-out traces of the calibrated decoder beside a Wiener filter
    fitted on the calibration's seconds."""
    from bci_decoder.data.session import time_split

    output = report.get("output")
    traces = None
    if output in session.behavior:
        start = time_split(session).fit[0]
        traces = calibration_traces(decoder, session, output,
                                    (start, start + float(report.get("seconds", 0.0))))  # fmt: skip
    return calibration_figure(report, path, traces)


def calibration_figure(
    report: dict[str, Any], path: str | Path, traces: dict[str, np.ndarray] | None = None
) -> Path:
    """Held-out R² of the calibrated model beside Wiener and GRU fitted on the same
    seconds and on the full first 70%; below, decoded against true on held-out time."""
    plt = _pyplot()
    rows = 2 if traces is not None else 1
    fig, axes = plt.subplots(rows, 1, figsize=(10, 3.2 * rows + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": [1.0] + [1.2] * (rows - 1)})  # fmt: skip
    secs = report.get("seconds", 0.0)
    how = "label-free (spikes only)" if report.get("labels") == "none" else "supervised"
    fig.suptitle(
        f"Calibration of {report.get('session', '?')} from {secs:.0f} s ({how}): "
        f"held-out R² of {report.get('output', '?')} (last 30% of the session)",
        fontsize=11,
    )
    ax = axes[0, 0]
    bars = [("ours", report.get("r2"), OURS)]
    for name in ("wiener", "gru"):
        bars.append((f"{NAMES[name]}, same {secs:.0f} s",
                     report.get(f"{name}_same_seconds"), BASELINE[name]))  # fmt: skip
    for name in ("wiener", "gru"):
        bars.append((f"{NAMES[name]}, full 70%", report.get(f"{name}_full"),
                     BASELINE[name]))  # fmt: skip
    bars = [b for b in bars if b[1] is not None]
    y = np.arange(len(bars))[::-1]
    vals = [float(b[1]) for b in bars]
    ax.barh(y, vals, color=[b[2] for b in bars])
    for yi, v in zip(y, vals, strict=True):
        ax.text(max(v, 0) + 0.01, yi, f"{v:.3f}", va="center", fontsize=9)
    ax.set_yticks(y, [b[0] for b in bars])
    lo = min(0.0, min(vals) - 0.05) if vals else 0.0
    ax.set_xlim(lo, 1.0)
    ax.axvline(0, color="0.5", lw=0.8)
    ax.set_xlabel("R² on held-out time (1 = perfect, 0 = the mean)")
    if traces is not None:
        ax = axes[1, 0]
        t = traces["t"]
        ax.plot(t, traces["target"][:, 0], color=TRUE, lw=1.6, label="true")
        if "wiener" in traces:
            ax.plot(t, traces["wiener"][:, 0], color=BASELINE["wiener"], lw=1.0,
                    label=f"Wiener, same {secs:.0f} s")  # fmt: skip
        ax.plot(t, traces["ours"][:, 0], color=OURS, lw=1.2, label="ours (streaming engine)")
        ax.set_xlabel("seconds into the held-out part")
        ax.set_ylabel(f"{report.get('output', '')}[0] (recorded units)")
        ax.legend(loc="upper right", fontsize=8, ncol=3)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------- recording
def recording_figure(recording: str | Path, path: str | Path, seconds: float = 20.0) -> Path:
    """A daemon recording at a glance: decoded output against the behaviour stream over
    its last ``seconds``, the output-latency histogram against the decode deadline, and
    spikes per second over the whole recording with model swaps and state changes."""
    from bci_decoder.runtime.recorder import open_recording

    plt = _pyplot()
    with open_recording(recording) as f:
        st = f["spikes/time"][:]
        ot, sent = f["outputs/time"][:], f["outputs/sent"][:]
        ov = f["outputs/values"][:, 0] if len(ot) else np.zeros(0)
        safe = f["outputs/safe"][:].astype(bool)
        bt = f["behavior/time"][:]
        bv = f["behavior/data"][:, 0] if len(bt) else np.zeros(0)
        events = [(float(t), k.decode()) for t, k in zip(f["events/time"][:],
                                                          f["events/kind"][:], strict=True)]  # fmt: skip
    # the deadline is one hop: the outputs' usual spacing (missed deadlines are skipped,
    # so the median is the cadence's)
    hop_ms = float(np.median(np.diff(ot))) * 1e3 if len(ot) > 2 else None
    times = [a for a in (st, ot, bt) if len(a)]
    t0 = min(a[0] for a in times) if times else 0.0
    t1 = max(a[-1] for a in times) if times else 1.0
    fig = plt.figure(figsize=(12, 7.5))
    grid = fig.add_gridspec(2, 2, height_ratios=[1.1, 1.0], width_ratios=[1.6, 1.0])
    fig.suptitle(
        f"Recording {Path(recording).name}: {t1 - t0:.0f} s, {len(st):,} spikes, "
        f"{len(ot):,} outputs ({int(safe.sum())} safe-value), {len(bt):,} behaviour samples",
        fontsize=11,
    )

    ax = fig.add_subplot(grid[0, :])  # decoded vs behaviour, last `seconds`
    seconds = min(seconds, t1 - t0)
    lo = t1 - seconds
    kb, ko = bt >= lo, ot >= lo
    if kb.any():
        ax.plot(bt[kb] - t1, bv[kb], color=TRUE, lw=1.5, label="behaviour stream [0]")
    if ko.any():
        ax.plot(ot[ko] - t1, ov[ko], color=OURS, lw=1.0, label="decoded output [0]")
        if (safe & ko).any():
            ax.plot(ot[safe & ko] - t1, ov[safe & ko], "x", color="k", ms=4,
                    label="safe value sent")  # fmt: skip
    ax.set_xlabel(f"seconds before the end of the recording (last {seconds:.0f} s)")
    ax.set_ylabel("first channel (stream units)")
    ax.set_title("decoded against the behaviour stream", fontsize=10)
    if kb.any() or ko.any():
        ax.legend(loc="upper right", fontsize=8, ncol=3)
    else:
        ax.text(0.5, 0.5, "no outputs or behaviour recorded", ha="center", transform=ax.transAxes)

    ax = fig.add_subplot(grid[1, 0])  # spikes per second, with events
    if len(st):
        edges = np.arange(t0, t1 + 1e-9, 1.0)  # whole seconds only: no partial last bin
        if len(edges) > 1:
            counts, _ = np.histogram(st, edges)
            ax.stairs(counts, edges - t0, baseline=None, color="0.2", lw=1.0)
    marks = {"model": ("tab:purple", "model swap"), "state": ("tab:orange", "state change")}
    shown = set()
    for t, kind in events:
        if kind in marks and t0 <= t <= t1:
            colour, label = marks[kind]
            ax.axvline(t - t0, color=colour, lw=1.5, ls="--",
                       label=None if kind in shown else label)  # fmt: skip
            shown.add(kind)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("seconds since the recording began")
    ax.set_ylabel("spikes per second")
    ax.set_title("spikes received", fontsize=10)
    if shown:
        ax.legend(loc="upper right", fontsize=8)

    ax = fig.add_subplot(grid[1, 1])  # latency histogram against the deadline
    if len(ot):
        lat = (sent - ot) * 1e3
        bins = np.geomspace(max(0.01, lat.min()), max(lat.max(), 1.0) * 1.01, 60)
        ax.hist(np.clip(lat, bins[0], None), bins=bins, color="tab:blue")
        ax.set_xscale("log")
        ax.set_yscale("log")
        p50, p99 = np.percentile(lat, [50, 99])
        ax.axvline(p50, color="tab:green", lw=1.2, label=f"p50 {p50:.2f} ms")
        ax.axvline(p99, color="tab:orange", lw=1.2, label=f"p99 {p99:.2f} ms")
        if hop_ms:
            late = int((lat > hop_ms).sum())
            ax.axvline(hop_ms, color="k", lw=1.2, ls="--",
                       label=f"deadline {hop_ms:.3g} ms ({late} later)")  # fmt: skip
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("output latency: sent - decode time (ms)")
    ax.set_ylabel("outputs")
    ax.set_title("output latency", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
