"""Causal GRU decoder: the strong learned baseline our product has to beat.

Each behaviour sample is decoded from a window of the last ``num_lags`` causal bins of
z-scored sqrt counts, read oldest to newest by a one-layer GRU whose final hidden state
is mapped linearly to the (z-scored) behaviour. Training stops early on the last part of
the training data, restoring the best epoch, so the test span is never looked at.

Input dropout (0.3, on the z-scored bins) is what makes it a fair bar. Scored as the data
README's reference GRU was (features over the full bin around t), it takes stevenson from
0.837 to 0.887 (reference 0.882), jango_20160711 from 0.936 to 0.960 (0.957) and the three
small center-out sessions from about 0.52 / 0.69 / 0.76 to 0.684 / 0.760 / 0.822 (0.671 /
0.735 / 0.827), the latter also needing a smaller batch (``min_steps_per_epoch``).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn


@contextlib.contextmanager
def _threads(num_threads: int) -> Iterator[None]:
    """At most ``num_threads`` intra-op threads while inside (the baseline's CPU budget).

    Fit times are only meaningful on an otherwise idle machine: with more busy threads
    than cores, torch's OpenMP workers spin-wait and one epoch can take 10-30x longer.
    """
    prev = torch.get_num_threads()
    torch.set_num_threads(max(1, min(num_threads, prev)))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


class _GRUNet(nn.Module):
    def __init__(
        self, n_in: int, hidden: int, n_out: int, dropout: float, input_dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.in_drop = nn.Dropout(input_dropout)
        self.gru = nn.GRU(n_in, hidden, num_layers=1, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.readout = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.gru(self.in_drop(x))  # (B, L, H)
        return self.readout(self.drop(h[:, -1]))  # (B, D): state after the newest bin


class GRUDecoder:
    """Windowed causal GRU trained with Adam(W) and early stopping on a validation tail.

    ``fit`` takes lagged counts (T, K, U) with lag 0 (the bin ending at t) first and
    K >= ``num_lags``; it carves the last ``valid_fraction`` of the samples (in time
    order) off for early stopping. ``max_seconds`` caps training time (the best epoch so
    far is kept); ``fit_seconds``/``epochs_run``/``best_epoch`` record what happened.
    """

    def __init__(
        self,
        num_lags: int = 20,
        hidden: int = 128,
        dropout: float = 0.0,
        input_dropout: float = 0.3,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        batch_size: int = 256,
        min_steps_per_epoch: int = 30,
        max_epochs: int = 40,
        patience: int = 5,
        valid_fraction: float = 0.1,
        seed: int = 0,
        num_threads: int = 2,
        max_seconds: float = 240.0,
    ) -> None:
        self.num_lags = num_lags
        self.hidden = hidden
        self.dropout = dropout
        self.input_dropout = input_dropout
        self.min_steps_per_epoch = min_steps_per_epoch
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.valid_fraction = valid_fraction
        self.seed = seed
        self.num_threads = num_threads
        self.max_seconds = max_seconds

    def _inputs(self, X: np.ndarray) -> torch.Tensor:
        """(T, K, U) lagged counts -> (T, L, U) z-scored sqrt counts, oldest bin first."""
        X = np.asarray(X)
        if X.ndim != 3 or X.shape[1] < self.num_lags:
            raise ValueError(f"expected (T, K>={self.num_lags}, U) lagged counts, got {X.shape}")
        seq = np.sqrt(X[:, : self.num_lags][:, ::-1].astype(np.float32))  # (T, L, U)
        return torch.from_numpy((seq - self.x_mean) / self.x_std)

    def fit(self, X: np.ndarray, Y: np.ndarray) -> GRUDecoder:
        """X: (T, K, U) lagged counts; Y: (T, D) behaviour; samples in time order."""
        t0 = time.perf_counter()
        with _threads(self.num_threads):
            self._fit(X, np.asarray(Y, dtype=np.float32).reshape(len(X), -1), t0)
        self.fit_seconds = time.perf_counter() - t0
        return self

    def _fit(self, X: np.ndarray, Y: np.ndarray, t0: float) -> None:
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        cut = int(round(len(X) * (1.0 - self.valid_fraction)))
        # Normalisation from the training part only (the tail is held out like test data).
        sq = np.sqrt(X[:cut, 0].astype(np.float32))  # (N, U): lag 0 covers every bin once
        self.x_mean = sq.mean(0).astype(np.float32)
        std = sq.std(0)
        self.x_std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
        self.y_mean = Y[:cut].mean(0)
        self.y_std = np.maximum(Y[:cut].std(0), 1e-8)
        xs = self._inputs(X)  # (T, L, U)
        ys = torch.from_numpy((Y - self.y_mean) / self.y_std)  # (T, D)
        x_tr, y_tr, x_va, y_va = xs[:cut], ys[:cut], xs[cut:], ys[cut:]

        # Small sessions (a few hundred samples) would get 2-4 steps an epoch at the full
        # batch and stop undertrained; shrink the batch to keep ~min_steps_per_epoch.
        batch = int(np.clip(cut // self.min_steps_per_epoch, 32, self.batch_size))
        self.batch_size_ = batch
        self.net = _GRUNet(xs.shape[2], self.hidden, ys.shape[1], self.dropout, self.input_dropout)
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        best, best_state, bad = float("inf"), copy.deepcopy(self.net.state_dict()), 0
        self.history: list[tuple[float, float]] = []  # (train MSE, valid MSE) per epoch
        self.best_epoch = -1
        for epoch in range(self.max_epochs):
            self.net.train()
            order = torch.from_numpy(rng.permutation(cut))
            total = 0.0
            for i in range(0, cut, batch):
                idx = order[i : i + batch]
                loss = nn.functional.mse_loss(self.net(x_tr[idx]), y_tr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            val = float(nn.functional.mse_loss(self._forward(x_va), y_va)) if len(x_va) else 0.0
            self.history.append((total / cut, val))
            if val < best:
                best, best_state, bad = val, copy.deepcopy(self.net.state_dict()), 0
                self.best_epoch = epoch
            else:
                bad += 1
            if bad >= self.patience or time.perf_counter() - t0 > self.max_seconds:
                break
        self.epochs_run = len(self.history)
        self.net.load_state_dict(best_state)
        self.net.eval()

    @torch.no_grad()
    def _forward(self, xs: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        self.net.eval()
        outs = [self.net(xs[i : i + chunk]) for i in range(0, len(xs), chunk)]
        return torch.cat(outs) if outs else torch.zeros(0, self.net.readout.out_features)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """(T, K, U) lagged counts -> (T, D) behaviour; each row uses only its own window."""
        with _threads(self.num_threads):
            z = self._forward(self._inputs(X)).numpy()  # (T, D) z-scored
        return z.astype(np.float64) * self.y_std + self.y_mean
