"""benchmarks/scaling.py: the arms are nested subsets of the leave-out recipe's pretraining
sessions, never a held-out one, and differ from each other only in ``data.include``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import scaling  # noqa: E402


def _args(tmp_path: Path) -> argparse.Namespace:
    return argparse.Namespace(
        config=ROOT / "configs" / "poyo-mp-transfer.yaml", steps=7, batch=3, out=tmp_path
    )


def test_arms_nested_and_sized():
    sizes = {a: len(s) for a, s in scaling.ARMS.items() if s is not None}
    assert sizes == {"1": 1, "4": 4, "12": 12}
    assert set(scaling.ONE) < set(scaling.FOUR) < set(scaling.TWELVE)
    assert len(set(scaling.TWELVE)) == 12


def test_arm_configs_differ_only_in_sessions(tmp_path):
    cfgs = {a: scaling.arm_config(a, _args(tmp_path)) for a in scaling.ARMS}
    held_out = set(cfgs["all"].data.exclude)
    assert held_out >= set(scaling.EVAL)
    assert not held_out & set(scaling.TWELVE)
    for arm, cfg in cfgs.items():
        assert cfg.optim.steps == 7 and cfg.sampler.batch_size == 3 and cfg.threads == 1
        assert cfg.out == str(tmp_path / f"arm-{arm}")
        assert cfg.data.include == (scaling.ARMS[arm] or [])
        same = cfg.model_dump(exclude={"out": True, "data": {"include"}})
        assert same == cfgs["all"].model_dump(exclude={"out": True, "data": {"include"}})


def test_untrained_arm_has_no_steps(tmp_path):
    assert scaling.trained_steps(tmp_path / "arm-4") == 0
