"""The benchmarks' pictures: one PNG next to each result JSON, drawn from the JSON alone.

Each benchmark calls ``draw(kind, result, json_path)`` after writing its JSON, and takes
``--plot-only JSON`` to redraw the picture of an earlier run without running again (the
load/soak run takes 12 minutes, the hour of offline decoding 3). Titles say what was
measured and on what; axes carry units; where the JSON holds a baseline or a goal it is
drawn beside ours. matplotlib's Agg backend: no display needed.

    .venv/bin/python benchmarks/_plots.py load_soak benchmarks/results/load_soak.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

OURS = "tab:red"
BASE = "0.45"  # a baseline or a reference floor
GOAL = "tab:green"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    print(f"wrote {path}")
    return path


# ------------------------------------------------------------------ load_soak
def load_soak(res: dict, path: Path) -> Path:
    """Spikes received per second, missed deadlines per 10 s and the daemon's RSS over
    the run, with the warm-up and the load window shaded and the issue's bounds drawn."""
    plt = _pyplot()
    s, tl = res["settings"], res["timeline"]
    t = np.array([x["t"] for x in tl])
    received = np.array([x["received"] for x in tl], dtype=float)
    missed = np.array([x["missed"] for x in tl], dtype=float)
    steps = np.array([x["steps"] for x in tl], dtype=float)
    rss = np.array([x["rss_mb"] for x in tl])
    fig, ax = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True)
    warm, load_end = s["warmup_s"], s["warmup_s"] + s["load_s"]
    for a in ax:
        a.axvspan(0, warm, color="0.92", lw=0)
        a.axvspan(warm, load_end, color="#fdeaea", lw=0)
    rate = np.diff(received) / np.diff(t)
    ax[0].plot(t[1:], rate / 1e3, color=OURS, lw=1, label="received by the daemon")
    ax[0].axhline(s["units"] * s["rate_hz"] / 1e3, color=BASE, ls="--", label="sent (target)")
    ax[0].set_ylabel("spikes/s (thousands)")
    ax[0].set_ylim(0, None)
    ax[0].legend(loc="lower right", fontsize=8)
    # missed deadlines per 10 s bin, and the 0.1% bound as a count per bin
    edges = np.arange(0, t[-1] + 10, 10.0)
    m_at = np.interp(edges, t, missed)
    st_at = np.interp(edges, t, steps)
    ax[1].bar(edges[:-1], np.diff(m_at), width=9, align="edge", color=OURS,
              label="missed deadlines")  # fmt: skip
    ax[1].plot(edges[:-1] + 5, 0.001 * np.diff(st_at), color=GOAL, ls="--",
               label="0.1% of the steps (issue bound)")  # fmt: skip
    ax[1].set_ylabel("missed per 10 s")
    ax[1].legend(loc="upper right", fontsize=8)
    ax[2].plot(t, rss, color=OURS, lw=1.2, label="daemon RSS")
    i_warm = int(np.searchsorted(t, warm))
    base = rss[min(i_warm, len(rss) - 1)]
    ax[2].axhline(base + 5.0, color=GOAL, ls="--", label="RSS after warm-up + 5 MB (issue bound)")
    ax[2].set_ylabel("RSS (MB)")
    ax[2].set_xlabel("time since decoding started (s)")
    ax[2].legend(loc="lower right", fontsize=8)
    ld, sk = res["load"], res["soak"]
    ax[0].set_title(
        f"Load and soak: {s['units']} units x {s['rate_hz']:g} Hz at {s['cadence']:g} Hz cadence "
        f"({s['model']})\ngrey: warm-up; red: load window ({ld['missed_percent']:.2f}% missed, "
        f"{ld['sequence_gaps']} gaps); soak RSS +{sk['rss_growth_mb']:.1f} MB over "
        f"{sk['seconds'] / 60:.0f} min",
        fontsize=10,
    )
    return _save(fig, path)


# ------------------------------------------------------------------ engine_latency
IMPL_STYLE = {
    "torch_brain": ("torch_brain POYO (reference)", BASE),
    "torch_full": ("ours, full torch forward", "tab:purple"),
    "window": ("ours, engine window mode", "tab:orange"),
    "causal": ("ours, engine causal mode", OURS),
}


