"""FALCON (Karpowicz et al., NeurIPS 2024; ``falcon-challenge`` on PyPI): our decoder
behind its ``BCIDecoder`` interface, so FALCON's own evaluator can score it.

FALCON serves 20 ms binned counts, ``predict((B, C)) -> (B, out_dim)``, one row per data
file in the batch, and calls ``reset(dataset_tags)`` whenever the batch's files change.
:class:`FalconDecoder` wraps a model folder with its calibrations:

- each dataset tag (``FalconConfig.hash_dataset`` of a file, e.g. ``Run1_20201019`` in
  M2) maps to a calibration of the model (``calibrations/<name>``) or a session it
  already knows; channel c is that session's c-th unit (the order the calibration saw).
- each batch row gets its own streaming engine (``StreamingEngine``, the ONNX graphs the
  daemon serves); ``reset`` starts every row's stream afresh at a file boundary.
- a bin's counts become spikes spread uniformly inside the bin, as the binned readers do
  (``bci_decoder.data.nwb.spikes_from_counts``), on the engine's own clock: bin k of a
  file covers [k·w, (k+1)·w) and its prediction is the engine's output at (k+1)·w, the
  first moment every spike of the bin is in. (FALCON stamps M2 bins at their start, H1
  and M1 at their end: either way the prediction uses the bin just served and nothing
  later.)

:class:`WienerFalconDecoder` is the baseline through the same interface (ridge on the
last five bins, one filter per tag). :func:`write_m2_file` writes a session in the
layout FALCON's M2 loader reads, so tests run the real evaluator on simulated data.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import UTC
from pathlib import Path

import numpy as np

from bci_decoder.baselines.wiener import WienerFilter
from bci_decoder.data.nwb import spikes_from_counts
from bci_decoder.data.session import Session
from bci_decoder.model import layout
from bci_decoder.train.checkpoint import Decoder

try:  # optional: pip install 'bci_decoder[falcon]' (or falcon-challenge --no-deps)
    from falcon_challenge.config import FalconConfig, FalconTask
    from falcon_challenge.interface import BCIDecoder
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "bci_decoder.falcon needs falcon-challenge: pip install 'bci_decoder[falcon]' "
        "(or, without its download tools, pip install --no-deps falcon-challenge "
        "hydra-core edit-distance)"
    ) from e

BIN_S = 0.02  # FALCON's bin width for H1, M1 and M2
CALIBRATIONS = layout.CALIBRATIONS
M2_HELD_IN = ["Run1_20201019", "Run2_20201019", "Run1_20201020", "Run2_20201020",
              "Run1_20201027", "Run2_20201027", "Run1_20201028"]  # fmt: skip


def dataset_tag(cfg: FalconConfig, handle: str | Path) -> str:
    """The tag FALCON's evaluator gives a data file (its ``hash_dataset`` of the stem)."""
    return cfg.hash_dataset(Path(handle).stem)


def onnx_cache(base: Path, state_dir: Path) -> Path:
    """Where the base model's step graphs are: its own package when exported and current,
    else exported once into ``state_dir`` (by weight hash; calibrations change only
    tables outside the graphs, so they share it)."""
    from bci_decoder.export.onnx_export import export_package
    from bci_decoder.model import layout
    from bci_decoder.model.package import ModelPackage, PackageError, file_sha256

    try:
        ModelPackage.load(base)
        if all(layout.graph_file(base, g).exists() for g in layout.GRAPHS):
            return base  # the engine checks the graphs' hash against the weights
    except PackageError:
        pass
    digest = file_sha256(base / layout.WEIGHTS)[:12]
    out = state_dir / "onnx" / f"{base.name}-{digest}"
    if not all(layout.graph_file(out, g).exists() for g in layout.GRAPHS):
        export_package(Decoder.load(base), out, weights_sha256="")
    return out


class _Row:
    """One batch row: an engine and the clock of the file it is decoding."""

    def __init__(self, engine, unit_count: int, bin_s: float) -> None:
        self.engine, self.units, self.bin_s = engine, unit_count, bin_s
        self.k = 0  # bins seen since the file began

    def reset(self) -> None:
        self.engine.reset(start=0.0)
        self.k = 0

    def step(self, counts: np.ndarray) -> np.ndarray:
        """counts (C,) of the next bin -> the prediction at the bin's end (D,)."""
        start = self.k * self.bin_s
        c = np.asarray(counts[: self.units], np.int64)[None, :]  # (1, U): extra channels dropped
        if c.any():
            times, units = spikes_from_counts(c, np.array([start]), self.bin_s, seed=self.k)
            self.engine.push(times, units.astype(np.int64))
        self.k += 1
        return self.engine.step(self.k * self.bin_s)


