"""The ``bci-decoder`` command: one entry point, one subcommand per job."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

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
def calibrate(
    model: Annotated[Path, typer.Option(help="Pretrained model folder")] = DEFAULT_MODEL,
    data: Annotated[Path, typer.Option(help="NWB file of the new session")] = ...,
    seconds: Annotated[
        float, typer.Option(help="Labelled seconds from the start of the training part")
    ] = 60.0,
    output: Annotated[
        str | None, typer.Option(help="Behaviour to decode (default hand_vel, else force)")
    ] = None,
    steps: Annotated[int, typer.Option(help="Optimisation steps")] = 150,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the report JSON here")
    ] = None,
    save: Annotated[
        Path | None, typer.Option(help="Save the calibrated model to this folder")
    ] = None,
    baselines: Annotated[
        bool, typer.Option(help="Also fit Wiener and GRU on the same and full data")
    ] = True,
) -> None:
    """Unit identification: fit new unit and session embeddings, everything else frozen."""
    from bci_decoder.calibrate import calibrate_report

    dec = _load_decoder(model)
    sessions = _load_sessions(data)
    if len(sessions) != 1:
        _fail("--data must be one NWB file")
    try:
        report, calibrated = calibrate_report(
            dec, sessions[0], seconds=seconds, output=output, steps=steps, baselines=baselines
        )
    except ValueError as e:
        _fail(str(e))
    typer.echo(json.dumps(report, indent=1))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=1))
    if save:
        calibrated.save(save)
        typer.echo(f"calibrated model saved to {save}")


@app.command()
def export(
    model: Annotated[Path, typer.Option(help="Model folder")] = DEFAULT_MODEL,
    out: Annotated[Path, typer.Option(help="Folder for the ONNX graphs")] = Path("out/onnx"),
    capacity: Annotated[
        int, typer.Option(help="Spikes per 50 ms causal group the graph holds")
    ] = 2048,
    window_capacity: Annotated[int, typer.Option(help="Spikes per window (window mode)")] = 8192,
) -> None:
    """ONNX graphs of the streaming step (causal and window modes), checked before writing.

    The per-unit tables stay outside the graphs, so a calibration changes data, not graphs."""
    from bci_decoder.export.onnx_export import export_step

    path = export_step(_load_decoder(model), out, capacity, window_capacity)
    typer.echo(f"wrote {path}/causal_step.onnx and {path}/window_step.onnx")


@app.command()
def demo(
    model: Annotated[Path, typer.Option(help="Model folder")] = DEFAULT_MODEL,
    data: Annotated[Path, typer.Option(help="Real recordings (skipped if absent)")] = DEFAULT_REAL,
    out: Annotated[Path, typer.Option(help="Report folder")] = Path("out/demo"),
) -> None:
    """The main job: evaluate the shipped model on a simulated session it knows and on the
    real recordings, next to the baselines; writes report.json, report.png and report.md."""
    from bci_decoder.demo import run_demo

    run_demo(_load_decoder(model), data, out)


if __name__ == "__main__":
    app()