def engine_latency(res: dict, path: Path) -> Path:
    """Per-step latency against units: one panel per model size and hop, one colour per
    implementation, p50 solid and p99 dashed, log scales."""
    plt = _pyplot()
    rows = res["rows"]
    configs = sorted({r["config"] for r in rows})
    hops = sorted({r["hop_ms"] for r in rows})
    fig, axes = plt.subplots(len(configs), len(hops), figsize=(4.8 * len(hops), 3.9 * len(configs)),
                             squeeze=False, sharey=True)  # fmt: skip
    for i, cfg in enumerate(configs):
        for j, hop in enumerate(hops):
            a = axes[i][j]
            for impl, (label, colour) in IMPL_STYLE.items():
                sel = sorted((r for r in rows if r["config"] == cfg and r["hop_ms"] == hop
                              and r["impl"] == impl), key=lambda r: r["units"])  # fmt: skip
                if not sel:
                    continue
                u = [r["units"] for r in sel]
                a.plot(u, [r["p50_ms"] for r in sel], "o-", color=colour, label=f"{label} p50")
                a.plot(u, [r["p99_ms"] for r in sel], "--", color=colour, alpha=0.7,
                       label=f"{label} p99")  # fmt: skip
            a.axhline(hop, color=GOAL, lw=0.8, ls=":", label="step period (hop)")
            a.set_xscale("log")
            a.set_yscale("log")
            a.set_title(f"{cfg}, a step every {hop:g} ms", fontsize=10)
            a.set_xlabel("units in the stream (20 Hz each)")
            if j == 0:
                a.set_ylabel("wall time per step (ms)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"Per-step decode latency, {res.get('threads', 1)} thread, "
                 f"{res.get('cpus', '?')}-CPU machine (p50 solid, p99 dashed)",
                 fontsize=11)  # fmt: skip
    return _save(fig, path)


# ------------------------------------------------------------------ e2e_latency
def e2e_latency(res: dict, path: Path) -> Path:
    """p50 / p99 / p99.9 of each measured latency, ours beside the echo path (the LSL
    floor) and, with --compare, beside the other daemon's output latency."""
    plt = _pyplot()
    groups = [
        ("output\n(ours)", res["output_latency_ms"], OURS),
        ("spike to output\n(ours)", res["spike_to_output_ms"], "tab:orange"),
        ("echo, no model\n(LSL floor)", res["echo_latency_ms"], BASE),
        ("decode step\n(ours)", res["step_ms"], "tab:purple"),
    ]
    cmp = res.get("compare")
    if cmp:
        groups.insert(1, (f"output\n({cmp.get('label', 'compare')})", cmp["output_latency_ms"],
                          "tab:pink"))  # fmt: skip
    keys = [("p50", "p50"), ("p99", "p99"), ("p999", "p99.9")]
    fig, a = plt.subplots(figsize=(max(7, 1.7 * len(groups)), 4.2))
    width = 0.8 / len(groups)
    for g, (label, d, colour) in enumerate(groups):
        x = np.arange(len(keys)) + (g - (len(groups) - 1) / 2) * width
        v = [d[k] for k, _ in keys]
        bars = a.bar(x, v, width * 0.95, color=colour, label=label.replace("\n", " "))
        a.bar_label(bars, fmt="%.1f", fontsize=7)
    a.axhline(1000.0 / res["cadence_hz"], color=GOAL, ls="--", lw=0.8, label="step period")
    a.set_xticks(np.arange(len(keys)), [k for _, k in keys])
    a.set_yscale("log")
    a.set_ylabel("latency (ms, log)")
    a.legend(fontsize=7, loc="upper left")
    missed = f"{res['missed']} of {res['steps']} deadlines missed"
    if cmp:
        missed += f" ({cmp.get('label', 'compare')}: {cmp['missed']} of {cmp['steps']})"
    a.set_title(f"End-to-end latency: {res['units']} units, {res['cadence_hz']:g} Hz cadence, "
                f"{res['seconds']:.0f} s replay\n{missed}", fontsize=10)  # fmt: skip
    return _save(fig, path)


