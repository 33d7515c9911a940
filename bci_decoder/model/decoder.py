"""A trained decoder on disk: ``model.safetensors`` + ``meta.json`` (+ its package).

The metadata holds everything needed to use the weights: the model config, the unit and
session vocabularies, the output kinds, and each session's behaviour normalisation.
``save`` also writes the model's package tables (``model.package``), so every saved model
and calibration can be served without torch once its base model's graphs are exported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from bci_decoder.model import layout
from bci_decoder.model.normalizer import Normalizer
from bci_decoder.model.package import FORMAT_VERSION as PACKAGE_FORMAT
from bci_decoder.model.package import ModelPackage, file_sha256, graph_hash
from bci_decoder.model.poyo import POYO, POYOConfig
from bci_decoder.model.session_readout import SessionReadout, key_prefix, readouts_in
from bci_decoder.model.vocab import UnitVocab, Vocab

FORMAT_VERSION = 1

__all__ = ["Decoder", "Normalizer", "FORMAT_VERSION", "package_of"]


@dataclass
class Decoder:
    """Model plus the vocabularies and normalisation that give its numbers meaning."""

    model: POYO
    units: UnitVocab
    sessions: Vocab
    norms: dict[str, dict[str, Normalizer]]  # session -> output -> normaliser
    modes: list[str] = field(default_factory=lambda: ["causal"])
    info: dict = field(default_factory=dict)
    # (session, output) -> its recurrent readout (``model.session_readout``), if fitted;
    # saved with the package tables (``layout.TABLES``), read back from there
    readouts: dict[tuple[str, str], SessionReadout] = field(default_factory=dict)

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
        save_file(state, str(directory / layout.WEIGHTS))
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
        (directory / layout.META).write_text(json.dumps(meta, indent=1))
        package_of(self, file_sha256(directory / layout.WEIGHTS)).write(directory)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Decoder:
        directory = Path(directory)
        meta_path, weights = directory / layout.META, directory / layout.WEIGHTS
        if not meta_path.exists() or not weights.exists():
            raise FileNotFoundError(
                f"{directory} is not a model folder (needs {layout.META} and {layout.WEIGHTS})"
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
        readouts = {}
        if (directory / layout.TABLES).exists():  # the package save wrote: their one home
            from safetensors import safe_open

            try:
                with safe_open(str(directory / layout.TABLES), "numpy") as f:
                    readouts = readouts_in(
                        {k: f.get_tensor(k) for k in f.keys() if k.startswith("readout/")}
                    )
            except Exception as e:  # safetensors' own errors, or a malformed readout
                raise ValueError(f"the readouts in {directory / layout.TABLES}: {e}") from None
        modes = meta.get("modes", ["causal"])
        return cls(model, units, sessions, norms, modes, meta["info"], readouts)

    def clone(self) -> Decoder:
        import copy

        return copy.deepcopy(self)


def readout_arrays(readouts: dict[tuple[str, str], SessionReadout]) -> dict[str, np.ndarray]:
    """Readouts as flat arrays (``readout/SESSION/OUTPUT/NAME``), for a tables file."""
    out = {}
    for (session_id, output), r in sorted(readouts.items()):
        out |= r.to_arrays(key_prefix(session_id, output))
    return out


def package_of(
    decoder: Decoder,
    weights_sha256: str = "",
    capacity: int = layout.GROUP_SPIKES,
    window_capacity: int = layout.WINDOW_SPIKES,
) -> ModelPackage:
    """The decoder's package (``model.package``) in memory, without graphs."""
    m = decoder.model
    c = m.config
    state = {k: v.detach().cpu().float().numpy() for k, v in m.state_dict().items()}
    enc, dec = m.enc_attn, m.dec_attn
    Hc, Dh, D = c.cross_heads, c.dim_head, c.dim
    n = c.latents_per_group
    f32 = np.float32

    def arr(t: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=f32)

    outputs = dict(m.output_dims)
    columns = np.cumsum([0, *outputs.values()])
    S, P, n_out = len(decoder.sessions), int(columns[-1]), len(outputs)
    norm_mean, norm_std = np.zeros((S, P), f32), np.ones((S, P), f32)
    known = np.zeros((S, n_out), np.uint8)
    for sid, by_output in decoder.norms.items():
        if sid not in decoder.sessions:
            continue
        i = decoder.sessions[sid]
        for j, name in enumerate(outputs):
            if name in by_output:
                lo, hi = columns[j], columns[j + 1]
                norm_mean[i, lo:hi] = by_output[name].mean
                norm_std[i, lo:hi] = by_output[name].std
                known[i, j] = 1
    arrays = {
        "unit_emb": arr(m.unit_emb.weight),
        "session_emb": arr(m.session_emb.weight),
        "output_emb": arr(m.output_emb.weight),
        "enc_ln_w": arr(enc.norm_kv.weight),
        "enc_ln_b": arr(enc.norm_kv.bias),
        "enc_wkv": arr(torch.cat([enc.to_k.weight, enc.to_v.weight], 0).T),
        "dec_ln_w": arr(dec.norm_q.weight),
        "dec_ln_b": arr(dec.norm_q.bias),
        "dec_wq": arr(dec.to_q.weight.T * Dh**-0.5),
        "norm_mean": norm_mean,
        "norm_std": norm_std,
        "norm_known": known,
        **readout_arrays(decoder.readouts),
    }
    periods = m.periods.numpy()
    spec = {
        "format_version": PACKAGE_FORMAT,
        "weights_sha256": weights_sha256,
        "graph_hash": graph_hash(state),
        "config": c.model_dump(),
        "dims": {
            "D": D,
            "depth": c.depth,
            "Dh": Dh,
            "Hc": Hc,
            "Hs": c.self_heads,
            "n": n,
            "L": max(c.context_groups - 1, 1) * n,
            "K": int(round(c.context / c.latent_step)),
            "W": c.context_groups,
            "F": int(periods.size),
            "P": P,
            "latent_step": float(c.latent_step),
            "context": float(c.context),
            "rotate_values": bool(c.rotate_values),
            "ln_eps": float(enc.norm_kv.eps),
        },  # fmt: skip
        "periods": [float(p) for p in periods],  # repr round-trips float64 exactly
        "outputs": outputs,
        "modes": list(decoder.modes),
        "units": decoder.units.to_list(),
        "sessions": decoder.sessions.to_list(),
        "info": decoder.info,
        "graphs": {name: f"{name}.onnx" for name in layout.GRAPHS},
        "capacity": capacity,
        "window_capacity": window_capacity,
    }
    return ModelPackage(spec, arrays)
