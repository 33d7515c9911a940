"""Configs as pydantic models loaded from YAML (``configs/*.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bci_decoder.data.simulate import SimConfig
from bci_decoder.model.masking import SCHEMES as MTM_SCHEMES
from bci_decoder.model.poyo import POYOConfig


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    real: list[str] = Field(default_factory=list)  # NWB files or folders
    simulate: SimConfig | None = None
    exclude: list[str] = Field(default_factory=list)  # session ids left out (LOSO)
    include: list[str] = Field(default_factory=list)  # if set, only these session ids
    train_fraction: float = 0.7
    valid_fraction: float = 0.1


class SamplerSettings(BaseModel):
    """How training batches are drawn (``BatchSampler``)."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = 32
    sequence: float = 3.0  # s of groups per causal sample
    burn_in: float = 1.0  # s at a sequence's start without loss (history still builds)
    max_queries: int = 24  # behaviour targets per causal sample, at most
    window_fraction: float = 0.25  # share of batches trained in window mode
    unit_dropout: float = 0.5  # probability that a sample drops units
    min_keep: float = 0.6  # fraction of units kept at least, when dropping


class OptimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lr: float = 2e-3
    weight_decay: float = 0.01
    steps: int = 2000
    warmup: float = 0.05  # fraction of steps of linear warm-up, then cosine to ~0
    grad_clip: float = 1.0


class MtMSettings(BaseModel):
    """The masked objective (MtM) mixed into training; off by default.

    Each step adds ``weight`` x the masked Poisson NLL of one window-mode batch (scheme drawn
    per batch with ``schemes`` weights) to ``supervised_weight`` x the supervised loss.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    weight: float = Field(1.0, ge=0)
    supervised_weight: float = Field(1.0, ge=0)
    bin_width: float = Field(0.02, gt=0)  # s; 20 ms for spike times, the source bin if binned
    window: float | None = None  # s of each masked window; None: the model's context
    schemes: dict[str, float] = Field(
        default_factory=lambda: {s: 1.0 for s in MTM_SCHEMES}
    )  # scheme -> sampling weight
    mask_ratio: float = Field(0.3, gt=0, lt=1)  # units or bins hidden by neuron/temporal/intra
    forward_s: float = Field(0.2, gt=0)  # s hidden at each window's end by ``causal``
    batch_size: int = Field(16, ge=1)
    unlabelled: bool = True  # sessions without behaviour join the masked objective only

    @model_validator(mode="after")
    def _known(self) -> MtMSettings:
        unknown = sorted(set(self.schemes) - set(MTM_SCHEMES))
        if unknown:
            raise ValueError(f"unknown mtm schemes {unknown}; known: {list(MTM_SCHEMES)}")
        if not any(w > 0 for w in self.schemes.values()):
            raise ValueError("mtm.schemes needs at least one scheme with a positive weight")
        return self


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: POYOConfig = Field(default_factory=POYOConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sampler: SamplerSettings = Field(default_factory=SamplerSettings)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    mtm: MtMSettings = Field(default_factory=MtMSettings)
    modes: list[Literal["causal", "window"]] = Field(default_factory=lambda: ["causal", "window"])
    eval_every: int = 250  # steps per "epoch": validation R² and a checkpoint
    eval_seconds: float = 60.0  # at most this much of each validation tail is decoded
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    init: str | None = None  # start from this model folder's weights (rows copied by name;
    # sessions it did not know start at the mean; train.loop.warm_start)
    # pull of a subject's same-channel unit rows toward their mean across days
    # (train.objectives.ChannelTie); 0: off
    channel_tie: float = Field(0.0, ge=0)
    out: str = "runs/default"


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no config file at {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def load_train_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read a training config; relative data paths resolve against the current folder."""
    return TrainConfig(**apply_overrides(load_yaml(path), overrides))


