"""A session's recurrent readout: a GRU over the decoder's features, in numpy.

The linear heads read the decoder's normalised features y(t) (D) at one time. A session
readout reads their history too, POSSM's recurrent backbone in its smallest form: a GRU
advances once per latent group, at the group's end time g·step, on the features there
(the finish run's readout: the group with all its spikes), and the output at any time t
is a linear head on one more GRU cell applied to y(t) from the state of the groups that
ended before t:

    h_g  = cell(h_{g-1}, x(g·step))           at each finished group, h = 0 at the start
    z(t) = head(cell(h_{g(t)-1}, x(t)))        g(t): the group that owns t
    x    = (y - in_mean) / in_std              the features, z-scored on the fit's data

so it is a function of the spikes up to t, as the heads are, and does not depend on the
cadence the engine is stepped at. z is in the output's normalised units (the session's
``Normalizer`` turns it into behaviour). Fitted per session on the training part, its
step chosen on the validation tail (``train/session_readout_fit.py``); served by the
streaming engine in causal mode (``runtime/engine.py``) and by offline decoding, the
same arithmetic in both (float32, this module).

Spike counts (``counts`` C > 0, POSSM's and the GRU baseline's input): the readout may
also read each unit's spike count in the group that owns t, up to t (at a group's end,
the whole group), as sqrt counts z-scored with the features: x = ([y | sqrt(c)] - in_mean)
/ in_std, the last C columns one per unit of the session, in the unit tables' order
(``for_units`` reorders them). The features summarise the population through 0.3 M
parameters shared by every session; the counts give the GRU each unit's own rate, which
the reference GRU lives on: on the three real sessions where the readout lost to it
(scratch measurement, frozen ``poyo-mp-small`` features, issue 8's note) they raised
the test R² 0.949 -> 0.966 (Jango 2016-06-26) and 0.716 -> 0.734 (millerlab), the
validation tail's by as much. The fit chooses with or without counts on the validation
tail (they overfit sessions of a few minutes); with that choice ``poyo-mp-small`` scores
0.820 on the seven, ahead of the reference GRU on all seven
(benchmarks/results/evaluate_readout.json).

Why: on the seven real sessions a GRU over the frozen ``poyo-mp-small`` features
(1 layer of 128, each session's training part) raised the mean causal test R² from
0.773 to 0.810 (scratch measurement, issue 8's note), where a session's own linear
readout of the same features gave 0.788 and a GRU on the 4 head outputs 0.840 vs 0.824
on three sessions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ARRAYS = ("w_ih", "w_hh", "b_ih", "b_hh", "head_w", "head_b", "in_mean", "in_std")
OPTIONAL = ("counts",)  # absent in a readout of features only (C = 0)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """In place (x is a temporary); tanh: no overflow warning for large |x|."""
    x *= 0.5
    np.tanh(x, out=x)
    x += 1.0
    x *= 0.5
    return x


@dataclass(frozen=True, eq=False)
class SessionReadout:
    """Weights as torch's ``nn.GRU`` (gates r, z, n stacked) and ``nn.Linear`` hold them.

    w_ih (3H, D + C), w_hh (3H, H), b_ih (3H,), b_hh (3H,), head_w (O, H), head_b (O,),
    in_mean / in_std (D + C,): the inputs' z-scoring; counts (1,): C, the units whose
    sqrt spike counts are the last C inputs (0: features only)."""

    w_ih: np.ndarray
    w_hh: np.ndarray
    b_ih: np.ndarray
    b_hh: np.ndarray
    head_w: np.ndarray
    head_b: np.ndarray
    in_mean: np.ndarray
    in_std: np.ndarray
    counts: np.ndarray | int = 0

    def __post_init__(self) -> None:
        for name in ARRAYS:
            a = np.ascontiguousarray(getattr(self, name), dtype=np.float32)
            a.flags.writeable = False
            object.__setattr__(self, name, a)
        c = np.asarray(self.counts).reshape(-1)
        if c.size != 1 or not 0 <= int(c[0]) < self.in_mean.size:
            raise ValueError(f"session readout: counts must be one integer in [0, inputs), "
                             f"got {self.counts!r}")  # fmt: skip
        object.__setattr__(self, "counts", np.array([int(c[0])], np.int64))
        H, D = self.hidden, self.in_mean.size
        shapes = {
            "w_ih": (3 * H, D), "w_hh": (3 * H, H), "b_ih": (3 * H,), "b_hh": (3 * H,),
            "head_w": (self.head_b.size, H), "in_std": (D,),
        }  # fmt: skip
        for name, shape in shapes.items():
            if getattr(self, name).shape != shape:
                raise ValueError(
                    f"session readout: {name} has shape {getattr(self, name).shape}, "
                    f"expected {shape}"
                )
        if not all(np.isfinite(getattr(self, n)).all() for n in ARRAYS):
            raise ValueError("session readout: its weights hold non-finite values")
        # what a step multiplies by, laid out once (transposed, contiguous; the inputs'
        # z-scoring folded into W_ih and b_ih): a cell costs ~10 µs, not ~20
        wi = self.w_ih / self.in_std  # (3H, D + C)
        F = self.features
        derived = {
            "_wi": np.ascontiguousarray(wi[:, :F].T),  # (D, 3H)
            "_wc": np.ascontiguousarray(wi[:, F:].T),  # (C, 3H)
            "_bi": (self.b_ih - wi @ self.in_mean).astype(np.float32),
            "_wh": np.ascontiguousarray(self.w_hh.T),  # (H, 3H)
            "_wo": np.ascontiguousarray(self.head_w.T),  # (H, O)
        }
        for name, a in derived.items():
            object.__setattr__(self, name, a)

    @property
    def hidden(self) -> int:
        return self.w_hh.shape[1]

    @property
    def features(self) -> int:
        """D: the decoder features it reads."""
        return self.in_mean.size - self.units

    @property
    def units(self) -> int:
        """C: the units whose spike counts it reads (0: none)."""
        return int(self.counts[0])

    @property
    def outputs(self) -> int:
        return self.head_b.size

    def zero_state(self, batch: tuple[int, ...] = ()) -> np.ndarray:
        return np.zeros((*batch, self.hidden), np.float32)

    def inputs(self, y: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
        """Features y (..., D) and, where the readout reads them, spike counts (..., C)
        -> the cell's inputs W_ih·x + b_ih (..., 3H), x z-scored. Computed for many
        times at once where they are known in advance."""
        gi = np.asarray(y, np.float32) @ self._wi
        gi += self._bi
        if self.units:
            if counts is None:
                raise ValueError("this session readout reads spike counts: pass them")
            gi += np.sqrt(np.asarray(counts, np.float32)) @ self._wc
        return gi

    def cell(self, h: np.ndarray, gi: np.ndarray) -> np.ndarray:
        """One GRU step: state h (..., H), input part gi (..., 3H) from ``inputs``."""
        H = self.hidden
        gh = h @ self._wh
        gh += self.b_hh
        rz = _sigmoid(gi[..., : 2 * H] + gh[..., : 2 * H])  # reset and update gates
        n = gh[..., 2 * H :] * rz[..., :H]
        n += gi[..., 2 * H :]
        np.tanh(n, out=n)
        out = h - n  # h' = (1 - z)·n + z·h = n + z·(h - n)
        out *= rz[..., H:]
        out += n
        return out

    def head(self, h: np.ndarray) -> np.ndarray:
        """State(s) (..., H) -> normalised outputs (..., O)."""
        return h @ self._wo + self.head_b

    def scan(
        self, y: np.ndarray, counts: np.ndarray | None = None, h0: np.ndarray | None = None
    ) -> np.ndarray:
        """States (T+1, H) after each of T group-end features y (T, D) and counts
        (T, C), from h0 (zeros): row 0 is h0, row i the state after the first i groups."""
        gi = self.inputs(y, counts)
        out = np.empty((len(gi) + 1, self.hidden), np.float32)
        out[0] = self.zero_state() if h0 is None else h0
        for i in range(len(gi)):
            out[i + 1] = self.cell(out[i], gi[i])
        return out

    def outputs_at(
        self, states: np.ndarray, y: np.ndarray, counts: np.ndarray | None = None
    ) -> np.ndarray:
        """Normalised outputs (Q, O) at queries with features y (Q, D) and counts
        (Q, C), each from the state (Q, H) of the groups that ended before it."""
        return self.head(self.cell(states, self.inputs(y, counts)))

    def for_units(self, index: np.ndarray) -> SessionReadout:
        """The same readout reading counts in another unit order: new unit j is old
        unit ``index[j]``. Old units left out never spike: their constant input
        (count 0) is folded into b_ih. A readout of features only is returned as it is."""
        if not self.units:
            return self
        index = np.asarray(index, np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= self.units
                           or np.unique(index).size != index.size):  # fmt: skip
            raise ValueError(f"session readout: a unit order must pick distinct units of its "
                             f"{self.units}, got {index.tolist()}")  # fmt: skip
        F = self.features
        gone = np.setdiff1d(np.arange(self.units), index) + F
        cols = np.concatenate([np.arange(F), F + index])
        a = self.to_arrays()
        a["b_ih"] = self.b_ih - self.w_ih[:, gone] @ (self.in_mean[gone] / self.in_std[gone])
        a["w_ih"], a["in_mean"], a["in_std"] = (
            a[k][..., cols] for k in ("w_ih", "in_mean", "in_std")
        )
        a["counts"] = np.array([index.size])
        return SessionReadout(**a)

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        return {prefix + name: getattr(self, name) for name in ARRAYS + OPTIONAL}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str = "") -> SessionReadout:
        missing = [prefix + n for n in ARRAYS if prefix + n not in arrays]
        if missing:
            raise ValueError(f"session readout: missing arrays {missing}")
        optional = {n: arrays[prefix + n] for n in OPTIONAL if prefix + n in arrays}
        return cls(**{n: arrays[prefix + n] for n in ARRAYS}, **optional)


def key_prefix(session_id: str, output: str) -> str:
    """Where a readout's arrays live in a tables file (``readout/SESSION/OUTPUT/``)."""
    return f"readout/{session_id}/{output}/"


def readouts_in(arrays: dict[str, np.ndarray]) -> dict[tuple[str, str], SessionReadout]:
    """Every readout stored in ``arrays`` under ``key_prefix``, by (session, output)."""
    found = {}
    for key in arrays:
        if key.startswith("readout/") and key.endswith("/w_ih"):
            session_id, output = key[len("readout/") : -len("/w_ih")].rsplit("/", 1)
            found[(session_id, output)] = SessionReadout.from_arrays(
                arrays, key_prefix(session_id, output)
            )
    return found
