"""StreamingEngine: causal-mode decoding one step at a time, with cached latent groups.

Per spike (on arrival): one table lookup and one rotation with float64-exact phases.
Per step: one run of the group-step graph for the current (partial) group, plus one per
group that finished since the last step, whose states go into a ring of the last
``context - step`` seconds of groups. Nothing else is recomputed.

Backends run the same ``CausalStep`` graph: ``torch`` (reference) or ``onnx`` (ONNX
Runtime; CUDA when present, else CPU).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bci_decoder.model.step import CausalStep, WindowStep
from bci_decoder.tokenizer import grid_index
from bci_decoder.train.checkpoint import Decoder


def _phases(t: float | np.ndarray, periods: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy twin of ``rotary_phases``: float64 (t mod P) first, then the angle."""
    t = np.asarray(t, dtype=np.float64)
    angle = (2 * math.pi) * (np.remainder(t[..., None], periods) / periods)
    cos = np.ones((*t.shape, half), np.float32)
    sin = np.zeros((*t.shape, half), np.float32)
    cos[..., : periods.size] = np.cos(angle)
    sin[..., : periods.size] = np.sin(angle)
    return cos, sin


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """numpy twin of ``rotate`` for x (..., H, Dh), phases (..., Dh/2)."""
    half = cos.shape[-1]
    a, b = x[..., :half], x[..., half:]
    c, s = cos[..., None, :], sin[..., None, :]
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


@dataclass
class EngineStats:
    steps: int = 0
    groups_finished: int = 0
    spikes: int = 0
    rejected_out_of_order: int = 0
    rejected_unknown_unit: int = 0
    rejected_overflow: int = 0
    step_ms: list[float] = field(default_factory=list)