class FalconDecoder(BCIDecoder):
    """Our model behind FALCON's ``BCIDecoder`` (see the module docstring).

    ``tags`` maps each dataset tag to a calibration name of the model (a folder under
    ``<model>/calibrations``) or to a session the base model knows. ``output``: the
    model output to decode (default: the session's own); its dimension must be the
    task's ``out_dim``.
    """

    def __init__(
        self,
        task_config: FalconConfig,
        model_dir: str | Path,
        tags: Mapping[str, str],
        *,
        batch_size: int = 1,
        output: str | None = None,
        mode: str = "causal",
        backend: str = "onnx",
        state_dir: str | Path = "out/falcon",
        bin_s: float = BIN_S,
    ) -> None:
        super().__init__(task_config=task_config, batch_size=batch_size)
        self.model_dir = Path(model_dir)
        if not (self.model_dir / layout.META).exists():
            raise FileNotFoundError(f"{self.model_dir} is not a model folder (no meta.json)")
        self.tags = dict(tags)
        self.output, self.mode, self.backend, self.bin_s = output, mode, backend, bin_s
        self.state_dir = Path(state_dir)
        self.base = Decoder.load(self.model_dir)
        self._decoders: dict[str, tuple[Decoder, str]] = {}  # tag -> (decoder, session)
        self._rows: dict[tuple[str, int], _Row] = {}  # (tag, batch row) -> row
        self.active: list[_Row] = []
        self._onnx = onnx_cache(self.model_dir, self.state_dir) if backend == "onnx" else None

    def _decoder_for(self, tag: str) -> tuple[Decoder, str]:
        if tag in self._decoders:
            return self._decoders[tag]
        if tag not in self.tags:
            raise KeyError(
                f"dataset tag {tag!r} has no calibration: map it in 'tags' ({sorted(self.tags)}); "
                "calibrate it on the tag's calib file first (bci-decoder falcon --help)"
            )
        name = self.tags[tag]
        folder = self.model_dir / CALIBRATIONS / name
        if (folder / layout.META).exists():
            dec = Decoder.load(folder)
            session = dec.info.get("calibration", {}).get("session") or name
        elif name in self.base.sessions:
            dec, session = self.base, name
        else:
            have = sorted(p.name for p in (self.model_dir / CALIBRATIONS).glob("*") if p.is_dir())
            raise KeyError(
                f"tag {tag!r} -> {name!r}: neither a calibration of {self.model_dir.name} "
                f"({have}) nor one of its sessions"
            )
        self._decoders[tag] = (dec, session)
        return dec, session

    def _row(self, tag: str, i: int) -> _Row:
        key = (tag, i)
        if key not in self._rows:
            from bci_decoder.runtime.engine import StreamingEngine

            dec, session = self._decoder_for(tag)
            kw = {"onnx_path": str(self._onnx)} if self._onnx is not None else {}
            engine = StreamingEngine(
                dec, session, self.output, mode=self.mode, backend=self.backend, **kw
            )
            dim = dec.model.output_dims[engine.output]
            if dim != self._task_config.out_dim:
                raise ValueError(
                    f"{self._task_config.task.name} needs {self._task_config.out_dim} outputs "
                    f"but {engine.output!r} of {self.model_dir.name} has {dim}: decode an "
                    "output of that size ('output') or train a head for it"
                )
            self._rows[key] = _Row(engine, len(engine.unit_names), self.bin_s)
        return self._rows[key]

    def reset(self, dataset_tags: Sequence[str | Path] = ("",)) -> None:
        """A new batch of files: each row decodes its file's tag from a fresh stream."""
        tags = [dataset_tag(self._task_config, t) for t in dataset_tags]
        self.active = [self._row(tag, i) for i, tag in enumerate(tags)]
        for row in self.active:
            row.reset()

    def predict(self, neural_observations: np.ndarray) -> np.ndarray:
        """(B, C) counts of the newest bin -> (B, out_dim); rows past the batch's files
        (padding) get zeros."""
        obs = np.asarray(neural_observations)
        out = np.zeros((obs.shape[0], self._task_config.out_dim), np.float32)
        for i, row in enumerate(self.active[: obs.shape[0]]):
            out[i] = row.step(obs[i])
        return out

    def on_done(self, dones: np.ndarray) -> None:
        """Trial ends: nothing to do, the streams run through trials as they would live."""


