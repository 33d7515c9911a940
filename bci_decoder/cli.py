"""The ``bci-decoder`` command: one entry point, one subcommand per job."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from bci_decoder.model import layout

app = typer.Typer(
    help=(
        "bci_decoder: spike-token (POYO) decoding for brain-computer interfaces.\n\n"
        "Typical flow: `simulate` or bring NWB recordings -> `train` (or use the shipped "
        "models/poyo-mp-small) -> `calibrate` a new session -> `evaluate`."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DEFAULT_MODEL = Path("models/poyo-mp-small")
DEFAULT_REAL = Path("../shared/data/real")


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _load_decoder(path: Path):
    from bci_decoder.train.checkpoint import Decoder

    try:
        return Decoder.load(path)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))


def _load_sessions(path: Path):
    from bci_decoder.data.nwb import load_sessions

    try:
        return load_sessions(path)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))


@app.command()
def simulate(
    out: Annotated[Path, typer.Option(help="Folder for the NWB files")] = Path("out/sim"),
    seed: Annotated[int, typer.Option(help="Same seed, same sessions, bit for bit")] = 0,
    sessions: Annotated[int, typer.Option(help="Number of sessions")] = 3,
    duration: Annotated[float, typer.Option(help="Seconds per session")] = 300.0,
    start_time: Annotated[
        float, typer.Option(help="Absolute time of each session's start (s)")
    ] = 0.0,
) -> None:
    """Write simulated M1-like sessions (reaching, cosine-tuned units, drift) as NWB."""
    from bci_decoder.data.simulate import SimConfig, write_simulated

    cfg = SimConfig(seed=seed, num_sessions=sessions, duration_s=duration, start_time=start_time)
    for p in write_simulated(cfg, out):
        typer.echo(p)


@app.command()
def train(
    config: Annotated[Path, typer.Option(help="Training config YAML (see configs/)")],
    out: Annotated[str | None, typer.Option(help="Override the output folder")] = None,
    steps: Annotated[int | None, typer.Option(help="Override optim.steps")] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Leave a session out (repeatable)")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from out/state.pt if present")] = False,
) -> None:
    """Pretrain on many sessions. Runs distributed under `torchrun --nproc_per_node N`."""
    from bci_decoder.config import load_train_config
    from bci_decoder.train.loop import train as run

    overrides: dict = {}
    if out:
        overrides["out"] = out
    if steps:
        overrides["optim.steps"] = steps
    if exclude:
        overrides["data.exclude"] = exclude
    try:
        cfg = load_train_config(config, overrides)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    run(cfg, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"model written to {cfg.out}")


@app.command("mtm-head")
def mtm_head(
    model: Annotated[Path, typer.Option(help="Model folder trained without the masked objective")],
    config: Annotated[
        Path, typer.Option(help="Its training config: the sessions the head learns on")
    ],
    out: Annotated[Path, typer.Option(help="Folder for the model with its new MtM head")],
    steps: Annotated[int, typer.Option(help="Optimiser steps (head only)")] = 400,
    bin_width: Annotated[
        float,
        typer.Option(help="s per count bin: the source bin of binned data, 0.02 for spike times"),
    ] = 0.05,
    threads: Annotated[int, typer.Option(help="torch threads (0: torch's default)")] = 1,
    latents: Annotated[
        str | None,
        typer.Option(
            help="Latents the head reads: causal or window (default: causal unless the model "
            "was trained in window mode too; it must read latents the model learned)"
        ),
    ] = None,
) -> None:
    """Give a supervised model a masked readout (MtM head) so it can calibrate without labels.

    Every pretrained weight stays as it is: only the head learns to reconstruct hidden
    spiking of the model's own pretraining sessions (training parts). Then
    `bci-decoder calibrate --labels none` and POST /calibrations with
    `"mode": "unsupervised"` work with the new folder.
    """
    import numpy as np
    import torch

    from bci_decoder.config import MtMSettings, load_train_config
    from bci_decoder.model.package import file_sha256
    from bci_decoder.train.loop import selected_sessions
    from bci_decoder.train.objectives import train_mtm_head

    if threads:
        torch.set_num_threads(threads)
    dec = _load_decoder(model)
    try:
        cfg = load_train_config(config)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    known = [s for s in selected_sessions(cfg) if s.session_id in dec.sessions]
    if not known:
        _fail(f"none of the sessions {config} selects is in {model}: another model's config?")
    settings = MtMSettings(enabled=True, bin_width=bin_width, batch_size=8)
    if latents is None:
        latents = "window" if "window" in dec.modes else "causal"
    if latents not in ("causal", "window"):
        _fail(f"--latents must be causal or window, not {latents!r}")
    typer.echo(f"fitting an MtM head ({latents} latents) on {len(known)} sessions, {steps} steps")
    head, losses = train_mtm_head(dec, known, settings, steps, progress=True, latents=latents)
    # the supervised weights are the base model's, bit for bit: what is scored with them
    # (e.g. the transfer studies' cache) may be shared with the base model
    weights = file_sha256(model / layout.WEIGHTS)
    head.info = dict(head.info) | {"mtm_head_of": {"model": str(model), "sha256": weights}}
    head.save(out)
    k = max(1, len(losses) // 10)
    typer.echo(
        f"masked Poisson NLL {np.mean(losses[:k]):.4f} -> {np.mean(losses[-k:]):.4f}; "
        f"written to {out}"
    )


@app.command()
def evaluate(
    model: Annotated[Path, typer.Option(help="Model folder")] = DEFAULT_MODEL,
    data: Annotated[Path, typer.Option(help="NWB file or folder of NWB files")] = DEFAULT_REAL,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results JSON here")] = None,
    png: Annotated[
        Path | None, typer.Option(help="Decoded-vs-true plot (default: next to JSON)")
    ] = None,
    baselines: Annotated[
        str, typer.Option(help="Comma list of wiener,kalman,gru or 'none'")
    ] = "wiener,kalman,gru",
) -> None:
    """R² on each session's last 30% for POYO (causal, window) and the baselines."""
    from bci_decoder.evaluate import evaluate as run

    dec = _load_decoder(model)
    sessions = _load_sessions(data)
    which = () if baselines == "none" else tuple(b for b in baselines.split(",") if b)
    if png is None and json_out is not None:
        png = json_out.with_suffix(".png")
    try:
        run(dec, sessions, json_out, png, which)
    except KeyError as e:
        _fail(str(e).strip("'\""))
    if json_out:
        typer.echo(f"wrote {json_out}" + (f" and {png}" if png else ""))