# ------------------------------------------------------------------ swap_gap
def swap_gap(res: dict, path: Path) -> Path:
    """The largest interval between outputs around each model swap, per gc setting."""
    plt = _pyplot()
    arms = [k for k in ("gc_freeze", "no_freeze") if k in res]
    names = {"gc_freeze": "gc_freeze on", "no_freeze": "gc_freeze off"}
    fig, a = plt.subplots(figsize=(6, 4))
    rng = np.random.default_rng(0)
    for i, arm in enumerate(arms):
        g = np.asarray(res[arm], dtype=float)
        a.scatter(i + rng.uniform(-0.12, 0.12, g.size), g, s=60, color=OURS, zorder=3)
        a.hlines(np.median(g), i - 0.25, i + 0.25, color="k", lw=2, zorder=4)
        a.annotate(f"median {np.median(g):.0f} ms\nmax {g.max():.0f} ms", (i + 0.28, np.median(g)),
                   fontsize=8, va="center")  # fmt: skip
    a.axhline(10.0, color=GOAL, ls="--", label="10 ms: no step missed at 100 Hz")
    a.set_xticks(range(len(arms)), [f"{names[k]}\n({len(res[k])} swaps)" for k in arms])
    a.set_xlim(-0.6, len(arms) - 0.1)
    a.set_ylim(0, None)
    a.set_ylabel("largest interval between outputs\nwithin 1 s of a swap (ms)")
    a.legend(fontsize=8, loc="upper right")
    a.set_title("Model swap (PUT /model) during decoding at 100 Hz", fontsize=10)
    return _save(fig, path)


# ------------------------------------------------------------------ serve_startup
def serve_startup(res: dict, path: Path) -> Path:
    """Start to ready per trial, split where the daemon was built, beside the imports."""
    plt = _pyplot()
    trials = res["trials"]
    ready = np.array([r["ready_s"] for r in trials])
    built = np.array([np.nan if r.get("daemon_built_at_s") is None else r["daemon_built_at_s"]
                      for r in trials])  # fmt: skip
    x = np.arange(len(trials))
    fig, a = plt.subplots(figsize=(7, 4))
    a.bar(x, built, color="tab:orange", label="process start to daemon built")
    a.bar(x, ready - built, bottom=built, color=OURS, label="daemon built to /health ready")
    a.axhline(float(np.median(ready)), color="k", lw=1, label=f"median {np.median(ready):.2f} s")
    imp = res.get("imports", {}).get("seconds")
    if imp is not None:
        a.axhline(imp, color=BASE, ls="--", label=f"imports alone {imp:.2f} s")
    a.set_xticks(x, [str(i + 1) for i in x])
    a.set_xlabel("trial")
    a.set_ylabel("seconds")
    a.set_ylim(0, ready.max() * 1.4)
    a.legend(fontsize=8, loc="upper right", ncol=2)
    a.set_title(f"`bci-decoder serve` start-up ({res.get('model', '')}, "
                f"{res.get('run', {}).get('cpus', '?')} CPUs)", fontsize=10)  # fmt: skip
    return _save(fig, path)


# ------------------------------------------------------------------ offline_throughput
def offline_throughput(res: dict, path: Path) -> Path:
    """Wall time to decode one hour, engine beside the torch reference, and x real time."""
    plt = _pyplot()
    names = {"engine": "ours: streaming engine\n(ONNX Runtime)",
             "torch_chunked": "torch reference\n(extrapolated from a slice)"}  # fmt: skip
    rows = res["rows"]
    fig, a = plt.subplots(figsize=(7, 3.2))
    y = np.arange(len(rows))
    colours = [OURS if r["impl"] == "engine" else BASE for r in rows]
    bars = a.barh(y, [r["hour_s"] / 60 for r in rows], color=colours)
    a.bar_label(bars, [f"{r['hour_s'] / 60:.1f} min ({r['x_realtime']:.1f}x real time)"
                       for r in rows], fontsize=8, padding=3)  # fmt: skip
    a.set_yticks(y, [names.get(r["impl"], r["impl"]) for r in rows], fontsize=8)
    a.invert_yaxis()
    a.set_xlim(0, max(r["hour_s"] for r in rows) / 60 * 1.45)
    a.set_xlabel("minutes to decode one hour of spikes")
    a.set_title(f"Offline decoding: {res['units']} units, a query every {res['hop_ms']:g} ms "
                f"({res['config']} model, {res.get('threads', 1)} thread)", fontsize=10)  # fmt: skip
    return _save(fig, path)