class WienerFalconDecoder(BCIDecoder):
    """The baseline through the same interface: a ``WienerFilter`` per tag on the last
    ``num_lags`` bins of counts (lag 0 = the bin just served)."""

    def __init__(
        self,
        task_config: FalconConfig,
        filters: Mapping[str, WienerFilter],
        batch_size: int = 1,
    ) -> None:
        super().__init__(task_config=task_config, batch_size=batch_size)
        self.filters = dict(filters)
        self.active: list[tuple[WienerFilter, np.ndarray]] = []

    def reset(self, dataset_tags: Sequence[str | Path] = ("",)) -> None:
        self.active = []
        for t in dataset_tags:
            tag = dataset_tag(self._task_config, t)
            if tag not in self.filters:
                raise KeyError(f"no Wiener filter for tag {tag!r} ({sorted(self.filters)})")
            f = self.filters[tag]
            units = f.coef_.shape[0] // f.num_lags
            self.active.append((f, np.zeros((f.num_lags, units), np.float64)))  # (K, U)

    def predict(self, neural_observations: np.ndarray) -> np.ndarray:
        obs = np.asarray(neural_observations, np.float64)
        out = np.zeros((obs.shape[0], self._task_config.out_dim), np.float32)
        for i, (f, hist) in enumerate(self.active[: obs.shape[0]]):
            hist[1:] = hist[:-1].copy()
            hist[0] = obs[i, : hist.shape[1]]
            out[i] = f.predict(hist[None])[0]
        return out

    def on_done(self, dones: np.ndarray) -> None:
        pass


# ------------------------------------------------------------------ files and fitting
def bin_counts(session: Session, bin_starts: np.ndarray, bin_s: float = BIN_S) -> np.ndarray:
    """(T, U) counts in bins [start, start + w), as FALCON's loader bins them."""
    edges = np.concatenate([bin_starts, [bin_starts[-1] + bin_s]])  # (T+1,)
    out = np.zeros((len(bin_starts), session.num_units), np.int64)
    for u in range(session.num_units):
        out[:, u] = np.histogram(session.spike_times[session.spike_units == u], bins=edges)[0]
    return out


def target_at(session: Session, output: str, times: np.ndarray) -> np.ndarray:
    """(T, D) behaviour interpolated at ``times`` (float64)."""
    b = session.behavior[output]
    return np.stack([np.interp(times, b.timestamps, b.data[:, d]) for d in range(b.dim)], axis=1)


def fit_wiener(
    session: Session, output: str, span: tuple[float, float], num_lags: int = 5
) -> WienerFilter:
    """A Wiener filter on the session's ``span`` in FALCON's bins, each bin's target at
    its end (what both decoders predict there)."""
    starts = np.arange(span[0], span[1] - BIN_S, BIN_S)
    counts = bin_counts(session, starts).astype(np.float64)  # (T, U)
    lagged = np.zeros((len(starts), num_lags, session.num_units))  # (T, K, U)
    for k in range(num_lags):
        lagged[k:, k] = counts[: len(starts) - k]
    return WienerFilter(num_lags=num_lags).fit(lagged, target_at(session, output, starts + BIN_S))


