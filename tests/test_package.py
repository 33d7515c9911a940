"""Model packages as the daemon loads them: by name, torch-free, and refused with the
export command when missing or stale (the serving process never exports)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from bci_decoder.model import layout
from bci_decoder.model.package import ModelPackage
from bci_decoder.runtime.daemon import DaemonError, load_package
from bci_decoder.serve_config import ServeConfig
from tests.daemon_harness import ROOT

MODEL = "poyo-mp-small"


@pytest.fixture()
def models(tmp_path):
    shutil.copytree(ROOT / "models" / MODEL, tmp_path / MODEL,
                    ignore=shutil.ignore_patterns(layout.CALIBRATIONS))  # fmt: skip
    return tmp_path


def _cfg(models) -> ServeConfig:
    return ServeConfig(models_dir=str(models), state_dir=str(models / "state"))


def test_shipped_packages_are_current():
    """Every shipped model carries its package, made from the weights beside it (after
    retraining: `make packages`)."""
    for folder in sorted((ROOT / "models").iterdir()):
        if not (folder / layout.META).exists():
            continue
        pkg = ModelPackage.load(folder)  # raises if stale
        for g in layout.GRAPHS:
            assert layout.graph_file(folder, g).exists(), (folder, g)
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        assert size < 12 * 2**20, f"{folder.name}: {size / 2**20:.1f} MB"
        meta = json.loads((folder / layout.META).read_text())
        assert pkg.spec["units"] == meta["units"] and pkg.output_dims == meta["outputs"]


def test_loads_by_name(models):
    pkg, base = load_package(_cfg(models), MODEL, None)
    assert base == models / MODEL and pkg.graphs_dir == base
    assert pkg.norms and pkg.output_names


@pytest.mark.parametrize("damage", ["weights", "graph", "package"])
def test_missing_or_stale_package_names_the_export_command(models, damage):
    folder = models / MODEL
    if damage == "weights":  # retrained (or replaced) weights, package not re-exported
        w = folder / layout.WEIGHTS
        w.write_bytes(w.read_bytes() + b"\0")
    elif damage == "graph":
        layout.graph_file(folder, "causal_step").unlink()
    else:
        (folder / layout.PACKAGE).unlink()
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(DaemonError, match="bci-decoder export") as e:
        load_package(_cfg(models), MODEL, None)
    assert e.value.status == 422
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing was exported


def test_calibration_on_other_weights_is_refused(models):
    """A calibration whose graph weights are not its base model's cannot share its graphs."""
    folder = models / MODEL
    cal = layout.calibration_dir(folder, "other")
    cal.mkdir(parents=True)
    for name in (layout.PACKAGE, layout.TABLES):
        shutil.copy(folder / name, cal / name)
    spec = json.loads((cal / layout.PACKAGE).read_text())
    spec["graph_hash"], spec["weights_sha256"] = "0" * 16, ""
    (cal / layout.PACKAGE).write_text(json.dumps(spec))
    with pytest.raises(DaemonError, match="other weights"):
        load_package(_cfg(models), MODEL, "other")
    spec["graph_hash"] = json.loads((folder / layout.PACKAGE).read_text())["graph_hash"]
    (cal / layout.PACKAGE).write_text(json.dumps(spec))
    pkg, _ = load_package(_cfg(models), MODEL, "other")  # its graphs: the base model's
    assert pkg.graphs_dir == folder


def test_with_session_adds_a_day_like_add_session(models):
    """The numpy zero-shot extension: copied rows where matched, the session's row and
    normalisation set, everything else unchanged."""
    pkg = ModelPackage.load(models / MODEL)
    sid0 = pkg.sessions.names[0]
    names = pkg.session_unit_names(sid0)[:3]
    rows = pkg.units.session_units(sid0, names)
    norm = pkg.norms[sid0][pkg.output_names[0]]
    new = pkg.with_session("new-day", ["a", "b", "c"], pkg.output_names[0], norm,
                           np.array([rows[0], -1, rows[2]]), pkg.sessions[sid0])  # fmt: skip
    emb = new.arrays["unit_emb"]
    added = new.units.session_units("new-day", ["a", "b", "c"])
    np.testing.assert_array_equal(emb[added[0]], pkg.arrays["unit_emb"][rows[0]])
    np.testing.assert_array_equal(emb[added[2]], pkg.arrays["unit_emb"][rows[2]])
    assert not np.array_equal(emb[added[1]], pkg.arrays["unit_emb"][rows[1]])
    np.testing.assert_array_equal(emb[: len(pkg.units)], pkg.arrays["unit_emb"])
    np.testing.assert_array_equal(new.arrays["session_emb"][new.sessions["new-day"]],
                                  pkg.arrays["session_emb"][pkg.sessions[sid0]])  # fmt: skip
    assert new.norms["new-day"][pkg.output_names[0]].mean.tolist() == norm.mean.tolist()
    assert "new-day" not in pkg.sessions  # the original is untouched