# ------------------------------------------------------------------ baselines_real
BASELINE_STYLE = {
    "wiener": ("Wiener", "tab:blue"),
    "kalman": ("Kalman", "tab:purple"),
    "gru": ("GRU", OURS),
    "gru_previous": ("GRU, pre-tuning defaults", "tab:orange"),
}


def baselines_real(res: dict, path: Path) -> Path:
    """Held-out R² of each classical baseline on each real session, our fits as bars and
    the reference (the data README's Wiener, issue 8's GRU) as black ticks on them."""
    plt = _pyplot()
    rows = res["rows"]
    names = [n for n in BASELINE_STYLE if any(n in r for r in rows)]
    ref = res.get("reference") or {}
    fig, a = plt.subplots(figsize=(max(8, 1.3 * len(rows) + 2), 4.3))
    width = 0.8 / len(names)
    x = np.arange(len(rows))
    ticked = False
    for k, n in enumerate(names):
        label, colour = BASELINE_STYLE[n]
        xs = x + (k - (len(names) - 1) / 2) * width
        v = [r[n]["r2"] if n in r else np.nan for r in rows]
        a.bar(xs, v, width * 0.95, color=colour, label=f"{label} (ours)")
        for xi, r in zip(xs, rows, strict=True):
            rv = ref.get(n, {}).get(r["session"])
            if rv is not None:
                a.hlines(rv, xi - width * 0.5, xi + width * 0.5, color="k", lw=2.2,
                         label=None if ticked else "reference R²")  # fmt: skip
                ticked = True
    a.set_xticks(x, [f"{r['session']}\n({r['units']} units)" for r in rows], fontsize=7)
    a.axhline(0, color="k", lw=0.6)
    a.set_ylim(min(0.0, np.nanmin([r[n]["r2"] for r in rows for n in names if n in r])), 1.0)
    a.set_ylabel("held-out R² (last 30%)")
    a.legend(fontsize=7, loc="lower left", ncol=len(names) + 1)
    fit = res.get("fit_seconds")
    fit_s = f"fit on the first {fit:g} s" if fit else "fit on the first 70%"
    a.set_title(f"Classical baselines on {len(rows)} real sessions, causal features, {fit_s}\n"
                f"({res.get('torch_threads', 1)} torch thread, "
                f"{res.get('machine', {}).get('cpus', '?')}-CPU machine)", fontsize=10)  # fmt: skip
    return _save(fig, path)


# ------------------------------------------------------------------ calibration
def calibration(res: dict, path: Path) -> Path:
    """Missed deadlines and p99 step time before and during an online calibration, with
    the decode threads at real-time priority (ours) beside normal scheduling."""
    plt = _pyplot()
    arms = [("real-time priority " + str(res.get("realtime_priority", "")), res, OURS)]
    if res.get("normal"):
        arms.append(("normal scheduling", res["normal"], BASE))
    fig, ax = plt.subplots(1, 3, figsize=(11, 3.8))
    phases = [("before", "decoding\nbefore"), ("during", "during\ncalibration")]
    width = 0.8 / len(arms)
    for k, (label, d, colour) in enumerate(arms):
        xs = np.arange(2) + (k - (len(arms) - 1) / 2) * width
        pct = [100 * d[f"missed_{p}"] / d[f"steps_{p}"] for p, _ in phases]
        b = ax[0].bar(xs, pct, width * 0.95, color=colour, label=label)
        ax[0].bar_label(b, [f"{d[f'missed_{p}']:.0f}/{d[f'steps_{p}']:.0f}" for p, _ in phases],
                        fontsize=7)  # fmt: skip
        b = ax[1].bar(xs, [d[f"p99_{p}_ms"] for p, _ in phases], width * 0.95, color=colour)
        ax[1].bar_label(b, fmt="%.1f", fontsize=7)
        b = ax[2].bar([k], [d["gap_at_swap_ms"]], 0.6, color=colour)
        ax[2].bar_label(b, fmt="%.0f", fontsize=7)
    for a in ax[:2]:
        a.set_xticks(range(2), [t for _, t in phases], fontsize=8)
    ax[0].set_ylabel("missed deadlines (% of steps)")
    ax[0].legend(fontsize=7, loc="upper left")
    ax[1].axhline(1000.0 / res["cadence_hz"], color=GOAL, ls="--", lw=0.8,
                  label="step period")  # fmt: skip
    ax[1].set_ylabel("p99 step time (ms)")
    ax[1].legend(fontsize=7, loc="lower right")
    ax[2].set_xticks(range(len(arms)), [lbl.replace(" priority", "\npriority") for lbl, _, _
                                         in arms], fontsize=8)  # fmt: skip
    ax[2].set_ylabel("largest output gap at the model swap (ms)")
    for a in ax:
        a.set_ylim(0, None)
    fig.suptitle(f"Online calibration while decoding: {res['units']} units at "
                 f"{res['cadence_hz']:g} Hz, {res['calibration_seconds']:g} s of data, median of "
                 f"{res.get('repeats', 1)} runs; R² after the swap {res['r2_after']:.2f}"
                 + (f" (normal: {res['normal']['r2_after']:.2f})" if res.get("normal") else ""),
                 fontsize=10)  # fmt: skip
    return _save(fig, path)