class TorchStepRunner:
    """Runs a step module (``CausalStep`` or ``WindowStep``) with torch: the reference."""

    def __init__(self, step: torch.nn.Module) -> None:
        self.step = step.eval()

    @torch.no_grad()
    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = self.step(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        return [o.numpy() for o in out] if isinstance(out, tuple) else [out.numpy()]


class StreamingEngine:
    """Decode one session's stream. ``push`` spikes (session-local unit indices), then
    ``step(t)`` returns the behaviour at t (in the behaviour's units).

    ``mode="causal"``: cached latent groups (the fast path). ``mode="window"``: a ring of
    the last ``context`` seconds of spike keys; latents recomputed every step.
    """

    def __init__(
        self,
        decoder: Decoder,
        session_id: str,
        output: str | None = None,
        *,
        mode: str = "causal",
        backend: str = "torch",
        max_spikes_per_group: int = 2048,
        max_spikes_per_window: int = 8192,
        onnx_path: str | None = None,
    ) -> None:
        if mode not in ("causal", "window"):
            raise ValueError(f"mode must be 'causal' or 'window', not {mode!r}")
        self.mode = mode
        self.decoder = decoder
        model = decoder.model.eval()
        c = self.config = decoder.config
        self.step_s = c.latent_step
        self.n = c.latents_per_group
        self.depth = c.depth
        self.dim = c.dim
        self.half = c.dim_head // 2
        self.periods = model.periods.numpy()
        self.L = max(c.context_groups - 1, 1) * self.n
        self.capacity = max_spikes_per_group
        self.ring_capacity = max_spikes_per_window
        self.K = int(round(c.context / c.latent_step))
        if backend == "torch":
            self.runner = TorchStepRunner(
                CausalStep(model) if mode == "causal" else WindowStep(model)
            )
        elif backend == "onnx":
            from bci_decoder.runtime.onnx_runner import OnnxStepRunner

            if onnx_path is None:
                raise ValueError(
                    "the onnx backend needs the folder written by `bci-decoder export`"
                )
            name = "causal_step.onnx" if mode == "causal" else "window_step.onnx"
            self.runner = OnnxStepRunner(str(Path(onnx_path) / name))
        else:
            raise ValueError(f"backend must be 'torch' or 'onnx', not {backend!r}")
        self.stats = EngineStats()
        self.set_session(session_id, output)
        self.reset()

    # ------------------------------------------------------------------ set-up
    def set_session(self, session_id: str, output: str | None = None) -> None:
        dec = self.decoder
        if session_id not in dec.sessions:
            raise KeyError(f"session {session_id!r} is unknown to this model; calibrate it first")
        self._sid = session_id
        norms = dec.norms.get(session_id, {})
        output = output or next(iter(norms), dec.model.output_names[0])
        self.output = output
        self.norm = norms[output]
        m = dec.model
        with torch.no_grad():
            q = (
                m.session_emb.weight[dec.sessions[session_id]]
                + m.output_emb.weight[dec.output_index(output)]
            )
        self.query = q.numpy().astype(np.float32)
        names = m.output_names
        offsets = np.cumsum([0] + [m.output_dims[k] for k in names])
        i = names.index(output)
        self.out_slice = slice(int(offsets[i]), int(offsets[i + 1]))
        prefix = f"{session_id}/"
        unit_names = [u[len(prefix) :] for u in dec.units.names if u.startswith(prefix)]
        self.set_units(unit_names)

    def set_units(self, unit_names: list[str]) -> None:
        """(Re)build the per-unit tables from the decoder (atomic: tables swap at once)."""
        dec = self.decoder
        m = dec.model
        with torch.no_grad():
            k_tab, v_tab = m.enc_attn.keys_values(m.unit_emb.weight)  # (V, H, Dh)
            emb = m.unit_emb.weight.clone()
        self.k_tab = k_tab.numpy().astype(np.float32)
        self.v_tab = v_tab.numpy().astype(np.float32)
        self.emb = emb.numpy().astype(np.float32)
        self.rotate_values = m.config.rotate_values
        # session-local index -> vocabulary index
        self.unit_names = list(unit_names)
        self.local_to_vocab = np.array(
            [dec.units[f"{self._sid}/{u}"] for u in unit_names], dtype=np.int64
        )

    def reset(self) -> None:
        H, Dh = self.k_tab.shape[1], self.k_tab.shape[2]
        self.group = None  # grid index of the current group
        self.k_buf = np.zeros((self.capacity, H, Dh), np.float32)
        self.v_buf = np.zeros((self.capacity, H, Dh), np.float32)
        self.count = 0
        self.unit_sum = np.zeros(self.dim, np.float32)
        self.cache_states = np.zeros((self.depth + 1, self.L, self.dim), np.float32)
        self.cache_time = np.zeros(self.L, np.float64)
        self.cache_group = np.full(self.L, -(2**62), np.int64)
        self.cache_cos = np.ones((self.L, self.half), np.float32)
        self.cache_sin = np.zeros((self.L, self.half), np.float32)
        self.cache_slot = 0
        self.last_time = -np.inf
        # window mode: ring of the last spikes (keys cached on arrival)
        R = self.ring_capacity
        self.ring_k = np.zeros((R, H, Dh), np.float32)
        self.ring_v = np.zeros((R, H, Dh), np.float32)
        self.ring_t = np.full(R, -np.inf, np.float64)
        self.ring_u = np.zeros(R, np.int64)
        self.ring_head = 0

    # ------------------------------------------------------------------ spikes
    def push(self, times: np.ndarray, units: np.ndarray) -> int:
        """Add spikes (float64 times, session-local unit indices), in time order.

        Spikes older than the newest one already pushed, and unknown units, are counted
        and dropped (never silently). Returns the number accepted.
        """
        times = np.asarray(times, dtype=np.float64)
        units = np.asarray(units, dtype=np.int64)
        ok = np.isfinite(times)
        known = (units >= 0) & (units < len(self.local_to_vocab))
        self.stats.rejected_unknown_unit += int((ok & ~known).sum())
        ok &= known
        accepted = 0
        for t, u in zip(times[ok], units[ok], strict=True):
            if t < self.last_time:
                self.stats.rejected_out_of_order += 1
                continue
            if self.mode == "causal":
                self._advance_to(int(grid_index(t, self.step_s)))
            if self.mode == "causal" and self.count >= self.capacity:
                self.stats.rejected_overflow += 1
                continue
            vocab = self.local_to_vocab[u]
            cos, sin = _phases(t, self.periods, self.half)
            k = _rotate(self.k_tab[vocab], cos, sin)
            v = self.v_tab[vocab]
            v = _rotate(v, cos, sin) if self.rotate_values else v
            if self.mode == "causal":
                self.k_buf[self.count], self.v_buf[self.count] = k, v
                self.unit_sum += self.emb[vocab]
                self.count += 1
            else:
                h = self.ring_head
                if np.isfinite(self.ring_t[h]) and self.ring_t[h] > t - self.config.context:
                    self.stats.rejected_overflow += 1  # would overwrite a spike still in use
                self.ring_k[h], self.ring_v[h], self.ring_t[h], self.ring_u[h] = k, v, t, vocab
                self.ring_head = (h + 1) % self.ring_capacity
            self.last_time = t
            accepted += 1
        self.stats.spikes += accepted
        return accepted

    # ------------------------------------------------------------------ steps
    def _feeds(self, t: float, elapsed: float) -> dict[str, np.ndarray]:
        cos, sin = _phases(t, self.periods, self.half)
        g = self.group
        valid = (self.cache_group < g) & (self.cache_group > g - self.config.context_groups)
        return {
            "spike_k": self.k_buf,
            "spike_v": self.v_buf,
            "spike_mask": np.arange(self.capacity) < self.count,
            "unit_sum": self.unit_sum,
            "elapsed": np.array([elapsed], np.float32),
            "q_cos": cos,
            "q_sin": sin,
            "cache_states": self.cache_states,
            "cache_cos": self.cache_cos,
            "cache_sin": self.cache_sin,
            "cache_dt": (t - self.cache_time).astype(np.float32),
            "cache_mask": valid,
            "query": self.query,
        }

    def _finish_group(self) -> None:
        """Run the current group at its end time and cache its states."""
        g = self.group
        tau = g * self.step_s
        _, states = self.runner(self._feeds(tau, 1.0))  # (depth+1, n, D)
        for j in range(self.n):
            s = self.cache_slot
            self.cache_states[:, s] = states[:, j]
            self.cache_time[s] = tau
            self.cache_group[s] = g
            self.cache_cos[s], self.cache_sin[s] = _phases(tau, self.periods, self.half)
            self.cache_slot = (s + 1) % self.L
        self.count = 0
        self.unit_sum[:] = 0
        self.stats.groups_finished += 1

    def _advance_to(self, g: int) -> None:
        """Make ``g`` the current group, finishing every group before it."""
        if self.group is None:
            self.group = g
            return
        while self.group < g:
            self._finish_group()
            self.group += 1

    def _window_feeds(self, t: float) -> dict[str, np.ndarray]:
        W, s, n, K = self.config.context, self.step_s, self.n, self.K
        mask = (self.ring_t > t - W) & (self.ring_t <= t)
        # the same float64 expressions as tokenize_window / forward_window
        lt = t - W + s * np.arange(1, K + 1, dtype=np.float64)  # (K,)
        start = lt[0] - s
        slot = np.clip(np.ceil((self.ring_t[mask] - start) / s).astype(np.int64) - 1, 0, K - 1)
        group_sum = np.zeros((K, self.dim), np.float32)
        np.add.at(group_sum, slot, self.emb[self.ring_u[mask]])
        lc, ls = _phases(lt, self.periods, self.half)
        dc, ds = _phases(t, self.periods, self.half)
        tt = np.repeat(lt, n)
        return {
            "spike_k": self.ring_k,
            "spike_v": self.ring_v,
            "spike_mask": mask,
            "group_sum": group_sum,
            "lat_cos": lc,
            "lat_sin": ls,
            "self_dt": np.abs(tt[:, None] - tt[None, :]).astype(np.float32),
            "dec_dt": np.abs(t - tt).astype(np.float32),
            "dec_cos": dc,
            "dec_sin": ds,
            "query": self.query,
        }

    def step(self, t: float) -> np.ndarray:
        """Behaviour at time t from every spike pushed so far with time <= t."""
        t0 = time.perf_counter()
        if self.mode == "window":
            pred = self.runner(self._window_feeds(t))[0]
            self.stats.steps += 1
            self.stats.step_ms.append((time.perf_counter() - t0) * 1e3)
            return self.norm.inverse(pred[self.out_slice])
        g = int(grid_index(t, self.step_s))
        if self.group is not None and g < self.group:
            raise ValueError(f"step time {t} is before the current group; steps must move forward")
        self._advance_to(g)
        elapsed = (t - (g - 1) * self.step_s) / self.step_s
        pred = self.runner(self._feeds(t, elapsed))[0]
        self.stats.steps += 1
        self.stats.step_ms.append((time.perf_counter() - t0) * 1e3)
        return self.norm.inverse(pred[self.out_slice])