@app.command()
def readout(
    model: Annotated[
        Path, typer.Option(help="Model folder (written back in place)")
    ] = DEFAULT_MODEL,
    data: Annotated[
        Path, typer.Option(help="NWB file or folder of sessions the model knows")
    ] = DEFAULT_REAL,
    hidden: Annotated[int, typer.Option(help="GRU units of each readout")] = 128,
    counts: Annotated[
        str,
        typer.Option(
            help="Read each unit's spike count in the group besides the features: yes, no, "
            "or choose (fit both, keep the better on 63-70%)"
        ),
    ] = "choose",
    seed: Annotated[int, typer.Option(help="Seed of the fit")] = 0,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the fit report here")
    ] = None,
) -> None:
    """Fit each session's recurrent readout: a GRU over the decoder's features, stepped
    at every latent group, in place of the linear head (causal mode; POSSM's recurrent
    backbone on POYO's tokens, in its smallest form: bci_decoder/model/session_readout.py).

    For every session in --data that the model knows: the features come from the
    streaming engine over the first 70% of the session; the GRU trains on the first 63%
    and the epoch is chosen on 63-70%; the test part (last 30%) is never read. A readout
    is kept only where it beats the linear head on 63-70%. With --counts choose (the
    default) a readout that also reads each unit's spike count in the 50 ms group and
    one of the features only are both fitted, and 63-70% keeps the better. The model
    folder's package tables are rewritten with the readouts (its graphs are unchanged);
    the daemon, `evaluate` and offline decoding then use them. About three minutes per
    45-minute session on one core."""
    import json

    from bci_decoder.train.session_readout_fit import ReadoutSettings, fit_session_readout

    if counts not in ("yes", "no", "choose"):
        _fail(f"--counts must be yes, no or choose, not {counts!r}")
    dec = _load_decoder(model)
    sessions = [s for s in _load_sessions(data) if s.session_id in dec.sessions]
    if not sessions:
        _fail(f"none of the sessions in {data} is known to {model}: calibrate them first")
    st = ReadoutSettings(hidden=hidden, seed=seed, counts=counts)
    rows = []
    for s in sessions:
        out = s.default_output()
        try:
            r, report = fit_session_readout(dec, s, out, st)
        except ValueError as e:
            typer.echo(f"{s.session_id}: skipped ({e})")
            continue
        if report["kept"]:
            dec.readouts[(s.session_id, out)] = r
        else:
            dec.readouts.pop((s.session_id, out), None)
        rows.append(report)
        typer.echo(
            f"{s.session_id:28s} {out:10s} valid R2 head {report['valid_r2_head']:.3f} "
            f"readout {report['valid_r2_readout']:.3f}"
            f"{' (with spike counts)' if report['counts'] else ''} -> "
            f"{'kept' if report['kept'] else 'not kept'} ({report['seconds']:.0f} s)"
        )
    dec.save(model)
    typer.echo(f"wrote {len(dec.readouts)} readouts into {model}")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"model": str(model), "settings": st.model_dump(),
                                        "rows": rows}, indent=1))  # fmt: skip
        typer.echo(f"wrote {json_out}")


