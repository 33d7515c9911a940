"""The command line end to end on a tiny model: evaluate and calibrate write what they
promise, and bad input gets a clear message, not a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bci_decoder.config import TrainConfig
from bci_decoder.data.simulate import SimConfig, write_simulated
from bci_decoder.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {
    "dim": 32,
    "depth": 1,
    "dim_head": 16,
    "cross_heads": 2,
    "self_heads": 2,
    "latents_per_group": 4,
    "latent_step": 0.05,
    "context": 0.5,
    "rotate_values": False,
}
SIM = {"seed": 5, "num_sessions": 2, "duration_s": 60, "num_units": 25}


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bci_decoder.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        check=check,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny model trained on simulated session 0 and 1; NWB files of both plus a new one."""
    root = tmp_path_factory.mktemp("cli")
    cfg = TrainConfig(
        model=TINY_MODEL,
        data={"simulate": SIM},
        sampler={"batch_size": 4, "sequence": 1.0, "burn_in": 0.3, "max_queries": 8},
        optim={"steps": 4},
        eval_every=100,
        eval_seconds=3,
        threads=1,
        out=str(root / "model"),
    )
    train(cfg, progress=False)
    write_simulated(SimConfig(**SIM), root / "known")
    write_simulated(SimConfig(**{**SIM, "seed": 6, "num_sessions": 1}), root / "new")
    return root / "model", root


def test_evaluate_writes_json_table_and_png(tiny):
    model, root = tiny
    out = root / "r.json"
    res = cli(
        "evaluate",
        "--model",
        str(model),
        "--data",
        str(root / "known"),
        "--json",
        str(out),
        "--baselines",
        "wiener",
    )
    assert "poyo_causal" in res.stdout and "mean" in res.stdout
    report = json.loads(out.read_text())
    assert set(report["sessions"]) == {"sim5_s0", "sim5_s1"}
    row = report["sessions"]["sim5_s0"]
    assert isinstance(row["poyo_causal"], float) and isinstance(row["poyo_window"], float)
    assert isinstance(row["wiener"], float) and row["gru"] is None
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_evaluate_unknown_session_says_calibrate(tiny):
    model, root = tiny
    res = cli("evaluate", "--model", str(model), "--data", str(root / "new"), check=False)
    assert res.returncode == 2
    assert "unknown to this model" in res.stderr and "calibrate" in res.stderr
    assert "Traceback" not in res.stderr


def test_calibrate_reports_all_fields(tiny):
    model, root = tiny
    out = root / "c.json"
    saved = root / "calibrated"
    nwb = next((root / "new").glob("*.nwb"))
    cli(
        "calibrate",
        "--model",
        str(model),
        "--data",
        str(nwb),
        "--seconds",
        "20",
        "--steps",
        "5",
        "--json",
        str(out),
        "--save",
        str(saved),
    )
    rep = json.loads(out.read_text())
    for key in (
        "session",
        "seconds",
        "r2",
        "wiener_same_seconds",
        "wiener_full",
        "gru_same_seconds",
        "gru_full",
        "wall_s",
    ):
        assert key in rep, key
    assert rep["session"] == "sim6_s0" and abs(rep["seconds"] - 20) < 1e-6
    # the calibrated model now knows the session: evaluate runs on it
    res = cli("evaluate", "--model", str(saved), "--data", str(nwb), "--baselines", "none")
    assert "sim6_s0" in res.stdout


def test_bad_model_folder_is_a_clear_error(tmp_path):
    res = cli("evaluate", "--model", str(tmp_path), "--data", str(tmp_path), check=False)
    assert res.returncode == 2 and "not a model folder" in res.stderr


def test_help_teaches():
    res = cli("--help")
    for sub in ("simulate", "train", "evaluate", "calibrate", "export", "serve", "replay", "demo"):
        assert sub in res.stdout
    assert "calibrate" in cli("calibrate", "--help").stdout
    assert "Bearer" in cli("serve", "--help").stdout
    assert "--speed" in cli("replay", "--help").stdout


def test_cli_errors_are_clear(tmp_path):
    res = cli("replay", check=False)
    assert res.returncode == 2 and "--simulate" in res.stderr
    res = cli("demo", "--data", str(tmp_path / "missing.nwb"), check=False)
    assert res.returncode == 2 and "one NWB file" in res.stderr
    bad = tmp_path / "serve.yaml"
    bad.write_text("cadence_hz: -5\n")
    res = cli("serve", "--config", str(bad), check=False)
    assert res.returncode == 2 and "cadence_hz" in res.stderr
    res = cli("readout", "--counts", "maybe", check=False)
    assert res.returncode == 2 and "--counts must be yes, no or choose" in res.stderr
