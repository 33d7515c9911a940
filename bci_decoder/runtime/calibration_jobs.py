"""Calibration jobs for the running daemon: few-shot adaptation in a process of its own.

A job gets a new session (spikes + behaviour, from the daemon's buffer or uploaded),
adapts the base model to it and stores the result as a named calibration next to the
model (``models/NAME/calibrations/CAL/``) so a restart can load it.

``adapt="auto"`` (the default, as ``bci-decoder calibrate``'s ``--second-stage``):
``calibrate.adapt``, the same code as the command: unit identification on the first 80%
of the data, then a short fine-tune of the network's shared weights (the second stage),
both scored on the last 20%; the second stage is kept only where it beats unit
identification there by ``SecondStage.min_gain``. ``adapt="units"``: unit identification
alone (``calibrate.fit_units``). Either way the job reports the held-out R² of what it
stored next to a Wiener filter fitted on the same 80%, and which stage it chose with the
slice R² of each. The stored calibration is then fitted on all of the data (as the
offline command does), unless ``refit`` is off.

What is stored follows from what changed: unit identification changes only the unit and
session tables, so the calibration shares its base model's ONNX graphs and applying it
swaps the tables into the running engine (``set_units``); a kept second stage changed
the shared weights, so the calibration is a whole model package with graphs of its own
(``export.onnx_export.export_package``) and applying it builds a new engine.

Isolation (ARCHITECTURE "Processes and threads"): the training runs in a spawned child
process with one torch thread at idle priority (SCHED_IDLE), so the decode loop keeps its
cadence.
A failed or cancelled job never touches the running decoder; only ``apply`` does.

Hygiene: the child dies with the daemon (``parent_watch.die_with_parent``: SIGKILL from
the kernel at the parent's death, and a ``getppid`` poll), and is started from a thread
that lives as long as the manager (the death signal follows the forking *thread*). It
writes into a hidden ``calibrations/.tmp-*`` folder and renames it whole, so a killed job
never leaves a half-written calibration that could be listed or loaded; leftovers are
removed at start-up. A fit that ends with a NaN/inf weight or normaliser is refused.
"""

from __future__ import annotations

import importlib.machinery
import logging
import multiprocessing as mp
import os
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bci_decoder.data.session import Session
from bci_decoder.model import layout
from bci_decoder.runtime.daemon import DaemonError
from bci_decoder.runtime.parent_watch import die_with_parent
from bci_decoder.runtime.priority import idle

log = logging.getLogger(__name__)

_CTX = mp.get_context("spawn")  # never fork a process that runs threads and torch
TMP_PREFIX = layout.TMP_PREFIX  # hidden: never a valid calibration name, never listed


def remove_partial(calibrations: Path) -> list[str]:
    """Delete what killed jobs left behind (temporary folders); returns their names."""
    import shutil

    gone = []
    for p in Path(calibrations).glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)
        gone.append(p.name)
    return gone


@dataclass
class JobSpec:
    session: Session | None  # the block (or None: session_path holds it, pickled)
    output: str
    base_model: str  # folder of the base model
    out_dir: str  # where the calibration is stored
    name: str
    steps: int = 150
    holdout: float = 0.2
    refit: bool = True
    threads: int = 1
    nice: int = 10
    sched_idle: bool = True  # ServeConfig.calibration_priority == "idle"
    seed: int = 0
    session_path: str | None = None  # a pickled Session written by the upload worker
    summary: dict = field(default_factory=dict)  # uploads.summarize(session)
    parent_pid: int = 0  # the daemon: the child exits when it is gone
    mode: str = "supervised"  # or "unsupervised": the masked objective on the spikes alone
    adapt: str = "auto"  # or "units": unit identification only (see the module docstring)
    # ``calibrate.SecondStage`` fields to override (benchmarks and tests, e.g. min_gain
    # to force the choice; not offered over REST, where the slice decides)
    second_stage: dict = field(default_factory=dict)


