"""Configs as pydantic models loaded from YAML (``configs/*.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from bci_decoder.data.simulate import SimConfig
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


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: POYOConfig = Field(default_factory=POYOConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sampler: SamplerSettings = Field(default_factory=SamplerSettings)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    modes: list[Literal["causal", "window"]] = Field(default_factory=lambda: ["causal", "window"])
    eval_every: int = 250  # steps per "epoch": validation R² and a checkpoint
    eval_seconds: float = 60.0  # at most this much of each validation tail is decoded
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    init: str | None = None  # start from this model folder's weights (same sessions/units)
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
    data = load_yaml(path)
    for key, value in (overrides or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return TrainConfig(**data)
