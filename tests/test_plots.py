"""The pictures of `calibrate` and `recording`: written where promised, and not blank:
each line and bar a reader needs is there in its colour."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb

from bci_decoder import plots
from bci_decoder.config import TrainConfig
from bci_decoder.data.simulate import SimConfig, write_simulated
from bci_decoder.runtime.decode_loop import lsl_clock
from bci_decoder.runtime.recorder import Recorder
from bci_decoder.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"dim": 32, "depth": 1, "dim_head": 16, "cross_heads": 2, "self_heads": 2,
              "latents_per_group": 4, "latent_step": 0.05, "context": 0.5,
              "rotate_values": False}  # fmt: skip
SIM = {"seed": 5, "num_sessions": 1, "duration_s": 60, "num_units": 25}


def cli(*args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "bci_decoder.cli", *args], capture_output=True,
                         text=True, cwd=ROOT, timeout=600, env={"OMP_NUM_THREADS": "1",
                                                                "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def share(png: Path, colour: str, tol: float = 0.06) -> float:
    """The fraction of the picture's pixels drawn in ``colour``."""
    import matplotlib.image

    img = matplotlib.image.imread(str(png))[..., :3]
    return float((np.abs(img - np.array(to_rgb(colour))) < tol).all(-1).mean())


def assert_readable(png: Path, colours: dict[str, str]) -> None:
    assert png.stat().st_size > 20_000, png.stat().st_size
    assert 1 - share(png, "white", 0.02) > 0.03, "mostly blank"
    for what, colour in colours.items():
        assert share(png, colour) > 5e-5, f"no {what} ({colour}) in {png.name}"  # ~50 pixels


def test_calibration_figure_has_ours_and_baselines(tmp_path):
    report = {"session": "s", "seconds": 60.0, "output": "hand_vel", "r2": 0.71,
              "wiener_same_seconds": 0.42, "gru_same_seconds": 0.55, "wiener_full": 0.66,
              "gru_full": 0.8}  # fmt: skip
    t = np.arange(0, 20, 0.01)
    traces = {"t": t, "target": np.sin(t)[:, None], "ours": 0.9 * np.sin(t)[:, None],
              "wiener": 0.5 * np.sin(t + 0.3)[:, None]}  # fmt: skip
    png = plots.calibration_figure(report, tmp_path / "c.png", traces)
    assert_readable(png, {"ours": plots.OURS, "Wiener": plots.BASELINE["wiener"],
                          "GRU": plots.BASELINE["gru"], "the behaviour": plots.TRUE})  # fmt: skip
    # without baselines (label-free, or --no-baselines) it still draws ours alone
    bare = plots.calibration_figure({"session": "s", "seconds": 10.0, "output": "x",
                                     "r2": 0.3, "labels": "none"}, tmp_path / "b.png")  # fmt: skip
    assert_readable(bare, {"ours": plots.OURS})
    assert share(bare, plots.BASELINE["gru"]) < 1e-5


@pytest.mark.slow
def test_calibrate_command_writes_its_png(tmp_path):
    cfg = TrainConfig(model=TINY_MODEL, data={"simulate": SIM},
                      sampler={"batch_size": 4, "sequence": 1.0, "burn_in": 0.3,
                               "max_queries": 8},
                      optim={"steps": 2}, eval_every=100, eval_seconds=3, threads=1,
                      out=str(tmp_path / "model"))  # fmt: skip
    train(cfg, progress=False)
    write_simulated(SimConfig(**{**SIM, "seed": 6}), tmp_path / "new")
    nwb = next((tmp_path / "new").glob("*.nwb"))
    out = tmp_path / "cal.json"
    res = cli("calibrate", "--model", str(tmp_path / "model"), "--data", str(nwb),
              "--seconds", "15", "--steps", "3", "--no-baselines", "--no-second-stage",
              "--json", str(out))  # fmt: skip
    png = out.with_suffix(".png")
    assert f"wrote {png}" in res.stdout
    # bars and traces of ours, the behaviour, and a Wiener fitted on the same 15 s
    assert_readable(png, {"ours": plots.OURS, "the behaviour": plots.TRUE,
                          "Wiener": plots.BASELINE["wiener"]})  # fmt: skip


def fake_recording(path: Path, seconds: float = 30.0, hop: float = 0.01) -> Path:
    """A recording as the daemon writes it: Poisson spikes, a sine behaviour, outputs
    that follow it at 100 Hz with 0.5-3 ms latency, a swap and state changes."""
    rng = np.random.default_rng(0)
    rec = Recorder(path, flush_s=0.1)
    t0 = lsl_clock() - seconds / 2  # events are stamped now: in the middle
    rec.event("start", model="m", calibration=None)
    n = rng.poisson(3000 * seconds)
    rec.spikes_in(np.sort(rng.uniform(t0, t0 + seconds, n)), rng.integers(0, 100, n))
    bt = np.arange(t0, t0 + seconds, 0.01)
    rec.behavior_in(bt, np.stack([np.sin(bt), np.cos(bt)], 1).astype(np.float32))
    for t in np.arange(t0, t0 + seconds, hop):
        y = np.array([np.sin(t), np.cos(t)]) * 0.8 + rng.normal(0, 0.05, 2)
        rec.output(t, y, t + rng.uniform(0.5e-3, 3e-3), 0.4, False)
    rec.event("model", name="m", calibration="c1")
    rec.close()
    return path


def test_recording_command_writes_its_png(tmp_path):
    path = fake_recording(tmp_path / "rec.h5")
    res = cli("recording", str(path))
    png = path.with_suffix(".png")
    assert f"wrote {png}" in res.stdout and '"spikes"' in res.stdout
    assert_readable(png, {"decoded output": plots.OURS, "the behaviour": plots.TRUE,
                          "latency histogram": "tab:blue", "model swap": "tab:purple"})  # fmt: skip
