"""A trained decoder on disk: moved to ``bci_decoder.model.decoder`` (the model's home,
next to its package); re-exported here for the training code."""

from __future__ import annotations

import torch

from bci_decoder.model.decoder import FORMAT_VERSION, Decoder
from bci_decoder.model.normalizer import Normalizer

__all__ = ["Decoder", "Normalizer", "FORMAT_VERSION", "parameter_count"]


def parameter_count(model: torch.nn.Module, exclude_embeddings: bool = False) -> int:
    return sum(
        p.numel()
        for n, p in model.named_parameters()
        if not (exclude_embeddings and n in ("unit_emb.weight", "session_emb.weight"))
    )