@dataclass
class Job:
    id: str
    name: str
    spec: JobSpec
    source: str
    state: str = "queued"  # queued, running, done, failed, cancelled
    phase: str = ""
    progress: float = 0.0
    loss: float | None = None
    r2: float | None = None
    wiener_r2: float | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    applied: bool = False
    auto_apply: bool = False
    choice: dict = field(default_factory=dict)  # which stage was stored and why (stage_choice)
    path: str | None = None
    process: Any = None

    def public(self) -> dict:
        s = self.spec.summary
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "phase": self.phase,
            "progress": round(self.progress, 4),
            "loss": self.loss,
            "heldout_r2": self.r2,
            "wiener_r2": self.wiener_r2,
            "error": self.error,
            "source": self.source,
            "session": s["session_id"],
            "output": self.spec.output,
            "mode": self.spec.mode,
            "adapt": self.spec.adapt,
            "stage": self.choice.get("stage"),
            "stage_reason": self.choice.get("stage_reason"),
            "slice_r2_units": self.choice.get("slice_r2_units"),
            "slice_r2_second_stage": self.choice.get("slice_r2_second_stage"),
            "second_stage_steps": self.choice.get("second_stage_steps"),
            "readout": self.choice.get("readout"),
            "slice_r2_readout": self.choice.get("slice_r2_readout"),
            "units": s["units"],
            "spikes": s["spikes"],
            "seconds": round(s["domain"][1] - s["domain"][0], 3),
            "steps": self.spec.steps,
            "wall_s": (self.finished or time.time()) - self.started if self.started else None,
            "applied": self.applied,
            "auto_apply": self.auto_apply,
            "calibration": self.path and Path(self.path).name,
        }