@app.command()
def calibrate(
    model: Annotated[Path, typer.Option(help="Pretrained model folder")] = DEFAULT_MODEL,
    data: Annotated[Path, typer.Option(help="NWB file of the new session")] = ...,
    seconds: Annotated[
        float,
        typer.Option(
            help="Labelled seconds from the start of the training part; 0: zero-shot, a new "
            "day of a known subject decoded from its earlier days' tables, nothing fitted"
        ),
    ] = 60.0,
    output: Annotated[
        str | None,
        typer.Option(help="Behaviour to decode (default hand_vel, else cursor_pos, else force)"),
    ] = None,
    steps: Annotated[int, typer.Option(help="Optimisation steps")] = 150,
    warm_start: Annotated[
        str,
        typer.Option(
            help="A known subject's new day starts each unit from the same channel on its "
            "most recent earlier day: name | name+rate (rates within 2x too) | off"
        ),
    ] = "name",
    second_stage: Annotated[
        bool,
        typer.Option(
            help="After unit identification, fine-tune the network where the block's last "
            "20% says it helps (chosen automatically)"
        ),
    ] = True,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the report JSON here")
    ] = None,
    save: Annotated[
        Path | None, typer.Option(help="Save the calibrated model to this folder")
    ] = None,
    baselines: Annotated[
        bool, typer.Option(help="Also fit Wiener and GRU on the same and full data")
    ] = True,
    png: Annotated[
        Path | None,
        typer.Option(help="Picture of the result (default: next to --json, else in --save)"),
    ] = None,
    labels: Annotated[
        str,
        typer.Option(
            help="behavior: fit to the behaviour; none: label-free, the masked objective "
            "on the spikes alone (a model trained with mtm; scored if the file has behaviour)"
        ),
    ] = "behavior",
) -> None:
    """Unit identification: fit new unit and session embeddings, everything else frozen.

    Scored on the last 30% of the session, next to a Wiener filter and a causal GRU fitted
    on the same seconds and on the full first 70%."""
    from bci_decoder.calibrate import CalibrationSettings, calibrate_report

    if warm_start not in ("name", "name+rate", "off"):
        _fail(f"--warm-start must be name, name+rate or off, not {warm_start!r}")
    if seconds < 0:
        _fail("--seconds must be >= 0")
    dec = _load_decoder(model)
    sessions = _load_sessions(data)
    if len(sessions) != 1:
        _fail("--data must be one NWB file")
    if labels != "behavior":
        if labels != "none":
            _fail(f"--labels must be 'behavior' or 'none', not {labels!r}")
        return _calibrate_label_free(dec, sessions[0], seconds, output, steps, json_out, save,
                                     png)  # fmt: skip
    try:
        report, calibrated = calibrate_report(
            dec,
            sessions[0],
            seconds=seconds,
            output=output,
            baselines=baselines,
            settings=CalibrationSettings(steps=steps, warm_start=warm_start),  # type: ignore[arg-type]
            second_stage=second_stage,
        )
    except ValueError as e:
        _fail(str(e))
    _emit_calibration(report, calibrated, json_out, save, sessions[0], png)


