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


def _sim(seed: int, sessions: int, **rename):
    from dataclasses import replace

    from bci_decoder.data.simulate import SimConfig, simulate_sessions

    out = simulate_sessions(
        SimConfig(seed=seed, num_sessions=sessions, duration_s=20, num_units=12)
    )
    return [replace(s, **rename) for s in out] if rename else out


def test_warm_start_copies_rows_by_name_adds_sessions_and_an_mtm_head(tmp_path):
    """A second stage may add sessions (they start at the mean of the earlier rows) and a
    masked readout; every row the earlier model knew is copied by name, every shared
    weight as it is."""
    import torch

    from bci_decoder.train.loop import build_decoder, warm_start

    first = _sim(5, 1)
    cfg1 = TrainConfig(**(TINY | {"data": {}}))
    dec1, _ = build_decoder(cfg1, first)
    with torch.no_grad():
        for p in dec1.model.parameters():
            p.normal_()  # not the init a fresh model would draw
    dec1.save(tmp_path / "first")

    second = first + [replace_id(s, f"new_{s.session_id}") for s in _sim(6, 1)]
    cfg2 = TrainConfig(**(TINY | {"data": {}, "mtm": {"enabled": True}}))
    dec2, _ = build_decoder(cfg2, second)
    rows = warm_start(dec2, tmp_path / "first")
    old, new = dec1.model, dec2.model
    units = dec1.units.to_list()
    assert rows["new"] == len(second[1].unit_ids) + 1  # the new session's units and its row
    for i, name in enumerate(units):
        assert torch.equal(new.unit_emb.weight[dec2.units[name]], old.unit_emb.weight[i])
    added = dec2.units.session_units(second[1].session_id, second[1].unit_ids)
    mean = old.unit_emb.weight.mean(0)
    assert torch.allclose(new.unit_emb.weight[added], mean.expand(len(added), -1))
    assert torch.equal(new.enc_attn.to_k.weight, old.enc_attn.to_k.weight)
    assert new.mtm is not None

    cfg_other = TrainConfig(**(TINY | {"data": {}, "model": TINY["model"] | {"dim": 16}}))
    dec3, _ = build_decoder(cfg_other, first)
    with pytest.raises(ValueError, match="other model dimensions"):
        warm_start(dec3, tmp_path / "first")


def replace_id(session, session_id: str):
    from dataclasses import replace

    return replace(session, session_id=session_id)


def test_channel_tie_pulls_a_subjects_same_channel_rows_together():
    """Rows of one subject's same channel on two days are pulled toward their mean; other
    subjects and unparseable names are left alone; gradient descent on the penalty alone
    shrinks the spread across days and keeps each group's mean."""
    from dataclasses import replace

    import torch

    from bci_decoder.train.loop import build_decoder
    from bci_decoder.train.objectives import ChannelTie

    a, b, c = _sim(8, 3)
    names = [f"ee{i:02d}u0" for i in range(a.num_units)]
    a = replace(a, session_id="d1", subject="m", unit_ids=names)
    b = replace(b, session_id="d2", subject="m", unit_ids=names)
    c = replace(c, session_id="other", subject="x", unit_ids=names)
    dec, _ = build_decoder(TrainConfig(**(TINY | {"data": {}})), [a, b, c])
    tie = ChannelTie(dec, [a, b, c], weight=1.0)
    assert tie.num_groups == a.num_units and len(tie.rows) == 2 * a.num_units
    assert not set(dec.units.session_units("other", names).tolist()) & set(tie.rows.tolist())

    emb = torch.nn.Parameter(torch.randn_like(dec.model.unit_emb.weight))
    r1, r2 = dec.units.session_units("d1", names), dec.units.session_units("d2", names)
    mean0 = (emb[r1] + emb[r2]).detach() / 2
    spread0 = float((emb[r1] - emb[r2]).detach().norm())
    before = float(tie.loss(emb).detach())
    opt = torch.optim.SGD([emb], lr=1.0)
    for _ in range(20):
        opt.zero_grad()
        tie.loss(emb).backward()
        opt.step()
    assert float(tie.loss(emb).detach()) < 0.5 * before
    assert float((emb[r1] - emb[r2]).detach().norm()) < 0.5 * spread0
    assert torch.allclose((emb[r1] + emb[r2]).detach() / 2, mean0, atol=1e-5)


def test_session_boost_multiplies_matching_sessions_shares_and_refuses_typos():
    from bci_decoder.train.data import boost_factors

    ids = ["jango_20160626_wfiso", "jango_20160711_wfiso", "spike_20120718_wf", "sim7_s0"]
    f = boost_factors(ids, {"jango_*": 4.0, "*_20160711_*": 0.5})
    assert f.tolist() == [4.0, 2.0, 1.0, 1.0]
    assert boost_factors(ids, {}).tolist() == [1.0] * 4
    with pytest.raises(ValueError, match="matches no training session"):
        boost_factors(ids, {"jnago_*": 4.0})
    with pytest.raises(ValueError, match="must be > 0"):
        boost_factors(ids, {"jango_*": 0.0})
