"""Unit identification (``bci_decoder.calibrate``): a session the shipped model has never
seen is decoded well after fitting only its unit and session embeddings on 30 s."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bci_decoder.calibrate import (
    CalibrationSettings,
    _batch_size,
    add_session,
    fit_units,
    score_span,
)
from bci_decoder.data.simulate import SimConfig, simulate_session
from bci_decoder.train.checkpoint import Decoder, Normalizer

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "poyo-mp-small"


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shipped() -> Decoder:
    return Decoder.load(SHIPPED)


@pytest.fixture(scope="module")
def unseen():
    """Session 3 of the simulator seed the shipped model was pretrained on (sessions 0-2):
    same generative model, new units with no correspondence, ~2,800 spikes/s (dense)."""
    return simulate_session(SimConfig(seed=7, num_sessions=4, duration_s=120.0), 3)


def test_unseen_session_is_unknown_to_the_shipped_model(shipped, unseen):
    assert unseen.session_id not in shipped.sessions
    assert not any(n.startswith(unseen.session_id + "/") for n in shipped.units.names)


def test_calibration_on_30_s_decodes_later_data(one_thread, shipped, unseen):
    cal = fit_units(shipped, unseen, "hand_vel", (0.0, 30.0), CalibrationSettings(seed=0))
    r2 = score_span(cal, unseen, "hand_vel", (60.0, 120.0))
    assert r2 > 0.5, f"unit identification on 30 s reached only R² {r2:.3f} on later data"


def test_only_new_rows_move_and_their_mean_is_held(one_thread, shipped, unseen):
    span = (0.0, 30.0)
    cal = fit_units(shipped, unseen, "hand_vel", span, CalibrationSettings(steps=3, seed=4))
    torch.manual_seed(4)  # fit_units seeds the initial rows the same way
    norm = Normalizer.fit(unseen.behavior["hand_vel"].between(*span).data)
    init = add_session(shipped, unseen, "hand_vel", norm).model.state_dict()
    old, new = shipped.model.state_dict(), cal.model.state_dict()
    n_units, n_sessions = len(shipped.units), len(shipped.sessions)
    for name, value in old.items():
        if name == "unit_emb.weight":
            assert torch.equal(new[name][:n_units], value)
        elif name == "session_emb.weight":
            assert torch.equal(new[name][:n_sessions], value)
        else:
            assert torch.equal(new[name], value), name
    rows, rows0 = new["unit_emb.weight"][n_units:], init["unit_emb.weight"][n_units:]
    assert rows.shape[0] == unseen.num_units
    assert not torch.allclose(rows, rows0)  # fitted ...
    assert torch.allclose(rows.mean(0), rows0.mean(0), atol=1e-6)  # ... around a fixed mean
    assert not torch.equal(
        new["session_emb.weight"][n_sessions:], init["session_emb.weight"][n_sessions:]
    )
    assert cal.info["calibrated"]["session"] == unseen.session_id


def test_dense_sessions_get_fewer_sequences_per_step(unseen):
    st = CalibrationSettings()
    dense = _batch_size(unseen, (0.0, 30.0), 0.05, st)
    assert 2 <= dense < st.batch_size
    sparse = unseen.slice(0.0, 120.0)
    keep = np.arange(len(sparse.spike_times)) % 20 == 0  # ~140 spikes/s
    sparse.spike_times, sparse.spike_units = sparse.spike_times[keep], sparse.spike_units[keep]
    assert _batch_size(sparse, (0.0, 30.0), 0.05, st) == st.batch_size


def test_adapt_keeps_the_second_stage_only_where_the_slice_says_so(one_thread, shipped, unseen):
    """adapt = unit identification on the whole block, plus the fine-tune only when it
    beat unit identification on the block's held-out slice; the fine-tune moves shared
    weights and leaves the identified embeddings alone."""
    from bci_decoder.calibrate import SecondStage, adapt

    span, st = (0.0, 30.0), CalibrationSettings(steps=6, seed=1)
    plain = fit_units(shipped, unseen, "hand_vel", span, st)
    # refit_steps=0: the whole block fitted from the start (the refit has its own test)
    never = SecondStage(steps=4, eval_every=2, min_gain=10.0, refit_steps=0)  # cannot gain 10 R²
    dec, report = adapt(shipped, unseen, "hand_vel", span, st, never)
    assert report["second_stage"] is False and len(report["curve"]) == 3
    for a, b in zip(dec.model.parameters(), plain.model.parameters(), strict=True):
        assert torch.equal(a, b)
    always = SecondStage(steps=4, eval_every=2, min_gain=-10.0, refit_steps=0)
    dec, report = adapt(shipped, unseen, "hand_vel", span, st, always)
    assert report["second_stage"] is True and report["second_stage_steps"] in (2, 4)
    assert torch.equal(dec.model.unit_emb.weight, plain.model.unit_emb.weight)
    moved = [
        n
        for (n, a), b in zip(dec.model.named_parameters(), plain.model.parameters(), strict=True)
        if not torch.equal(a, b)
    ]
    assert moved and "unit_emb.weight" not in moved and "session_emb.weight" not in moved
    assert dec.info["adapt"]["second_stage"] is True


def test_fit_units_can_start_from_an_earlier_fit(one_thread, shipped, unseen):
    """``start``: the fit begins from another calibration's rows (0 steps: exactly them),
    with the new span's behaviour normalisation, not from the mean / warm start."""
    from dataclasses import replace

    st = CalibrationSettings(steps=3, seed=2)
    part = fit_units(shipped, unseen, "hand_vel", (0.0, 24.0), st)
    same = fit_units(shipped, unseen, "hand_vel", (0.0, 30.0), replace(st, steps=0), start=part)
    # (mean + offsets rebuilt from the rows: equal up to rounding)
    assert torch.allclose(same.model.unit_emb.weight, part.model.unit_emb.weight, atol=1e-6)
    assert torch.equal(same.model.session_emb.weight, part.model.session_emb.weight)
    norm = Normalizer.fit(unseen.behavior["hand_vel"].between(0.0, 30.0).data)
    assert np.allclose(same.norms[unseen.session_id]["hand_vel"].mean, norm.mean)
    scratch = fit_units(shipped, unseen, "hand_vel", (0.0, 30.0), replace(st, steps=0))
    assert not torch.equal(same.model.unit_emb.weight, scratch.model.unit_emb.weight)
    with pytest.raises(ValueError, match="start"):
        fit_units(shipped, unseen, "hand_vel", (0.0, 30.0), st, start=shipped)


def test_adapt_refit_continues_from_the_first_80_percent(one_thread, shipped, unseen):
    """``SecondStage.refit_steps``: the whole block's unit identification continues from
    the rows the first 80% found, for that many steps at a lower learning rate."""
    from dataclasses import replace

    from bci_decoder.calibrate import SecondStage, adapt

    span, st = (0.0, 30.0), CalibrationSettings(steps=6, seed=1)
    stage = SecondStage(steps=2, eval_every=2, min_gain=10.0, refit_steps=3)
    dec, report = adapt(shipped, unseen, "hand_vel", span, st, stage)
    assert report["second_stage"] is False
    first = fit_units(shipped, unseen, "hand_vel", (0.0, 24.0), st)
    more = replace(st, steps=3, lr=st.lr * stage.refit_lr, warmup=stage.refit_warmup)
    cont = fit_units(shipped, unseen, "hand_vel", span, more, start=first)
    assert torch.equal(dec.model.unit_emb.weight, cont.model.unit_emb.weight)
    assert dec.info["calibrated"]["steps"] == 3
    scratch = fit_units(shipped, unseen, "hand_vel", span, st)
    assert not torch.equal(dec.model.unit_emb.weight, scratch.model.unit_emb.weight)
