"""Request and response bodies of the REST API (split by purpose)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Health(BaseModel):
    ok: bool
    state: str


class StateReply(BaseModel):
    state: str


class ModelLoad(BaseModel):
    """``PUT /model``: a model by name from the models folder, optionally calibrated."""

    model_config = ConfigDict(extra="forbid")

    # names in the models folder, never paths (a path or a non-ASCII name is a 422)
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$", examples=["poyo-mp-small"])
    calibration: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class ModelPublic(BaseModel):
    name: str
    calibration: str | None
    sessions: int
    units: int
    outputs: list[str]
    session: str | None
    output: str | None
    calibrated: bool | None
    # which unit/session tables decode and where they came from: "pretrained",
    # "calibrated", "zero-shot warm start" (with the days and units it matched) or none;
    # "readout": the session's recurrent readout (GRU units, units whose counts it
    # reads) or None where the linear head decodes
    tables: dict | None = None


class CalibrationData(BaseModel):
    """An uploaded calibration block as arrays: spikes and the behaviour they drive."""

    model_config = ConfigDict(extra="forbid")

    unit_ids: list[str] = Field(min_length=1, max_length=20_000)
    spike_times: list[float] = Field(max_length=5_000_000)  # seconds (any clock)
    spike_units: list[int] = Field(max_length=5_000_000)  # index into unit_ids
    behavior_times: list[float] = Field(min_length=10, max_length=2_000_000)
    behavior: list[list[float]] = Field(min_length=10, max_length=2_000_000)  # (T, D)


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"


class CalibrationCreate(BaseModel):
    """``POST /calibrations``: where the data comes from and how to fit.

    ``source="buffer"``: the last ``seconds`` of spikes and of the behaviour stream the
    running daemon recorded. ``source="upload"``: ``data`` (JSON arrays) or
    ``nwb_base64`` (an NWB file, base64; its first ``seconds`` are used)."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["buffer", "upload"]
    # "supervised": unit identification on the behaviour recorded with the spikes;
    # "unsupervised": label-free, the masked objective on the spikes alone (no behaviour
    # stream needed; the model needs an MtM head, see `bci-decoder mtm-head`)
    mode: Literal["supervised", "unsupervised"] = "supervised"
    # "auto" (as `bci-decoder calibrate`, whose --second-stage is on by default): unit
    # identification, then a short fine-tune of the network's shared weights (the second
    # stage), kept only where it beats unit identification on the held-out slice
    # (``holdout``); kept, the calibration carries graphs of its own and applying it builds
    # a new engine. "units": unit identification only (tables swapped into the running
    # engine). Label-free calibration is unit identification whichever is asked.
    adapt: Literal["auto", "units"] = "auto"
    seconds: float = Field(30.0, gt=2.0, le=3600.0)
    steps: int = Field(150, ge=1, le=5000)
    output: str | None = None  # behaviour to decode (default: the recorded/uploaded one)
    name: str | None = Field(None, pattern=NAME_PATTERN)  # stored as calibrations/<name>
    session: str | None = Field(None, pattern=NAME_PATTERN)  # id of the new session
    holdout: float = Field(0.2, ge=0.0, le=0.5)  # share of the data scored, not fitted
    refit: bool = True  # after scoring, fit the stored calibration on all the data
    auto_apply: bool = False  # swap it into the running decoder when done
    data: CalibrationData | None = None
    nwb_base64: str | None = Field(None, max_length=64 * 2**20)  # and api.max_body_mb


class CalibrationPublic(BaseModel):
    id: str
    name: str
    state: str
    phase: str
    progress: float
    loss: float | None
    heldout_r2: float | None
    wiener_r2: float | None
    error: str | None
    source: str
    session: str
    output: str
    mode: str = "supervised"
    adapt: str = "auto"  # what was asked: "auto" or "units"
    # what was stored once done: "units" (tables only) or "second-stage" (own graphs),
    # why, and the held-out slice's R² of each (the second stage's is its best step's,
    # which also picked its number of steps); ``heldout_r2`` is the stored stage's
    stage: str | None = None
    stage_reason: str | None = None
    slice_r2_units: float | None = None
    slice_r2_second_stage: float | None = None
    second_stage_steps: int | None = None
    # the session readout (a GRU over the model's features) fitted last: kept or not, and
    # its slice R² (the stored model's ``heldout_r2`` when kept)
    readout: bool | None = None
    slice_r2_readout: float | None = None
    units: int
    spikes: int
    seconds: float
    steps: int
    wall_s: float | None
    applied: bool
    auto_apply: bool
    calibration: str | None
