"""Masked self-supervision (MtM): schemes, the masked readout, its training, its evaluation
and label-free calibration."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bci_decoder.calibrate import add_session
from bci_decoder.calibrate_unsupervised import UnsupervisedSettings, fit_units_unsupervised
from bci_decoder.config import MtMSettings, load_train_config
from bci_decoder.data.nwb import write_nwb
from bci_decoder.data.session import Session, time_split
from bci_decoder.data.simulate import SimConfig, simulate_session
from bci_decoder.decode import WINDOW_KEYS, to_torch
from bci_decoder.model.masking import MTM_KEYS, SCHEMES, collate_mtm, draw_mask, mask_window
from bci_decoder.model.poyo import POYO, POYOConfig
from bci_decoder.ssl_eval import SSLEvalSettings, evaluate_ssl, heldout_units, tuned_glm
from bci_decoder.tokenizer import collate_window, tokenize_window
from bci_decoder.train.checkpoint import Decoder
from bci_decoder.train.data import MtMSampler, MtMSource
from bci_decoder.train.loop import train
from bci_decoder.train.objectives import attach_mtm_head, masked_poisson_nll

ROOT = Path(__file__).resolve().parents[1]
SMALL = POYOConfig(
    dim=32,
    depth=1,
    dim_head=16,
    cross_heads=2,
    self_heads=2,
    latents_per_group=4,
    latent_step=0.05,
    context=0.5,
    rotate_values=False,
)
MTM = SMALL.model_copy(update={"mtm_head": True})
TINY = {
    "model": SMALL.model_dump(),
    "data": {
        "simulate": {
            "seed": 5,
            "num_sessions": 1,
            "duration_s": 40,
            "num_units": 24,
            "num_regions": 2,
        }
    },
    "sampler": {"batch_size": 4, "sequence": 1.0, "burn_in": 0.3, "max_queries": 8},
    "optim": {"lr": 3e-3, "steps": 4, "warmup": 0.0},
    "mtm": {"enabled": True, "batch_size": 4},
    "eval_every": 1000,
    "eval_seconds": 3,
    "threads": 1,
}


@pytest.fixture(scope="module")
def two_regions() -> Session:
    return simulate_session(
        SimConfig(seed=5, num_sessions=1, duration_s=40, num_units=24, num_regions=2), 0
    )


def _window(session: Session, t_end: float, scheme: str, seed: int = 0, **kw):
    return mask_window(
        session.spike_times,
        session.spike_units,
        np.arange(1, session.num_units + 1),
        np.unique(session.brain_areas, return_inverse=True)[1],
        t_end,
        0.5,
        0.05,
        0.02,
        scheme,
        np.random.default_rng(seed),
        **kw,
    )


# ---------------------------------------------------------------- model and loading
def test_mtm_off_leaves_the_supervised_model_unchanged():
    """No MtM parameters without the flag; with it, the supervised weights draw the same
    start and the window/causal outputs are the same function of the same weights."""
    torch.manual_seed(0)
    plain = POYO(SMALL, num_units=10, num_sessions=2, outputs={"v": 2})
    torch.manual_seed(0)
    with_head = POYO(MTM, num_units=10, num_sessions=2, outputs={"v": 2})
    assert plain.mtm is None and not any(k.startswith("mtm.") for k in plain.state_dict())
    shared = plain.state_dict()
    for k, v in shared.items():
        assert torch.equal(v, with_head.state_dict()[k]), k
    rng = np.random.default_rng(1)
    times = np.sort(rng.uniform(0, 0.5, 40))
    units = rng.integers(1, 10, 40)
    batch = to_torch(collate_window([tokenize_window(times, units, 0.5, 0.5, 0.05)]), WINDOW_KEYS)
    assert torch.equal(plain(mode="window", **batch), with_head(mode="window", **batch))


def test_shipped_model_loads_and_gets_a_head_without_changing():
    dec = Decoder.load(ROOT / "models" / "poyo-mp-small")
    assert dec.model.mtm is None
    with pytest.raises(ValueError, match="no MtM head"):
        dec.model.forward_mtm(**{k: None for k in MTM_KEYS})
    headed = attach_mtm_head(dec)
    for k, v in dec.model.state_dict().items():
        assert torch.equal(v, headed.model.state_dict()[k]), k
    assert headed.model.mtm is not None


def test_mtm_model_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    dec = attach_mtm_head(Decoder.load(ROOT / "models" / "poyo-mp-small"))
    dec.save(tmp_path / "m")
    back = Decoder.load(tmp_path / "m")
    assert back.config.mtm_head
    for k, v in dec.model.state_dict().items():
        assert torch.equal(v, back.model.state_dict()[k]), k


# ---------------------------------------------------------------- schemes
@pytest.mark.parametrize("scheme", SCHEMES)
def test_hidden_spikes_leave_the_input_and_only_they_are_scored(two_regions, scheme):
    s = _window(two_regions, 20.0, scheme)
    start = 20.0 - 0.5
    b = np.ceil((s.spike_time - start) / 0.02).astype(int) - 1
    local = s.spike_unit - 1
    assert not s.hidden[local, b].any()  # no visible spike lies in a hidden pair
    assert s.counts[s.hidden].sum() > 0  # and hidden pairs did have spikes
    assert s.counts.sum() == s.counts[s.hidden].sum() + len(s.spike_time)
    assert (s.scored <= s.hidden).all() and s.scored.any()
    assert s.scheme == SCHEMES.index(scheme)


def test_scheme_shapes(two_regions):
    reg = np.unique(two_regions.brain_areas, return_inverse=True)[1]
    rng = np.random.default_rng(0)
    h, sc = draw_mask(rng, "temporal", reg, 25, 0.3, 10)
    assert (h.all(0) | ~h.any(0)).all() and h.any(0).sum() == 8  # whole bins
    h, sc = draw_mask(rng, "neuron", reg, 25, 0.3, 10)
    assert (h.all(1) | ~h.any(1)).all()  # whole units
    h, sc = draw_mask(rng, "causal", reg, 25, 0.3, 10)
    assert h[:, 15:].all() and not h[:, :15].any()
    h, sc = draw_mask(rng, "inter_region", reg, 25, 0.3, 10)
    assert len(set(reg[h[:, 0]])) == 1 and h[:, 0].sum() == (reg == reg[h[:, 0]][0]).sum()
    h, sc = draw_mask(rng, "intra_region", reg, 25, 0.3, 10)
    kept = reg[~h[:, 0]]
    assert len(set(kept)) == 1 and len(set(reg[sc[:, 0]])) == 1 and reg[sc[:, 0]][0] == kept[0]
    # one region: the region schemes fall back to hiding units
    h, _ = draw_mask(rng, "inter_region", np.zeros(20, int), 25, 0.3, 10)
    assert 0 < h[:, 0].sum() < 20


def test_masked_unit_differs_from_silent_unit(two_regions):
    """A unit hidden by the scheme and the same unit present but silent give different
    inputs to the model (the marker), hence different predicted rates."""
    torch.manual_seed(0)
    model = POYO(MTM, num_units=two_regions.num_units + 1, num_sessions=1, outputs={"v": 2})
    model.eval()
    u = 3
    hidden = np.zeros((two_regions.num_units, 25), bool)
    hidden[u] = True
    masked = _window(two_regions, 20.0, "neuron", fixed=(hidden, hidden))
    # the silent twin: the same visible spikes, unit u simply has none, nothing hidden
    silent = dataclasses.replace(
        masked, hidden=np.zeros_like(hidden), marker=np.zeros_like(masked.marker)
    )
    assert np.array_equal(masked.spike_unit, silent.spike_unit)
    with torch.no_grad():
        a = model(mode="mtm", **to_torch(collate_mtm([masked]), MTM_KEYS))
        b = model(mode="mtm", **to_torch(collate_mtm([silent]), MTM_KEYS))
    assert masked.marker[:, u].sum() == pytest.approx(10.0)  # 10 groups, hidden throughout
    assert (a - b).abs().max() > 1e-3


def test_rate_prior_head_reads_each_units_mean_rate(two_regions):
    """``mtm_rate_prior``: a unit's log-rate moves one for one with its prior (its mean rate
    over the sampler's span, from spiking only); a head without it ignores the prior."""
    from bci_decoder.model.masking import log_rate_prior

    span = (0.0, 30.0)
    prior = log_rate_prior(two_regions.spike_times, two_regions.spike_units, 24, span)
    lo, hi = np.searchsorted(two_regions.spike_times, span, side="right")
    n3 = np.sum(two_regions.spike_units[lo:hi] == 3)
    assert prior[3] == pytest.approx(np.log((n3 + 0.5) / 30.0), rel=1e-5)
    src = MtMSource(two_regions, 0, np.arange(1, 25), span)
    _, batch = MtMSampler([src], 0.05, 0.5, MtMSettings(enabled=True, batch_size=2)).batch(0)
    assert np.allclose(batch["mtm_log_prior"][0], prior)
    shifted = dict(batch, mtm_log_prior=batch["mtm_log_prior"] + np.arange(24, dtype=np.float32))
    for reads, expected in ((True, np.arange(24)), (False, np.zeros(24))):
        torch.manual_seed(0)
        cfg = MTM.model_copy(update={"mtm_rate_prior": reads})
        model = POYO(cfg, num_units=25, num_sessions=1, outputs={"v": 2}).eval()
        with torch.no_grad():
            a = model(mode="mtm", **to_torch(batch, MTM_KEYS))
            b = model(mode="mtm", **to_torch(shifted, MTM_KEYS))
        assert np.allclose((b - a)[0].numpy(), expected[:, None], atol=1e-5)


