"""benchmarks/train_throughput.py runs end to end on a tiny setting, with and without the
optional torch_brain reference."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--batch", "2", "--steps", "1", "--rounds", "2", "--warmup", "0", "--threads", "1",
    "--units", "20", "--duration", "20",
]  # fmt: skip


def _load():
    spec = importlib.util.spec_from_file_location(
        "train_throughput", ROOT / "benchmarks" / "train_throughput.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_ours_only_without_reference(monkeypatch, tmp_path, capsys):
    bench = _load()
    monkeypatch.setattr(bench, "reference_available", lambda: (False, "ImportError: test"))
    out = tmp_path / "bench.json"
    res = bench.main([*TINY, "--arms", "torch_brain,causal1,window", "--json", str(out)])
    assert "not importable" in capsys.readouterr().out
    arms = [r["arm"] for r in res["rows"]]
    assert arms == ["ours causal 1s", "ours window 1s"]
    assert res["ratio"] == {}
    saved = json.loads(out.read_text())
    assert saved["rows"][0]["steps"] == 2
    assert saved["rows"][1]["targets_per_sample"] == 1.0


def test_against_reference(capsys):
    pytest.importorskip("torch_brain.models")
    bench = _load()
    res = bench.main(TINY)
    rows = {r["arm"]: r for r in res["rows"]}
    assert set(rows) == {
        "torch_brain",
        "ours causal 1s",
        "ours causal 3s",
        "ours window 1s",
        "ours train mix",
    }
    ref = rows["torch_brain"]
    assert ref["targets_per_sample"] == pytest.approx(100, abs=2)  # 100 Hz behaviour, 1 s
    assert 0 < rows["ours causal 1s"]["targets_per_sample"] <= 24
    for name, r in res["ratio"].items():
        assert r["samples"] == pytest.approx(rows[name]["samples_per_s"] / ref["samples_per_s"])
    text = capsys.readouterr().out
    assert "ratio ours / torch_brain" in text and "load average" in text
