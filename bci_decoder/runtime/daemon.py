"""The daemon's state: model, streams, spike ring, decode loop, and what /status reports.

Threads (ARCHITECTURE "Processes and threads"): a spike inlet and a behaviour inlet pull
from LSL into rings; a supervisor waits for the spike stream and (re)builds the engine
when it (re)appears; the decode loop steps at cadence. Control calls (REST) run on the
server's threads and never touch the loop's state directly: they prepare a new engine
off the hot path and hand it over between two steps.

States: ``idle`` (not started), ``waiting-for-stream`` (started, no spike stream yet),
``running``, ``stalled`` (the stream vanished, went silent, or most of its spikes were
rejected over the last second, e.g. stamped in the future: the safe value is sent),
``degraded`` (a step failed or gave a non-finite output within the last
``DEGRADED_HOLD_S``: the safe value was sent for it; ``/status.degraded`` says why).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bci_decoder.model import layout
from bci_decoder.model.package import ModelPackage, PackageError
from bci_decoder.runtime.decode_loop import ActiveEngine, DecodeLoop, lsl_clock
from bci_decoder.runtime.gc_pauses import GcMonitor, freeze
from bci_decoder.runtime.guards import GuardError, check_meta, check_package
from bci_decoder.runtime.lsl_io import BehaviorInletThread, ControlOutlet, SpikeInletThread
from bci_decoder.runtime.priority import policy_of, realtime_process
from bci_decoder.runtime.ring import SpikeRing
from bci_decoder.runtime.unit_tables import UnitTables
from bci_decoder.serve_config import ServeConfig

log = logging.getLogger(__name__)

AXIS_LABELS = {
    "hand_vel": ["vx", "vy"],
    "hand_pos": ["px", "py"],
    "force": ["fx", "fy"],
    "cursor_vel": ["vx", "vy"],
    "cursor_pos": ["px", "py"],
}
CALIBRATIONS = layout.CALIBRATIONS
DEGRADED_HOLD_S = 5.0  # a failed step keeps the state ``degraded`` this long


class DaemonError(Exception):
    """A control request that cannot be carried out; the message says what to fix."""

    def __init__(self, message: str, status: int = 409, errors: list | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.errors = errors or []  # validation errors by field (api/errors.ErrorItem)


def output_labels(output: str, dim: int) -> list[str]:
    labels = AXIS_LABELS.get(output)
    if labels and len(labels) == dim:
        return list(labels)
    return [f"{output}{i}" for i in range(dim)]


# a model or calibration is a name inside the models folder, never a path
NAME_PATTERN = layout.NAME_PATTERN


def check_name(kind: str, name: str) -> str:
    if not layout.valid_name(name):
        raise DaemonError(
            f"{kind} name {str(name)[:60]!r}: use 1-100 ASCII letters, digits, '-', '_' or "
            "'.', starting with a letter or digit (a name in the models folder, not a path)",
            422,
        )
    return name


def model_folder(cfg: ServeConfig, name: str) -> Path:
    """A model by name: a folder directly under ``models_dir`` (no paths, so a request
    can neither load nor write anything outside the models folder)."""
    check_name("model", name)
    root = Path(cfg.models_dir)
    by_name = root / name
    if by_name.is_dir():
        return by_name
    raise DaemonError(f"no model {name!r} in {cfg.models_dir}/ (known: "
                      f"{layout.known_models(root)})", 404)  # fmt: skip


def stored_calibrations(model_dir: Path) -> list[str]:
    """Calibrations listed for a model: whole ones only (a job writes into a hidden
    temporary folder and renames it when complete)."""
    return layout.stored_calibrations(model_dir)


def calibration_folder(model_dir: Path, calibration: str) -> Path:
    check_name("calibration", calibration)
    path = layout.calibration_dir(model_dir, calibration)
    if not layout.is_model(path):
        raise DaemonError(
            f"model {model_dir.name} has no calibration {calibration!r} "
            f"({stored_calibrations(model_dir)})",
            404,
        )
    return path


def load_package(cfg: ServeConfig, name: str, calibration: str | None) -> tuple[ModelPackage, Path]:
    """The package to serve and its base model folder (whose ONNX graphs it uses, unless
    a calibration has graphs of its own: a second stage that fine-tuned shared weights).

    Packages only: no torch, never an export here. A missing or stale package, or a
    calibration made on other graph weights, is a 422 naming the export command; every
    malformed model is a 422 with what is wrong (a meta.json of the wrong shape, a
    corrupt table, a table or normaliser that is NaN/inf as float32)."""
    base = model_folder(cfg, name)
    path = calibration_folder(base, calibration) if calibration else base
    own_graphs = layout.graph_file(path, layout.GRAPHS[0]).exists()
    try:
        check_meta(path)
        pkg = ModelPackage.load(path, graphs_dir=path if own_graphs else base)
        check_package(pkg, str(path))
        if calibration and not own_graphs:  # own graphs: the engine checks their hash
            own = ModelPackage.load(base)
            if own.graph_hash != pkg.graph_hash:
                raise PackageError(
                    f"calibration {calibration} was made on other weights than {base} "
                    f"(graph hash {pkg.graph_hash} vs {own.graph_hash}): recalibrate, or "
                    f"export the model it was made on"
                )
        for g in ("causal_step", "causal_finish", "window_step"):
            pkg.graph(g)  # the clear error now, not when a stream appears
        return pkg, base
    except (GuardError, PackageError) as e:
        raise DaemonError(str(e), 422) from None
    except FileNotFoundError as e:
        raise DaemonError(f"cannot load {path}: {e}", 422) from None
    except Exception as e:  # noqa: BLE001 - a malformed model is the model's fault, not ours
        raise DaemonError(f"cannot load {path}: {type(e).__name__}: {e}"[:1000], 422) from None


def as_package(model, base: Path) -> ModelPackage:
    """A package, from a torch ``Decoder`` too (tests swap in decoders; imports torch)."""
    if isinstance(model, ModelPackage):
        return model
    from bci_decoder.model.decoder import package_of

    pkg = package_of(model)
    pkg.graphs_dir = base
    return pkg


def process_age_s() -> float | None:
    """Seconds since this process started (Linux, 10 ms resolution; None elsewhere): the
    daemon's start-up, imports included."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return round(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 3)
    except (OSError, ValueError, IndexError):
        return None