def test_unit_norm_readout_tells_nearly_alike_rows_apart():
    """``mtm_unit_norm``: rows as alike as freshly trained ones (std 0.02) still get readout
    directions about as different as two random unit vectors; without it they nearly share
    one (the readout's bias)."""
    torch.manual_seed(0)
    rows = torch.randn(50, 32) * 0.02  # (U, D)
    cos = {}
    for norm in (False, True):
        cfg = MTM.model_copy(update={"mtm_unit_norm": norm})
        model = POYO(cfg, num_units=51, num_sessions=1, outputs={"v": 2})
        head = model.mtm
        unit_in = head.unit_norm(rows) if head.unit_norm is not None else rows
        with torch.no_grad():
            r = torch.nn.functional.normalize(head.unit_out(unit_in)[:, :32], dim=1)
        cos[norm] = float((r @ r.T).triu(1).abs().sum() / (50 * 49 / 2))
    assert cos[False] > 0.9 and cos[True] < 0.5, cos


def test_forward_scheme_never_uses_spikes_after_the_cut(two_regions):
    """Causal scheme: outputs for the hidden (future) bins are the same whatever spikes lie
    after the cut, so an output at t uses spikes before it only."""
    torch.manual_seed(0)
    model = POYO(MTM, num_units=two_regions.num_units + 1, num_sessions=1, outputs={"v": 2})
    model.eval()
    a = _window(two_regions, 20.0, "causal")
    cut = 20.0 - 0.2
    extra_t = np.sort(np.random.default_rng(3).uniform(cut + 1e-6, 20.0, 200))
    times = np.concatenate([two_regions.spike_times, extra_t])
    units = np.concatenate([two_regions.spike_units, np.arange(200) % two_regions.num_units])
    order = np.argsort(times, kind="stable")
    b = mask_window(
        times[order],
        units[order],
        np.arange(1, two_regions.num_units + 1),
        np.unique(two_regions.brain_areas, return_inverse=True)[1],
        20.0,
        0.5,
        0.05,
        0.02,
        "causal",
        np.random.default_rng(0),
    )
    assert (a.spike_time <= cut).all() and np.array_equal(a.spike_time, b.spike_time)
    assert b.counts.sum() == a.counts.sum() + 200  # the extra spikes are targets only
    with torch.no_grad():
        ra = model(mode="mtm", **to_torch(collate_mtm([a]), MTM_KEYS))
        rb = model(mode="mtm", **to_torch(collate_mtm([b]), MTM_KEYS))
    assert torch.equal(ra, rb)