# ------------------------------------------------------------------ live_vs_offline
def live_vs_offline(res: dict, path: Path) -> Path:
    """R² of the live daemon's outputs beside the offline decode of the same span."""
    plt = _pyplot()
    fig, a = plt.subplots(figsize=(6, 3.8))
    v = [res["live_r2"], res["offline_r2"]]
    b = a.bar([0, 1], v, 0.6, color=[OURS, BASE])
    a.bar_label(b, fmt="%.3f", fontsize=9)
    a.set_xticks([0, 1], ["live daemon\n(LSL in, outputs recorded)",
                          "offline decode\n(same model, same span)"], fontsize=8)  # fmt: skip
    a.set_ylim(0, 1.0)
    a.set_ylabel("R² against the recorded behaviour")
    span = res["span_s"][1] - res["span_s"][0]
    a.set_title(f"Live vs offline on {res['session']}, {span:.0f} s at "
                f"{res['cadence_hz']:g} Hz: difference {res['difference']:+.3f}\n"
                f"{res['missed']} of {res['steps']} deadlines missed, "
                f"{res['dropped']} spikes dropped", fontsize=10)  # fmt: skip
    return _save(fig, path)


# ------------------------------------------------------------------ multi_vs_single
def multi_vs_single(res: dict, path: Path) -> Path:
    """Per session: the multi-session model (ours) beside a single-session model."""
    plt = _pyplot()
    rows = res["rows"]
    fig, a = plt.subplots(figsize=(max(5.5, 2.2 * len(rows) + 1.5), 3.8))
    x = np.arange(len(rows))
    m = rows[0]
    b = a.bar(x - 0.2, [r["multi_r2"] for r in rows], 0.38, color=OURS,
              label=f"multi-session model ({m['multi_steps']} steps)")  # fmt: skip
    a.bar_label(b, fmt="%.3f", fontsize=8)
    b = a.bar(x + 0.2, [r["single_r2"] for r in rows], 0.38, color=BASE,
              label=f"trained on this session only ({m['single_steps']} steps)")  # fmt: skip
    a.bar_label(b, fmt="%.3f", fontsize=8)
    a.set_xticks(x, [r["session"] for r in rows], fontsize=8)
    a.set_ylim(0, 1.0)
    a.set_ylabel("held-out R²")
    a.legend(fontsize=7, loc="upper left")
    a.set_title("One model for many sessions vs one model per session", fontsize=10)
    return _save(fig, path)