def _emit_calibration(
    report: dict, calibrated, json_out: Path | None, save: Path | None, session, png: Path | None
) -> None:
    """Print a calibration report, write its JSON and save the calibrated model, as asked."""
    typer.echo(json.dumps(report, indent=1))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=1))
    if save:
        calibrated.save(save)
        typer.echo(f"calibrated model saved to {save}")
    png = png or (json_out.with_suffix(".png") if json_out else save / "calibration.png" if save else None)  # fmt: skip
    if png is not None:
        from bci_decoder.plots import calibration_png

        typer.echo(f"wrote {calibration_png(report, calibrated, session, png)}")


def _calibrate_label_free(dec, session, seconds, output, steps, json_out, save, png) -> None:
    from bci_decoder.calibrate_unsupervised import calibrate_report_unsupervised

    try:
        report, calibrated = calibrate_report_unsupervised(
            dec, session, seconds=seconds, output=output, steps=steps
        )
    except ValueError as e:
        _fail(str(e))
    _emit_calibration(report, calibrated, json_out, save, session, png)


@app.command("evaluate-ssl")
def evaluate_ssl(
    model: Annotated[
        list[str], typer.Option(help="NAME=FOLDER of a model with an MtM head (repeatable)")
    ] = ...,
    data: Annotated[Path | None, typer.Option(help="NWB file or folder of NWB files")] = None,
    config: Annotated[
        Path | None, typer.Option(help="Training config whose sessions to score (e.g. simulated)")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results JSON here")] = None,
    max_windows: Annotated[int, typer.Option(help="Test windows per session, at most")] = 120,
    smoothing: Annotated[bool, typer.Option(help="Also score the smoothing baseline")] = True,
) -> None:
    """Masked reconstruction in bits per spike on each session's last 30%: co-smoothing
    (20% of units held out), forward prediction (last 200 ms), region prediction."""
    from bci_decoder.ssl_eval import SSLEvalSettings, format_table
    from bci_decoder.ssl_eval import evaluate_ssl as run

    models = {}
    for item in model:
        name, _, folder = item.rpartition("=")
        models[name or Path(folder).name] = _load_decoder(Path(folder))
    if (data is None) == (config is None):
        _fail("give exactly one of --data (NWB) or --config (a training config's sessions)")
    if data is not None:
        sessions = _load_sessions(data)
    else:
        from bci_decoder.config import load_train_config
        from bci_decoder.train.loop import gather_sessions

        sessions = gather_sessions(load_train_config(config))
    try:
        report = run(models, sessions, SSLEvalSettings(max_windows=max_windows), smoothing)
    except (KeyError, ValueError) as e:
        _fail(str(e).strip("'\""))
    typer.echo(format_table(report))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=1))
        typer.echo(f"wrote {json_out}")


