"""POYO: spike tokens -> PerceiverIO with rotary time -> behaviour, in two modes.

1. Spike tokens: a learned embedding per unit; the spike's time enters only through
   rotary phases of its key and value.
2. Encoder: latents cross-attend to spikes (plus an always-present ``<null>`` token so an
   empty group is well defined).
3. Processor: ``depth`` blocks of latent self-attention.
4. Decoder: an output query (session embedding + output-kind embedding) at time t
   cross-attends to latents; one linear head per output kind.

Modes (see ARCHITECTURE "Two model modes"):
- ``window``: latents at t - W + k·s; each sees every spike of (t - W, t]; full
  self-attention; the query at t sees all latents.
- ``causal``: latent groups on the absolute grid k·s see only their own spikes in
  ((k-1)·s, k·s]; self-attention is causal and spans ``context`` seconds of groups; the
  query at t uses the partial group of t (its spikes up to t, latent time t) and the
  finished groups before it. A finished group never changes, so its states are cached
  between chunks (``CausalCache``): training, chunked evaluation and the streaming engine
  compute the same function.

Masked self-supervision (MtM, ``mtm_head``): ``forward_mtm`` reads log-rates of (unit, bin)
pairs out of window-mode latents (``MtMHead``); absent unless the config enables it, so
models without it load and compute exactly as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from bci_decoder.model.masking import SCHEMES
from bci_decoder.model.rotary import rotary_periods, rotary_phases, rotate, unrotate


class POYOConfig(BaseModel):
    """Hyperparameters; stored in every checkpoint."""

    model_config = ConfigDict(extra="forbid")

    dim: int = 64
    depth: int = 6
    dim_head: int = 64
    cross_heads: int = 2
    self_heads: int = 8
    ffn_mult: int = 4
    latents_per_group: int = 16
    latent_step: float = 0.125  # s: grid step of latent groups
    context: float = 1.0  # W: seconds of groups a causal latent attends to; window length
    min_period: float = 2e-3
    max_period: float = 8.0
    rotary_fraction: float = 0.5  # share of each head's channels that carry time
    rotate_values: bool = True  # encoder values carry each spike's time relative to its latent
    # the masked-reconstruction readout (MtMHead); off: no such parameters exist
    mtm_head: bool = False
    # which latents the MtM readout reads: "window" (every group sees the whole window,
    # bidirectional self-attention) or "causal" (each group sees its own spikes, causal
    # self-attention over the context: the latents the causal decoder reads). A model
    # trained in causal mode only never learned window latents: its label-free calibration
    # fitted through them scored R² -0.74 on spike_20120904 (zero-shot 0.22)
    mtm_latents: Literal["window", "causal"] = "window"
    # the masked readout adds each unit's log mean rate over the data it came from
    # (``mtm_log_prior``, spiking only) instead of one 10 Hz start for every unit: from
    # scratch, unit rows start at std 0.02 and 1,000 steps left them so alike that the
    # readout did not even learn the units' mean rates (co-smoothing under 0.06 bps on all
    # 8 real sessions, mean -0.024 bps); with the prior: -0.001 (configs/mtm-real.yaml)
    mtm_rate_prior: bool = False
    # the readout reads each unit through a LayerNorm of its row: rows trained from std 0.02
    # stay within ~0.03 of each other (mtm-real: row spread 0.24 over 64 dims), so
    # unit_out(row) gave every unit nearly one readout direction and the masked loss stayed
    # at the null even on the training windows (co-smoothing 0.014 bps vs smoothing 0.25)
    mtm_unit_norm: bool = False

    @property
    def context_groups(self) -> int:
        return int(round(self.context / self.latent_step))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.net = nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(x))


class RotaryAttention(nn.Module):
    """Multi-head attention whose queries and keys are rotated at their own times."""

    def __init__(self, dim: int, heads: int, dim_head: int, num_freqs: int) -> None:
        super().__init__()
        self.heads, self.dim_head, self.num_freqs = heads, dim_head, num_freqs
        inner = heads * dim_head
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        # Recency prior (ALiBi-like, in seconds): score -= rate_h · |t_q - t_k|, heads with
        # half-lives from ~20 ms to ~1 s. Without it attention starts uniform over a second
        # of history, averages the signal away and training sits on a plateau. Fixed, not
        # learned, so one bias tensor serves every layer of a forward pass.
        self.register_buffer(
            "recency", torch.logspace(math.log10(30.0), math.log10(0.7), heads), persistent=False
        )

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.dim_head))  # (..., inner) -> (..., H, Dh)

    def keys_values(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unrotated keys/values (..., H, Dh) of kv inputs (..., D)."""
        kv = self.norm_kv(kv)
        return self.split(self.to_k(kv)), self.split(self.to_v(kv))

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.split(self.to_q(self.norm_q(x)))


