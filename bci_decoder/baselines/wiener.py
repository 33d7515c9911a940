"""Wiener filter: ridge regression from a few lagged bins of spike counts to behaviour.

The classic BCI decoder and the first bar any learned model must clear. Features are raw
counts (centred, not standardised: scaling every unit to unit variance inflates the
noise of sparse units and cost up to 0.09 R² on the small real sessions), and the ridge
penalty is picked on the last part of the training data (never on test data).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bci_decoder.metrics import r2_score

# Relative penalties: alpha = lam * mean diagonal of the centred Gram matrix, so the
# grid means the same for any count scale, bin width or number of samples.
DEFAULT_LAMBDAS: tuple[float, ...] = (1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)


def flatten_lags(X: np.ndarray, num_lags: int) -> np.ndarray:
    """(T, K, U) lagged counts -> (T, num_lags * U); a 2-D input is taken as flattened."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 2:
        return X
    if X.ndim != 3 or X.shape[1] < num_lags:
        raise ValueError(f"expected (T, K>={num_lags}, U) lagged counts, got {X.shape}")
    return X[:, :num_lags].reshape(len(X), -1)


class _Ridge:
    """Ridge on centred data solved through one eigendecomposition, so a whole grid of
    penalties costs one factorisation."""

    def __init__(self, X: np.ndarray, Y: np.ndarray) -> None:
        self.x_mean = X.mean(0)  # (F,)
        self.y_mean = Y.mean(0)  # (D,)
        Xc = X - self.x_mean  # (N, F)
        self.evals, self.evecs = np.linalg.eigh(Xc.T @ Xc)  # (F,), (F, F)
        self.proj = self.evecs.T @ (Xc.T @ (Y - self.y_mean))  # (F, D)
        self.scale = max(float(self.evals.sum()) / len(self.evals), 1e-12)  # mean Gram diag

    def weights(self, lam: float) -> np.ndarray:
        alpha = lam * self.scale
        return self.evecs @ (self.proj / (self.evals + alpha)[:, None])  # (F, D)


class WienerFilter:
    """Ridge on ``num_lags`` lagged bins of counts (flattened) plus a bias.

    ``fit`` picks the penalty on the last ``valid_fraction`` of the samples (in time
    order) from ``lambdas`` unless ``lam`` is fixed, then refits on all samples.
    """

    def __init__(
        self,
        num_lags: int = 5,
        lambdas: Sequence[float] = DEFAULT_LAMBDAS,
        valid_fraction: float = 0.1,
        lam: float | None = None,
    ) -> None:
        self.num_lags = num_lags
        self.lambdas = tuple(lambdas)
        self.valid_fraction = valid_fraction
        self.lam = lam
        self.valid_r2: dict[float, float] = {}

    def fit(self, X: np.ndarray, Y: np.ndarray) -> WienerFilter:
        """X: (T, K, U) lagged counts (lag 0 first) or (T, F); Y: (T, D), in time order."""
        F = flatten_lags(X, self.num_lags)  # (T, F)
        Y = np.asarray(Y, dtype=np.float64).reshape(len(F), -1)  # (T, D)
        lam = self.lam
        if lam is None:
            cut = int(round(len(F) * (1.0 - self.valid_fraction)))
            ridge = _Ridge(F[:cut], Y[:cut])
            for cand in self.lambdas:
                pred = (F[cut:] - ridge.x_mean) @ ridge.weights(cand) + ridge.y_mean
                self.valid_r2[cand] = r2_score(Y[cut:], pred)
            lam = max(self.valid_r2, key=self.valid_r2.__getitem__)
        self.lam_ = float(lam)
        ridge = _Ridge(F, Y)
        self.coef_ = ridge.weights(self.lam_)  # (F, D)
        self.intercept_ = ridge.y_mean - ridge.x_mean @ self.coef_  # (D,)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """(T, K, U) or (T, F) -> (T, D) behaviour; each row uses only its own row of X."""
        return flatten_lags(X, self.num_lags) @ self.coef_ + self.intercept_