def _worker(spec: JobSpec, q: Any) -> None:
    """Child process: fit, score, refit, save. Talks to the parent only through ``q``."""
    # SCHED_IDLE: any normal thread preempts the fit at once (nice alone still gave it a
    # share of a busy core, and on 2 cores the decode loop waited behind it)
    die_with_parent(spec.parent_pid or os.getppid())
    idle(spec.nice, spec.sched_idle)
    import pickle

    import numpy as np
    import torch

    torch.set_num_threads(spec.threads)
    from bci_decoder.baselines import evaluate_baselines
    from bci_decoder.calibrate import CalibrationSettings, fit_units, score_span
    from bci_decoder.model.decoder import Decoder

    try:
        base = Decoder.load(spec.base_model)
        s = spec.session
        if s is None:
            with open(spec.session_path, "rb") as f:
                s = pickle.load(f)
            s.session_id = spec.summary.get("session_id", s.session_id)
        lo, hi = s.domain
        if spec.mode == "unsupervised":
            _label_free(spec, base, s, q)
            return
        settings = CalibrationSettings(steps=spec.steps, threads=spec.threads, seed=spec.seed)
        if spec.adapt == "auto":
            _adapted(spec, base, s, settings, q)
            return
        fits = {"holdout": 0, "all": 0}  # steps done per fit
        if not (spec.holdout > 0):
            fits.pop("holdout")
        if not (spec.refit or spec.holdout <= 0):
            fits.pop("all")

        def progress_of(fit: str):
            def progress(step: int, loss: float) -> None:
                fits[fit] = step
                q.put(("progress", sum(fits.values()) / (spec.steps * len(fits)), loss))

            return progress

        def holdout_score() -> tuple[Any, float, float]:
            cut = lo + (1 - spec.holdout) * (hi - lo)
            held = fit_units(base, s, spec.output, (lo, cut), settings, progress_of("holdout"))
            r2 = score_span(held, s, spec.output, (cut, hi))
            wiener = evaluate_baselines(s, spec.output, (lo, cut), (cut, hi + 1e-9), ("wiener",))
            q.put(("score", r2, wiener["wiener"]["r2"]))
            return held, r2, wiener["wiener"]["r2"]

        r2 = wiener = None
        # The two fits are independent (the stored one does not start from the scored
        # one), so they run side by side, one torch thread each: on two cores the job
        # takes about one fit's time. Each is bit-identical to running it alone.
        q.put(("phase", " + ".join(
            {"holdout": "fit on the first 80% (scored on the rest)",
             "all": "fit on all the data (stored)"}[f] for f in fits)))  # fmt: skip
        with ThreadPoolExecutor(max_workers=len(fits)) as pool:
            scored = pool.submit(holdout_score) if "holdout" in fits else None
            stored = (
                pool.submit(
                    fit_units, base, s, spec.output, (lo, hi), settings, progress_of("all")
                )  # fmt: skip
                if "all" in fits
                else None
            )
            if scored is not None:
                held, r2, wiener = scored.result()
            # no refit: the scored fit is the one stored
            dec = stored.result() if stored is not None else held
        dec.info = dict(dec.info) | {
            "calibration": {
                "name": spec.name,
                "session": s.session_id,
                "output": spec.output,
                "heldout_r2": r2,
                "wiener_r2": wiener,
                "seconds": hi - lo,
                "steps": spec.steps,
                "stage": "units",
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
        }
        _store(spec, dec)
        reason = "unit identification only, as asked (adapt 'units')"
        q.put(("choice", {"stage": "units", "stage_reason": reason, "slice_r2_units": r2}))
        q.put(("done", str(spec.out_dir), float(np.nan if r2 is None else r2)))
    except Exception as e:  # noqa: BLE001 - reported to the parent, never raised there
        q.put(("failed", f"{type(e).__name__}: {e}"))


def stage_choice(report: dict, min_gain: float) -> dict:
    """The job's public account of ``calibrate.adapt``'s choice (its report)."""
    kept = bool(report.get("second_stage"))
    r_units = report.get("slice_r2_unit_identification")
    r_second = report.get("slice_r2_second_stage")
    if "reason" in report:
        reason = report["reason"]
    else:
        reason = (f"second stage {'kept' if kept else 'not kept'}: held-out slice R² "
                  f"{r_second:.3f} against {r_units:.3f} for unit identification alone, "
                  f"{r_second - r_units:+.3f} (kept above {min_gain:+g})")  # fmt: skip
    out = {
        "stage": "second-stage" if kept else "units",
        "stage_reason": reason,
        "slice_r2_units": r_units,
        "slice_r2_second_stage": r_second,
        "second_stage_steps": report.get("second_stage_steps"),
        "readout": report.get("readout"),
    }
    rr = report.get("readout_report")
    if rr:  # the session readout on top of the stage kept (calibrate.adapt's last stage)
        out["slice_r2_readout"] = rr["valid_r2_readout"]
        out["stage_reason"] += (
            f"; session readout {'kept' if rr['kept'] else 'not kept'}: slice R² "
            f"{rr['valid_r2_readout']:.3f} against {rr['valid_r2_head']:.3f} for the linear "
            f"head (kept above {rr['min_gain']:+g})"
        )
    return out


def _adapted(spec: JobSpec, base: Any, s: Session, settings: Any, q: Any) -> None:
    """Child process, ``adapt="auto"``: ``calibrate.adapt`` (the choice ``bci-decoder
    calibrate`` makes), the whole block's unit identification in a second thread beside
    the slice's fits, as the unit-only job runs its two fits."""
    from bci_decoder.baselines import evaluate_baselines
    from bci_decoder.calibrate import SecondStage, adapt

    stage = SecondStage(**({"holdout": spec.holdout} | spec.second_stage))
    lo, hi = s.domain
    planned = {"all": spec.steps}  # steps per fit, for the progress fraction
    if stage.holdout > 0:
        planned = {"holdout": spec.steps, "second_stage": stage.steps}
        if spec.refit:
            planned |= {"all": spec.steps, "second_stage_all": stage.steps}
    done = dict.fromkeys(planned, 0)

    def steps(fit: str, step: int, total: int, loss: float) -> None:
        planned[fit], done[fit] = total, step
        q.put(("progress", min(sum(done.values()) / sum(planned.values()), 1.0), loss))

    dec, report = adapt(base, s, spec.output, (lo, hi), settings, stage,
                        progress=lambda msg: q.put(("phase", msg)), steps=steps, parallel=True,
                        refit=spec.refit)  # fmt: skip
    choice = stage_choice(report, stage.min_gain)
    kept = choice["stage"] == "second-stage"
    r2 = choice["slice_r2_second_stage"] if kept else choice["slice_r2_units"]
    if choice.get("readout"):  # the readout decodes: its slice R² is the stored model's
        r2 = choice["slice_r2_readout"]
    wiener = None
    if "reason" not in report:
        cut = lo + (1 - stage.holdout) * (hi - lo)
        wiener = evaluate_baselines(s, spec.output, (lo, cut), (cut, hi + 1e-9), ("wiener",))
        wiener = wiener["wiener"]["r2"]
    q.put(("score", r2, wiener))
    q.put(("choice", choice))
    dec.info = dict(dec.info) | {
        "calibration": {
            "name": spec.name, "session": s.session_id, "output": spec.output,
            "heldout_r2": r2, "wiener_r2": wiener, "seconds": hi - lo, "steps": spec.steps,
            "stage": choice["stage"], "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    }  # fmt: skip
    if kept:
        q.put(("phase", "exporting the fine-tuned network's ONNX graphs"))
    _store(spec, dec, graphs=kept)
    q.put(("done", str(spec.out_dir), float("nan") if r2 is None else float(r2)))


def _label_free(spec: JobSpec, base: Any, s: Session, q: Any) -> None:
    """Child process, ``mode="unsupervised"``: the new session's rows fitted by the masked
    objective on its spikes alone (``calibrate_unsupervised``), on the whole block: with no
    labels there is nothing to score a held-out slice with, so no R² is reported."""
    from bci_decoder.calibrate_unsupervised import UnsupervisedSettings, fit_units_unsupervised

    st = UnsupervisedSettings(
        steps=spec.steps, threads=spec.threads, seed=spec.seed, output=spec.output
    )  # the bins: those the model's MtM head was trained on
    q.put(("phase", "label-free fit on the block's spikes (masked reconstruction)"))

    def progress(step: int, loss: float) -> None:
        q.put(("progress", step / spec.steps, loss))

    dec = fit_units_unsupervised(base, s, s.domain, st, progress)
    dec.info = dict(dec.info) | {
        "calibration": {
            "name": spec.name, "session": s.session_id, "output": spec.output,
            "mode": "unsupervised", "heldout_r2": None, "wiener_r2": None,
            "seconds": s.domain[1] - s.domain[0], "steps": spec.steps, "stage": "units",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    }  # fmt: skip
    _store(spec, dec)
    reason = "label-free: unit identification only (no labels to score a second stage with)"
    q.put(("choice", {"stage": "units", "stage_reason": reason}))
    q.put(("done", str(spec.out_dir), float("nan")))


def _store(spec: JobSpec, dec: Any, graphs: bool = False) -> None:
    """Child process: check a finished calibration and write it whole or not at all.

    ``graphs``: the fit changed the shared weights (a kept second stage), so the
    calibration gets ONNX graphs of its own, exported and checked against torch as
    ``bci-decoder export`` does, at the base model's buffer sizes; without, it shares its
    base model's graphs and holds tables only."""
    from bci_decoder.runtime.guards import check_decoder

    check_decoder(dec, f"calibration {spec.name}")  # e.g. behaviour too large: inf norms
    out = Path(spec.out_dir)
    tmp = layout.temporary_dir(out, os.getpid())
    try:
        dec.save(tmp)  # weights, and the package tables the daemon loads (no torch there)
        if graphs:
            from bci_decoder.export.onnx_export import export_package
            from bci_decoder.model.package import ModelPackage

            sizes = ModelPackage.load(spec.base_model).spec
            export_package(
                dec,
                tmp,
                sizes.get("capacity", layout.GROUP_SPIKES),
                sizes.get("window_capacity", layout.WINDOW_SPIKES),
            )
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, out)  # a calibration appears whole or not at all


class CalibrationManager:
    """Starts, tracks, cancels and applies calibration jobs (one runs at a time)."""

    def __init__(self, apply: Any, max_jobs_kept: int = 100, events: Any = None) -> None:
        self._apply = apply  # callable(job) -> None: swap the calibration into the daemon
        self._events = events or (lambda kind, **data: None)  # the recorder's events
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self.max_jobs_kept = max_jobs_kept
        # children are started from this thread, which lives as long as the manager
        self._launcher = ThreadPoolExecutor(1, thread_name_prefix="calibration-launcher")

    def running(self) -> Job | None:
        return next((j for j in self.jobs.values() if j.state in ("queued", "running")), None)

    def submit(self, spec: JobSpec, source: str, auto_apply: bool) -> Job:
        # the fit runs torch in the child; a core (serving-only) install has none. Asked of
        # the file system, not of this process's importers: the daemon never imports torch
        if importlib.machinery.PathFinder.find_spec("torch") is None:
            raise DaemonError(
                "calibration fits need torch, which this install lacks: pip install "
                "'bci_decoder[train]' (torch==2.13.0, the CPU build), or fit the calibration "
                "elsewhere, copy it into the model's calibrations/ folder and PUT /model",
                409,
            )
        with self._lock:
            busy = self.running()
            if busy is not None:
                raise DaemonError(
                    f"calibration {busy.id} is still {busy.state}; wait for it or DELETE it", 409
                )
            job = Job(id=uuid.uuid4().hex[:12], name=spec.name, spec=spec, source=source,
                      auto_apply=auto_apply)  # fmt: skip
            self.jobs[job.id] = job
            self._trim()
        spec.parent_pid = os.getpid()
        q = _CTX.Queue()
        proc = _CTX.Process(target=_worker, args=(spec, q), name=f"calibration-{job.id}")
        job.process = proc
        job.state, job.started = "running", time.time()
        self._launcher.submit(proc.start).result()
        self._events("calibration", id=job.id, name=job.name, state="running",
                     source=source, summary=spec.summary)  # fmt: skip
        threading.Thread(target=self._watch, args=(job, q), daemon=True).start()
        return job

    def _trim(self) -> None:
        done = [j for j in self.jobs.values() if j.state not in ("queued", "running")]
        for j in done[: max(0, len(self.jobs) - self.max_jobs_kept)]:
            self.jobs.pop(j.id, None)

    def _watch(self, job: Job, q: Any) -> None:
        proc = job.process
        while True:
            try:
                msg = q.get(timeout=0.2)
            except queue.Empty:
                if not proc.is_alive():
                    if job.state == "running":
                        job.state = "failed"
                        job.error = (
                            job.error or f"the calibration process died (exit {proc.exitcode})"
                        )
                        job.finished = time.time()
                    self._forget_upload(job)
                    return
                continue
            kind = msg[0]
            if kind == "progress":
                job.progress, job.loss = msg[1], msg[2]
            elif kind == "phase":
                job.phase = msg[1]
            elif kind == "score":
                job.r2, job.wiener_r2 = msg[1], msg[2]
            elif kind == "choice":
                job.choice = msg[1]
            elif kind == "failed":
                job.state, job.error, job.finished = "failed", msg[1], time.time()
            elif kind == "done":
                job.path, job.progress, job.finished = msg[1], 1.0, time.time()
                job.state = "done"
                if job.auto_apply:
                    try:
                        self.apply(job.id)
                    except Exception as e:  # noqa: BLE001 - reported on the job
                        job.error = f"auto-apply failed: {e}"
            if job.state in ("done", "failed", "cancelled"):
                proc.join(timeout=5)
                self._forget_upload(job)
                self._events("calibration", id=job.id, name=job.name, state=job.state,
                             heldout_r2=job.r2, error=job.error)  # fmt: skip
                return

    @staticmethod
    def _forget_upload(job: Job) -> None:
        if job.spec.session_path:
            Path(job.spec.session_path).unlink(missing_ok=True)

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise DaemonError(f"no calibration job {job_id!r}", 404)
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.state in ("queued", "running"):
            job.state, job.finished = "cancelled", time.time()
            if job.process is not None and job.process.is_alive():
                job.process.terminate()
                job.process.join(timeout=5)
        return job

    def apply(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.state != "done":
            raise DaemonError(f"calibration {job_id} is {job.state}; only a done one applies", 409)
        self._apply(job)
        job.applied = True
        return job

    def close(self) -> None:
        for job in list(self.jobs.values()):
            if job.state in ("queued", "running"):
                self.cancel(job.id)
        self._launcher.shutdown(wait=False)
