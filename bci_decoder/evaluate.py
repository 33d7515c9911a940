"""Score a model against the baselines on held-out time (the last 30% of each session).

Every prediction at a behaviour timestamp t uses only spikes up to t: causal mode streams
the session; window mode uses the window ending at t; the baselines use bins ending at t.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bci_decoder.baselines import evaluate_baselines
from bci_decoder.data.session import Session, time_split
from bci_decoder.decode import decode_session
from bci_decoder.metrics import r2_score
from bci_decoder.train.checkpoint import Decoder

# poyo_causal_head: the linear head, where poyo_causal read a session readout
COLUMNS = ("poyo_causal", "poyo_causal_head", "poyo_window", "wiener", "kalman", "gru")
# the engine decodes on both cores where there are two (StreamingEngine.decode's split)
WORKERS = min(2, os.cpu_count() or 1)


def evaluate_session(
    decoder: Decoder,
    session: Session,
    output: str | None = None,
    baselines: tuple[str, ...] = ("wiener", "kalman", "gru"),
    seed: int = 0,
) -> dict[str, Any]:
    """R² of each decoder on the session's test split, with the traces for plotting."""
    output = output or session.default_output()
    split = time_split(session)
    res: dict[str, Any] = {"output": output, "traces": {}}
    ts, target, pred = decode_session(
        decoder, session, output, split.test, "causal", workers=WORKERS
    )
    res["poyo_causal"] = r2_score(target, pred)
    res["traces"] = {"t": ts, "target": target, "poyo_causal": pred}
    # causal mode reads the session's recurrent readout where one was fitted
    # (model.session_readout); the linear head's R² is reported beside it
    res["readout"] = (session.session_id, output) in decoder.readouts
    if res["readout"]:
        _, _, hpred = decode_session(
            replace(decoder, readouts={}), session, output, split.test, "causal", workers=WORKERS
        )
        res["poyo_causal_head"] = r2_score(target, hpred)
    if "window" in decoder.modes:
        _, _, wpred = decode_session(
            decoder, session, output, split.test, "window", workers=WORKERS
        )
        res["poyo_window"] = r2_score(target, wpred)
        res["traces"]["poyo_window"] = wpred
    else:
        res["poyo_window"] = None
    if baselines:
        base = evaluate_baselines(session, output, split.fit, split.test, baselines, seed=seed)
        for name in baselines:
            res[name] = base[name]["r2"]
            res["traces"][name] = base[name]["pred"]
    return res


def format_table(rows: dict[str, dict[str, Any]], columns: tuple[str, ...] = COLUMNS) -> str:
    """A plain-text table of R² per session and column, with the mean last."""
    cols = [c for c in columns if any(r.get(c) is not None for r in rows.values())]
    width = max([len(s) for s in rows] + [8])
    lines = [f"{'session':<{width}}  " + "  ".join(f"{c:>11}" for c in cols)]
    for sid, r in rows.items():
        cells = [f"{r[c]:>11.3f}" if r.get(c) is not None else f"{'-':>11}" for c in cols]
        lines.append(f"{sid:<{width}}  " + "  ".join(cells))
    means = []
    for c in cols:
        vals = [r[c] for r in rows.values() if r.get(c) is not None]
        means.append(f"{np.mean(vals):>11.3f}" if vals else f"{'-':>11}")
    lines.append(f"{'mean':<{width}}  " + "  ".join(means))
    return "\n".join(lines)


def plot_traces(
    results: dict[str, dict[str, Any]], path: str | Path, seconds: float = 20.0
) -> Path:
    """Decoded vs true traces (first output dim, first ``seconds`` of each test span)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    fig, axes = plt.subplots(n, 1, figsize=(11, 2.2 * n), squeeze=False)
    for ax, (sid, r) in zip(axes[:, 0], results.items(), strict=True):
        tr = r["traces"]
        t = tr["t"]
        keep = t < t[0] + seconds
        ax.plot(t[keep] - t[0], tr["target"][keep, 0], color="k", lw=1.5, label="true")
        styles = {
            "poyo_causal": "tab:red",
            "poyo_window": "tab:orange",
            "gru": "tab:blue",
            "wiener": "tab:green",
        }
        for name, color in styles.items():
            if name in tr:
                r2 = r.get(name)
                label = f"{name} (R² {r2:.2f})" if r2 is not None else name
                ax.plot(t[keep] - t[0], tr[name][keep, 0], color=color, lw=1, label=label)
        ax.set_title(f"{sid}: {r['output']}[0], test split", fontsize=9)
        ax.legend(fontsize=7, loc="upper right", ncol=5)
    axes[-1, 0].set_xlabel("seconds into the test split")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def evaluate(
    decoder: Decoder,
    sessions: list[Session],
    json_path: str | Path | None = None,
    png_path: str | Path | None = None,
    baselines: tuple[str, ...] = ("wiener", "kalman", "gru"),
    log=print,
) -> dict[str, Any]:
    """Evaluate every session; print the table; write JSON and PNG when asked."""
    results: dict[str, dict[str, Any]] = {}
    for s in sessions:
        log(f"evaluating {s.session_id} ...")
        results[s.session_id] = evaluate_session(decoder, s, baselines=baselines)
    table = format_table(results)
    log(table)
    report = {
        "sessions": {
            sid: {c: r.get(c) for c in COLUMNS} | {"output": r["output"], "readout": r["readout"]}
            for sid, r in results.items()
        }
    }
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=1))
    if png_path:
        plot_traces(results, png_path)
    report["table"] = table
    return report
