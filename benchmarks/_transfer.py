"""The measurements the transfer studies share (unit_identification.py, across_days.py).

Each method is scored on a held-out session's last 30% (every prediction from spikes up to
its own time); calibration and the baselines use the first S seconds of the first 70% or
all of it. Results are cached per model and session under ``out/transfer_cache/`` so the
two studies reuse each other's fits and an interrupted run picks up where it stopped.

Methods:
- ``zero_shot``: warm-started tables, nothing fitted (a known subject's new day only);
- ``ui_S``: unit identification on S s, the product's default (warm start where the
  subject is known); ``ui_cold_S``: the same with every unit starting at the mean;
- ``adapt_S``: ``calibrate.adapt`` (unit identification, then a second stage where the
  calibration block's held-out slice says it helps);
- ``ui_auto_S``: unit identification from the start (warm or cold) that scores better on
  the block's last 20% (``adapt`` without its second stage);
- ``free_S``: label-free calibration on the spikes of the same S s (``fit_units_unsupervised``,
  warm-started on a known subject's new day; no behaviour read), for a model with an MtM head;
- ``gru_S``, ``wiener_S``, ``gru_full``, ``wiener_full``: the baselines on the same span.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import time
from pathlib import Path

import torch

from bci_decoder.baselines import evaluate_baselines
from bci_decoder.calibrate import CalibrationSettings, fit_units, score_span, zero_shot
from bci_decoder.data.session import Session, time_split
from bci_decoder.train.checkpoint import Decoder

CACHE = Path(__file__).resolve().parents[1] / "out" / "transfer_cache"
_METHOD = re.compile(r"^(zero_shot|ui|ui_cold|ui_auto|adapt|free|gru|wiener)(?:_(\d+|full))?$")


def model_hash(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()[:12]


def baselines_hash() -> str:
    """The baselines' own code, docstrings and comments left out: their scores do not
    depend on the model, only on what this code computes."""
    src = Path(__file__).resolve().parents[1] / "bci_decoder" / "baselines"
    h = hashlib.sha256()
    for f in sorted(src.glob("*.py")):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (
                isinstance(body, list)
                and body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
        h.update(ast.dump(tree).encode())
    return "baselines-" + h.hexdigest()[:12]


class Study:
    """Scores of methods on held-out sessions of one model, cached on disk."""

    def __init__(self, model: Path | None, cache: Path = CACHE) -> None:
        torch.set_num_threads(1)  # as the REST calibration job: one thread
        self.model_dir = model
        self.decoder = Decoder.load(model) if model is not None else None
        key = model_hash(model) if model is not None else "no-model"
        # a model given an MtM head afterwards (bci-decoder mtm-head) has its base model's
        # supervised weights bit for bit: it shares the base's scores, except label-free ones
        base = (self.decoder.info.get("mtm_head_of") or {}).get("sha256") if model else None
        self.cache = cache / (base[:12] if base else key)
        self.free_cache = cache / key
        self.baseline_cache = cache / baselines_hash()
        for c in (self.cache, self.free_cache, self.baseline_cache):
            c.mkdir(parents=True, exist_ok=True)

    def held_out(self) -> list[str]:
        return list(self.decoder.info.get("train_config", {}).get("data", {}).get("exclude", []))

    def score(self, session: Session, method: str) -> dict:
        """``{"r2": ..., "wall_s": ..., ...}`` of one method, from the cache if there."""
        folder = self.baseline_cache if method.startswith(("gru", "wiener")) else self.cache
        if method.startswith("free"):
            folder = self.free_cache
        path = folder / f"{session.session_id}.json"
        done = json.loads(path.read_text()) if path.exists() else {}
        if method not in done:
            if folder is not self.baseline_cache and session.session_id in self.decoder.sessions:
                raise SystemExit(f"{session.session_id} was pretrained on: not held out")
            t0, c0 = time.perf_counter(), time.process_time()
            entry = self._run(session, method)
            entry |= {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
            done = json.loads(path.read_text()) if path.exists() else {}
            done[method] = entry
            path.write_text(json.dumps(done, indent=1))
            print(f"{session.session_id:<22} {method:<14} R² {entry['r2']:.3f}", flush=True)
        return done[method]

    def _run(self, session: Session, method: str) -> dict:
        m = _METHOD.match(method)
        if not m:
            raise ValueError(f"unknown method {method!r}")
        kind, arg = m.group(1), m.group(2)
        output = session.default_output()
        split = time_split(session)
        start = split.fit[0]
        span = split.fit if arg == "full" else (start, min(start + float(arg or 0), split.fit[1]))
        dec = self.decoder
        if kind == "zero_shot":
            cal = zero_shot(dec, session, output, "name", (start, start + 60.0))
            return {
                "r2": score_span(cal, session, output, split.test),
                "warm": cal.info["warm_start"],
            }
        if kind in ("ui", "ui_cold"):
            st = CalibrationSettings(warm_start="off" if kind == "ui_cold" else "name")
            cal = fit_units(dec, session, output, span, st)
            return {
                "r2": score_span(cal, session, output, split.test),
                "seconds": span[1] - span[0],
                "warm": cal.info.get("warm_start"),
            }
        if kind in ("adapt", "ui_auto"):
            from bci_decoder.calibrate import SecondStage, adapt

            stage = SecondStage(steps=0, choose_start=True) if kind == "ui_auto" else SecondStage()
            cal, report = adapt(dec, session, output, span, CalibrationSettings(), stage)
            return {"r2": score_span(cal, session, output, split.test), **report}
        if kind == "free":
            from bci_decoder.calibrate_unsupervised import (
                UnsupervisedSettings,
                fit_units_unsupervised,
            )

            st = UnsupervisedSettings(output=output)  # the bins the MtM head learned on
            cal = fit_units_unsupervised(dec, session, span, st)
            return {
                "r2": score_span(cal, session, output, split.test),
                "seconds": span[1] - span[0],
                "warm": cal.info.get("warm_start"),
            }
        res = evaluate_baselines(session, output, span, split.test, (kind,))
        return {"r2": res[kind]["r2"], "seconds": span[1] - span[0]}
