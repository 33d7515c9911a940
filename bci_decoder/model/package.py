"""The model package: what the daemon serves, readable without torch.

``Decoder.save`` writes ``package.json`` and ``tables.safetensors`` next to the torch
weights; ``bci-decoder export`` adds the ONNX step graphs (``layout.GRAPHS``). Together
they hold everything the streaming engine needs:

- ``package.json``: format version, dimensions, rotary periods (float64, exact in JSON),
  outputs, modes, vocabularies, info, the graph files, the SHA-256 of the
  ``model.safetensors`` it came from (``weights_sha256``) and a hash of the weights the
  graphs hold (``graph_hash``: every weight but the unit, session and output embeddings,
  so a calibration shares its base model's graphs).
- ``tables.safetensors`` (float32, never pickle): the unit, session and output
  embeddings, the encoder's key/value projection and the decoder's query projection
  (layer norm and matrix each, so unit tables of any embedding are computed here, in
  numpy: a calibration or a zero-shot start changes tables, never graphs), and each
  session's normalisation; and each session readout (``model.session_readout``) under
  ``readout/SESSION/OUTPUT/``.

Staleness is checked at load: a package whose ``weights_sha256`` is not the weights
file's, or whose graphs carry another ``graph_hash`` (ONNX metadata), is refused with
the command that re-exports it (``layout.export_hint``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from bci_decoder.model import layout
from bci_decoder.model.normalizer import Normalizer
from bci_decoder.model.session_readout import SessionReadout, readouts_in
from bci_decoder.model.vocab import UnitVocab, Vocab

# 2: the step graphs' ``prediction`` holds the heads' features after the heads (P + D)
# and the finish graph outputs it too (the session readouts read them)
FORMAT_VERSION = 2
# folded into ``graph_hash``: graphs of an older layout are refused even where their
# weights are the package's (a calibration's package next to its base model's graphs)
GRAPH_LAYOUT = "prediction+features/finish-readout"
TABLE_NAMES = (
    "unit_emb",  # (Nu, D) every unit of the vocabulary, row 0 <null>
    "session_emb",  # (S, D)
    "output_emb",  # (O, D)
    "enc_ln_w",  # (D,) encoder cross-attention: layer norm of the key/value input
    "enc_ln_b",
    "enc_wkv",  # (D, 2·Hc·Dh) keys then values
    "dec_ln_w",  # (D,) decoder cross-attention: layer norm of the query
    "dec_ln_b",
    "dec_wq",  # (D, Hc·Dh) query projection, scaled by Dh^-0.5
    "norm_mean",  # (S, P) each session's normalisation, outputs side by side
    "norm_std",  # (S, P)
    "norm_known",  # (S, O) 1 where the session has a normalisation of the output
)


class PackageError(ValueError):
    """A package that is missing, stale or malformed; the message says what to run."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def graph_hash(weights: dict[str, np.ndarray]) -> str:
    """Hash of the weights the step graphs hold (all but the embedding tables)."""
    h = hashlib.sha256(GRAPH_LAYOUT.encode())
    for name in sorted(weights):
        if name in ("unit_emb.weight", "session_emb.weight", "output_emb.weight"):
            continue
        a = np.ascontiguousarray(weights[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """torch's layer_norm over the last axis, float32 in and out."""
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return ((x - mu) / np.sqrt(var + eps) * w + b).astype(np.float32)


@dataclass
class ModelPackage:
    """A package in memory: ``spec`` (package.json), ``arrays`` (tables), ``graphs_dir``
    (where its ONNX graphs are: its own folder, or its base model's for a calibration)."""

    spec: dict
    arrays: dict[str, np.ndarray]
    graphs_dir: Path | None = None
    folder: Path | None = None
    graph_bytes: dict[str, bytes] | None = None  # graphs held in memory (no folder)
    units: UnitVocab = field(init=False)
    sessions: Vocab = field(init=False)
    norms: dict[str, dict[str, Normalizer]] = field(init=False)
    readouts: dict[tuple[str, str], SessionReadout] = field(init=False)

    def __post_init__(self) -> None:
        s = self.spec
        self.readouts = readouts_in(self.arrays)
        self.units = UnitVocab(s["units"])
        self.sessions = Vocab(s["sessions"])
        for (sid, out), r in self.readouts.items():
            if r.units and r.units != len(self.session_unit_names(sid)):
                raise ValueError(
                    f"the session readout of {sid!r}/{out!r} reads {r.units} units' spike "
                    f"counts, the session has {len(self.session_unit_names(sid))}"
                )
        known = self.arrays["norm_known"]
        self.norms = {}
        for i, sid in enumerate(self.sessions.names):
            for j, (out, cols) in enumerate(self.output_columns.items()):
                if known[i, j]:
                    self.norms.setdefault(sid, {})[out] = Normalizer(
                        self.arrays["norm_mean"][i, cols].copy(),
                        self.arrays["norm_std"][i, cols].copy(),
                    )

    # ---------------------------------------------------------------- what it holds
    @property
    def dims(self) -> dict:
        return self.spec["dims"]

    @property
    def info(self) -> dict:
        return self.spec["info"]

    @info.setter
    def info(self, value: dict) -> None:
        self.spec = self.spec | {"info": value}

    @property
    def modes(self) -> list[str]:
        return self.spec["modes"]

    @property
    def output_dims(self) -> dict[str, int]:
        return dict(self.spec["outputs"])

    @property
    def output_names(self) -> list[str]:
        return list(self.spec["outputs"])

    @property
    def output_columns(self) -> dict[str, slice]:
        """Each output's columns in the concatenated heads (and in ``norm_mean``)."""
        out, start = {}, 0
        for name, dim in self.spec["outputs"].items():
            out[name] = slice(start, start + dim)
            start += dim
        return out

    @property
    def periods(self) -> np.ndarray:
        return np.asarray(self.spec["periods"], np.float64)

    @property
    def context(self) -> float:
        return float(self.dims["context"])

    @property
    def latent_step(self) -> float:
        return float(self.dims["latent_step"])

    @property
    def graph_hash(self) -> str:
        return self.spec["graph_hash"]

    def readout(self, session_id: str, output: str) -> SessionReadout | None:
        """The session's recurrent readout of ``output``, if one was fitted."""
        return self.readouts.get((session_id, output))

    def output_index(self, name: str) -> int:
        if name not in self.spec["outputs"]:
            raise ValueError(f"output {name!r} is not one this model decodes: {self.output_names}")
        return self.output_names.index(name)

    def session_unit_names(self, session_id: str) -> list[str]:
        return self.units.unit_names(session_id)

    # ---------------------------------------------------------------- projections
    def keys_values(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Unrotated encoder keys and values (U, Hc, Dh) of unit embeddings (U, D)."""
        a, d = self.arrays, self.dims
        x = layer_norm(np.asarray(emb, np.float32), a["enc_ln_w"], a["enc_ln_b"], d["ln_eps"])
        kv = (x @ a["enc_wkv"]).reshape(len(x), 2 * d["Hc"], d["Dh"])
        return kv[:, : d["Hc"]], kv[:, d["Hc"] :]

    def decoder_query(self, query: np.ndarray) -> np.ndarray:
        """The decoder's projected, scaled, unrotated query (Hc, 1, Dh) of a query (D,)."""
        a, d = self.arrays, self.dims
        x = layer_norm(np.asarray(query, np.float32)[None], a["dec_ln_w"], a["dec_ln_b"],
                       d["ln_eps"])  # fmt: skip
        return (x @ a["dec_wq"]).reshape(d["Hc"], 1, d["Dh"])

    def graph(self, name: str) -> Path | bytes:
        """Step graph ``name`` (its ONNX file, or its bytes for an in-memory package); a
        clear error when it was never exported."""
        if self.graph_bytes is not None:
            return self.graph_bytes[name]
        if self.graphs_dir is None:
            raise PackageError("this package has no graphs (an in-memory package)")
        path = layout.graph_file(self.graphs_dir, name)
        if not path.exists():
            raise PackageError(
                f"{self.graphs_dir} has no exported step graph {path.name}: run "
                f"{layout.export_hint(self.graphs_dir)}"
            )
        return path

    # ---------------------------------------------------------------- new sessions
    def with_session(
        self,
        session_id: str,
        unit_ids: list[str],
        output: str,
        norm: Normalizer,
        unit_rows: np.ndarray | None = None,
        session_row: int = -1,
        info: dict | None = None,
        seed: int = 0,
    ) -> ModelPackage:
        """A copy that knows ``session_id`` and its units (``calibrate.add_session`` in
        numpy): a unit whose ``unit_rows`` entry is a vocabulary row starts as a copy of
        it, others near the mean of the known units; the session's row is a copy of
        ``session_row`` or near the mean of the known sessions."""
        rng = np.random.default_rng(seed)
        a = dict(self.arrays)
        units = UnitVocab(self.units.names)
        added = units.extend(f"{session_id}/{u}" for u in unit_ids)
        a["unit_emb"] = _grow(a["unit_emb"], len(added), rng)
        if unit_rows is not None and added:
            rows = units.session_units(session_id, unit_ids)
            hit = unit_rows >= 0
            a["unit_emb"][rows[hit]] = a["unit_emb"][unit_rows[hit]]
        sessions = Vocab(self.sessions.names)
        if session_id not in sessions:
            sessions.extend([session_id])
            a["session_emb"] = _grow(a["session_emb"], 1, rng)
            for k, fill in (("norm_mean", 0.0), ("norm_std", 1.0), ("norm_known", 0)):
                a[k] = np.concatenate([a[k], np.full((1, *a[k].shape[1:]), fill, a[k].dtype)])
        if session_row >= 0:
            a["session_emb"][sessions[session_id]] = a["session_emb"][session_row]
        i, cols = sessions[session_id], self.output_columns[output]
        for k in ("norm_mean", "norm_std", "norm_known"):
            a[k] = a[k].copy()
        a["norm_mean"][i, cols] = norm.mean
        a["norm_std"][i, cols] = norm.std
        a["norm_known"][i] = 0
        a["norm_known"][i, self.output_index(output)] = 1
        spec = self.spec | {
            "units": units.to_list(),
            "sessions": sessions.to_list(),
            "info": info if info is not None else self.info,
        }
        return replace(self, spec=spec, arrays=a)

    # ---------------------------------------------------------------- disk
    def write(self, folder: Path) -> Path:
        """package.json and tables.safetensors into ``folder`` (graphs are written by
        ``export.package``)."""
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = [*TABLE_NAMES, *(k for k in self.arrays if k.startswith("readout/"))]
        save_file({k: np.ascontiguousarray(self.arrays[k]) for k in names},
                  str(folder / layout.TABLES))  # fmt: skip
        (folder / layout.PACKAGE).write_text(json.dumps(self.spec, indent=1))
        return folder

    @classmethod
    def load(cls, folder: Path, graphs_dir: Path | None = None) -> ModelPackage:
        """Read the package in ``folder``; ``graphs_dir``: where its graphs are (default:
        the folder itself). Raises ``PackageError`` naming the export command when the
        package is missing, of another format, or older than the weights beside it."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        folder = Path(folder)
        path, tables = folder / layout.PACKAGE, folder / layout.TABLES
        hint = layout.export_hint(graphs_dir or folder)
        if not path.exists() or not tables.exists():
            raise PackageError(
                f"{folder} has no model package ({layout.PACKAGE} and {layout.TABLES}): run {hint}"
            )
        try:
            spec = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise PackageError(f"{path} is not valid JSON ({e}): run {hint}") from None
        if not isinstance(spec, dict) or spec.get("format_version") != FORMAT_VERSION:
            got = spec.get("format_version") if isinstance(spec, dict) else None
            raise PackageError(
                f"{path} is package format {got}, this version reads {FORMAT_VERSION}: run {hint}"
            )
        weights = folder / layout.WEIGHTS
        if weights.exists() and file_sha256(weights) != spec.get("weights_sha256"):
            raise PackageError(
                f"the package in {folder} is stale: {layout.WEIGHTS} changed since it was "
                f"written (weights_sha256 differs); run {hint}"
            )
        try:
            arrays = load_file(str(tables))
        except (SafetensorError, OSError, ValueError) as e:
            raise PackageError(f"{tables} is corrupt or unreadable ({e}): run {hint}") from None
        missing = [k for k in TABLE_NAMES if k not in arrays]
        if missing:
            raise PackageError(f"{tables} lacks {missing}: run {hint}")
        try:
            return cls(spec, arrays, Path(graphs_dir or folder), folder)
        except ValueError as e:  # a malformed session readout
            raise PackageError(f"{tables}: {e}; run {hint}") from None


def _grow(table: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` new rows near the mean of the known ones (``poyo._grow`` in numpy; row 0
    of the unit table is <null> and left out of the statistics, as there)."""
    if count <= 0:
        return table.copy()
    known = table[1:] if len(table) > 1 else table
    mean = known.mean(0)
    std = float(known.std(0, ddof=1).mean()) if len(table) > 2 else 0.02
    new = mean + rng.standard_normal((count, table.shape[1])) * std
    return np.concatenate([table, new.astype(np.float32)])