# ---------------------------------------------------------------- objective
def test_poisson_nll_scores_masked_entries_only():
    torch.manual_seed(0)
    log_rate = torch.randn(2, 5, 7)
    counts = torch.poisson(torch.full((2, 5, 7), 0.5))
    scored = torch.rand(2, 5, 7) < 0.4
    loss = masked_poisson_nll(log_rate, counts, scored, 0.02)
    mu = torch.exp(log_rate) * 0.02
    per = mu - counts * torch.log(mu)
    want = torch.stack([per[i][scored[i]].mean() for i in range(2)]).mean()
    assert torch.allclose(loss, want, atol=1e-6)
    changed = torch.where(scored, counts, counts + 5.0)
    assert torch.allclose(masked_poisson_nll(log_rate, changed, scored, 0.02), loss)


@pytest.mark.slow
def test_masked_objective_learns(two_regions):
    """A few dozen steps of the masked objective lower its loss on fixed batches."""
    torch.manual_seed(0)
    model = POYO(MTM, num_units=two_regions.num_units + 1, num_sessions=1, outputs={"v": 2})
    src = MtMSource(two_regions, 0, np.arange(1, two_regions.num_units + 1), (0.0, 40.0))
    sampler = MtMSampler([src], 0.05, 0.5, MtMSettings(enabled=True, batch_size=8), seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_of(step: int) -> torch.Tensor:
        _, b = sampler.batch(step)
        out = model(mode="mtm", **to_torch(b, MTM_KEYS))
        return masked_poisson_nll(
            out, torch.from_numpy(b["mtm_counts"]), torch.from_numpy(b["mtm_scored"]), 0.02
        )

    with torch.no_grad():
        before = float(np.mean([float(loss_of(1000 + i)) for i in range(4)]))
    for step in range(30):
        loss = loss_of(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(np.mean([float(loss_of(1000 + i)) for i in range(4)]))
    assert after < before - 0.02, (before, after)


# ---------------------------------------------------------------- training and data
def test_train_mixes_the_masked_objective_and_uses_unlabelled_sessions(tmp_path):
    """``mtm.enabled`` trains the head next to the supervised loss (logged per step), and a
    session without behaviour joins the vocabulary for the masked objective only."""
    bare = simulate_session(SimConfig(seed=9, num_sessions=1, duration_s=30, num_units=12), 0)
    bare = dataclasses.replace(bare, session_id="unlabelled_sim", behavior={})
    write_nwb(bare, tmp_path / "data" / "unlabelled_sim.nwb")
    cfg = dict(TINY, out=str(tmp_path / "m"))
    cfg["data"] = dict(cfg["data"], real=[str(tmp_path / "data")])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    dec = train(load_train_config(tmp_path / "c.yaml"), progress=False)
    rows = [json.loads(x) for x in (tmp_path / "m" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "mtm_loss" in r]
    assert len(steps) == 4 and all(np.isfinite(r["mtm_loss"]) for r in steps)
    assert "unlabelled_sim" in dec.sessions and len(dec.units) == 1 + 24 + 12
    assert "unlabelled_sim" not in dec.norms
    back = Decoder.load(tmp_path / "m")
    assert back.model.mtm is not None


def test_mtm_settings_reject_unknown_schemes():
    with pytest.raises(ValueError, match="unknown mtm schemes"):
        MtMSettings(schemes={"nope": 1.0})


def test_simulator_regions_leave_defaults_unchanged():
    one = simulate_session(SimConfig(seed=4, num_sessions=1, duration_s=10, num_units=12), 0)
    same = simulate_session(
        SimConfig(seed=4, num_sessions=1, duration_s=10, num_units=12, num_regions=1), 0
    )
    two = simulate_session(
        SimConfig(seed=4, num_sessions=1, duration_s=10, num_units=12, num_regions=2), 0
    )
    assert np.array_equal(one.spike_times, same.spike_times)
    assert one.description == same.description and set(one.brain_areas) == {"M1"}
    assert two.brain_areas == ["M1"] * 6 + ["PMd"] * 6
    assert not np.array_equal(one.spike_times, two.spike_times)  # private latents differ


# ---------------------------------------------------------------- evaluation
def test_heldout_units_are_fixed():
    a, b = heldout_units(50, 0.2, 0), heldout_units(50, 0.2, 0)
    assert np.array_equal(a, b) and a.sum() == 10
    assert not np.array_equal(a, heldout_units(50, 0.2, 1))


def test_tuned_glm_picks_the_kernel_the_held_back_bins_favour():
    # 20 ms bins; every unit follows one latent that drifts over ~0.5 s, so a 10 ms kernel
    # (no smoothing at all) predicts the target unit worse than a 200 ms one
    from scipy.ndimage import gaussian_filter1d

    rng = np.random.default_rng(0)
    n, bw = 4000, 0.02
    latent = gaussian_filter1d(rng.standard_normal(n), 25) * 25  # (N,) slow, sd about 1
    rates = np.exp(0.8 * latent[:, None] + rng.uniform(-1.5, -0.5, 9))  # (N, 9) per bin
    counts = rng.poisson(rates).astype(float)
    visible, target = counts[:, :8], counts[:, 8:]

    def smooth(sd_s: float) -> np.ndarray:
        return gaussian_filter1d(visible, sd_s / bw, axis=0, mode="nearest")

    st = SSLEvalSettings(bin_width=bw, smooth_sd_s=(0.01, 0.2), glm_l2=(1e-3,))
    _, x = tuned_glm(smooth, target, np.arange(3000), st)
    assert np.allclose(x, smooth(0.2))


def test_evaluate_ssl_scores_every_task(two_regions):
    torch.manual_seed(0)
    dec = attach_mtm_head(_decoder_for(two_regions))
    one = {"smooth_sd_s": (0.05,), "glm_l2": (1e-3,)}  # no sweep: test_tuned_glm covers it
    st = SSLEvalSettings(max_windows=8, batch_size=8, **one)
    report = evaluate_ssl({"mtm": dec}, [two_regions], st)
    row = report["sessions"][two_regions.session_id]
    assert set(row) == {"mtm", "smoothing"}
    for name in row:
        assert set(row[name]) == {"co_smoothing", "forward", "region"}
        assert all(np.isfinite(v) for v in row[name].values())
    # the smoothing baseline, fitted on the training part, beats the mean-rate null
    assert row["smoothing"]["co_smoothing"] > 0


def _decoder_for(session: Session, config: POYOConfig = SMALL) -> Decoder:
    from bci_decoder.model.vocab import UnitVocab, Vocab, unit_key
    from bci_decoder.train.checkpoint import Normalizer

    units = UnitVocab(unit_key(session.session_id, u) for u in session.unit_ids)
    model = POYO(config, num_units=len(units), num_sessions=1, outputs={"hand_vel": 2})
    beh = session.behavior["hand_vel"]
    norm = {session.session_id: {"hand_vel": Normalizer.fit(beh.data)}}
    return Decoder(model, units, Vocab([session.session_id]), norm)


# ---------------------------------------------------------------- label-free calibration
def test_label_free_calibration_fits_only_the_new_rows_without_behaviour(two_regions):
    torch.manual_seed(0)
    dec = attach_mtm_head(_decoder_for(two_regions))
    new = simulate_session(SimConfig(seed=6, num_sessions=1, duration_s=20, num_units=10), 0)
    new = dataclasses.replace(new, session_id="new", behavior={})  # no behaviour at all
    losses = []
    cal = fit_units_unsupervised(
        dec,
        new,
        (0.0, 20.0),
        UnsupervisedSettings(steps=30, batch_size=4, lr=3e-2, bin_width=0.02),
        progress=lambda step, loss: losses.append(loss),
    )
    old = dec.model.state_dict()
    for k, v in cal.model.state_dict().items():
        if k == "unit_emb.weight":
            assert torch.equal(v[: len(dec.units)], old[k])
            new_rows = v[len(dec.units) :]
            assert new_rows.shape[0] == 10
        elif k == "session_emb.weight":
            assert torch.equal(v[:1], old[k])
        else:
            assert torch.equal(v, old[k]), k
    # the new rows' mean is held at its start (see calibrate.fit_units)
    torch.manual_seed(0)
    start = add_session(dec, new, "hand_vel", cal.norms["new"]["hand_vel"])
    start_rows = start.model.unit_emb.weight[len(dec.units) :]
    assert torch.allclose(new_rows.mean(0), start_rows.mean(0), atol=1e-5)
    assert not torch.allclose(new_rows, start_rows, atol=1e-3)  # but the rows moved
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert cal.info["calibrated"]["labels"] == "none"
    assert cal.norms["new"]["hand_vel"].mean.shape == (2,)


def test_label_free_calibration_refuses_bad_input(two_regions):
    plain = _decoder_for(two_regions)
    with pytest.raises(ValueError, match="no MtM head"):
        fit_units_unsupervised(plain, two_regions, (0.0, 20.0))
    dec = attach_mtm_head(plain)
    new = dataclasses.replace(two_regions, session_id="new2")
    with pytest.raises(ValueError, match="no spikes"):
        fit_units_unsupervised(dec, new, (100.0, 130.0))
    with pytest.raises(ValueError, match="too short"):
        fit_units_unsupervised(dec, new, (0.0, 0.8))
    with pytest.raises(ValueError, match="which bins"):  # nor a default that may be wrong
        fit_units_unsupervised(dec, new, (0.0, 20.0))


def test_cli_calibrate_labels_none(tmp_path, two_regions):
    from typer.testing import CliRunner

    from bci_decoder.cli import app

    torch.manual_seed(0)
    dec = attach_mtm_head(_decoder_for(two_regions))
    dec.info = {"train_config": {"mtm": {"bin_width": 0.02}}}  # as training records it
    dec.save(tmp_path / "model")
    new = simulate_session(SimConfig(seed=8, num_sessions=1, duration_s=30, num_units=10), 0)
    write_nwb(dataclasses.replace(new, session_id="fresh"), tmp_path / "fresh.nwb")
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "calibrate",
            "--model",
            str(tmp_path / "model"),
            "--data",
            str(tmp_path / "fresh.nwb"),
            "--labels",
            "none",
            "--steps",
            "3",
            "--seconds",
            "10",
            "--json",
            str(tmp_path / "r.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["labels"] == "none" and np.isfinite(report["r2"])
    bad = runner.invoke(
        app, ["calibrate", "--model", str(tmp_path / "model"), "--data",
              str(tmp_path / "fresh.nwb"), "--labels", "some"],
    )  # fmt: skip
    assert bad.exit_code == 2 and "--labels" in bad.output
    assert time_split(new).test[0] > 10


def test_label_free_calibration_of_a_new_day_starts_from_the_earlier_day(two_regions):
    """A new day of a subject the model knows: label-free calibration starts each unit from
    the same channel's row on the earlier day and decodes with that day's normalisation;
    with warm_start off it starts from the mean and the pretrained sessions' mean norm."""
    names = [f"ch{i + 1:02d}_u0" for i in range(two_regions.num_units)]
    day1 = dataclasses.replace(two_regions, session_id="day1", subject="m", unit_ids=names)
    day1.recorded_at = "2020-01-01T00:00:00"
    torch.manual_seed(0)
    dec = attach_mtm_head(_decoder_for(day1))
    dec.info = {"session_meta": {"day1": {"subject": "m", "recorded_at": day1.recorded_at}}}
    n1 = dec.norms["day1"]["hand_vel"]  # another animal's norm, so the mean of all differs
    dec.norms["other"] = {"hand_vel": dataclasses.replace(n1, mean=n1.mean + 5.0)}
    day2 = dataclasses.replace(day1, session_id="day2", behavior={})
    day2.recorded_at = "2020-01-02T00:00:00"
    st = UnsupervisedSettings(
        steps=1, batch_size=2, lr=1e-9, warm_lr=1e-9, warmup=1.0, bin_width=0.02
    )
    cal = fit_units_unsupervised(dec, day2, (0.0, 20.0), st)
    assert cal.info["warm_start"]["units_matched"] == day1.num_units
    assert cal.info["calibrated"]["lr"] == 1e-9  # warm: warm_lr
    rows = cal.units.session_units("day2", names)
    # the warm rows, moved by at most one step of lr 1e-9 (and the held mean)
    torch.testing.assert_close(
        cal.model.unit_emb.weight[rows], dec.model.unit_emb.weight[1:], atol=1e-6, rtol=0
    )
    np.testing.assert_array_equal(
        cal.norms["day2"]["hand_vel"].mean, dec.norms["day1"]["hand_vel"].mean
    )
    cold = fit_units_unsupervised(
        dec, day2, (0.0, 20.0), dataclasses.replace(st, warm_start="off", lr=3e-2)
    )
    assert "warm_start" not in cold.info
    assert not np.allclose(cold.norms["day2"]["hand_vel"].mean, n1.mean)
    assert not torch.allclose(cold.model.unit_emb.weight[rows], dec.model.unit_emb.weight[1:])


def test_cli_mtm_head_gives_a_supervised_model_a_masked_readout(tmp_path):
    """`bci-decoder mtm-head`: a supervised model's folder in, the same weights plus a
    trained MtM head out, which label-free calibration then accepts."""
    from typer.testing import CliRunner

    from bci_decoder.cli import app

    cfg = dict(TINY, mtm={"enabled": False}, out=str(tmp_path / "sup"))
    cfg_path = tmp_path / "sup.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    train(load_train_config(cfg_path), progress=False)
    res = CliRunner().invoke(
        app,
        ["mtm-head", "--model", str(tmp_path / "sup"), "--config", str(cfg_path),
         "--out", str(tmp_path / "head"), "--steps", "3", "--bin-width", "0.05"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    sup, head = Decoder.load(tmp_path / "sup"), Decoder.load(tmp_path / "head")
    assert sup.model.mtm is None and head.model.mtm is not None
    state = head.model.state_dict()
    for k, v in sup.model.state_dict().items():
        assert torch.equal(state[k], v), k
    assert "masked Poisson NLL" in res.output
    assert head.info["train_config"]["mtm"]["head_only_steps"] == 3
    new = simulate_session(SimConfig(seed=9, num_sessions=1, duration_s=12, num_units=8), 0)
    new = dataclasses.replace(new, session_id="new_head", behavior={})
    cal = fit_units_unsupervised(
        head, new, (0.0, 12.0), UnsupervisedSettings(steps=2, batch_size=2)
    )
    # label-free fits count spikes in the bins the head learned on, not a default
    assert cal.info["calibrated"]["bin_width"] == 0.05


def test_causal_mtm_latents_are_the_causal_decoders_latents():
    """``mtm_latents: causal``: the masked readout reads the latents the causal decoder
    reads (each group its own spikes, self-attention only backwards), equal to
    forward_causal's finished groups over the same window; window latents differ."""
    from bci_decoder.decode import CAUSAL_KEYS
    from bci_decoder.tokenizer import collate_causal, grid_index, tokenize_causal

    torch.manual_seed(0)
    cfg = SMALL.model_copy(update={"depth": 2})
    model = POYO(cfg, num_units=21, num_sessions=1, outputs={"hand_vel": 2})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    rng = np.random.default_rng(1)
    t = np.sort(rng.uniform(0, 3, 500))
    u = rng.integers(1, 21, 500)
    step, K, n = cfg.latent_step, cfg.context_groups, cfg.latents_per_group
    last = int(grid_index(2.5, step))
    t_end = last * step
    win = collate_window([tokenize_window(t, u, t_end, cfg.context, step)])
    b = to_torch(win, WINDOW_KEYS)
    args = (b["spike_unit"], b["spike_time"], b["spike_mask"], b["latent_time"])
    with torch.no_grad():
        x_causal, _ = model.window_latents(*args, causal=True)
        x_window, _ = model.window_latents(*args)
        s = tokenize_causal(t, u, last - K + 1, K, step, np.array([t_end]))
        cb = to_torch(collate_causal([s]), CAUSAL_KEYS)
        _, cache = model.forward_causal(**cb, return_cache=True)
    finished = cache.states[-1]  # (1, (K-1)·n, D): the last K-1 groups
    torch.testing.assert_close(x_causal[:, n:], finished, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(x_window[:, n:], finished, atol=1e-3)