@app.command()
def export(
    model: Annotated[Path, typer.Option(help="Model folder")] = DEFAULT_MODEL,
    out: Annotated[
        Path | None, typer.Option(help="Write the package here instead of the model folder")
    ] = None,
    capacity: Annotated[
        int, typer.Option(help="Spikes per 50 ms causal group the graph holds")
    ] = layout.GROUP_SPIKES,
    window_capacity: Annotated[
        int, typer.Option(help="Spikes per window (window mode)")
    ] = layout.WINDOW_SPIKES,
) -> None:
    """The model package the daemon serves: ONNX step graphs (causal and window modes,
    checked against torch before writing), unit/session tables and normalisation
    (safetensors) and package.json, written into the model folder; its stored
    calibrations' tables are re-written too. Rerun after the weights change.

    The per-unit tables stay outside the graphs, so a calibration changes data, not graphs."""
    from bci_decoder.export.onnx_export import export_model, export_package

    if out is None:
        if not (model / "meta.json").exists():
            _fail(f"{model} is not a model folder (needs meta.json and model.safetensors)")
        for path in export_model(model, capacity, window_capacity):
            typer.echo(f"wrote the package of {path}")
    else:
        path = export_package(_load_decoder(model), out, capacity, window_capacity)
        typer.echo(f"wrote the package of {model} to {path}")


@app.command()
def serve(
    config: Annotated[
        Path | None, typer.Option(help="Daemon config YAML (default: configs/serve.yaml)")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Override the model (a name in models_dir)")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Override the REST port")] = None,
    cadence: Annotated[float | None, typer.Option(help="Override cadence_hz")] = None,
    autostart: Annotated[
        bool | None, typer.Option(help="Start decoding at once (no POST /decoder/start)")
    ] = None,
) -> None:
    """The real-time daemon: spikes in over LSL, decoded behaviour out over LSL, REST
    control on loopback (GET /status, POST /decoder/start, PUT /model, /docs for all).

    Mutating calls need 'Authorization: Bearer TOKEN'; the token comes from the config,
    $BCI_DECODER_TOKEN, or is generated into <state_dir>/token at start-up."""
    from bci_decoder.serve import ServeError, run

    # the `bci-decoder` script runs serve without this module (bci_decoder/serve.py); these
    # options and that parser are held equal by tests/test_serve_startup.py
    try:
        run(config, model, port, cadence, autostart)
    except ServeError as e:
        _fail(str(e))


@app.command()
def recording(
    file: Annotated[Path, typer.Argument(help="A recording written by serve (recording:)")],
    nwb: Annotated[
        Path | None, typer.Option(help="Export to this NWB file (units, TimeSeries)")
    ] = None,
    png: Annotated[
        Path | None, typer.Option(help="Picture of the recording (default: FILE with .png)")
    ] = None,
) -> None:
    """Summarise a daemon recording (spikes, behaviour, outputs, events; it opens after a
    SIGKILL too) in text and a picture, and optionally export it to NWB."""
    from bci_decoder.plots import recording_figure
    from bci_decoder.runtime.recorder import export_nwb, summary

    if not file.exists():
        _fail(f"no recording at {file}")
    try:
        info = summary(file)
    except (OSError, KeyError) as e:
        _fail(f"{file} is not a bci_decoder recording: {e}")
    typer.echo(json.dumps(info, indent=1))
    typer.echo(f"wrote {recording_figure(file, png or file.with_suffix('.png'))}")
    if nwb is not None:
        typer.echo(f"wrote {export_nwb(file, nwb)}")