def write_m2_file(
    session: Session,
    path: str | Path,
    span: tuple[float, float],
    *,
    output: str = "hand_vel",
    burn_in_s: float = 1.0,
    trial_s: float = 5.0,
) -> Path:
    """Write ``session`` over ``span`` in FALCON M2's layout (what
    ``falcon_challenge.dataloaders.load_nwb`` reads for M2): ``units`` with spike times,
    ``acquisition/finger_vel`` (one TimeSeries per dimension, stamped at 20 ms bin
    starts, the value at each bin's end), ``acquisition/eval_mask`` (False for the
    first ``burn_in_s``, while the decoders fill their history) and ``trials``."""
    from datetime import datetime

    import pynwb
    from pynwb.behavior import BehavioralTimeSeries

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lo, hi = span
    stamps = lo + np.arange(int(round((hi - lo) / BIN_S))) * BIN_S  # (T,) bin starts
    vel = target_at(session, output, stamps + BIN_S)  # (T, D)
    nwb = pynwb.NWBFile(
        session_description=f"{session.session_id} [{lo:g}, {hi:g}) s in FALCON M2 layout",
        identifier=f"{session.session_id}-{lo:g}",
        session_start_time=datetime(2020, 10, 19, tzinfo=UTC),
    )
    keep = (session.spike_times >= lo) & (session.spike_times < hi)
    for u in range(session.num_units):
        nwb.add_unit(spike_times=session.spike_times[keep & (session.spike_units == u)])
    fv = BehavioralTimeSeries(name="finger_vel")
    for d in range(vel.shape[1]):
        fv.add_timeseries(pynwb.TimeSeries(name=f"vel{d}", data=vel[:, d], unit="a.u.",
                                           timestamps=stamps))  # fmt: skip
    nwb.add_acquisition(fv)
    mask = stamps >= lo + burn_in_s
    nwb.add_acquisition(pynwb.TimeSeries(name="eval_mask", data=mask, unit="bool",
                                         timestamps=stamps))  # fmt: skip
    for t in np.arange(lo, hi - 1e-9, trial_s):
        nwb.add_trial(start_time=float(t), stop_time=float(min(t + trial_s, hi)))
    with pynwb.NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)
    return path


OUTPUT_FOR = {"m2": "hand_vel"}  # the model output a split's behaviour trains (2-D finger velocity)


def read_falcon(path: str | Path, split: str, output: str | None = None) -> Session:
    """A FALCON file (e.g. a ``held_in_calib`` one) as a Session, through FALCON's own
    loader: its 20 ms counts become spikes spread inside each bin, its behaviour is
    stamped at the bin ends and kept where ``eval_mask`` is set; channel c is unit
    ``ch{c:03d}``. Write it with ``bci_decoder.data.nwb.write_nwb`` and calibrate on it."""
    from falcon_challenge.dataloaders import load_nwb

    from bci_decoder.data.session import Behavior

    cfg = task_config(split)
    counts, target, _, mask = load_nwb(path, dataset=cfg.task)
    counts = np.asarray(counts)
    starts = np.arange(len(counts)) * BIN_S  # (T,)
    times, units = spikes_from_counts(counts, starts, BIN_S, seed=0)
    target = np.asarray(target, np.float32).reshape(len(counts), -1)  # (T, D)
    keep = np.asarray(mask, bool).reshape(len(counts), -1).all(1) & np.isfinite(target).all(1)
    output = output or OUTPUT_FOR.get(split, f"falcon_{split}")
    tag = dataset_tag(cfg, path)
    n = counts.shape[1]
    return Session(
        session_id=f"falcon-{split}-{tag}", subject=f"falcon-{split}", spike_times=times,
        spike_units=units, unit_ids=[f"ch{c:03d}" for c in range(n)], brain_areas=["M1"] * n,
        behavior={output: Behavior(output, starts[keep] + BIN_S, target[keep])},
        domain=(0.0, float(len(counts) * BIN_S)),
    )  # fmt: skip


def evaluate(decoder: BCIDecoder, split: str, data_dir: str | Path, work: str | Path) -> dict:
    """Run FALCON's local evaluator (``FalconEvaluator.evaluate``, phase ``minival``) on
    ``decoder`` over ``<data_dir>/<split>/minival/*val*.nwb``; its prediction and
    ground-truth pickles go to ``work``. Returns the evaluator's result for the split
    (e.g. ``Held In R2 Mean``, ``Normalized Latency``)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    env = {
        "EVAL_DATA_PATH": str(data_dir),
        "PREDICTION_PATH_LOCAL": str(work / "prediction.pkl"),
        "GT_PATH": str(work / "gt.pkl"),
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        from falcon_challenge.evaluator import FalconEvaluator

        ev = FalconEvaluator(eval_remote=False, split=split, dataloader_workers=0)
        res = ev.evaluate(decoder, phase="minival")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return res["result"][0][f"minival_split_{split}"]


def task_config(split: str) -> FalconConfig:
    return FalconConfig(task=getattr(FalconTask, split))
