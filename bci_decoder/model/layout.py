"""Where a model's files live: the one place the model and calibration folder layout is
written down (training, export, the daemon, calibration jobs, FALCON and the benchmarks
import it).

    models/NAME/                     a model (``Decoder.save``)
        meta.json                    config, vocabularies, normalisation, info (training)
        model.safetensors            the torch weights (training, calibration fits)
        package.json                 everything the engine needs (``model.package``)
        tables.safetensors           unit/session tables, projections, normalisation,
                                     the sessions' recurrent readouts (when fitted)
        causal_step.onnx ...         the step graphs (``bci-decoder export``)
        calibrations/CAL/            a calibration: the same files but the graphs, which
                                     it shares with its base model (one whose second
                                     stage fine-tuned shared weights has its own)
        calibrations/.tmp-CAL-PID/   a job still writing (renamed whole when complete)

Names are names, never paths: nothing a request names can reach outside the models
folder.
"""

from __future__ import annotations

import re
from pathlib import Path

META = "meta.json"
WEIGHTS = "model.safetensors"
PACKAGE = "package.json"
TABLES = "tables.safetensors"
GRAPHS = ("causal_step", "causal_finish", "causal_chunk", "window_step")
CALIBRATIONS = "calibrations"
TMP_PREFIX = ".tmp-"  # hidden: never a valid calibration name, never listed
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
# the step graphs' default buffer sizes: spikes per latent group (causal mode) and per
# window (window mode); an export records the sizes it checked, an engine's buffers
# default to them
GROUP_SPIKES = 2048
WINDOW_SPIKES = 8192
EXPORT_COMMAND = "bci-decoder export --model {folder}  (or `make packages` for models/)"


def valid_name(name: object) -> bool:
    return isinstance(name, str) and re.fullmatch(NAME_PATTERN, name) is not None


def graph_file(folder: Path, name: str) -> Path:
    return Path(folder) / f"{name}.onnx"


def calibrations_dir(model_dir: Path) -> Path:
    return Path(model_dir) / CALIBRATIONS


def calibration_dir(model_dir: Path, name: str) -> Path:
    return calibrations_dir(model_dir) / name


def temporary_dir(final: Path, pid: int) -> Path:
    """Where a job writes ``final`` before renaming it whole."""
    return final.with_name(f"{TMP_PREFIX}{final.name}-{pid}")


def is_model(folder: Path) -> bool:
    return (Path(folder) / META).exists() or (Path(folder) / PACKAGE).exists()


def stored_calibrations(model_dir: Path) -> list[str]:
    """Calibrations of a model: whole ones only (valid names, hidden temporaries never)."""
    return sorted(
        p.name
        for p in calibrations_dir(model_dir).glob("*")
        if p.is_dir() and valid_name(p.name) and is_model(p)
    )


def known_models(models_dir: Path) -> list[str]:
    return sorted(p.name for p in Path(models_dir).glob("*") if p.is_dir() and is_model(p))


def export_hint(folder: Path) -> str:
    return EXPORT_COMMAND.format(folder=folder)
