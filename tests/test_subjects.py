"""A new day of a known subject starts from what the model knows about that array
(``bci_decoder.subjects`` and ``calibrate.zero_shot``); an unknown subject is calibrated
exactly as before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bci_decoder.calibrate import CalibrationSettings, fit_units, zero_shot
from bci_decoder.data.session import Session
from bci_decoder.data.simulate import SimConfig, simulate_session
from bci_decoder.decode import decode_causal, session_tokens
from bci_decoder.subjects import channel_key, plan_warm_start, subject_sessions
from bci_decoder.train.checkpoint import Decoder
from tests.conftest import require_real_data

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "poyo-mp-small"
JANGO = "jango_20160626_wfiso"


def test_channel_keys_match_across_a_subjects_naming_schemes():
    assert channel_key("ch01_u0") == channel_key("ee001u0") == channel_key("ee01u0") == "ch1/u0"
    assert channel_key("ch12_u1") == "ch12/u1" != channel_key("ch12_u0")
    # spike-sorted units and simulator units are no channel: a day's unit003 is not another's
    assert channel_key("unit003") is None and channel_key("u003") is None
    assert channel_key("col001") is None


def _info(days: dict[str, str], subject: str = "Spike") -> dict:
    return {"session_meta": {d: {"subject": subject, "recorded_at": t} for d, t in days.items()}}


def test_plan_takes_the_most_recent_earlier_day_of_each_channel():
    days = {"d1": "2012-07-01T10:00:00", "d2": "2012-08-01T10:00:00", "d9": "2012-12-01T10:00:00"}
    units = ["<null>", "d1/ee01u0", "d1/ee02u0", "d2/ee01u0", "d9/ee01u0", "d9/ee02u0"]
    plan = plan_warm_start(
        units,
        ["d1", "d2", "d9"],
        _info(days),
        "Spike",
        ["ee01u0", "ee02u0", "ee03u0"],
        recorded_at="2012-09-01T10:00:00",
    )
    # d9 is later than the new day, so it is not used; ee02u0 is absent on d2 -> d1
    assert plan.unit_rows.tolist() == [3, 2, -1]
    assert plan.unit_sources == ["d2", "d1", ""]
    assert plan.nearest_session == "d2" and plan.session_row == 1
    assert plan.summary()["units_matched"] == 2 and plan.summary()["units_new"] == 1
    assert subject_sessions(_info(days), "Spike") == ["d9", "d2", "d1"]
    assert plan_warm_start(units, ["d1"], _info(days), "Mihi", ["ee01u0"]) is None
    assert plan_warm_start(units, ["d1"], _info(days), "Spike", ["ee01u0"], mode="off") is None


def test_rate_matching_passes_over_a_channel_whose_rate_moved():
    days = {"d1": "2012-07-01", "d2": "2012-08-01"}
    units = ["<null>", "d1/ee01u0", "d2/ee01u0", "d2/ee02u0"]
    info = _info(days) | {"unit_rates": {"d1/ee01u0": 10.0, "d2/ee01u0": 40.0, "d2/ee02u0": 5.0}}
    plan = plan_warm_start(
        units,
        ["d1", "d2"],
        info,
        "Spike",
        ["ee01u0", "ee02u0"],
        recorded_at="2012-09-01",
        mode="name+rate",
        unit_rates=np.array([11.0, 30.0]),
    )
    # ee01u0 at 11 Hz: d2's 40 Hz is too far, d1's 10 Hz matches; ee02u0 30 vs 5 Hz: none
    assert plan.unit_rows.tolist() == [1, -1] and plan.rate_rejected == 2


@pytest.fixture(scope="module")
def shipped_knows_jango() -> Decoder:
    dec = Decoder.load(SHIPPED)
    dec.info = dict(dec.info) | {
        "session_meta": {JANGO: {"subject": "Jango", "recorded_at": "2016-06-26T00:00:00+00:00"}}
    }
    return dec


def _renamed_day(session: Session, names: list[str], sid: str, span=(300.0, 330.0)) -> Session:
    """The same spikes as a new day of the same subject, channels under other names."""
    part = session.slice(*span)
    return Session(
        session_id=sid,
        subject=session.subject,
        spike_times=part.spike_times,
        spike_units=part.spike_units,
        unit_ids=names,
        brain_areas=part.brain_areas,
        behavior=part.behavior,
        domain=part.domain,
        recorded_at="2016-07-11T00:00:00+00:00",
    )


@pytest.mark.slow
def test_zero_shot_new_day_decodes_as_the_day_it_came_from(shipped_knows_jango):
    """Jango's channels renamed to the 2014 scheme (ch01_u0 -> ee001u0): zero-shot, the
    new day's tables are the earlier day's rows, so the same spikes decode the same."""
    jango = _load(JANGO)
    names = [f"ee{int(u[2:4]):03d}u0" for u in jango.unit_ids]
    day = _renamed_day(jango, names, "jango_new_day")
    dec = zero_shot(shipped_knows_jango, day, "force")
    warm = dec.info["warm_start"]
    assert warm["units_matched"] == jango.num_units and warm["session_from"] == JANGO
    query = day.behavior["force"].timestamps[20:200]
    times, units, sidx = session_tokens(dec, day)
    new = decode_causal(dec, times, units, sidx, "force", query)
    base = shipped_knows_jango
    old_units = base.units.session_units(JANGO, jango.unit_ids)[day.spike_units]
    old = decode_causal(base, day.spike_times, old_units, base.sessions[JANGO], "force", query)
    np.testing.assert_allclose(new, old, atol=1e-5)
    assert np.all(np.isfinite(new)) and new.std() > 0.05


def test_renamed_or_missing_channels_fall_back_to_the_mean(shipped_knows_jango):
    jango = _load(JANGO)
    names = [f"ee{int(u[2:4]):03d}u0" for u in jango.unit_ids]
    names[:10] = [f"ee{200 + i}u0" for i in range(10)]  # channels the earlier day lacks
    day = _renamed_day(jango, names, "jango_partial_day")
    torch.manual_seed(0)
    dec = zero_shot(shipped_knows_jango, day, "force")
    assert dec.info["warm_start"]["units_matched"] == jango.num_units - 10
    rows = dec.units.session_units(day.session_id, day.unit_ids)
    table = dec.model.unit_emb.weight.detach()
    known = shipped_knows_jango.model.unit_emb.weight.detach()
    # unmatched rows start near the mean of all known units, matched ones are copies
    assert torch.equal(table[rows[10:]], known[_rows(shipped_knows_jango, jango)[10:]])
    far = (table[rows[:10]] - known[1:].mean(0)).norm(dim=1).mean()
    spread = (known[1:] - known[1:].mean(0)).norm(dim=1).mean()
    assert far < 2 * spread
    # every channel renamed to something unknown: nothing matched, still decodes
    blind = _renamed_day(jango, [f"x{u}" for u in jango.unit_ids], "jango_blind_day")
    dec = zero_shot(shipped_knows_jango, blind, "force")
    assert dec.info["warm_start"]["units_matched"] == 0


@pytest.mark.slow
def test_unknown_subject_calibrates_exactly_as_before(shipped_knows_jango):
    sim = simulate_session(SimConfig(seed=7, num_sessions=4, duration_s=40.0), 3)
    st = dict(steps=4, seed=3, threads=1)
    a = fit_units(shipped_knows_jango, sim, "hand_vel", (0.0, 30.0), CalibrationSettings(**st))
    b = fit_units(
        shipped_knows_jango,
        sim,
        "hand_vel",
        (0.0, 30.0),
        CalibrationSettings(**st, warm_start="off"),
    )
    assert "warm_start" not in a.info
    assert torch.equal(a.model.unit_emb.weight, b.model.unit_emb.weight)
    assert torch.equal(a.model.session_emb.weight, b.model.session_emb.weight)
    with pytest.raises(ValueError, match="needs a subject the model knows"):
        zero_shot(shipped_knows_jango, sim, "hand_vel")


def _rows(dec: Decoder, session: Session) -> torch.Tensor:
    return torch.from_numpy(dec.units.session_units(session.session_id, session.unit_ids))


_CACHE: dict[str, Session] = {}


def _load(sid: str) -> Session:
    from bci_decoder.data.nwb import read_nwb

    if sid not in _CACHE:
        _CACHE[sid] = read_nwb(require_real_data(f"{sid}.nwb"))
    return _CACHE[sid]


@pytest.mark.slow
def test_adapt_keeps_the_start_that_scores_better_on_the_slice(shipped_knows_jango):
    """On a new day of a known subject, adapt fits unit identification warm and cold on the
    block's first 80% and keeps whichever scores better on the last 20%; the stored model is
    then fitted on the whole block from that start (here without a second stage)."""
    from dataclasses import replace

    from bci_decoder.calibrate import SecondStage, adapt

    jango = _load(JANGO)
    names = [f"ee{int(u[2:4]):03d}u0" for u in jango.unit_ids]
    day = _renamed_day(jango, names, "jango_choice_day", span=(300.0, 330.0))
    span, st = (300.0, 330.0), CalibrationSettings(steps=6, seed=1, threads=1)
    # refit_steps=0: the whole block fitted from the chosen start (the refit that goes on
    # from the first 80%'s rows has its own test in test_calibrate.py)
    no_second = SecondStage(steps=2, eval_every=2, min_gain=10.0, choose_start=True,
                            refit_steps=0)  # fmt: skip
    dec, report = adapt(shipped_knows_jango, day, "force", span, st, no_second)
    assert {"slice_r2_warm", "slice_r2_cold"} <= set(report)
    chosen = "cold" if report["slice_r2_cold"] > report["slice_r2_warm"] else "warm"
    assert report["start"] == chosen
    mode = "off" if chosen == "cold" else "name"
    plain = fit_units(shipped_knows_jango, day, "force", span, replace(st, warm_start=mode))
    assert torch.equal(dec.model.unit_emb.weight, plain.model.unit_emb.weight)
    assert ("warm_start" in dec.info) == (chosen == "warm")
    # not asked to choose (the default): the warm start is kept as before
    fixed = SecondStage(steps=2, eval_every=2, min_gain=10.0)
    _, report = adapt(shipped_knows_jango, day, "force", span, st, fixed)
    assert report["start"] == "warm" and "slice_r2_cold" not in report
