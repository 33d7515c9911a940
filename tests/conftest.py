"""Shared fixtures. Real recordings live in ../shared/data/real (never in the repo): a
test that needs them skips with a clear message when they are absent, except in CI
(CI=true), where a missing data folder is a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("BCI_REAL_DATA", ROOT.parent / "shared" / "data" / "real"))
CORPUS_DATA = Path(os.environ.get("BCI_CORPUS_DATA", ROOT.parent / "shared" / "data" / "corpus"))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two test processes on two cores (pytest-xdist): one compute thread
    # each, read by torch and OpenMP when they start, or their pools spin against each other
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def require_real_data(name: str | None = None, folder: Path = REAL_DATA) -> Path:
    """Path of a data folder (or one file in it); skip, or fail in CI, if absent."""
    path = folder / name if name else folder
    if not path.exists():
        msg = f"recordings not found at {path} (set BCI_REAL_DATA / BCI_CORPUS_DATA)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; in CI the data folder is required")
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def real_data() -> Path:
    return require_real_data()


@pytest.fixture(scope="session")
def corpus_data() -> Path:
    return require_real_data(folder=CORPUS_DATA)
