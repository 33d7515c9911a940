"""benchmarks/_plots.py: each benchmark's picture is drawn from its committed JSON alone
(what ``--plot-only`` does), next to it, and is not blank: our colour is in it."""

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
]


@pytest.mark.parametrize("kind,name", CASES)
def test_drawn_from_the_json(kind, name, tmp_path):
    import matplotlib.image

    src = tmp_path / f"{name}.json"
    shutil.copy(RESULTS / f"{name}.json", src)
    png = _plots.plot_only(kind, src)
    assert png == tmp_path / f"{name}.png" and png.stat().st_size > 15_000
    img = matplotlib.image.imread(str(png))[..., :3]
    ours = np.abs(img - np.array(to_rgb(_plots.OURS))).max(axis=-1) < 0.06
    assert ours.mean() > 0.001, f"{kind}: our colour covers {ours.mean():.4f} of the picture"


def test_no_json_no_picture():
    assert _plots.draw("swap_gap", {"gc_freeze": [10.0]}, None) is None
