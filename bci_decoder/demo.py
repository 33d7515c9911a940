"""The main job (``make demo``): the shipped model on a simulated session it knows and on
the real recordings, next to the baselines, as a table, a JSON report and a plot."""

from __future__ import annotations

import json
import time
from pathlib import Path

from bci_decoder.data.nwb import load_sessions
from bci_decoder.data.simulate import SimConfig, simulate_session
from bci_decoder.evaluate import evaluate
from bci_decoder.train.checkpoint import Decoder


def known_simulation(decoder: Decoder) -> SimConfig | None:
    """The simulator settings the model was pretrained with (stored in its metadata)."""
    sim = decoder.info.get("train_config", {}).get("data", {}).get("simulate")
    return SimConfig(**sim) if sim else None


def run_demo(decoder: Decoder, data: Path, out: Path) -> dict:
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    sessions = []
    sim = known_simulation(decoder)
    if sim is not None:
        sessions.append(simulate_session(sim, 0))
        print(f"simulated session {sessions[0].session_id} (seed {sim.seed}, known to the model)")
    if data.exists():
        real = [s for s in load_sessions(data) if s.session_id in decoder.sessions]
        print(f"{len(real)} real recordings from {data}")
        sessions.extend(real)
    else:
        print(f"no recordings at {data}: simulated data only")
    if not sessions:
        raise SystemExit("nothing to evaluate: the model knows none of the given sessions")
    report = evaluate(decoder, sessions, out / "report.json", out / "report.png")
    md = [
        "# bci_decoder demo report",
        "",
        "Test R² (last 30% of each session; every prediction uses only spikes up to its time).",
        "",
        "```",
        report["table"],
        "```",
        "",
        "![decoded vs true](report.png)",
    ]
    (out / "report.md").write_text("\n".join(md) + "\n")
    print(
        f"report: {out / 'report.md'}, {out / 'report.json'}, {out / 'report.png'} "
        f"({time.time() - t0:.0f} s)"
    )
    return json.loads((out / "report.json").read_text())
