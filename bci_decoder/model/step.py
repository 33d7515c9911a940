"""One causal-mode group step: the graph the streaming engine runs (and exports to ONNX).

It computes one latent group at latent time t from its own spikes and the cached states
of the finished groups before it, and reads the behaviour out at t. Run at a group's end
time it gives the finished group's states (which the engine caches); run at any t inside
the group it is the partial group of ``POYO.forward_causal``. Everything that needs
float64 (phases, time differences) is computed outside, so the graph is float32 only.
"""

from __future__ import annotations

import torch
from torch import nn

from bci_decoder.model.poyo import POYO


class CausalStep(nn.Module):
    """Inputs (one stream; no batch dimension):

    spike_k, spike_v  (S, H, Dh) rotated encoder keys/values of the group's spikes so far
    spike_mask        (S,) bool
    unit_sum          (D,) sum of those spikes' unit embeddings
    elapsed           (1,) fraction of the group's step seen, in (0, 1]
    q_cos, q_sin      (Dh/2,) phases of the latent time t
    cache_states      (depth+1, L, D) states of finished groups (layer inputs; last = final)
    cache_cos, cache_sin (L, Dh/2) phases of their times
    cache_dt          (L,) t - their time (seconds, computed in float64)
    cache_mask        (L,) bool: valid cache rows (finished groups within the context)
    query             (D,) output query (session + output-kind embedding)

    Outputs: prediction (sum of head dims,) in head order, states (depth+1, n, D).
    """

    def __init__(self, model: POYO) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        spike_k: torch.Tensor,
        spike_v: torch.Tensor,
        spike_mask: torch.Tensor,
        unit_sum: torch.Tensor,
        elapsed: torch.Tensor,
        q_cos: torch.Tensor,
        q_sin: torch.Tensor,
        cache_states: torch.Tensor,
        cache_cos: torch.Tensor,
        cache_sin: torch.Tensor,
        cache_dt: torch.Tensor,
        cache_mask: torch.Tensor,
        query: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        n = m.config.latents_per_group
        x = m.encode(
            (q_cos[None, None], q_sin[None, None]),
            spike_k[None, None],
            spike_v[None, None],
            spike_mask[None, None],
            unit_sum[None, None],
            elapsed[None],
        )[:, 0]  # (1, n, D)
        # keys: cached finished groups, then the group itself (dt = 0)
        kc = torch.cat([cache_cos, q_cos.expand(n, -1)], 0)[None]  # (1, L+n, Dh/2)
        ks = torch.cat([cache_sin, q_sin.expand(n, -1)], 0)[None]
        qc, qs = q_cos.expand(n, -1)[None], q_sin.expand(n, -1)[None]
        dt = torch.cat([cache_dt, cache_dt.new_zeros(n)], 0).abs()  # (L+n,)
        valid = torch.cat([cache_mask, cache_mask.new_ones(n)], 0)  # (L+n,)

        def bias(attn, lq: int) -> torch.Tensor:
            b = -attn.recency[:, None, None] * dt[None, None, :]  # (H, 1, L+n)
            b = b.masked_fill(~valid[None, None, :], float("-inf"))
            return b.expand(-1, lq, -1)[None]  # (1, H, lq, L+n)

        sbias = bias(m.self_attn[0], n)
        states = []
        for layer in range(m.config.depth):
            states.append(x[0])
            kv = torch.cat([cache_states[layer][None], x], 1)  # (1, L+n, D)
            x = x + m._attend(m.self_attn[layer], x, None, kv, None, sbias, (qc, qs, kc, ks))
            x = x + m.self_ffn[layer](x)
        states.append(x[0])
        kv = torch.cat([cache_states[m.config.depth][None], x], 1)
        y = query[None, None]  # (1, 1, D)
        y = y + m._attend(
            m.dec_attn,
            y,
            None,
            kv,
            None,
            bias(m.dec_attn, 1),
            (q_cos[None, None], q_sin[None, None], kc, ks),
        )
        y = m.dec_norm(y + m.dec_ffn(y))
        pred = torch.cat([m.heads[name](y)[0, 0] for name in m.output_names], 0)
        return pred, torch.stack(states, 0)


class WindowStep(nn.Module):
    """Window mode for one stream: latents recomputed each step from cached spike keys.

    spike_k, spike_v  (N, H, Dh) rotated keys/values of the ring's spikes
    spike_mask        (N,) bool: spikes inside (t - W, t]
    group_sum         (K, D) sum of unit embeddings of each latent group's own spikes
    lat_cos, lat_sin  (K, Dh/2) phases of the latent times t - W + k·s
    self_dt           (K·n, K·n) |time differences| between latents (seconds)
    dec_dt            (K·n,) t - latent time
    dec_cos, dec_sin  (Dh/2,) phases of t
    query             (D,)
    Output: prediction (sum of head dims,).
    """

    def __init__(self, model: POYO) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        spike_k: torch.Tensor,
        spike_v: torch.Tensor,
        spike_mask: torch.Tensor,
        group_sum: torch.Tensor,
        lat_cos: torch.Tensor,
        lat_sin: torch.Tensor,
        self_dt: torch.Tensor,
        dec_dt: torch.Tensor,
        dec_cos: torch.Tensor,
        dec_sin: torch.Tensor,
        query: torch.Tensor,
    ) -> torch.Tensor:
        m = self.model
        n = m.config.latents_per_group
        K = lat_cos.shape[0]
        x = m.encode(
            (lat_cos[None], lat_sin[None]),
            spike_k[None, None],
            spike_v[None, None],
            spike_mask[None, None],
            group_sum[None],
            torch.ones(1, K),
        ).flatten(1, 2)  # (1, K·n, D)
        tc = lat_cos.repeat_interleave(n, 0)[None]  # (1, K·n, Dh/2)
        ts = lat_sin.repeat_interleave(n, 0)[None]
        sbias = (-m.self_attn[0].recency[:, None, None] * self_dt[None])[None]  # (1, H, Kn, Kn)
        for layer in range(m.config.depth):
            x = x + m._attend(m.self_attn[layer], x, None, x, None, sbias, (tc, ts, tc, ts))
            x = x + m.self_ffn[layer](x)
        dbias = (-m.dec_attn.recency[:, None, None] * dec_dt[None, None])[None]  # (1, H, 1, Kn)
        y = query[None, None]
        y = y + m._attend(
            m.dec_attn, y, None, x, None, dbias, (dec_cos[None, None], dec_sin[None, None], tc, ts)
        )
        y = m.dec_norm(y + m.dec_ffn(y))
        return torch.cat([m.heads[name](y)[0, 0] for name in m.output_names], 0)