# ------------------------------------------------------------------ recorder_replay
def recorder_replay(res: dict, path: Path) -> Path:
    """What was sent or produced beside what the recording file holds, per stream."""
    plt = _pyplot()
    streams = [("spikes", res["replayed"]["spikes"]), ("behavior", res["replayed"]["behavior"]),
               ("outputs", res["status"]["steps_final"])]  # fmt: skip
    fig, a = plt.subplots(figsize=(7, 3.8))
    x = np.arange(len(streams))
    sent = np.array([n for _, n in streams], dtype=float)
    kept = np.array([res["file_counts"][s] for s, _ in streams], dtype=float)
    b = a.bar(x - 0.2, sent, 0.38, color=BASE, label="sent / decoded by the daemon")
    a.bar_label(b, [f"{n:,.0f}" for n in sent], fontsize=7)
    b = a.bar(x + 0.2, kept, 0.38, color=OURS, label="in the recording file")
    a.bar_label(b, [f"{n:,.0f}" for n in kept], fontsize=7)
    a.set_xticks(x, [s for s, _ in streams])
    a.set_yscale("log")
    a.set_ylim(1, sent.max() * 8)
    a.set_ylabel("samples (log)")
    a.legend(fontsize=7, loc="upper right")
    ok = "all kept, spikes identical" if all(res["verdict"].values()) else "LOSS"
    a.set_title(f"Recorder: {res['seconds']:.0f} s replayed into the daemon, "
                f"{res['file_mb']:.1f} MB file, read back in {res['read_s'] * 1e3:.0f} ms\n"
                f"{ok}; lost {sum(res['lost'].values())} (the daemon missed "
                f"{res['status']['missed']} of {res['status']['steps_final']} deadlines on "
                f"{res.get('info', {}).get('cpus', '?')} loaded CPUs)", fontsize=10)  # fmt: skip
    return _save(fig, path)


# ------------------------------------------------------------------ train_throughput
def train_throughput(res: dict, path: Path) -> Path:
    """Training samples/s and supervised targets/s of each of our arms beside torch_brain."""
    plt = _pyplot()
    rows = res["rows"]
    cfg = res["config"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    y = np.arange(len(rows))
    colours = [BASE if r["arm"] == "torch_brain" else OURS for r in rows]
    for a, key, unit in ((ax[0], "samples_per_s", "samples/s"),
                         (ax[1], "targets_per_s", "targets/s")):  # fmt: skip
        v = [r[key] for r in rows]
        b = a.barh(y, v, color=colours)
        a.bar_label(b, fmt="%.1f", fontsize=7, padding=2)
        a.set_xscale("log")
        a.set_xlim(min(v) / 2, max(v) * 6)
        a.set_xlabel(f"training {unit} (log)")
    ax[0].set_yticks(y, [f"{r['arm']}\n{r['sample']}" for r in rows], fontsize=7)
    ax[0].invert_yaxis()
    fig.suptitle(f"Training throughput, batch {cfg['batch']}, {cfg['threads']} torch thread(s), "
                 f"{cfg['units']} units ({cfg['data']}); grey: torch_brain POYO",
                 fontsize=10)  # fmt: skip
    return _save(fig, path)


# ------------------------------------------------------------------ zero_shot_axes
def zero_shot_axes(res: dict, path: Path) -> Path:
    """Per session, correlation of each decoded output dimension with each true one."""
    plt = _pyplot()
    sess = res["sessions"]
    fig, ax = plt.subplots(1, len(sess), figsize=(3.4 * len(sess) + 1, 3.6), squeeze=False)
    for a, (name, d) in zip(ax[0], sess.items(), strict=True):
        c = np.asarray(d["corr"], dtype=float)
        im = a.imshow(c, cmap="RdBu_r", vmin=-1, vmax=1)
        for (i, j), v in np.ndenumerate(c):
            a.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
        a.set_xticks(range(c.shape[1]))
        a.set_yticks(range(c.shape[0]))
        a.set_xlabel(f"true {d['output']} dim")
        a.set_ylabel("decoded dim")
        a.set_title(f"{name}\nR² {d['r2']:.2f}, axes "
                    f"{'match' if d['axes_match'] else 'SWAPPED'}", fontsize=8)  # fmt: skip
    fig.colorbar(im, ax=ax[0].tolist(), label="correlation", shrink=0.8)
    fig.suptitle(f"Zero-shot {Path(res.get('model', '')).name}: which true axis each decoded "
                 "axis follows", fontsize=10)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    print(f"wrote {path}")
    return path


# ------------------------------------------------------------------ mtm_ssl
def mtm_ssl(res: dict, path: Path) -> Path:
    """Co-smoothing and forward-prediction bps per session: MtM (ours), temporal-only
    masking and the smoothing baseline side by side."""
    plt = _pyplot()
    sessions = list(res["sessions"])
    names = list(next(iter(res["sessions"].values())))
    colours = {"mtm": OURS, "temporal-only": "tab:orange", "smoothing": BASE}
    fig, axes = plt.subplots(2, 1, figsize=(max(9, 1.1 * len(sessions) + 2), 7), sharex=True)
    x = np.arange(len(sessions) + 1)
    width = 0.8 / len(names)
    tasks = (("co_smoothing", "co-smoothing"), ("forward", "forward prediction"))
    for a, (task, label) in zip(axes, tasks, strict=True):
        for i, name in enumerate(names):
            vals = [res["sessions"][s][name].get(task, np.nan) for s in sessions]
            vals.append(res["mean"][name].get(task, np.nan))
            a.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, label=name,
                  color=colours.get(name))  # fmt: skip
        a.axhline(0, color="k", lw=0.6)
        a.axvline(len(sessions) - 0.5, color="k", lw=0.6, ls=":")
        a.set_ylabel(f"{label} (bits/spike)")
        a.grid(axis="y", alpha=0.3)
    axes[0].legend(frameon=False, ncol=len(names))
    axes[1].set_xticks(x, [*sessions, "mean"], rotation=30, ha="right")
    bw = res["settings"]["bin_width"] * 1000
    axes[0].set_title(f"Masked reconstruction, each session's last 30% ({bw:g} ms bins)\n"
                      "MtM vs temporal-only masking vs the smoothing baseline (higher is "
                      "better)")  # fmt: skip
    return _save(fig, path)