class Daemon:
    def __init__(self, cfg: ServeConfig) -> None:
        # The decode loop shares the GIL with the inlets, the server and engine building.
        # At CPython's default 5 ms switch interval a busy thread can hold the loop off
        # for 5 ms at each of its GIL waits (the convoy effect); 0.5 ms bounds that.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        self.cfg = cfg
        # the other threads' SCHED_FIFO priority and why it was refused (None: not asked;
        # ``bci-decoder serve`` sets them, priority.realtime_process)
        self.support_rt_priority: int | None = None
        self.support_rt_error: str | None = None
        self.state_dir = Path(cfg.state_dir)
        self.ring = SpikeRing(cfg.ring_spikes)
        self._lock = threading.RLock()  # one control operation at a time
        self.package, self.model_dir = load_package(cfg, cfg.model, cfg.calibration)
        self.model_name = cfg.model
        self.calibration = cfg.calibration
        self.spike_inlet: SpikeInletThread | None = None
        self.behavior_inlet: BehaviorInletThread | None = None
        self.loop: DecodeLoop | None = None
        self.outlet: ControlOutlet | None = None
        self._supervisor: threading.Thread | None = None
        self._stop = threading.Event()
        self._seen_connects = 0
        self._retired_rejected: dict[str, int] = {}
        self.started = time.time()
        self.providers: list[str] = []
        self.tables: dict = {}  # which tables decode (/status), set by prepare
        if cfg.gc_freeze:
            freeze(collect=True)  # nothing runs on deadlines yet: collect, then freeze
        self.gc = GcMonitor()  # collections from here on (the one above took ~150 ms)
        self.recorder = self._open_recorder()
        self._last_state = self.state
        # what start-up left behind: a full GC collection walks every tracked object while
        # holding the GIL (runtime/gc_pauses.py), so /status reports the count
        self.startup = {"gc_tracked_objects": len(gc.get_objects()),
                        "process_age_s": process_age_s()}  # fmt: skip

    @property
    def decoder(self) -> ModelPackage:
        """The package being served (the name it had when it was a torch Decoder)."""
        return self.package

    def _open_recorder(self):
        rc = self.cfg.recording
        if rc is None:
            return None
        from bci_decoder.runtime.recorder import Recorder

        path = Path(rc.path) if rc.path else self.state_dir / "recordings"
        if path.suffix not in (".h5", ".hdf5"):
            path = path / f"{time.strftime('%Y%m%d-%H%M%S')}.h5"
        rec = Recorder(path, flush_s=rc.flush_s, queue_spikes=rc.queue_spikes,
                       queue_outputs=rc.queue_outputs)  # fmt: skip
        rec.event("start", model=self.model_name, calibration=self.calibration,
                  config=self.cfg.model_dump(mode="json", exclude={"api"}))  # fmt: skip
        log.info("recording to %s", path)
        return rec

    def record_event(self, kind: str, **data) -> None:
        if self.recorder is not None:
            self.recorder.event(kind, **data)

    def _emit(self, y: np.ndarray, t: float) -> None:
        """The decode loop's output: to the Control outlet, then (a few stores) to the
        recorder's preallocated ring."""
        self.outlet.push(y, t)
        rec = self.recorder
        if rec is not None:
            loop = self.loop
            rec.output(t, y, lsl_clock(), loop.step_ms.last(), loop.last_safe)

    # ---------------------------------------------------------------- engines
    def _session_for(self, decoder: ModelPackage, hint: str) -> tuple[str, bool]:
        """(session to decode, whether the stream's units are known to it)."""
        calibrated = decoder.info.get("calibration", {}).get("session")
        for cand in (calibrated, self.cfg.session, hint):
            if cand and cand in decoder.sessions and decoder.norms.get(cand):
                return cand, True
        # unknown session: decode with a known one and no known units until calibrated
        wanted = self.cfg.output
        for s in decoder.sessions.names:
            if decoder.norms.get(s) and (wanted is None or wanted in decoder.norms[s]):
                return s, False
        raise DaemonError(f"the model has no session that decodes {wanted!r}", 422)

    def _plan(self, pkg: ModelPackage, labels: list[str], hint: str) -> dict:
        """What decodes the current stream: package (zero-shot: extended), session,
        output, unit map, and which tables (/status)."""
        session, known = self._session_for(pkg, hint)
        tables = {"kind": "pretrained" if known else "none: units unknown until calibrated"}
        if pkg.info.get("calibration", {}).get("session") == session:
            tables["kind"] = "calibrated"
        if not known and labels:
            warm = self._zero_shot(pkg, labels, hint)
            if warm is not None:  # a new day of a known subject: its earlier days' tables
                pkg, session, known = warm, warm.info["calibrated"]["session"], True
                tables = {"kind": "zero-shot warm start", **warm.info["warm_start"]}
        output = self.cfg.output if self.cfg.output in pkg.norms[session] else None
        output = output or next(iter(pkg.norms[session]))
        # the session's recurrent readout, if it has one (model.session_readout)
        readout = pkg.readout(session, output)
        tables["readout"] = (
            None if readout is None else {"hidden": readout.hidden, "count_units": readout.units}
        )
        names = pkg.session_unit_names(session)
        index = {u: i for i, u in enumerate(names)}
        if not known:
            unit_map = np.full(max(len(labels), 1), -1, np.int64)
        elif labels:
            unit_map = np.array([index.get(lab, -1) for lab in labels], np.int64)
        else:  # a stream without unit labels: index i is the session's i-th unit
            unit_map = np.arange(len(names), dtype=np.int64)
        return {"package": pkg, "session": session, "known": known, "output": output,
                "unit_map": unit_map, "tables": tables | {"session": session}}  # fmt: skip

    def _active(self, plan: dict, engine, cursor: int, tables=None) -> ActiveEngine:
        output = plan["output"]
        return ActiveEngine(
            engine=engine,
            unit_map=plan["unit_map"],
            cursor=cursor,
            labels=output_labels(output, plan["package"].output_dims[output]),
            output=output,
            session=plan["session"],
            calibrated=plan["known"],
            model=self.model_name,
            calibration=self.calibration,
            tables=tables,
        )

    def prepare(
        self, decoder: ModelPackage, base: Path, labels: list[str], hint: str, prime: bool = True
    ) -> ActiveEngine:
        """Build an engine for the current stream and prime it with the ring's last
        ``context`` seconds, off the decode loop's thread."""
        from bci_decoder.runtime.engine import StreamingEngine

        plan = self._plan(as_package(decoder, base), labels, hint)
        pkg, unit_map = plan["package"], plan["unit_map"]
        self.tables = plan["tables"]
        engine = StreamingEngine(pkg, plan["session"], plan["output"], mode=self.cfg.mode,
                                 intra_op_threads=self.cfg.onnx_threads,
                                 max_spikes_per_group=self.cfg.max_spikes_per_group,
                                 late_grace_s=self.cfg.late_grace_s)  # fmt: skip
        sess = getattr(engine.runner, "session", None)
        if sess is not None:
            self.providers = list(sess.get_providers())
        cursor = self.ring.written
        if prime:
            now = lsl_clock()
            start = self.ring.cursor_at(now - pkg.context - pkg.latent_step)
            cursor = self.ring.cursor_at(now - 0.002)
            times, units, _, _ = self.ring.read_spikes(start)
            times, units = times[: cursor - start], units[: cursor - start]
            mapped = np.full(len(units), -1, np.int64)
            inside = (units >= 0) & (units < len(unit_map))
            mapped[inside] = unit_map[units[inside]]
            keep = mapped >= 0
            times, mapped = times[keep], mapped[keep]
            # in slices of about 10 ms of spikes, yielding between them: this thread and
            # the decode loop share the GIL, and the loop must not wait for the priming
            for part in np.array_split(np.arange(len(times)), max(1, len(times) // 40)):
                if len(part):
                    engine.push(times[part], mapped[part])
                time.sleep(0.0005)
        return self._active(plan, engine, cursor)

    def retable(self, decoder: ModelPackage, base: Path, labels: list[str], hint: str):
        """The running engine with new unit tables (a calibration of the model it runs):
        no new ONNX Runtime session, no priming; the loop swaps the tables in with
        ``set_units`` between two steps. None when a new engine is needed (other graphs,
        or an output of another size)."""
        loop = self.loop
        if loop is None:
            return None
        old = loop.active
        engine = old.engine
        pkg = as_package(decoder, base)
        if getattr(engine, "package", None) is None or engine.package.graph_hash != pkg.graph_hash:
            return None
        plan = self._plan(pkg, labels, hint)
        if plan["package"].output_dims[plan["output"]] != len(old.labels):
            return None
        tables = UnitTables.build(plan["package"], plan["session"], plan["output"])
        self.tables = plan["tables"]
        return self._active(plan, engine, old.cursor, tables)

    def _zero_shot(self, pkg: ModelPackage, labels: list[str], hint: str):
        """The package with a new day of the stream's subject added from its earlier
        days' tables (``calibrate.zero_shot``, in numpy on the package), or None when the
        stream names no subject the model knows or none of its channels."""
        from bci_decoder.subjects import plan_warm_start, subject_sessions

        inlet = self.spike_inlet
        subject = inlet.subject_hint if inlet is not None else ""
        recorded = inlet.recorded_hint if inlet is not None else ""
        days = subject_sessions(pkg.info, subject, recorded) if subject else []
        if not days:
            return None
        output = self.cfg.output or next(iter(pkg.norms.get(days[0], {})), None)
        if output is None or output not in pkg.output_names:
            return None
        sid = hint or f"{subject}-new-day"
        warm = plan_warm_start(pkg.units.to_list(), pkg.sessions.to_list(), pkg.info, subject,
                               list(labels), recorded_at=recorded)  # fmt: skip
        if warm is None or warm.matched == 0:
            return None
        norm = pkg.norms.get(warm.nearest_session, {}).get(output)
        if norm is None:
            with_output = [d for d in days if output in pkg.norms.get(d, {})]
            if not with_output:
                log.info("no zero-shot start: no day of %r decodes %r", subject, output)
                return None
            norm = pkg.norms[with_output[0]][output]
            warm.notes.append(f"normalisation of {output} from {with_output[0]}")
        info = dict(pkg.info) | {
            "warm_start": warm.summary(),
            "calibrated": {"session": sid, "span": [], "steps": 0, "zero_shot": True},
        }
        return pkg.with_session(sid, list(labels), output, norm, warm.unit_rows,
                                warm.session_row, info)  # fmt: skip

    # ---------------------------------------------------------------- control
    @property
    def state(self) -> str:
        if self._supervisor is None:
            return "idle"
        if self.loop is None:
            return "waiting-for-stream"
        if self.loop.stalled:
            return "stalled"
        if lsl_clock() - self.loop.stats.last_error_clock < DEGRADED_HOLD_S:
            return "degraded"
        return "running"

    def start(self) -> str:
        with self._lock:
            if self._supervisor is not None:
                return self.state
            cfg = self.cfg
            self._stop.clear()
            self.spike_inlet = SpikeInletThread(
                cfg.spikes, self.ring, max_future_s=cfg.max_future_s,
                rt_priority=cfg.realtime_priority,
            )  # fmt: skip
            rec = self.recorder
            if rec is not None:
                self.spike_inlet.on_spikes = rec.spikes_in
                self.spike_inlet.on_rejected = rec.rejected_in  # with why, as received
            self.spike_inlet.start()
            if cfg.behavior is not None:
                self.behavior_inlet = BehaviorInletThread(
                    cfg.behavior, cfg.behavior_seconds, max_mb=cfg.behavior_max_mb
                )
                if rec is not None:
                    self.behavior_inlet.on_samples = rec.behavior_in
                self.behavior_inlet.start()
            self._seen_connects = 0
            self._supervisor = threading.Thread(
                target=self._supervise, name="supervisor", daemon=True
            )
            self._supervisor.start()
            return self.state

    def stop(self) -> str:
        with self._lock:
            self._stop.set()
            for th in (self.loop, self.spike_inlet, self.behavior_inlet):
                if th is not None:
                    th.stop()
            for th in (self._supervisor, self.loop, self.spike_inlet, self.behavior_inlet):
                if th is not None and th.is_alive():
                    th.join(timeout=3.0)
            self.loop = self._supervisor = None
            self.spike_inlet = self.behavior_inlet = None
            return self.state

    def close(self) -> None:
        self.stop()
        self.outlet = None
        self.gc.close()
        if self.recorder is not None:
            self.record_event("close")
            self.recorder.close()

    def raise_support_threads(self, priority: int) -> None:
        """Every normal thread of this process to SCHED_FIFO ``priority``, now and (from
        the supervisor) every second after; ``bci-decoder serve`` asks for it, /status
        reports it (priority.realtime_process)."""
        self.support_rt_priority = priority
        self.support_rt_error = realtime_process(priority)

    def _realtime(self) -> dict:
        """The hot threads' scheduling as the kernel reports it, and why real-time
        priority was refused if it was."""
        threads = {"decode_loop": self.loop, "spike_inlet": self.spike_inlet}
        out = {
            "priority": self.cfg.realtime_priority,
            "threads": {
                k: th.rt_error or policy_of(th.native_id)
                for k, th in threads.items()
                if th is not None and th.is_alive()
            },
        }
        if self.support_rt_priority is not None:  # set by ``bci-decoder serve``
            out["support_priority"] = self.support_rt_priority
            out["threads"]["others"] = self.support_rt_error or policy_of(
                threading.main_thread().native_id
            )
        return out

    def _stalled(self, now: float) -> bool:
        inlet = self.spike_inlet
        if inlet is None or inlet.state != "connected":
            return True
        if inlet.mostly_rejected(now):  # e.g. every spike stamped in the future
            return True
        return not (now - inlet.stats.last_sample_clock <= self.cfg.stall_after_s)

    def _supervise(self) -> None:
        """Build the engine when the spike stream (re)connects; start the loop once."""
        inlet = self.spike_inlet
        ticks = 0
        while not self._stop.wait(0.05):
            ticks += 1
            if self.support_rt_priority is not None and ticks % 20 == 0:
                # threads started since (by real-time threads, whose children come up
                # normal: RESET_ON_FORK) get the support priority within a second
                self.raise_support_threads(self.support_rt_priority)
            state = self.state
            if state != self._last_state:
                self.record_event("state", state=state, previous=self._last_state)
                self._last_state = state
            if inlet.connected.is_set() and inlet.stats.connects != self._seen_connects:
                info = inlet.info
                self.record_event(
                    "spike-stream", labels=list(inlet.labels), connects=inlet.stats.connects,
                    name=info.name() if info else None,
                    source_id=info.source_id() if info else None,
                    hostname=info.hostname() if info else None,
                )  # fmt: skip
                try:
                    with self._lock:
                        if self._stop.is_set():
                            return
                        self._seen_connects = inlet.stats.connects
                        self._install(
                            self.prepare(
                                self.package, self.model_dir, inlet.labels, inlet.session_hint
                            )
                        )
                except Exception:  # noqa: BLE001 - keep supervising; /status shows it
                    log.exception("could not build the engine for the new stream")
                    time.sleep(1.0)

    def _install(self, active: ActiveEngine) -> None:
        """Hand an engine to the loop (starting the loop the first time)."""
        cfg = self.cfg
        if self.outlet is None or len(self.outlet.labels) != len(active.labels):
            self.outlet = ControlOutlet(
                cfg.control_name, cfg.control_source_id, active.output, active.labels,
                cfg.cadence_hz,
            )  # fmt: skip
        if self.loop is None:
            self.loop = DecodeLoop(
                self.ring,
                active,
                self._emit,
                cadence_hz=cfg.cadence_hz,
                safe_output=cfg.safe_output,
                stalled=self._stalled,
                spin_us=cfg.spin_us,
                prime_us=cfg.prime_us,
                trace_steps=cfg.trace_steps,
                rt_priority=cfg.realtime_priority,
            )
            self.loop.start()
        else:
            old = self.loop.active
            if not self.loop.hand_over(active):
                raise DaemonError("the decode loop did not take the new engine within 2 s", 503)
            self._retire(old)
        if self.cfg.gc_freeze:
            freeze()  # the new engine's objects too; no collection (it would hold the GIL)

    def _retire(self, old: ActiveEngine) -> None:
        """Keep a replaced engine's discard counts, so /status.dropped never goes back."""
        try:
            for reason, n in old.engine.stats().rejected.items():
                self._retired_rejected[reason] = self._retired_rejected.get(reason, 0) + n
        except Exception:  # noqa: BLE001 - counting must not fail a swap
            log.exception("could not read the replaced engine's counters")

    def engine_rejected(self) -> dict[str, int]:
        """Spikes the engines (current and replaced) discarded, by reason."""
        out = dict(self._retired_rejected)
        loop = self.loop
        if loop is not None:
            try:
                for reason, n in loop.active.engine.stats().rejected.items():
                    out[reason] = out.get(reason, 0) + n
            except Exception:  # noqa: BLE001 - status must answer whatever the engine does
                pass
        return out

    def swap_decoder(
        self, decoder: ModelPackage, base: Path, name: str, calibration: str | None
    ) -> dict:
        """Serve ``decoder`` (a package) from the next step on (model load or
        calibration apply). A calibration of the running model only swaps unit tables
        into the running engine (``retable``); anything else builds a new engine."""
        decoder = as_package(decoder, base)
        with self._lock:
            prev = (self.package, self.model_dir, self.model_name, self.calibration)
            self.package, self.model_dir = decoder, base
            self.model_name, self.calibration = name, calibration
            try:
                if self.loop is not None and self.spike_inlet is not None:
                    inlet = self.spike_inlet
                    active = None
                    if base == prev[1] and self.cfg.mode == getattr(
                        self.loop.active.engine, "mode", None
                    ):
                        active = self.retable(decoder, base, inlet.labels, inlet.session_hint)
                    if active is None:
                        active = self.prepare(decoder, base, inlet.labels, inlet.session_hint)
                    self._install(active)
            except Exception:
                self.package, self.model_dir, self.model_name, self.calibration = prev
                raise
            self.record_event("model", name=name, calibration=calibration)
            return self.describe_model()

    def load_model(self, name: str, calibration: str | None = None) -> dict:
        package, base = load_package(self.cfg, name, calibration)
        return self.swap_decoder(package, base, name, calibration)

    def base_package(self) -> ModelPackage:
        """The base model (what calibrations start from), whatever is loaded now."""
        if self.calibration is None:
            return self.package
        return ModelPackage.load(self.model_dir)

    base_decoder = base_package

    def calibration_block(self, seconds: float, output: str | None, labels: bool = True) -> tuple:
        """The last ``seconds`` of recorded spikes and behaviour as a new Session.

        Returns (session, output, session hint). Refuses (409) while idle or before
        enough behaviour has been recorded. ``labels=False`` (label-free calibration):
        the spikes alone; no behaviour stream is needed, and the output is ``output`` or
        the model's first."""
        from bci_decoder.data.session import Behavior, Session

        inlet, binlet = self.spike_inlet, self.behavior_inlet
        if self.state == "idle" or inlet is None:
            raise DaemonError("the decoder is idle: POST /decoder/start and stream first", 409)
        if not labels:
            now = self.ring.newest_time
            st, su = self.ring.last_spikes(seconds, now)
            if len(st) == 0:
                raise DaemonError(
                    "no spikes in the buffer: stream spikes while decoding, then calibrate", 409
                )
            if st[-1] - st[0] < 0.5 * seconds:
                raise DaemonError(
                    f"only {st[-1] - st[0]:.1f} s of spikes buffered; asked for {seconds:g} s", 409
                )
            out = output or self.package.output_names[0]
            behavior = {}
            domain = (float(st[0]), float(st[-1]) + 1e-6)
        else:
            if binlet is None:
                raise DaemonError(
                    "no behaviour stream is configured (behavior: null); upload the data "
                    "instead, or calibrate without labels (mode 'unsupervised')",
                    409,
                )
            ring = binlet.ring
            if ring is None or len(ring) < 20:
                raise DaemonError(
                    "no behaviour recorded yet: stream the cued block's behaviour (type "
                    f"{self.cfg.behavior.type}) while decoding, then calibrate",
                    409,
                )
            out = output or binlet.output
            if out not in self.package.output_names:
                raise DaemonError(
                    f"the behaviour stream carries {out!r}, which the model does not decode "
                    f"({self.package.output_names}); pass 'output'",
                    422,
                )
            now = ring.newest_time
            bt, bx = ring.last_seconds(seconds, now)
            st, su = self.ring.last_spikes(seconds, now)
            if len(bt) < 20 or bt[-1] - bt[0] < 0.5 * seconds:
                raise DaemonError(
                    f"only {bt[-1] - bt[0] if len(bt) else 0:.1f} s of behaviour recorded; "
                    f"asked for {seconds:g} s",
                    409,
                )
            behavior = {out: Behavior(out, bt, bx)}
            domain = (float(min(bt[0], st[0] if len(st) else bt[0])), float(bt[-1]) + 1e-6)
        labels_ = list(inlet.labels) or [str(i) for i in range(int(su.max(initial=-1)) + 1)]
        keep = (su >= 0) & (su < len(labels_))
        session = Session(
            session_id="pending", subject=inlet.subject_hint or "rig", spike_times=st[keep],
            spike_units=su[keep].astype(np.int32), unit_ids=labels_,
            brain_areas=["unknown"] * len(labels_), behavior=behavior, domain=domain,
            recorded_at=inlet.recorded_hint,
        )  # fmt: skip
        return session, out, inlet.session_hint

    # ---------------------------------------------------------------- reporting
    def describe_model(self) -> dict:
        active = self.loop.active if self.loop is not None else None
        return {
            "name": self.model_name,
            "calibration": self.calibration,
            "sessions": len(self.package.sessions),
            "units": len(self.package.units) - 1,
            "outputs": self.package.output_names,
            "session": active.session if active else None,
            "output": active.output if active else None,
            "calibrated": active.calibrated if active else None,
            # which unit/session tables decode and where they came from (zero-shot: the
            # subject's earlier days, per channel)
            "tables": self.tables if active else None,
        }

    def status(self) -> dict:
        loop, inlet, binlet = self.loop, self.spike_inlet, self.behavior_inlet
        ls = loop.stats if loop is not None else None
        lat = {
            "step_ms": loop.step_ms.percentiles() if loop else None,
            "output_ms": loop.output_ms.percentiles() if loop else None,
        }
        stream = None
        if inlet is not None:
            s = inlet.stats
            info = inlet.info
            stream = {
                "state": inlet.state,
                "name": info.name() if info is not None else None,
                "source_id": info.source_id() if info is not None else None,
                "hostname": info.hostname() if info is not None else None,
                "pinned_source_id": self.cfg.spikes.source_id,
                "units": len(inlet.labels),
                "received": s.received,
                "kept": s.kept,
                "connects": s.connects,
                "losses": s.losses,
                "errors": s.error_count,
                "last_error": s.errors[-1] if s.errors else None,
                "rejected_share_1s": inlet.rejected_share(),
                "seconds_since_sample": (
                    None if np.isnan(s.last_sample_clock) else lsl_clock() - s.last_sample_clock
                ),
            }
        behavior = None
        if binlet is not None:
            ring = binlet.ring
            binfo = binlet.info
            behavior = {
                "state": binlet.state,
                "name": binfo.name() if binfo is not None else None,
                "source_id": binfo.source_id() if binfo is not None else None,
                "hostname": binfo.hostname() if binfo is not None else None,
                "rate_hz": binlet.rate or None,
                "capacity": ring.capacity if ring is not None else 0,
                "errors": binlet.stats.error_count,
                "last_error": binlet.stats.errors[-1] if binlet.stats.errors else None,
                "output": binlet.output or None,
                "channels": binlet.labels,
                "samples": len(ring) if ring is not None else 0,
                "seconds": (len(ring) / binlet.rate) if ring is not None and binlet.rate else 0.0,
            }
        # every spike that was not decoded, by where and why it was discarded
        rejected = self.engine_rejected()
        dropped = {
            "nan_time": inlet.stats.nan_time if inlet else 0,
            "future_time": inlet.stats.future if inlet else 0,
            "out_of_order": inlet.stats.out_of_order if inlet else 0,
            "bad_unit": inlet.stats.bad_unit if inlet else 0,
            "lsl_gaps": inlet.stats.seq_gaps if inlet else 0,
            "ring_overflow": ls.ring_lost if ls else 0,
            "unknown_unit": ls.unknown_unit_spikes if ls else 0,
            **{f"engine_{k}": v for k, v in sorted(rejected.items())},
            "behavior_nan": binlet.stats.nan_time if binlet else 0,
        }
        engine = None
        if loop is not None:
            try:
                es = loop.active.engine.stats()
                engine = {k: v for k, v in vars(es).items() if isinstance(v, int | float | dict)}
            except Exception:  # noqa: BLE001 - status must answer whatever the engine does
                engine = None
        state = self.state
        return {
            "state": state,
            "degraded": (ls.last_error or None) if state == "degraded" else None,
            "engine": engine,  # the engine's own counts (rejected spikes by reason, ...)
            "gc": self.gc.stats.public(),  # garbage collections and their pauses
            "realtime": self._realtime(),
            "model": self.describe_model(),
            "mode": self.cfg.mode,
            "backend": self.cfg.backend,
            "providers": self.providers,
            "cadence_hz": self.cfg.cadence_hz,
            "steps": ls.steps if ls else 0,
            "missed_deadlines": ls.missed if ls else 0,
            "late_outputs": ls.late if ls else 0,
            # deadlines whose spikes were pushed and step warmed before them (prime_us)
            "primed_deadlines": ls.primes if ls else 0,
            "prime_errors": ls.prime_errors if ls else 0,
            "prime_skipped": ls.prime_skipped if ls else 0,
            "errors": ls.errors if ls else 0,
            "non_finite_outputs": ls.non_finite_outputs if ls else 0,
            "last_error": ls.last_error if ls else "",
            "safe_steps": ls.safe_steps if ls else 0,
            "swaps": ls.swaps if ls else 0,
            "latency": lat,
            "buffer": {
                "spikes": len(self.ring),
                "capacity": self.ring.capacity,
                "fill": self.ring.fill,
            },
            "dropped": dropped,
            "unknown_units": {
                "units": len(ls.unknown_units) if ls else 0,
                "spikes": ls.unknown_unit_spikes if ls else 0,
            },
            "stream": stream,
            "behavior": behavior,
            "uptime_s": time.time() - self.started,
            "startup": self.startup,
            "recording": self.recorder.public() if self.recorder is not None else None,
        }
