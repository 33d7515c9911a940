"""Configs as pydantic models loaded from YAML (``configs/*.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

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
    # session-id glob -> factor on its share of batches (after the sqrt-duration weights),
    # e.g. {"jango_2016*": 4.0}: a stage that leans on some sessions without dropping the
    # rest from the model's vocabulary
    session_boost: dict[str, float] = Field(default_factory=dict)


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


def load_train_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read a training config; relative data paths resolve against the current folder."""
    return TrainConfig(**apply_overrides(load_yaml(path), overrides))


# the daemon's settings live in serve_config (torch-free); re-exported for callers
from bci_decoder.serve_config import (  # noqa: E402
    ApiSettings,
    RecordingSettings,
    ServeConfig,
    StreamSettings,
    apply_overrides,
    load_serve_config,
    load_yaml,
)

__all__ = ["ApiSettings", "RecordingSettings", "ServeConfig", "StreamSettings",
           "apply_overrides", "load_serve_config", "load_yaml"]  # fmt: skip