# ------------------------------------------------------------------ mtm_label_free
def mtm_label_free(res: dict, path: Path) -> Path:
    """R² of each calibration of the new session: label-free (ours) beside the fits given
    labels (supervised, Wiener) and the uncalibrated floor."""
    plt = _pyplot()
    names = list(res["results"])
    r2 = [res["results"][n]["r2"] for n in names]
    colours = [OURS if n.startswith("label-free") else "0.8" if n.startswith("uncalibrated")
               else BASE for n in names]  # fmt: skip
    fig, a = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5))
    a.barh(names, r2, color=colours)
    a.axvline(0, color="k", lw=0.6)
    a.invert_yaxis()
    a.set_xlabel("test R² on the last 30% (causal)")
    a.set_title(f"New session {res['session']}: label-free (red) vs given labels (grey)")
    a.grid(axis="x", alpha=0.3)
    return _save(fig, path)


# ------------------------------------------------------------------ scaling
def scaling(res: dict, path: Path) -> Path:
    """R² of unit identification on each held-out session (thin lines) and their mean
    (ours, thick) against the number of pretraining sessions, log x; the GRU trained on
    the same seconds as a dashed horizontal line (its mean) and ticks (each session); stars:
    the full recipe's model, where the JSON has it."""
    plt = _pyplot()
    arms, sessions, s = res["arms"], res["sessions"], res["seconds"]
    n = np.array([a["num_sessions"] for a in arms], dtype=float)
    r2 = {(r["arm"], r["session"]): r["r2"] for r in res["rows"]}
    ref = res.get("reference")
    fig, ax = plt.subplots(figsize=(11.5, 5))
    colours = plt.get_cmap("tab10")
    palette = [colours(k) for k in (0, 1, 2, 4, 5, 6, 7, 8, 9)] + ["k"]  # no OURS' red
    low = -0.3  # R² below this (a session every decoder fails on) drawn at the floor
    for i, sid in enumerate(sessions):
        c = palette[i % len(palette)]
        y = np.array([np.nan if r2.get((a["arm"], sid)) is None else r2[(a["arm"], sid)]
                      for a in arms])  # fmt: skip
        ax.plot(n, np.maximum(y, low), "o-", color=c, lw=1, ms=4, alpha=0.8, label=sid)
        for x, v in zip(n, y, strict=True):
            if v < low:
                ax.annotate(f"{v:.2f}", (x, low), textcoords="offset points", xytext=(4, 4),
                            fontsize=7, color=c)  # fmt: skip
        ax.plot([n[-1] * 1.25], [res["baselines"][sid]["gru"]], "_", color=c, ms=14, mew=2)
        if ref:
            y_ref = {r["session"]: r["r2"] for r in ref["rows"]}.get(sid)
            if y_ref is not None:
                ax.plot([ref["num_sessions"] * 1.1], [y_ref], "*", color=c, ms=8)
    mean = [res["summary"][a["arm"]]["mean"] for a in arms]
    full = [res["summary"][a["arm"]]["scored"] == len(sessions) for a in arms]
    ax.plot(n, [np.nan if m is None else m for m in mean], "-", color=OURS, lw=2.5,
            label="mean over the sessions scored")  # fmt: skip
    for x, m, f, a in zip(n, mean, full, arms, strict=True):
        if m is None:
            continue
        ax.plot([x], [m], "o", color=OURS, ms=8, mfc=OURS if f else "white", mew=2)
        if not f:
            ax.annotate(f"{res['summary'][a['arm']]['scored']}/{len(sessions)} scored",
                        (x, m), textcoords="offset points", xytext=(6, -12), fontsize=8)  # fmt: skip
    if ref and ref["mean"] is not None:
        ax.plot([ref["num_sessions"] * 1.1], [ref["mean"]], "*", color=OURS, ms=14, mec="k",
                label=f"the recipe in full ({ref['steps']} steps of {ref['batch_size']}), "
                "same sessions as 'all'")  # fmt: skip
    common = res["summary"].get("common_sessions", sessions)
    if 0 < len(common) < len(sessions):
        ax.plot(n, [res["summary"][a["arm"]]["mean_common"] for a in arms], ":", color=OURS,
                lw=2, label=f"mean over the {len(common)} sessions every arm scored")  # fmt: skip
    ax.axhline(res["summary"]["gru_mean"], color=BASE, ls="--", lw=1.5,
               label=f"GRU on the same {s} s (mean; ticks at the right: each session)")  # fmt: skip
    ax.set_ylim(low - 0.05, None)
    ax.set_xscale("log")
    ax.set_xticks(n, [f"{int(v)}" for v in n])
    ax.minorticks_off()
    ax.set_xlim(n[0] / 1.4, n[-1] * 1.6)
    ax.set_xlabel("pretraining sessions (nested subsets of the leave-out recipe)")
    ax.set_ylabel(f"test R² (last 30%, causal), unit identification on {s} s")
    b = res["budget"]
    ax.set_title(f"More pretraining sessions, equal steps ({b['steps']} steps of "
                 f"{b['batch_size']}): held-out sessions calibrated with {s} s",
                 fontsize=10)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


