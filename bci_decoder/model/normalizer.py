"""z-scoring of one behaviour of one session (numpy only: training and serving share it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
