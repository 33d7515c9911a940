"""Checks that keep garbage out of the decoder: every number the engine will use is
checked in the dtype the engine uses (float32), so a value that is finite as float64
(1e308) but inf once converted is refused before it can reach the Control outlet.

- ``check_decoder``: a model or calibration loaded from disk (weights, unit and session
  tables, normalisers); refused at load with what is wrong and where.
- ``check_float32``: uploaded arrays (behaviour used to fit a calibration).
- ``check_meta``: a ``meta.json`` whose shape is wrong (``[]``, ``"units": 5``) is a
  clear error, not an ``AttributeError`` deep in the loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bci_decoder.model import layout

# keys meta.json must have, with the JSON type each must be
META_KEYS = {"config": dict, "outputs": dict, "units": list, "sessions": list, "norms": dict}


class GuardError(ValueError):
    """A model, calibration or upload that would make the decoder emit garbage."""


def check_float32(name: str, values: np.ndarray) -> np.ndarray:
    """``values`` as float32, refusing anything not finite after the conversion."""
    with np.errstate(over="ignore", invalid="ignore"):
        as32 = np.asarray(values).astype(np.float32)
    bad = ~np.isfinite(as32)
    if bad.any():
        raise GuardError(
            f"{name} has {int(bad.sum())} values that are NaN or inf as float32 (|x| must be "
            f"below {float(np.finfo(np.float32).max):.3g}); first at index "
            f"{tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape))}"
        )
    return as32


def check_meta(folder: Path) -> None:
    """Refuse a ``meta.json`` that is not the mapping the loader expects."""
    path = Path(folder) / layout.META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        return  # the loader says which files a model folder needs
    except (OSError, ValueError) as e:
        raise GuardError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise GuardError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    for key, kind in META_KEYS.items():
        if key in meta and not isinstance(meta[key], kind):
            raise GuardError(
                f"{path}: {key!r} must be a JSON {kind.__name__.replace('dict', 'object')}"
                f", got {type(meta[key]).__name__}"
            )


def check_package(pkg, where: str) -> None:
    """Refuse a model package with a non-finite table or normaliser (``model.package``)."""
    for name, table in pkg.arrays.items():
        if table.dtype.kind != "f" or name.startswith("norm_"):  # norms: below, by name
            continue
        bad = ~np.isfinite(table.astype(np.float32))
        if bad.any():
            raise GuardError(
                f"{where}: weight {name} has {int(bad.sum())} NaN/inf values; "
                "this model cannot be served (retrain or recalibrate it)"
            )
    _check_norms(pkg.norms, where)


def check_decoder(decoder, where: str) -> None:
    """Refuse a decoder with a non-finite weight, table or normaliser (as float32)."""
    import torch

    for name, tensor in decoder.model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        t32 = tensor.detach().to(torch.float32)
        finite = torch.isfinite(t32)
        if not bool(finite.all()):
            raise GuardError(
                f"{where}: weight {name} has {int((~finite).sum())} NaN/inf values; "
                "this model cannot be served (retrain or recalibrate it)"
            )
    _check_norms(decoder.norms, where)


def _check_norms(norms: dict, where: str) -> None:
    for session, outputs in norms.items():
        for output, norm in outputs.items():
            for part in ("mean", "std"):
                v = np.asarray(getattr(norm, part), np.float32)
                if not np.isfinite(v).all():
                    raise GuardError(
                        f"{where}: normaliser {session}/{output} {part} is not finite: {v}"
                    )
            if np.any(np.asarray(norm.std, np.float32) <= 0):
                raise GuardError(f"{where}: normaliser {session}/{output} std must be > 0")
