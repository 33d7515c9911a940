"""/status as Prometheus text."""

from __future__ import annotations

import numbers


def _line(name: str, value: float | int | None, help_: str, kind: str = "gauge") -> str:
    # counts exactly: ".6g" wrote 1,005,518 late spikes as 1.00552e+06
    if value is None:
        v = "NaN"
    elif isinstance(value, numbers.Integral):  # numpy integers too
        v = str(int(value))
    else:
        v = f"{float(value):.6g}"
    return f"# HELP bci_{name} {help_}\n# TYPE bci_{name} {kind}\nbci_{name} {v}\n"


def prometheus_text(s: dict) -> str:
    states = ["idle", "waiting-for-stream", "running", "degraded", "stalled"]
    out = ["# HELP bci_state 1 for the current state\n# TYPE bci_state gauge\n"]
    out += [f'bci_state{{state="{x}"}} {int(s["state"] == x)}\n' for x in states]
    out.append(_line("steps_total", s["steps"], "decode steps", "counter"))
    out.append(_line("missed_deadlines_total", s["missed_deadlines"], "missed", "counter"))
    out.append(_line("step_errors_total", s["errors"], "failed steps", "counter"))
    out.append(_line("safe_steps_total", s["safe_steps"], "safe-value steps", "counter"))
    out.append(_line("cadence_hz", s["cadence_hz"], "decode cadence"))
    out.append(_line("buffer_fill", s["buffer"]["fill"], "spike ring fill (0-1)"))
    for reason, n in s["dropped"].items():
        out.append(_line(f"dropped_{reason}_total", n, f"samples dropped: {reason}", "counter"))
    out.append(_line("unknown_unit_spikes_total", s["unknown_units"]["spikes"], "", "counter"))
    for which in ("step_ms", "output_ms"):
        for q, v in (s["latency"][which] or {}).items():
            out.append(_line(f"latency_{which}_{q}", v, f"{which} percentile {q}"))
    return "".join(out)
