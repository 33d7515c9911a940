"""A trained decoder on disk: ``model.safetensors`` + ``meta.json``.

The metadata holds everything needed to use the weights: the model config, the unit and
session vocabularies, the output kinds, and each session's behaviour normalisation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from bci_decoder.model.poyo import POYO, POYOConfig
from bci_decoder.model.vocab import UnitVocab, Vocab

FORMAT_VERSION = 1


@dataclass
class Normalizer:
    """z-scoring of one behaviour of one session."""

    mean: np.ndarray  # (D,)
    std: np.ndarray  # (D,)

    def forward(self, y: np.ndarray) -> np.ndarray:
        return (y - self.mean) / self.std

    def inverse(self, z: np.ndarray) -> np.ndarray:
        return z * self.std + self.mean

    @classmethod
    def fit(cls, y: np.ndarray) -> Normalizer:
        y = np.asarray(y, dtype=np.float64)
        return cls(y.mean(0).astype(np.float32), np.maximum(y.std(0), 1e-6).astype(np.float32))

    def to_json(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> Normalizer:
        return cls(np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32))


@dataclass
class Decoder:
    """Model plus the vocabularies and normalisation that give its numbers meaning."""

    model: POYO
    units: UnitVocab
    sessions: Vocab
    norms: dict[str, dict[str, Normalizer]]  # session -> output -> normaliser
    modes: list[str] = field(default_factory=lambda: ["causal"])
    info: dict = field(default_factory=dict)

    @property
    def config(self) -> POYOConfig:
        return self.model.config

    def output_index(self, name: str) -> int:
        if name not in self.model.output_names:
            raise ValueError(
                f"output {name!r} is not one this model decodes: {self.model.output_names}"
            )
        return self.model.output_names.index(name)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"))
        meta = {
            "format_version": FORMAT_VERSION,
            "config": self.model.config.model_dump(),
            "outputs": self.model.output_dims,
            "units": self.units.to_list(),
            "sessions": self.sessions.to_list(),
            "norms": {s: {o: n.to_json() for o, n in d.items()} for s, d in self.norms.items()},
            "modes": self.modes,
            "info": self.info,
        }
        (directory / "meta.json").write_text(json.dumps(meta, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Decoder:
        directory = Path(directory)
        meta_path, weights = directory / "meta.json", directory / "model.safetensors"
        if not meta_path.exists() or not weights.exists():
            raise FileNotFoundError(
                f"{directory} is not a model folder (needs meta.json and model.safetensors)"
            )
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path} is corrupt: {e}") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory}: unsupported format {meta.get('format_version')}")
        units = UnitVocab(meta["units"])
        sessions = Vocab(meta["sessions"])
        model = POYO(
            POYOConfig(**meta["config"]),
            num_units=len(units),
            num_sessions=len(sessions),
            outputs=meta["outputs"],
        )
        try:
            state = load_file(str(weights))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{weights} is corrupt or unreadable: {e}") from None
        model.load_state_dict(state)
        model.eval()
        norms = {
            s: {o: Normalizer.from_json(n) for o, n in d.items()} for s, d in meta["norms"].items()
        }
        return cls(model, units, sessions, norms, meta.get("modes", ["causal"]), meta["info"])

    def clone(self) -> Decoder:
        import copy

        return copy.deepcopy(self)


def parameter_count(model: torch.nn.Module, exclude_embeddings: bool = False) -> int:
    return sum(
        p.numel()
        for n, p in model.named_parameters()
        if not (exclude_embeddings and n in ("unit_emb.weight", "session_emb.weight"))
    )