@app.command()
def replay(
    data: Annotated[Path | None, typer.Argument(help="NWB file to replay (or --simulate)")] = None,
    simulate: Annotated[
        bool, typer.Option(help="Replay a simulated session instead of a file")
    ] = False,
    seed: Annotated[int, typer.Option(help="Simulator seed (with --simulate)")] = 7,
    index: Annotated[int, typer.Option(help="Simulated session index")] = 0,
    units: Annotated[
        int | None, typer.Option(help="Units of the simulated session (default 80-160)")
    ] = None,
    speed: Annotated[float, typer.Option(help="1 = real time; 10 = ten times faster")] = 1.0,
    start: Annotated[
        float | None, typer.Option(help="Start at this fraction of the session (0-1)")
    ] = None,
    seconds: Annotated[float | None, typer.Option(help="Replay at most this long")] = None,
    name: Annotated[str, typer.Option(help="LSL stream name")] = "bci_replay",
    source_id: Annotated[str | None, typer.Option(help="LSL source id")] = None,
    counts_bin_ms: Annotated[
        float | None, typer.Option(help="Send binned counts (SpikeCounts) instead of spikes")
    ] = None,
    log: Annotated[Path | None, typer.Option(help="Write what was sent (.npz)")] = None,
) -> None:
    """Play a recording's spikes (and its behaviour on a second stream) into LSL at real
    time or N x speed, in 1 ms chunks with per-sample timestamps and sequence numbers."""
    from bci_decoder.runtime.replay import Replayer

    if simulate == (data is not None):
        _fail("give an NWB file or --simulate (one of them)")
    if simulate:
        from bci_decoder.data.simulate import SimConfig, simulate_session

        extra = {"num_units": units} if units else {}
        session = simulate_session(SimConfig(seed=seed, num_sessions=index + 1, **extra), index)
    else:
        sessions = _load_sessions(data)
        if len(sessions) != 1:
            _fail(f"{data} holds {len(sessions)} sessions; give one NWB file")
        session = sessions[0]
    lo, hi = session.domain
    t0 = lo + (start or 0.0) * (hi - lo)
    t1 = min(hi, t0 + seconds) if seconds else hi
    try:
        rep = Replayer(
            session, start=t0, stop=t1, speed=speed, name=name, source_id=source_id,
            counts_bin_s=counts_bin_ms / 1e3 if counts_bin_ms else None,
        )  # fmt: skip
    except ValueError as e:
        _fail(str(e))
    typer.echo(
        f"replaying {session.session_id}: {t1 - t0:.1f} s at {speed:g}x on LSL "
        f"'{name}' (source_id {rep.source_id}); Ctrl-C stops"
    )
    rep.start()
    try:
        while not rep.done.wait(1.0):
            pass
    except KeyboardInterrupt:
        rep.stop()
        rep.done.wait(2.0)
    if log and rep.log is not None:
        rep.log.save(str(log))
        typer.echo(f"wrote {log}")


@app.command()
def demo(
    model: Annotated[str, typer.Option(help="Model name under models/ (or a path)")] = (
        "poyo-mp-small"
    ),
    data: Annotated[
        Path | None,
        typer.Option(help="Replay this NWB file (from 70%) instead of a new simulated session"),
    ] = None,
    out: Annotated[Path, typer.Option(help="Report folder")] = Path("out/demo"),
    calibrate_after: Annotated[
        float, typer.Option(help="Seconds decoded before calibrating (and calibrated on)")
    ] = 30.0,
    after: Annotated[float, typer.Option(help="Seconds decoded after the calibration")] = 40.0,
    cadence: Annotated[float, typer.Option(help="Decode steps per second")] = 100.0,
) -> None:
    """The main job, live on loopback: daemon + replay + client; calibrate over REST while
    decoding, apply, decode on; prints R² before/after, latency, missed deadlines."""
    from bci_decoder.demo import run_demo

    if data is not None and not data.is_file():
        _fail(f"--data {data}: give one NWB file (e.g. ../shared/data/real/stevenson2011_m1.nwb)")
    try:
        run_demo(
            model=model, data=data, out=out, calibrate_after=calibrate_after, after=after,
            cadence_hz=cadence,
        )  # fmt: skip
    except (RuntimeError, TimeoutError) as e:
        _fail(f"demo failed: {e} (logs in {out / 'logs'})")