KINDS = {
    "load_soak": load_soak,
    "engine_latency": engine_latency,
    "e2e_latency": e2e_latency,
    "swap_gap": swap_gap,
    "serve_startup": serve_startup,
    "offline_throughput": offline_throughput,
    "baselines_real": baselines_real,
    "calibration": calibration,
    "live_vs_offline": live_vs_offline,
    "multi_vs_single": multi_vs_single,
    "recorder_replay": recorder_replay,
    "train_throughput": train_throughput,
    "zero_shot_axes": zero_shot_axes,
    "mtm_ssl": mtm_ssl,
    "mtm_label_free": mtm_label_free,
    "scaling": scaling,
}


def draw(kind: str, result: dict, json_path: Path | str | None) -> Path | None:
    """The picture of ``result`` next to its JSON (same name, .png); none without a JSON."""
    if json_path is None:
        return None
    return KINDS[kind](result, Path(json_path).with_suffix(".png"))


def plot_only(kind: str, json_path: Path | str) -> Path:
    """Redraw from a JSON an earlier run wrote (``--plot-only``)."""
    return draw(kind, json.loads(Path(json_path).read_text()), json_path)


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in KINDS:
        raise SystemExit(f"usage: _plots.py {{{','.join(KINDS)}}} RESULT.json [...]")
    for p in sys.argv[2:]:
        plot_only(sys.argv[1], p)
