"""Kalman filter decoder (Wu et al. 2006 style), the standard linear-Gaussian baseline.

State x_t = behaviour (optionally stacked with its previous value, giving second-order
dynamics); observation z_t = sqrt counts of the current causal bin. Every matrix is fit
by least squares on training data, and decoding runs the steady-state filter forward in
time, so the estimate at t depends only on observations up to t.
"""

from __future__ import annotations

import numpy as np


def _lstsq(X: np.ndarray, Y: np.ndarray, ridge: float = 1e-6) -> np.ndarray:
    """B minimising ||Y - X B||² (+ a tiny ridge for rank-deficient X); (F, D)."""
    G = X.T @ X
    G += ridge * np.trace(G) / len(G) * np.eye(len(G))
    return np.linalg.solve(G, X.T @ Y)


class KalmanFilter:
    """Linear-Gaussian decoder: x_t = A x_{t-1} + w (cov W), z_t = H x_t + q (cov Q).

    ``augment_lag`` stacks [y_t, y_{t-1}] as the state; ``sqrt`` takes sqrt counts as
    observations (variance-stabilised, closer to Gaussian); ``q_shrink`` pulls Q towards
    its diagonal, which keeps it well conditioned when units outnumber samples.
    """

    def __init__(
        self,
        augment_lag: bool = True,
        sqrt: bool = True,
        q_shrink: float = 0.1,
        max_iter: int = 5000,
        tol: float = 1e-10,
    ) -> None:
        self.augment_lag = augment_lag
        self.sqrt = sqrt
        self.q_shrink = q_shrink
        self.max_iter = max_iter
        self.tol = tol

    def _observe(self, X: np.ndarray) -> np.ndarray:
        """(T, K, U) lagged counts or (T, U) current-bin counts -> (T, U) observations."""
        X = np.asarray(X, dtype=np.float64)
        Z = X[:, 0] if X.ndim == 3 else X  # lag 0: the bin ending at t
        return np.sqrt(Z) if self.sqrt else Z

    def _state(self, Y: np.ndarray) -> np.ndarray:
        """(T, D) behaviour -> (T, S) states; the first sample repeats itself as its lag."""
        if not self.augment_lag:
            return Y
        prev = np.concatenate([Y[:1], Y[:-1]], axis=0)
        return np.concatenate([Y, prev], axis=1)

    def fit(self, X: np.ndarray, Y: np.ndarray) -> KalmanFilter:
        """X: (T, K, U) lagged counts; Y: (T, D) behaviour; consecutive samples in time."""
        Z = self._observe(X)  # (T, U)
        Y = np.asarray(Y, dtype=np.float64).reshape(len(Z), -1)  # (T, D)
        self.dim = Y.shape[1]
        self.y_mean = Y.mean(0)
        self.z_mean = Z.mean(0)
        S = self._state(Y - self.y_mean)  # (T, S)
        Zc = Z - self.z_mean  # (T, U)
        if self.augment_lag:
            S, Zc = S[1:], Zc[1:]  # the first state has no real lag
        A = _lstsq(S[:-1], S[1:]).T  # (S, S)
        res_x = S[1:] - S[:-1] @ A.T
        W = res_x.T @ res_x / len(res_x)  # (S, S)
        H = _lstsq(S, Zc).T  # (U, S)
        res_z = Zc - S @ H.T
        Q = res_z.T @ res_z / len(res_z)  # (U, U)
        Q = (1.0 - self.q_shrink) * Q + self.q_shrink * np.diag(np.diag(Q))
        Q += 1e-6 * max(float(np.mean(np.diag(Q))), 1e-12) * np.eye(len(Q))  # silent units
        self.A, self.W, self.H, self.Q = A, W, H, Q
        self.K = self._steady_gain()
        return self

    def _steady_gain(self) -> np.ndarray:
        """Iterate the Riccati recursion to its fixed point; the gain is then constant.

        Uses P⁺ = P⁻ (I + Hᵀ Q⁻¹ H P⁻)⁻¹ and K = P⁺ Hᵀ Q⁻¹, which invert only S x S
        matrices however many units there are, and never invert P⁻ itself (singular when
        the state carries its own lag, whose transition is noiseless).
        """
        A, W, H = self.A, self.W, self.H
        HtQi = np.linalg.solve(self.Q, H).T  # (S, U)
        info = HtQi @ H  # (S, S)
        eye = np.eye(len(A))
        P = W.copy()
        for _ in range(self.max_iter):
            P_prior = A @ P @ A.T + W
            P_new = P_prior @ np.linalg.inv(eye + info @ P_prior)
            done = np.max(np.abs(P_new - P)) < self.tol * max(1.0, float(np.max(np.abs(P))))
            P = P_new
            if done:
                break
        return P @ HtQi  # (S, U)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Filter a contiguous sequence in time order: (T, K, U) -> (T, D).

        Starts from the training mean; the estimate at t uses observations 0..t only.
        """
        Zc = self._observe(X) - self.z_mean  # (T, U)
        A, H, K = self.A, self.H, self.K
        M = A - K @ H @ A  # (S, S): x_t = M x_{t-1} + K z_t
        drive = Zc @ K.T  # (T, S)
        x = np.zeros(len(A))
        out = np.empty((len(Zc), self.dim))
        for t in range(len(Zc)):
            x = M @ x + drive[t]
            out[t] = x[: self.dim]
        return out + self.y_mean