def apply_overrides(data: dict, overrides: dict | None) -> dict:
    """Set dotted keys (``"optim.steps": 10``) in a config mapping, creating parents."""
    for key, value in (overrides or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[leaf] = value
    return data


# ---------------------------------------------------------------- the daemon (serve)
class StreamSettings(BaseModel):
    """Which LSL stream to open (every field given must match). On a rig with more than
    one stream of the type, pin ``source_id`` (the sender's stable id; /status shows the
    name, source id and host of the stream the daemon opened)."""

    model_config = ConfigDict(extra="forbid")

    type: str
    name: str | None = None
    source_id: str | None = None


class ApiSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = Field(8765, ge=0, le=65535)  # 0: any free port (tests)
    # Bearer token for mutating calls. None: $BCI_DECODER_TOKEN, else a random one written
    # to <state_dir>/token at start-up.
    token: str | None = None
    # Bytes actually received per request (chunked too); over it: 413 at once. The largest
    # legitimate upload is a calibration block: 5 minutes of 200 units at 20 Hz is 1.2M
    # spikes, about 10 MB as NWB (float64 times) and 14 MB once base64-encoded, or about
    # 25 MB as JSON arrays; 32 MB holds that with room, and bounds what a request costs.
    max_body_mb: int = Field(32, ge=1)


class RecordingSettings(BaseModel):
    """``recording:``: everything in and out, appended to an HDF5 file (runtime/recorder.py)."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = None  # file or folder; None: <state_dir>/recordings/<start time>.h5
    flush_s: float = Field(1.0, gt=0, le=1.0)  # the most a SIGKILL can lose
    queue_spikes: int = Field(4_000_000, ge=10_000)  # preallocated hand-off from the inlet
    queue_outputs: int = Field(65_536, ge=1000)  # ... from the decode loop


class ServeConfig(BaseModel):
    """``bci-decoder serve --config configs/serve.yaml``: every setting of the daemon."""

    model_config = ConfigDict(extra="forbid")

    # a folder name under models_dir (a name, never a path: nothing outside models_dir)
    model: str = Field("poyo-mp-small", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    models_dir: str = "models"
    calibration: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    session: str | None = None  # model session the stream's units belong to (None: ask the
    # stream's desc/session; an unknown session decodes uncalibrated until calibrated)
    output: str | None = None  # behaviour to decode (None: the session's own)
    mode: Literal["causal", "window"] = "causal"
    backend: Literal["onnx", "torch"] = "onnx"
    onnx_threads: int = Field(1, ge=1)
    cadence_hz: float = Field(100.0, gt=0, le=2000)
    safe_output: Literal["hold", "zero"] = "hold"  # what is sent while the stream is stalled
    stall_after_s: float = Field(0.5, gt=0)  # no spike for this long: stalled
    # a spike stamped further than this ahead of the LSL clock is rejected (counted as
    # future_time); a stream whose spikes are mostly rejected for a second is stalled
    max_future_s: float = Field(1.0, gt=0)
    spin_us: float = Field(150.0, ge=0)  # busy-wait before each deadline (sleep jitter)
    # freeze the start-up heap out of the cyclic GC (runtime/gc_pauses.py): a full
    # collection of it would hold the GIL ~150 ms, but none came in 3-minute runs, and
    # with the freeze model swaps held the loop up longer (largest interval 40-50 ms vs
    # 10 ms, benchmarks/swap_gap.py); off until that is understood
    gc_freeze: bool = False
    # SCHED_FIFO priority (1-99) for the decode loop and the spike inlet thread, so other
    # processes on the machine cannot delay a step; None: normal scheduling. Needs root,
    # CAP_SYS_NICE or an rtprio limit; refused, it is reported in /status (runtime/priority.py)
    realtime_priority: int | None = Field(None, ge=1, le=99)
    spikes: StreamSettings = Field(default_factory=lambda: StreamSettings(type="Spikes"))
    behavior: StreamSettings | None = Field(default_factory=lambda: StreamSettings(type="Behavior"))
    control_name: str = "bci_decoder"
    control_source_id: str = "bci_decoder-control"
    ring_spikes: int = Field(4_000_000, ge=1000)  # spike ring capacity
    behavior_seconds: float = Field(600.0, gt=0)  # behaviour recorded for calibration
    behavior_max_mb: float = Field(64.0, gt=0)  # ... but never more memory than this
    autostart: bool = False  # start decoding without waiting for POST /decoder/start
    state_dir: str = "out/serve"  # token file, ONNX cache, logs
    trace_steps: int = Field(0, ge=0)  # record (t, ring cursor) of the first N steps (tests)
    api: ApiSettings = Field(default_factory=ApiSettings)
    recording: RecordingSettings | None = None  # null: nothing recorded


def load_serve_config(path: str | Path | None, overrides: dict | None = None) -> ServeConfig:
    """Read the daemon's config (defaults for everything when ``path`` is None)."""
    data = load_yaml(path) if path else {}
    return ServeConfig(**apply_overrides(data, overrides))