@dataclass
class CausalCache:
    """States of finished latent groups, kept between causal chunks.

    ``states[l]`` is the input of self-attention layer l (l = depth: the final latents the
    decoder reads), for the last ``context_groups - 1`` finished groups.
    """

    states: list[torch.Tensor]  # depth+1 x (B, L, D)
    group: torch.Tensor  # (B, L) int64 absolute grid index
    time: torch.Tensor  # (B, L) float64


class POYO(nn.Module):
    def __init__(
        self,
        config: POYOConfig,
        *,
        num_units: int,
        num_sessions: int,
        outputs: dict[str, int],
    ) -> None:
        super().__init__()
        c = self.config = config
        self.output_names = list(outputs)
        self.output_dims = dict(outputs)
        self.unit_emb = nn.Embedding(num_units, c.dim)
        self.session_emb = nn.Embedding(num_sessions, c.dim)
        self.output_emb = nn.Embedding(len(outputs), c.dim)
        self.latent_emb = nn.Parameter(torch.randn(c.latents_per_group, c.dim) * 0.02)
        nn.init.normal_(self.unit_emb.weight, std=0.02)
        nn.init.normal_(self.session_emb.weight, std=0.02)
        nn.init.normal_(self.output_emb.weight, std=0.02)

        def freqs(dim_head: int) -> int:
            return max(1, int(dim_head * c.rotary_fraction) // 2)

        self.enc_attn = RotaryAttention(c.dim, c.cross_heads, c.dim_head, freqs(c.dim_head))
        # Softmax attention averages, so it cannot count; spike counts carry most of the
        # information in motor cortex. A sum of the group's unit embeddings (a learned
        # embedding of the counts vector) adds what attention misses, and a learned
        # vector scaled by the elapsed fraction of the group tells a partial group how
        # much of its bin it has seen.
        self.count_proj = nn.Linear(c.dim, c.dim)
        self.elapsed_emb = nn.Parameter(torch.zeros(c.dim))
        self.enc_ffn = FeedForward(c.dim, c.ffn_mult)
        self.self_attn = nn.ModuleList(
            RotaryAttention(c.dim, c.self_heads, c.dim_head, freqs(c.dim_head))
            for _ in range(c.depth)
        )
        self.self_ffn = nn.ModuleList(FeedForward(c.dim, c.ffn_mult) for _ in range(c.depth))
        self.dec_attn = RotaryAttention(c.dim, c.cross_heads, c.dim_head, freqs(c.dim_head))
        self.dec_ffn = FeedForward(c.dim, c.ffn_mult)
        self.dec_norm = nn.LayerNorm(c.dim)
        self.heads = nn.ModuleDict({k: nn.Linear(c.dim, d) for k, d in outputs.items()})
        self.register_buffer(
            "periods",
            rotary_periods(freqs(c.dim_head), c.min_period, c.max_period),
            persistent=False,
        )
        # created last, so the supervised weights draw the same initial values either way
        self.mtm = MtMHead(c, freqs(c.dim_head)) if c.mtm_head else None

    # ------------------------------------------------------------------ helpers
    def phases(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., Dh/2) cos and sin of times t (float64)."""
        return rotary_phases(t, self.periods, self.config.dim_head // 2)

    def readout(self, y: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Per-sample output kind -> (B, Q, Dmax), unused dims zero."""
        dmax = max(self.output_dims.values())
        y = self.dec_norm(y)
        out = y.new_zeros(*y.shape[:-1], dmax)
        for i, name in enumerate(self.output_names):
            sel = (output == i).view(-1, *([1] * (y.dim() - 1)))
            pred = self.heads[name](y)  # (B, Q, D_i)
            pred = F.pad(pred, (0, dmax - pred.shape[-1]))
            out = torch.where(sel, pred, out)
        return out

    def spike_keys(
        self,
        spike_unit: torch.Tensor,
        spike_time: torch.Tensor,
        tables: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated encoder keys and values of spikes (..., S) -> (..., S, H, Dh) each.

        Keys depend only on the unit and the time: project the unit table once, then a
        spike costs a lookup and a rotation (the streaming engine does the same).
        ``tables``: the projected (V, H, Dh) key and value tables, when the caller
        already has them.
        """
        if tables is None:
            tables = self.enc_attn.keys_values(self.unit_emb.weight)  # (V, H, Dh)
        k_tab, v_tab = tables
        kc, ks = self.phases(spike_time)
        v = v_tab[spike_unit]
        if self.config.rotate_values:
            v = rotate(v, kc, ks)
        return rotate(k_tab[spike_unit], kc, ks), v

    def encode(
        self,
        q_phases: tuple[torch.Tensor, torch.Tensor],
        k: torch.Tensor,
        v: torch.Tensor,
        spike_mask: torch.Tensor,
        unit_sum: torch.Tensor,
        elapsed: torch.Tensor,
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Latent groups attend to their spikes.

        q_phases: cos, sin (B, G, Dh/2) of each group's latent time; k, v (B, G, S, H, Dh) rotated
        spike keys/values, mask (B, G, S); or (B, 1, S, ...) when every group sees the same
        spikes (window mode). unit_sum (B, G, D): sum of the unit embeddings of the
        group's own spikes; elapsed (B, G): seen fraction of the group's step, in (0, 1].
        extra (B, G, D): added to every latent's start (the MtM prompt and masked-unit
        marker); None adds nothing. Returns latents (B, G, n, D).
        """
        attn = self.enc_attn
        start = self.count_proj(unit_sum) + elapsed.unsqueeze(-1) * self.elapsed_emb
        if extra is not None:
            start = start + extra
        x = self.latent_emb + start.unsqueeze(2)  # (B, G, n, D)
        qc, qs = q_phases[0].unsqueeze(2), q_phases[1].unsqueeze(2)  # (B, G, 1, Dh/2)
        q_plain = attn.query(x)  # (B, G, n, H, Dh)
        q = rotate(q_plain, qc, qs)
        scale = attn.dim_head**-0.5
        scores = q.transpose(2, 3) @ k.permute(0, 1, 3, 4, 2) * scale  # (B, G, H, n, S)
        scores = scores.masked_fill(~spike_mask[:, :, None, None, :], float("-inf"))
        # <null>: key/value at the latent's own time, so its score needs no rotation
        k0, v0 = attn.keys_values(self.unit_emb.weight[0])  # (H, Dh)
        null = (q_plain * k0).sum(-1).transpose(2, 3).unsqueeze(-1) * scale  # (B, G, H, n, 1)
        p = torch.softmax(torch.cat([null, scores], dim=-1), dim=-1)  # (B, G, H, n, 1+S)
        out = (p[..., 1:] @ v.transpose(2, 3)).transpose(2, 3)  # (B, G, n, H, Dh)
        if self.config.rotate_values:
            out = unrotate(out, qc, qs)
        out = out + p[..., 0].transpose(2, 3).unsqueeze(-1) * v0
        x = x + attn.to_out(out.flatten(-2))
        return x + self.enc_ffn(x)

    def encode_rows(
        self,
        units: torch.Tensor,
        times: torch.Tensor,
        mask: torch.Tensor,
        row_time: torch.Tensor,
        elapsed: torch.Tensor,
    ) -> torch.Tensor:
        """``encode`` of rows of spikes, each row one latent group: units, times, mask
        (B, R, S) (padded slots masked), row_time (B, R) float64 latent times, elapsed
        (B, R). Returns latents (B, R, n, D).

        A batch pads every row to its densest one, and a few bursts (the binned Spike
        days: one group of 775 spikes where most hold ~100) left 88% of the slots padding.
        Rows are therefore encoded in buckets of similar width (powers of two), each
        padded only to its own widest row: the same function (a padded slot adds exactly
        nothing), at the cost of the slots actually used (a calibration step on such a
        batch: 1.35 s -> 0.18 s of CPU). Only where gradients are taken (training,
        calibration): a row's bucket width depends on the other rows, which moves its
        float sums in the last bit, and decoding stays bit-exact, causality included
        (tests/test_model.py).
        """
        B, R, S = units.shape
        u, t, m = units.flatten(0, 1), times.flatten(0, 1), mask.flatten(0, 1)  # (B·R, S)

        def padded() -> torch.Tensor:  # one call, every row padded to S
            k, v = self.spike_keys(units, times)  # (B, R, S, H, Dh)
            return self.encode(self.phases(row_time), k, v, mask,
                               self._unit_sum(u, m).unflatten(0, (B, R)), elapsed)  # fmt: skip

        if not torch.is_grad_enabled():
            return padded()
        # the slots a row needs: up to its last real spike (masks need not be prefixes)
        last = S - m.flip(-1).to(torch.int8).argmax(-1)  # (B·R,)
        width = torch.where(m.any(-1), last, torch.zeros_like(last))
        bucket = torch.ceil(torch.log2(width.clamp(min=8).to(torch.float64))).to(torch.int64)
        keys = torch.unique(bucket)
        widths = [int(width[bucket == b].max().clamp(min=1)) for b in keys.tolist()]
        counts = [int((bucket == b).sum()) for b in keys.tolist()]
        if (
            len(widths) == 1
            or sum(c * w for c, w in zip(counts, widths, strict=True)) > 0.8 * B * R * S
        ):
            return padded()  # little to save
        tables = self.enc_attn.keys_values(self.unit_emb.weight)  # (V, H, Dh) once
        parts, order = [], []
        for b, w in zip(keys.tolist(), widths, strict=True):
            idx = torch.nonzero(bucket == b).squeeze(1)  # (Rb,)
            ub, tb, mb = u[idx, :w], t[idx, :w], m[idx, :w]  # (Rb, w)
            k, v = self.spike_keys(ub[None], tb[None], tables)  # (1, Rb, w, H, Dh)
            lat = self.encode(
                self.phases(row_time.flatten()[idx][None]), k, v, mb[None],
                self._unit_sum(ub, mb)[None], elapsed.flatten()[idx][None],
            )  # fmt: skip
            parts.append(lat[0])  # (Rb, n, D)
            order.append(idx)
        inverse = torch.argsort(torch.cat(order))
        return torch.cat(parts)[inverse].unflatten(0, (B, R))  # (B, R, n, D)

    def _unit_sum(self, units: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, S) -> (N, D) sum of the unmasked spikes' unit embeddings, without an
        (N, S, D) tensor."""
        w = self.unit_emb.weight
        return F.embedding_bag(units, w, mode="sum", per_sample_weights=mask.to(w.dtype))

    @staticmethod
    def attention_bias(
        attn: RotaryAttention, t_q: torch.Tensor, t_kv: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Additive scores (B, H, Lq, Lk): recency prior, -inf where ``mask`` is False."""
        # time differences in float64 first: absolute times may be hours
        dt = (t_q[:, :, None] - t_kv[:, None, :]).abs().to(torch.float32)  # (B, Lq, Lk)
        bias = -attn.recency[None, :, None, None] * dt.unsqueeze(1)
        if mask is not None:
            bias = bias.masked_fill(~mask.unsqueeze(1), float("-inf"))
        return bias

    def _attend(
        self,
        attn: RotaryAttention,
        x_q: torch.Tensor,
        t_q: torch.Tensor,
        x_kv: torch.Tensor,
        t_kv: torch.Tensor,
        bias: torch.Tensor,
        phases: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        """x_q (B, Lq, D) at t_q (B, Lq); x_kv (B, Lk, D) at t_kv; bias (B, H, Lq, Lk)."""
        qc, qs, kc, ks = phases if phases is not None else (*self.phases(t_q), *self.phases(t_kv))
        q = rotate(attn.query(x_q), qc, qs).transpose(1, 2)  # (B, H, Lq, Dh)
        k, v = attn.keys_values(x_kv)
        k = rotate(k, kc, ks).transpose(1, 2)
        v = v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return attn.to_out(out.transpose(1, 2).flatten(-2))

    def forward(self, *, mode: str, **batch: torch.Tensor) -> torch.Tensor:
        """Training entry point (one call for DDP): predictions (B, Q, Dmax)."""
        if mode == "causal":
            return self.forward_causal(**batch)[0]
        if mode == "window":
            return self.forward_window(**batch)
        if mode == "mtm":
            return self.forward_mtm(**batch)
        raise ValueError(f"mode must be 'causal', 'window' or 'mtm', not {mode!r}")

    # ------------------------------------------------------------------ causal
    def forward_causal(
        self,
        *,
        spike_unit: torch.Tensor,
        spike_time: torch.Tensor,
        spike_mask: torch.Tensor,
        group_index: torch.Tensor,
        query_time: torch.Tensor,
        query_group: torch.Tensor,
        query_mask: torch.Tensor,
        session: torch.Tensor,
        output: torch.Tensor,
        cache: CausalCache | None = None,
        return_cache: bool = False,
    ) -> tuple[torch.Tensor, CausalCache | None]:
        """Causal chunk: G consecutive groups and Q queries inside them.

        spike_* (B, G, S); group_index (B, G) int64 absolute; query_* (B, Q).
        Returns predictions (B, Q, Dmax) and, if asked, the cache for the next chunk.
        ``query_mask`` is accepted with the batch but not needed: a padded query only
        attends to its own tokens, and the loss masks its output.
        """
        c = self.config
        n = c.latents_per_group
        B, G, S = spike_unit.shape
        Q = query_time.shape[1]
        step = c.latent_step
        g_time = group_index.to(torch.float64) * step  # (B, G)

        # partial groups: the owning group's spikes up to the query time
        slot = (query_group - group_index[:, :1]).clamp(0, G - 1)  # (B, Q)
        gather = slot[:, :, None].expand(B, Q, S)
        p_time = torch.gather(spike_time, 1, gather)
        p_mask = torch.gather(spike_mask, 1, gather) & (p_time <= query_time[:, :, None])
        units = torch.cat([spike_unit, torch.gather(spike_unit, 1, gather)], 1)  # (B, G+Q, S)
        times = torch.cat([spike_time, p_time], 1)
        mask = torch.cat([spike_mask, p_mask], 1)
        q_elapsed = (query_time - (query_group - 1).to(torch.float64) * step) / step
        elapsed = torch.cat([torch.ones_like(g_time), q_elapsed], 1).to(torch.float32)
        lat = self.encode_rows(
            units, times, mask, torch.cat([g_time, query_time], 1), elapsed
        )  # (B, G+Q, n, D)
        x = lat.flatten(1, 2)  # (B, (G+Q)·n, D)

        # token attributes for masks
        tok_group = torch.cat([group_index, query_group], 1).repeat_interleave(n, 1)
        tok_time = torch.cat([g_time, query_time], 1).repeat_interleave(n, 1)
        owner = torch.cat(
            [torch.full_like(group_index, -1), torch.arange(Q).expand(B, Q)], 1
        ).repeat_interleave(n, 1)  # (B, (G+Q)·n): -1 for finished groups
        is_main = owner < 0
        main_x = slice(0, G * n)

        if cache is not None:
            c_group, c_time = cache.group, cache.time
        else:
            c_group = group_index.new_zeros(B, 0)
            c_time = g_time.new_zeros(B, 0)
        key_group = torch.cat([c_group, tok_group], 1)
        key_time = torch.cat([c_time, tok_time], 1)
        key_owner = torch.cat([torch.full_like(c_group, -1), owner], 1)
        W = c.context_groups
        qg, kg = tok_group[:, :, None], key_group[:, None, :]
        q_main = is_main[:, :, None]
        k_main = key_owner[:, None, :] < 0
        in_span = kg > qg - W
        mask = k_main & in_span & ((kg < qg) | ((kg == qg) & q_main))
        mask = mask | (~k_main & (key_owner[:, None, :] == owner[:, :, None]))

        states = []
        bias = self.attention_bias(self.self_attn[0], tok_time, key_time, mask)
        phases = (*self.phases(tok_time), *self.phases(key_time))
        for layer in range(c.depth):
            prev = cache.states[layer] if cache is not None else x.new_zeros(B, 0, c.dim)
            states.append(torch.cat([prev, x[:, main_x]], 1))
            kv = torch.cat([prev, x], 1)
            x = x + self._attend(self.self_attn[layer], x, tok_time, kv, key_time, bias, phases)
            x = x + self.self_ffn[layer](x)
        prev = cache.states[c.depth] if cache is not None else x.new_zeros(B, 0, c.dim)
        states.append(torch.cat([prev, x[:, main_x]], 1))

        # decoder: query q sees its partial group and the finished groups before it
        y = self.session_emb(session)[:, None] + self.output_emb(output)[:, None]  # (B, 1, D)
        y = y.expand(B, Q, -1)
        qg = query_group[:, :, None]
        dmask = k_main & (kg > qg - W) & (kg < qg)
        dmask = dmask | (key_owner[:, None, :] == torch.arange(Q)[None, :, None])
        kv = torch.cat([prev, x], 1)
        dbias = self.attention_bias(self.dec_attn, query_time, key_time, dmask)
        y = y + self._attend(self.dec_attn, y, query_time, kv, key_time, dbias)
        y = y + self.dec_ffn(y)
        pred = self.readout(y, output)

        new_cache = None
        if return_cache:  # keep the tokens of the last W-1 finished groups
            all_group = torch.cat([c_group, group_index.repeat_interleave(n, 1)], 1)
            all_time = torch.cat([c_time, g_time.repeat_interleave(n, 1)], 1)
            start = all_group.shape[1] - min((W - 1) * n, all_group.shape[1])
            new_cache = CausalCache(
                states=[st[:, start:] for st in states],
                group=all_group[:, start:],
                time=all_time[:, start:],
            )
        return pred, new_cache

    # ------------------------------------------------------------------ window
    def forward_window(
        self,
        *,
        spike_unit: torch.Tensor,
        spike_time: torch.Tensor,
        spike_mask: torch.Tensor,
        latent_time: torch.Tensor,
        query_time: torch.Tensor,
        session: torch.Tensor,
        output: torch.Tensor,
        query_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Window mode. spike_* (B, N); latent_time (B, K); query_time (B, Q) -> (B, Q, Dmax).

        ``query_mask`` is accepted with the batch; the loss masks padded queries."""
        B, Q = query_time.shape
        x, t = self.window_latents(spike_unit, spike_time, spike_mask, latent_time)
        y = self.session_emb(session)[:, None] + self.output_emb(output)[:, None]
        y = y.expand(B, Q, -1)
        dbias = self.attention_bias(self.dec_attn, query_time, t, None)
        y = y + self._attend(self.dec_attn, y, query_time, x, t, dbias)
        y = y + self.dec_ffn(y)
        return self.readout(y, output)

    def window_latents(
        self,
        spike_unit: torch.Tensor,
        spike_time: torch.Tensor,
        spike_mask: torch.Tensor,
        latent_time: torch.Tensor,
        extra: torch.Tensor | None = None,
        causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Window-mode encoder and processor: latents (B, K·n, D) and their times (B, K·n).

        ``extra`` (B, K, D) is added to each group's latent start (see ``encode``).
        ``causal``: the causal mode's latents instead (the finished groups of
        ``forward_causal`` without a cache): group k sees only its own spikes, and
        self-attention reaches back ``context`` seconds of groups, never forward."""
        c = self.config
        n = c.latents_per_group
        B, K = latent_time.shape
        # every latent group sees every spike: the spikes broadcast over the K groups
        k, v = self.spike_keys(spike_unit[:, None], spike_time[:, None])  # (B, 1, N, H, Dh)
        # each latent group's own spikes, (tau - s, tau], for the count path
        step = c.latent_step
        start = latent_time[:, :1] - step  # (B, 1) start of the first group
        slot = torch.ceil((spike_time - start) / step).long() - 1  # (B, N)
        slot = slot.clamp(0, K - 1)
        emb = self.unit_emb(spike_unit) * spike_mask.unsqueeze(-1)  # (B, N, D)
        unit_sum = emb.new_zeros(B, K, c.dim).scatter_add(
            1, slot.unsqueeze(-1).expand_as(emb), emb
        )  # (B, K, D)
        enc_mask = spike_mask[:, None]  # (B, 1, N): every group, every spike
        self_mask = None
        if causal:
            groups = torch.arange(K, device=slot.device)
            enc_mask = spike_mask[:, None] & (
                slot[:, None, :] == groups[None, :, None]
            )  # (B, K, N)
            g = groups.repeat_interleave(n)  # (K·n,) group of each latent
            back = g[:, None] - g[None, :]  # query group - key group
            self_mask = ((back >= 0) & (back < c.context_groups)).expand(B, -1, -1)  # (B, Kn, Kn)
        lat = self.encode(
            self.phases(latent_time),
            k,
            v,
            enc_mask,
            unit_sum,
            torch.ones_like(latent_time).float(),
            extra,
        )  # (B, K, n, D)
        x = lat.flatten(1, 2)
        t = latent_time.repeat_interleave(n, 1)
        bias = self.attention_bias(self.self_attn[0], t, t, self_mask)
        phases = (*self.phases(t), *self.phases(t))
        for layer in range(c.depth):
            x = x + self._attend(self.self_attn[layer], x, t, x, t, bias, phases)
            x = x + self.self_ffn[layer](x)
        return x, t

    # ------------------------------------------------------------------ masked (MtM)
    def forward_mtm(
        self,
        *,
        spike_unit: torch.Tensor,
        spike_time: torch.Tensor,
        spike_mask: torch.Tensor,
        latent_time: torch.Tensor,
        session: torch.Tensor,
        mtm_units: torch.Tensor,
        mtm_marker: torch.Tensor,
        mtm_bin_time: torch.Tensor,
        mtm_scheme: torch.Tensor,
        mtm_log_prior: torch.Tensor | None = None,
        **_: torch.Tensor,
    ) -> torch.Tensor:
        """Log-rates (Hz) of (unit, bin) pairs from the latents (``config.mtm_latents``:
        window or causal mode's): (B, U, T).

        spike_* (B, N): the spikes left visible (a scheme removed the hidden ones);
        latent_time (B, K); mtm_units (B, U) vocabulary index of the units read out;
        mtm_marker (B, K, U): share of group k's span in which unit u is hidden, so a hidden
        unit is told apart from a silent one; mtm_bin_time (B, T) bin centres; mtm_scheme (B,)
        index into ``SCHEMES`` (the prompt); mtm_log_prior (B, U) each unit's log mean rate
        (Hz), read when ``config.mtm_rate_prior``. Other batch entries are ignored.
        """
        head = self.mtm
        if head is None:
            raise ValueError("this model has no MtM head (train it with mtm.enabled: true)")
        unit_e = self.unit_emb(mtm_units)  # (B, U, D)
        prompt = head.prompt_emb(mtm_scheme)  # (B, D)
        extra = head.marker_proj(mtm_marker @ unit_e) + prompt[:, None]  # (B, K, D)
        causal = self.config.mtm_latents == "causal"
        x, t = self.window_latents(spike_unit, spike_time, spike_mask, latent_time, extra, causal)
        # each bin's visible population vector (sum of the unit embeddings of its visible
        # spikes; zero in a hidden bin): without it the bin queries start nearly alike and
        # the bilinear readout sat at the per-unit mean rates (loss = the null's, to 1e-5)
        B, T = mtm_bin_time.shape
        width = (mtm_bin_time[:, 1:2] - mtm_bin_time[:, :1]) if T > 1 else None
        if width is None:
            raise ValueError("the MtM readout needs at least two bins per window")
        first = mtm_bin_time[:, :1] - width / 2  # (B, 1) start of bin 0
        slot = (torch.ceil((spike_time - first) / width).long() - 1).clamp(0, T - 1)  # (B, N)
        emb = self.unit_emb(spike_unit) * spike_mask.unsqueeze(-1)  # (B, N, D)
        bin_sum = emb.new_zeros(B, T, emb.shape[-1]).scatter_add(
            1, slot.unsqueeze(-1).expand_as(emb), emb
        )  # (B, T, D)
        y = (head.query_emb + prompt + self.session_emb(session))[:, None]  # (B, 1, D)
        y = y + head.bin_proj(bin_sum)  # (B, T, D)
        bias = self.attention_bias(head.attn, mtm_bin_time, t, None)
        y = y + self._attend(head.attn, y, mtm_bin_time, x, t, bias)
        y = head.norm(y + head.ffn(y))
        unit_in = head.unit_norm(unit_e) if head.unit_norm is not None else unit_e
        r = head.unit_out(unit_in)  # (B, U, D+1): readout direction and log-rate offset
        d = y.shape[-1]
        log_rate = torch.einsum("btd,bud->but", y, r[..., :d]) * d**-0.5
        if self.config.mtm_rate_prior:
            if mtm_log_prior is None:
                raise ValueError("this MtM head reads each unit's log mean rate: mtm_log_prior")
            return log_rate + r[..., d:] + mtm_log_prior[..., None]  # (B, U, T)
        return log_rate + r[..., d:] + head.log_rate0  # (B, U, T)

    # ------------------------------------------------------------------ vocabularies
    def extend_units(self, count: int) -> None:
        """Append ``count`` unit embeddings, initialised near the mean of the known ones."""
        self.unit_emb = _grow(self.unit_emb, count)

    def extend_sessions(self, count: int) -> None:
        self.session_emb = _grow(self.session_emb, count)


class MtMHead(nn.Module):
    """Parameters of the masked-reconstruction readout (factorised unit x time).

    A bin query (learned vector + scheme prompt + session embedding, rotated at the bin
    centre) cross-attends to the latents; a unit's log-rate in that bin is the dot product
    of the result with a projection of the unit's embedding, plus a per-unit offset from the
    same embedding. The unit table is the encoder's, so fitting a new session's embeddings
    by this objective alone moves the same rows the behaviour heads read through.
    """

    def __init__(self, c: POYOConfig, num_freqs: int) -> None:
        super().__init__()
        self.prompt_emb = nn.Embedding(len(SCHEMES), c.dim)
        nn.init.normal_(self.prompt_emb.weight, std=0.02)
        self.marker_proj = nn.Linear(c.dim, c.dim)
        self.bin_proj = nn.Linear(c.dim, c.dim)
        self.query_emb = nn.Parameter(torch.zeros(c.dim))
        self.attn = RotaryAttention(c.dim, c.cross_heads, c.dim_head, num_freqs)
        self.ffn = FeedForward(c.dim, c.ffn_mult)
        self.norm = nn.LayerNorm(c.dim)
        self.unit_out = nn.Linear(c.dim, c.dim + 1)
        self.unit_norm = nn.LayerNorm(c.dim) if c.mtm_unit_norm else None
        # rates start near 10 Hz instead of 1 Hz: fewer steps spent on the mean
        self.register_buffer("log_rate0", torch.tensor(math.log(10.0)), persistent=False)


def _grow(emb: nn.Embedding, count: int) -> nn.Embedding:
    if count <= 0:
        return emb
    old = emb.weight.data
    new = nn.Embedding(old.shape[0] + count, old.shape[1])
    with torch.no_grad():
        new.weight[: old.shape[0]] = old
        mean = old[1:].mean(0) if old.shape[0] > 1 else old.mean(0)
        std = old[1:].std(0).mean() if old.shape[0] > 2 else torch.tensor(0.02)
        new.weight[old.shape[0] :] = mean + torch.randn(count, old.shape[1]) * std
    return new.to(old.device)
