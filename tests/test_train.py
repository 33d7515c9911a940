"""Training: learnability on simulated data, resume, and DDP equivalence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from bci_decoder.config import TrainConfig, load_train_config
from bci_decoder.data.session import time_split
from bci_decoder.decode import decode_session
from bci_decoder.metrics import r2_score
from bci_decoder.train.loop import gather_sessions, train

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "model": {
        "dim": 32,
        "depth": 1,
        "dim_head": 16,
        "cross_heads": 2,
        "self_heads": 2,
        "latents_per_group": 4,
        "latent_step": 0.05,
        "context": 0.5,
        "rotate_values": False,
    },
    "data": {"simulate": {"seed": 3, "num_sessions": 2, "duration_s": 40, "num_units": 30}},
    "sampler": {"batch_size": 4, "sequence": 1.0, "burn_in": 0.3, "max_queries": 8},
    "optim": {"lr": 3e-3, "steps": 6, "warmup": 0.0},
    "eval_every": 1000,
    "eval_seconds": 5,
    "threads": 1,
}


def _write(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_simulated_session_is_learnable(tmp_path):
    """A short CPU training run decodes a simulated session with R² > 0.8 on held-out time."""
    cfg = load_train_config(ROOT / "configs" / "learnability.yaml", {"out": str(tmp_path / "m")})
    dec = train(cfg, progress=False)
    session = gather_sessions(cfg)[0]
    split = time_split(session)
    _, target, pred = decode_session(dec, session, "hand_vel", split.test, "causal")
    r2 = r2_score(target, pred)
    print(f"learnability: causal R² {r2:.3f} on {session.session_id}")
    assert r2 > 0.8


def test_resume_continues_where_it_stopped(tmp_path):
    cfg = dict(TINY, out=str(tmp_path / "a"))
    full = train(TrainConfig(**cfg), progress=False)  # 6 steps in one go
    cfg_b = dict(TINY, out=str(tmp_path / "b"))
    train(TrainConfig(**cfg_b), progress=False, stop_at=3)  # "interrupted" after step 3
    resumed = train(TrainConfig(**cfg_b), resume=True, progress=False)
    np.testing.assert_allclose(_losses(tmp_path / "a"), _losses(tmp_path / "b"), rtol=1e-4)
    a = full.model.state_dict()["latent_emb"]
    b = resumed.model.state_dict()["latent_emb"]
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    """torchrun with 2 gloo processes gives the loss curve of 1 process on the same batches."""
    cfg_path = _write(TINY, tmp_path / "tiny.yaml")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = tmp_path / "single"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bci_decoder.cli",
            "train",
            "--config",
            str(cfg_path),
            "--out",
            str(single),
        ],
        check=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    double = tmp_path / "ddp"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "bci_decoder.cli",
            "train",
            "--config",
            str(cfg_path),
            "--out",
            str(double),
        ],
        check=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    a, b = _losses(single), _losses(double)
    assert len(a) == len(b) == TINY["optim"]["steps"]
    assert a[0] != a[-1]  # it trained
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-4)
