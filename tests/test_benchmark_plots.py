"""benchmarks/_plots.py: each benchmark's picture is drawn from its committed JSON alone
(what ``--plot-only`` does), next to it, and is not blank: our colour is in it; and the
committed PNG next to each of those JSONs exists."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
import _plots  # noqa: E402

CASES = [
    ("load_soak", "load_soak"),
    ("engine_latency", "engine_latency_shipped"),
    ("e2e_latency", "e2e_200u_100hz_realtime_vs_normal"),
    ("swap_gap", "swap_gap"),
    ("serve_startup", "serve_startup"),
    ("offline_throughput", "offline_throughput_1h"),
    ("serve_startup", "serve_startup_before"),
    ("baselines_real", "baselines_real"),
    ("baselines_real", "baselines_real_60s"),
    ("calibration", "calibration_200u_realtime_vs_normal"),
    ("live_vs_offline", "live_vs_offline_stevenson"),
    ("multi_vs_single", "multi_vs_single_chewie_stevenson"),
    ("multi_vs_single", "multi_vs_single_millerlab"),
    ("recorder_replay", "recorder_replay"),
    ("train_throughput", "train_throughput_1thread"),
    ("train_throughput", "train_throughput_2threads"),
    ("zero_shot_axes", "zero_shot_axes"),
    ("mtm_ssl", "mtm_ssl"),
    ("mtm_ssl", "mtm_ssl_real"),
    ("mtm_ssl", "mtm_ssl_real_prior_only"),
    ("scaling", "scaling"),
]
# a diagnostic with no "ours vs baseline": a correlation heat map, not our colour
NO_OURS = {"zero_shot_axes"}


@pytest.mark.parametrize("kind,name", CASES)
def test_drawn_from_the_json(kind, name, tmp_path):
    import matplotlib.image

    src = tmp_path / f"{name}.json"
    shutil.copy(RESULTS / f"{name}.json", src)
    png = _plots.plot_only(kind, src)
    assert png == tmp_path / f"{name}.png" and png.stat().st_size > 15_000
    img = matplotlib.image.imread(str(png))[..., :3]
    assert (img.min(axis=-1) < 0.9).mean() > 0.05, f"{kind}: the picture is nearly blank"
    if kind in NO_OURS:
        return
    ours = np.abs(img - np.array(to_rgb(_plots.OURS))).max(axis=-1) < 0.06
    assert ours.mean() > 0.001, f"{kind}: our colour covers {ours.mean():.4f} of the picture"


def test_no_json_no_picture():
    assert _plots.draw("swap_gap", {"gc_freeze": [10.0]}, None) is None


@pytest.mark.parametrize("name", sorted({name for _, name in CASES}))
def test_committed_png_next_to_the_json(name):
    assert (RESULTS / f"{name}.png").stat().st_size > 15_000