@app.command()
def falcon(
    split: Annotated[
        str, typer.Argument(help="FALCON split: m2 (m1, h1 need a head of their size)")
    ],
    data: Annotated[Path, typer.Option(help="FALCON data root: <data>/<split>/minival/*val*.nwb")],
    model: Annotated[
        Path, typer.Option(help="Model folder with the tags' calibrations")
    ] = DEFAULT_MODEL,
    tags: Annotated[
        Path | None,
        typer.Option(help="YAML: dataset tag -> calibration name (or known session) of --model"),
    ] = None,
    convert: Annotated[
        Path | None,
        typer.Option(
            help="Instead of evaluating: write each <data>/<split>/*calib*/*.nwb "
            "as an NWB file we calibrate on, into this folder"
        ),  # fmt: skip
    ] = None,
    output: Annotated[str | None, typer.Option(help="Model output to decode")] = None,
    batch_size: Annotated[int, typer.Option(help="Files decoded side by side")] = 1,
    work: Annotated[Path, typer.Option(help="Evaluator pickles, ONNX cache")] = Path("out/falcon"),
) -> None:
    """Score a model with FALCON's own evaluator (falcon-challenge, Karpowicz
    et al., NeurIPS 2024) on 20 ms binned counts.

    Real data, once downloaded (pip install 'bci_decoder\\[falcon]' brings dandi;
    M1 is dandiset 000941, M2 000953, H1 000954), under <data>/<split>/ with
    minival/ and held_in_calib/ as FALCON ships them:

    1. bci-decoder falcon m2 --data DATA --convert out/falcon/calib
    (an NWB file per calib file, named falcon-m2-TAG, and tags.yaml)

    2. per tag: bci-decoder calibrate --model MODEL --output hand_vel
    --data out/falcon/calib/falcon-m2-TAG.nwb
    --save MODEL/calibrations/falcon-m2-TAG

    3. bci-decoder falcon m2 --data DATA --model MODEL
    --tags out/falcon/calib/tags.yaml

    Prints the evaluator's R² and normalised latency (compute time / data
    time). M2's 2-D finger velocity decodes with the hand_vel head; M1 (16 EMG
    channels) and H1 (7-D) need a model trained with a head of that size, else
    the decoder says so.
    """
    import yaml

    try:
        from bci_decoder import falcon as fal
    except ImportError as e:
        _fail(str(e))
    if split not in ("m1", "m2", "h1"):
        _fail(f"split must be m1, m2 or h1 (the 20 ms regression tasks), not {split!r}")
    if convert is not None:
        from bci_decoder.data.nwb import write_nwb

        files = sorted((data / split).glob("*calib*/*.nwb"))
        if not files:
            _fail(f"no calibration files under {data / split}/*calib*/ (download them first)")
        mapping = {}
        for f in files:
            s = fal.read_falcon(f, split, output)
            write_nwb(s, convert / f"{s.session_id}.nwb")
            mapping[fal.dataset_tag(fal.task_config(split), f)] = s.session_id
            typer.echo(f"{f.name} -> {convert / (s.session_id + '.nwb')}")
        (convert / "tags.yaml").write_text(yaml.safe_dump(mapping))
        typer.echo(f"wrote {convert / 'tags.yaml'}: calibrate each file, then name the "
                   "calibration in it")  # fmt: skip
        return
    if tags is None or not tags.is_file():
        _fail("--tags: a YAML file mapping each dataset tag to a calibration of --model")
    cfg = fal.task_config(split)
    try:
        dec = fal.FalconDecoder(cfg, model, yaml.safe_load(tags.read_text()),
                                batch_size=batch_size, output=output, state_dir=work)  # fmt: skip
        result = fal.evaluate(dec, split, data, work)
    except (FileNotFoundError, KeyError, ValueError) as e:
        _fail(str(e))
    typer.echo(json.dumps({k: float(v) for k, v in result.items()}, indent=1))


if __name__ == "__main__":
    app()
