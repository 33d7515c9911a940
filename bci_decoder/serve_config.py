"""The daemon's settings (``bci-decoder serve --config configs/serve.yaml``), apart from
the training configs so that serving imports no torch (``config`` re-exports them)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no config file at {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def apply_overrides(data: dict, overrides: dict | None) -> dict:
    """Set dotted keys (``"optim.steps": 10``) in a config mapping, creating parents."""
    for key, value in (overrides or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[leaf] = value
    return data


# ---------------------------------------------------------------- the daemon (serve)
class StreamSettings(BaseModel):
    """Which LSL stream to open (every field given must match). On a rig with more than
    one stream of the type, pin ``source_id`` (the sender's stable id; /status shows the
    name, source id and host of the stream the daemon opened)."""

    model_config = ConfigDict(extra="forbid")

    type: str
    name: str | None = None
    source_id: str | None = None


class ApiSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = Field(8765, ge=0, le=65535)  # 0: any free port (tests)
    # Bearer token for mutating calls. None: $BCI_DECODER_TOKEN, else a random one written
    # to <state_dir>/token at start-up.
    token: str | None = None
    # Bytes actually received per request (chunked too); over it: 413 at once. The largest
    # legitimate upload is a calibration block: 5 minutes of 200 units at 20 Hz is 1.2M
    # spikes, about 10 MB as NWB (float64 times) and 14 MB once base64-encoded, or about
    # 25 MB as JSON arrays; 32 MB holds that with room, and bounds what a request costs.
    max_body_mb: int = Field(32, ge=1)


class RecordingSettings(BaseModel):
    """``recording:``: everything in and out, appended to an HDF5 file (runtime/recorder.py)."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = None  # file or folder; None: <state_dir>/recordings/<start time>.h5
    flush_s: float = Field(1.0, gt=0, le=1.0)  # the most a SIGKILL can lose
    queue_spikes: int = Field(4_000_000, ge=10_000)  # preallocated hand-off from the inlet
    queue_outputs: int = Field(65_536, ge=1000)  # ... from the decode loop


class ServeConfig(BaseModel):
    """``bci-decoder serve --config configs/serve.yaml``: every setting of the daemon."""

    model_config = ConfigDict(extra="forbid")

    # a folder name under models_dir (a name, never a path: nothing outside models_dir)
    model: str = Field("poyo-mp-small", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    models_dir: str = "models"
    calibration: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    session: str | None = None  # model session the stream's units belong to (None: ask the
    # stream's desc/session; an unknown session decodes uncalibrated until calibrated)
    output: str | None = None  # behaviour to decode (None: the session's own)
    mode: Literal["causal", "window"] = "causal"
    backend: Literal["onnx"] = "onnx"  # the torch reference runs in tests, never served
    onnx_threads: int = Field(1, ge=1)
    # spikes one latent group (50 ms for the shipped models) may hold; more are dropped
    # and counted as overflow. 16,384 covers 2,000 units at 160 Hz; the buffer costs
    # 2 x capacity x heads x 32 float32 (4 MB here) and a step reads only the rows in use
    max_spikes_per_group: int = Field(16_384, ge=64, le=1_048_576)
    cadence_hz: float = Field(100.0, gt=0, le=2000)
    # a spike of the latent group just finished that arrives late (LSL delivers in
    # bursts) still joins it while no step has gone past the group's end by more than
    # this; the group is then finished again with it (one more finish run, only for a
    # group that got late spikes; runtime/engine.py). Later ones are dropped and counted
    # (engine_late). At 1 kHz 22% of spikes came after their group's first step past its
    # end; 0: drop them all, as before
    late_grace_s: float = Field(0.02, ge=0, le=1.0)
    safe_output: Literal["hold", "zero"] = "hold"  # what is sent while the stream is stalled
    stall_after_s: float = Field(0.5, gt=0)  # no spike for this long: stalled
    # a spike stamped further than this ahead of the LSL clock is rejected (counted as
    # future_time); a stream whose spikes are mostly rejected for a second is stalled
    max_future_s: float = Field(1.0, gt=0)
    spin_us: float = Field(150.0, ge=0)  # busy-wait before each deadline (sleep jitter)
    # this long before each deadline, push the spikes that have arrived and run the step
    # once, output discarded, so the deadline's step finds warm caches (a cold step cost
    # 1.4 ms at 100 Hz against 0.45 ms warm); off where the hop is under twice this
    # (1 kHz), 0: off. Costs one more step of CPU per deadline
    prime_us: float = Field(2000.0, ge=0)
    # freeze the start-up heap out of the cyclic GC (runtime/gc_pauses.py): a full
    # collection of it would hold the GIL ~150 ms, but none came in 3-minute runs, and
    # with the freeze model swaps held the loop up longer (largest interval 40-50 ms vs
    # 10 ms, benchmarks/swap_gap.py); off until that is understood
    gc_freeze: bool = False
    # SCHED_FIFO priority (1-99) for the decode loop and the spike inlet thread, so other
    # processes on the machine cannot delay a step; None: normal scheduling. Needs root,
    # CAP_SYS_NICE or an rtprio limit; refused, it is reported in /status (runtime/priority.py)
    realtime_priority: int | None = Field(None, ge=1, le=99)
    # ... and with it, every other thread of the serve process (REST server, behaviour
    # inlet, recorder, liblsl's I/O threads) at SCHED_FIFO this much lower (at least 1):
    # at normal priority one of them, preempted by another process while it held the GIL
    # or a lock, held the loop up (2,000 units at 100 Hz beside process-spawning and disk
    # load: 5.3% missed with them normal, 0.04% with them real-time). None: they stay
    # normal. Applied by ``bci-decoder serve`` only (a daemon inside another process, as
    # in the tests, leaves that process's threads alone), and only with onnx_threads 1
    # (ONNX Runtime's pool threads spin: real-time, they would hold a core)
    realtime_support_offset: int | None = Field(10, ge=1, le=98)
    # the calibration fit's process: "idle" (SCHED_IDLE and nice 10) runs only on CPU time
    # nothing else wants, so the decode loop never waits behind it, but beside other busy
    # work (a shared machine, a test suite in two processes) a fit may wait minutes; "low"
    # (nice 10 alone) gets a small share of a busy core and can delay a step on 2 cores
    calibration_priority: Literal["idle", "low"] = "idle"
    spikes: StreamSettings = Field(default_factory=lambda: StreamSettings(type="Spikes"))
    behavior: StreamSettings | None = Field(default_factory=lambda: StreamSettings(type="Behavior"))
    control_name: str = "bci_decoder"
    control_source_id: str = "bci_decoder-control"
    ring_spikes: int = Field(4_000_000, ge=1000)  # spike ring capacity
    behavior_seconds: float = Field(600.0, gt=0)  # behaviour recorded for calibration
    behavior_max_mb: float = Field(64.0, gt=0)  # ... but never more memory than this
    autostart: bool = False  # start decoding without waiting for POST /decoder/start
    state_dir: str = "out/serve"  # token file, ONNX cache, logs
    trace_steps: int = Field(0, ge=0)  # record (t, ring cursor) of the first N steps (tests)
    api: ApiSettings = Field(default_factory=ApiSettings)
    recording: RecordingSettings | None = None  # null: nothing recorded


def load_serve_config(path: str | Path | None, overrides: dict | None = None) -> ServeConfig:
    """Read the daemon's config (defaults for everything when ``path`` is None)."""
    data = load_yaml(path) if path else {}
    return ServeConfig(**apply_overrides(data, overrides))
