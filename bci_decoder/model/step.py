"""The graphs the streaming engine runs (in torch, or exported to ONNX): one decode step.

Both take pre-rotated spike keys/values and compute only what changed. They are written
op by op for a small ONNX graph (ONNX Runtime costs about 1 µs per node on this CPU, as
much as the arithmetic of a small node in a 4-latent step): weights are folded at
construction (2D projections, the attention scale in W_q, one matrix for the count
path, the heads' weights concatenated) and every shape is a Python constant or -1 (a shape
read from a tensor exports as Shape/Gather/Concat nodes). Queries and keys are rotated
by one Dh x Dh product each (below): measured side by side on a quiet 2-core VM, 4% less
CPU per step than q, k, v and their halves-swapped copies from one GEMM rotated
elementwise at the shipped size, 9% less at POYO's 1.3M size.

Rotations. Every rotation of a query is at one time (the step's time t, or a latent
group's time), so it is one Dh x Dh matrix ``R``: ``x @ R`` rotates rows x (..., Dh)
exactly like ``rotate`` (pairs (x[i], x[i + Dh/2]) by the phases of t). ``R`` is built in
the graph from ``phase`` = [cos | sin] (Dh/2 each, float64-exact phases computed by the
caller) with one product against a constant 0/±1 basis, so no entry is rounded.

``CausalKVStep`` (causal mode): B partial groups (B queries of the current group, as
rows; B = 1 when streaming) attend to a per-layer key/value cache of finished groups:
keys rotated at their group's time and values, exactly what ``POYO.forward_causal``
computes from the cached states, but projected once, when the group finishes, instead
of at every step. ``WindowKVStep`` (window mode): latents at t - W + k·s recomputed from
the cached, pre-rotated spike keys of the window. ``CausalChunk`` (offline causal
decoding): every query and every group's finish of G groups in one run, layer by layer;
its batches are large, so it is written for arithmetic, not nodes (rows heads first,
rotations elementwise, spikes rotated in the graph from their F-wide cos and sin).

Everything that needs float64 (phases, time differences) is computed by the caller, so
the graphs are float32 only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bci_decoder.model.poyo import POYO, FeedForward, RotaryAttention


def rotation_basis(dim_head: int) -> torch.Tensor:
    """(Dh, Dh·Dh) 0/±1 matrix B with ``R(t) = ([cos | sin] @ B).reshape(Dh, Dh)``.

    ``x @ R`` equals ``rotate(x, cos, sin)``: out[i] = x[i]·c_i - x[h+i]·s_i and
    out[h+i] = x[h+i]·c_i + x[i]·s_i for i < h = Dh/2.
    """
    d, h = dim_head, dim_head // 2
    b = torch.zeros(d, d, d)  # (source phase, row, column)
    for i in range(h):
        b[i, i, i] = 1.0  # R[i, i] = c_i
        b[i, h + i, h + i] = 1.0  # R[h+i, h+i] = c_i
        b[h + i, h + i, i] = -1.0  # R[h+i, i] = -s_i
        b[h + i, i, h + i] = 1.0  # R[i, h+i] = s_i
    return b.reshape(d, d * d)


def _heads_in(w: torch.Tensor, heads: int) -> torch.Tensor:
    """nn.Linear weight (H·Dh, D) -> (H, D, Dh): x (.., D) @ it gives heads first."""
    inner, dim = w.shape
    return w.detach().reshape(heads, inner // heads, dim).transpose(1, 2).contiguous()


class _Attn(nn.Module):
    """Folded weights of one ``RotaryAttention``; 2D weights (one GEMM each), rows
    (..., H, Dh) out: ONNX Runtime runs a broadcast (H, D, Dh) weight as H small GEMMs."""

    def __init__(self, attn: RotaryAttention) -> None:
        super().__init__()
        H, Dh = attn.heads, attn.dim_head
        self.heads, self.dim_head = H, Dh
        self.eps = attn.norm_q.eps
        for name in ("norm_q", "norm_kv"):
            ln = getattr(attn, name)
            self.register_buffer(f"{name}_w", ln.weight.detach().clone())
            self.register_buffer(f"{name}_b", ln.bias.detach().clone())
        self.register_buffer(
            "wq", (attn.to_q.weight.detach() * Dh**-0.5).T.contiguous()
        )  # (D, H·Dh)
        wkv = torch.cat([attn.to_k.weight.detach(), attn.to_v.weight.detach()], 0)
        self.register_buffer("wkv", wkv.T.contiguous())  # (D, 2·H·Dh)
        self.register_buffer("wo", attn.to_out.weight.detach().T.contiguous())  # (H·Dh, D)
        self.register_buffer("bo", attn.to_out.bias.detach().clone())
        self.register_buffer("neg_recency", -attn.recency.detach().clone()[:, None, None])

    def ln(self, x: torch.Tensor, which: str) -> torch.Tensor:
        w, b = getattr(self, f"{which}_w"), getattr(self, f"{which}_b")
        return F.layer_norm(x, w.shape, w, b, self.eps)

    # Shapes are Python constants (and -1) throughout: a shape read from a tensor would
    # export as Shape/Gather/Concat nodes, each costing as much as a small matmul.
    def query(self, x: torch.Tensor) -> torch.Tensor:
        """x (rows, D) -> scaled, unrotated queries (rows, H, Dh)."""
        return (self.ln(x, "norm_q") @ self.wq).reshape(-1, self.heads, self.dim_head)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (rows, D) -> unrotated k, v (rows, H, Dh)."""
        kv = (self.ln(x, "norm_kv") @ self.wkv).reshape(-1, 2 * self.heads, self.dim_head)
        k, v = kv.split(self.heads, 1)
        return k, v

    def out_rows(self, o: torch.Tensor) -> torch.Tensor:
        """o (rows, H, Dh) -> (rows, D): the output projection."""
        return o.reshape(-1, self.heads * self.dim_head) @ self.wo + self.bo


def _swap_halves(w: torch.Tensor, heads: int, dim_head: int) -> torch.Tensor:
    """Columns (.., H·Dh) of a projection with each head's halves swapped: x @ it gives
    swap(x) = [x[h:], x[:h]] per head, so rotate(x) = x ⊙ [c | c] + swap(x) ⊙ [-s | s]."""
    h = dim_head // 2
    w = w.reshape(*w.shape[:-1], heads, 2, h)
    return w.flip(-2).reshape(*w.shape[:-3], heads * dim_head)


class _FFN(nn.Module):
    def __init__(self, ffn: FeedForward) -> None:
        super().__init__()
        lin1, lin2 = ffn.net[0], ffn.net[2]
        self.eps = ffn.norm.eps
        self.register_buffer("ln_w", ffn.norm.weight.detach().clone())
        self.register_buffer("ln_b", ffn.norm.bias.detach().clone())
        self.register_buffer("w1", lin1.weight.detach().clone())
        self.register_buffer("b1", lin1.bias.detach().clone())
        self.register_buffer("w2", lin2.weight.detach().clone())
        self.register_buffer("b2", lin2.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(x, self.ln_w.shape, self.ln_w, self.ln_b, self.eps)
        return F.linear(F.gelu(F.linear(h, self.w1, self.b1)), self.w2, self.b2)


class _Folded(nn.Module):
    """Weights shared by both step graphs."""

    def __init__(self, model: POYO) -> None:
        super().__init__()
        c = model.config
        self.n, self.dim, self.dim_head, self.depth = (
            c.latents_per_group,
            c.dim,
            c.dim_head,
            c.depth,
        )
        self.rotate_values = c.rotate_values
        self.register_buffer("basis", rotation_basis(c.dim_head))
        self.register_buffer("latent", model.latent_emb.detach().clone())  # (n, D)
        # count path: [unit_sum | elapsed] @ count_w + count_b (one product)
        cw = torch.cat([model.count_proj.weight.detach().T, model.elapsed_emb.detach()[None]], 0)
        self.register_buffer("count_w", cw)  # (D+1, D)
        self.register_buffer("count_b", model.count_proj.bias.detach().clone())
        self.enc = _Attn(model.enc_attn)
        self.enc_ffn = _FFN(model.enc_ffn)
        self.self_attn = nn.ModuleList(_Attn(a) for a in model.self_attn)
        self.self_ffn = nn.ModuleList(_FFN(f) for f in model.self_ffn)
        self.dec = _Attn(model.dec_attn)
        self.dec_ffn = _FFN(model.dec_ffn)
        self.register_buffer("dec_norm_w", model.dec_norm.weight.detach().clone())
        self.register_buffer("dec_norm_b", model.dec_norm.bias.detach().clone())
        self.dec_norm_eps = model.dec_norm.eps
        names = model.output_names
        self.register_buffer(
            "head_w", torch.cat([model.heads[k].weight.detach() for k in names], 0).T.contiguous()
        )  # (D, sum of head dims)
        self.register_buffer("head_b", torch.cat([model.heads[k].bias.detach() for k in names]))

    def rotation(self, phase: torch.Tensor) -> torch.Tensor:
        """phase (B, Dh) = [cos | sin] -> R (B, Dh, Dh)."""
        d = self.dim_head
        return (phase @ self.basis).reshape(-1, d, d)  # -1: the exported graph keeps B dynamic

    def readout(self, y: torch.Tensor) -> torch.Tensor:
        """y (B, D) after the decoder attention -> (B, P + D): the predictions of every
        head (P = sum of head dims), then the normalised features the heads read (what
        a session's recurrent readout, ``model.session_readout``, reads instead)."""
        y = y + self.dec_ffn(y)
        y = F.layer_norm(
            y, self.dec_norm_w.shape, self.dec_norm_w, self.dec_norm_b, self.dec_norm_eps
        )
        return torch.cat([y @ self.head_w + self.head_b, y], -1)


def decoder_query(model: POYO, query: torch.Tensor) -> torch.Tensor:
    """The decoder's projected query (Hc, 1, Dh), scaled, unrotated, for a query (D,):
    constant per session and output, so it lives in the unit tables, not the graph."""
    att = _Attn(model.dec_attn)
    with torch.no_grad():
        return att.query(query[None]).transpose(0, 1).contiguous()


CAUSAL_INPUTS_HEAD = [
    "spike_k",  # (S, Hc, Dh) rotated encoder keys of the group's spikes
    "spike_v",  # (S, Hc, Dh) their values (rotated if rotate_values)
    "spike_bias",  # (1 or B·n, B+S) additive score of [<null> of each query | spikes]:
    #                0 where a query's rows see the key, -inf where not
    "count_feat",  # (B, D+1) [sum of the unit embeddings of the spikes seen | elapsed]
    "phase",  # (B, Dh) [cos | sin] of each query's latent time t_b
    "dt",  # (1 or B·n, L+B·n) t_b - time of each key row: inf where a row must not
    #        see the key (empty cache row, another query's rows), 0 for its own rows
    "dec_dt",  # (1 or B, L+B·n) the same per query, for the readout
    "null_k",  # (Hc, 1, Dh) <null> key, unrotated
    "null_v",  # (Hc, 1, Dh) <null> value
    "dec_q",  # (Hc, 1, Dh) decoder query, projected and scaled, unrotated
    "query",  # (1, D) output query embedding (session + output kind)
]


def causal_inputs(depth: int) -> list[str]:
    """Input names of ``CausalKVStep`` in order: one cache input per layer, so the
    engine binds views of its cache arrays once and no graph node slices them."""
    return (
        CAUSAL_INPUTS_HEAD
        + [f"cache_k{i}" for i in range(depth)]  # (Hs, L, Dh) keys rotated at their time
        + [f"cache_v{i}" for i in range(depth)]  # (Hs, L, Dh)
        + ["dec_k", "dec_v"]  # (Hc, L, Dh) decoder keys (rotated) / values of final states
    )


CACHE_OUTPUTS = ["new_k", "new_v", "new_dk", "new_dv"]


class CausalKVStep(nn.Module):
    """Causal steps of one stream: B partial groups of the current group (queries at
    times t_b, each seeing the group's spikes up to t_b) read the cache of finished groups.

    The B queries are rows, not a batch dimension: their n latents each are stacked into
    B·n rows that attend to the cache and, through the ``dt`` / ``spike_bias`` masks,
    only to their own query's rows. Streaming runs B = 1, the smallest graph; offline
    decoding runs ``CausalChunk``, the same function for many groups at once.

    ``readout``: output ``prediction`` (B, P + D: every head, then the features the heads
    read; ``_Folded.readout``). ``emit``: output the rows'
    cache entries ``new_k``, ``new_v`` (depth·Hs, B·n, Dh), ``new_dk``, ``new_dv``
    (Hc, B·n, Dh); run at a group's end time (elapsed 1, all its spikes) the last n rows
    are the finished group's cache rows.
    """

    def __init__(self, model: POYO, readout: bool = True, emit: bool = False) -> None:
        super().__init__()
        if not (readout or emit):
            raise ValueError("a step graph needs an output: readout, emit or both")
        self.f = _Folded(model)
        self.readout, self.emit = readout, emit
        self.input_names = causal_inputs(self.f.depth)
        self.output_names = (["prediction"] if readout else []) + (CACHE_OUTPUTS if emit else [])

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        f = self.f
        n, depth = f.n, f.depth
        (spike_k, spike_v, spike_bias, count_feat, phase, dt, dec_dt) = inputs[:7]
        (null_k, null_v, dec_q, query) = inputs[7:11]
        cache_k, cache_v = inputs[11 : 11 + depth], inputs[11 + depth : 11 + 2 * depth]
        dec_k, dec_v = inputs[11 + 2 * depth], inputs[12 + 2 * depth]
        R = f.rotation(phase)  # (B, Dh, Dh)

        Dh = f.dim_head

        def rot(x: torch.Tensor, H: int, R: torch.Tensor = R) -> torch.Tensor:
            """Rows x (B·n, H, Dh) rotated by their query's R (B, Dh, Dh)."""
            return (x.reshape(-1, n * H, Dh) @ R).reshape(-1, H, Dh)

        # encoder: each query's n latents attend to its <null> + the spikes it sees
        enc = f.enc
        x = f.latent + (count_feat @ f.count_w + f.count_b)[:, None]  # (B, n, D)
        x = x.reshape(-1, f.dim)  # (B·n, D)
        Hc, Hs = enc.heads, f.self_attn[0].heads
        q = rot(enc.query(x), Hc).transpose(0, 1)  # (Hc, B·n, Dh)
        null_kr = (null_k.transpose(0, 1) @ R).transpose(0, 1)  # (Hc, B, Dh) at each t_b
        k = torch.cat([null_kr, spike_k.transpose(0, 1)], 1)  # (Hc, B+S, Dh)
        if f.rotate_values:
            null_v = (null_v.transpose(0, 1) @ R).transpose(0, 1)  # (Hc, B, Dh)
        else:
            null_v = null_v.expand_as(null_kr)
        v = torch.cat([null_v, spike_v.transpose(0, 1)], 1)  # (Hc, B+S, Dh)
        p = torch.softmax(q @ k.transpose(1, 2) + spike_bias, -1)  # (Hc, B·n, B+S)
        o = (p @ v).transpose(0, 1)  # (B·n, Hc, Dh)
        if f.rotate_values:
            o = rot(o, Hc, R.transpose(1, 2))  # back from each query's time
        x = x + enc.out_rows(o)
        x = x + f.enc_ffn(x)

        # processor: causal self-attention over cached groups + the query's own rows
        self_bias = f.self_attn[0].neg_recency * dt  # (Hs, 1 or B·n, L+B·n)
        new_k, new_v = [], []
        for layer in range(depth):
            a = f.self_attn[layer]
            q = rot(a.query(x), Hs).transpose(0, 1)  # (Hs, B·n, Dh)
            k, v = a.keys_values(x)  # (B·n, Hs, Dh)
            k, v = rot(k, Hs).transpose(0, 1), v.transpose(0, 1)
            if self.emit:
                new_k.append(k)
                new_v.append(v)
            kk = torch.cat([cache_k[layer], k], 1)  # (Hs, L+B·n, Dh)
            vv = torch.cat([cache_v[layer], v], 1)
            p = torch.softmax(q @ kk.transpose(1, 2) + self_bias, -1)  # (Hs, B·n, L+B·n)
            o = p @ vv
            x = x + a.out_rows(o.transpose(0, 1))
            x = x + f.self_ffn[layer](x)

        dk, dv = f.dec.keys_values(x)  # (B·n, Hc, Dh)
        dk, dv = rot(dk, f.dec.heads).transpose(0, 1), dv.transpose(0, 1)  # (Hc, B·n, Dh)
        outputs = []
        if self.readout:  # the output query at each t_b reads finished groups + its rows
            kk = torch.cat([dec_k, dk], 1)  # (Hc, L+B·n, Dh)
            vv = torch.cat([dec_v, dv], 1)
            qd = (dec_q.transpose(0, 1) @ R).transpose(0, 1)  # (Hc, B, Dh)
            p = torch.softmax(qd @ kk.transpose(1, 2) + f.dec.neg_recency * dec_dt, -1)
            outputs.append(f.readout(query + f.dec.out_rows((p @ vv).transpose(0, 1))))
        if self.emit:
            outputs += [torch.cat(new_k, 0), torch.cat(new_v, 0), dk, dv]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


WINDOW_INPUTS = [
    "spike_k",  # (N, Hc, Dh) rotated keys of the window's spikes
    "spike_v",  # (N, Hc, Dh)
    "group_sum",  # (K, D) sum of unit embeddings of each latent group's own spikes
    "lat_phase",  # (K, Dh) [cos | sin] of the latent times t - W + k·s
    "dec_phase",  # (Dh,) [cos | sin] of t
    "self_dt",  # (K·n, K·n) |time differences| between latents (constant)
    "dec_dt",  # (K·n,) t - latent time (constant)
    "null_k",  # (Hc, 1, Dh)
    "null_v",  # (Hc, 1, Dh)
    "dec_q",  # (Hc, 1, Dh)
    "query",  # (1, D)
]


class WindowKVStep(nn.Module):
    """Window mode for one stream: latents recomputed each step from cached spike keys.
    Inputs ``WINDOW_INPUTS``; output ``prediction`` (P + D,): the heads, then their features."""

    input_names = WINDOW_INPUTS
    output_names = ["prediction"]

    def __init__(self, model: POYO) -> None:
        super().__init__()
        self.f = _Folded(model)
        self.K = int(round(model.config.context / model.config.latent_step))

    def forward(
        self,
        spike_k: torch.Tensor,
        spike_v: torch.Tensor,
        group_sum: torch.Tensor,
        lat_phase: torch.Tensor,
        dec_phase: torch.Tensor,
        self_dt: torch.Tensor,
        dec_dt: torch.Tensor,
        null_k: torch.Tensor,
        null_v: torch.Tensor,
        dec_q: torch.Tensor,
        query: torch.Tensor,
    ) -> torch.Tensor:
        f, K, n, D = self.f, self.K, self.f.n, self.f.dim
        Kn = K * n
        Rl = f.rotation(lat_phase)  # (K, Dh, Dh)
        Rd = f.rotation(dec_phase[None])[0]  # (Dh, Dh)

        Dh = f.dim_head

        def rot(x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
            """Rows x (K·n, H, Dh) rotated per latent group by R (K, Dh, Dh)."""
            H = x.shape[1]  # a constant here: every shape of the window graph is fixed
            return (x.reshape(K, n * H, Dh) @ R).reshape(Kn, H, Dh)

        enc = f.enc
        ones = torch.ones(K, 1)  # elapsed = 1: every window group is complete
        x = f.latent + (torch.cat([group_sum, ones], 1) @ f.count_w + f.count_b)[:, None]
        x = x.reshape(Kn, D)  # (K·n, D)
        qp = enc.query(x)  # (K·n, Hc, Dh) unrotated
        q = rot(qp, Rl).transpose(0, 1)  # (Hc, K·n, Dh)
        s_spk = q @ spike_k.permute(1, 2, 0)  # (Hc, K·n, N)
        # <null> sits at the latent's own time: its score needs no rotation
        s_null = qp.transpose(0, 1) @ null_k.transpose(1, 2)  # (Hc, K·n, 1)
        p = torch.softmax(torch.cat([s_null, s_spk], -1), -1)
        if f.rotate_values:
            o = rot((p[..., 1:] @ spike_v.transpose(0, 1)).transpose(0, 1), Rl.transpose(1, 2))
            o = o.transpose(0, 1) + p[..., :1] * null_v
        else:
            o = p @ torch.cat([null_v, spike_v.transpose(0, 1)], 1)  # (Hc, K·n, Dh)
        x = x + enc.out_rows(o.transpose(0, 1))
        x = x + f.enc_ffn(x)

        self_bias = f.self_attn[0].neg_recency * self_dt  # (Hs, K·n, K·n)
        for layer in range(f.depth):
            a = f.self_attn[layer]
            q = rot(a.query(x), Rl).transpose(0, 1)  # (Hs, K·n, Dh)
            k, v = a.keys_values(x)
            k = rot(k, Rl).transpose(0, 1)
            p = torch.softmax(q @ k.transpose(1, 2) + self_bias, -1)
            x = x + a.out_rows((p @ v.transpose(0, 1)).transpose(0, 1))
            x = x + f.self_ffn[layer](x)

        dk, dv = f.dec.keys_values(x)
        p = torch.softmax(
            (dec_q @ Rd) @ rot(dk, Rl).permute(1, 2, 0) + f.dec.neg_recency * dec_dt, -1
        )  # (Hc, 1, K·n)
        return f.readout(query + f.dec.out_rows((p @ dv.transpose(0, 1)).transpose(0, 1)))[0]


def chunk_inputs(depth: int) -> list[str]:
    """Input names of ``CausalChunk`` in order."""
    return [
        "spike_k",  # (Hc, G, S, Dh) each group's spikes' keys (their units' rows, not yet
        "spike_v",  # (Hc, G, S, Dh) rotated) and values, padded to the chunk's widest group
        "spike_cos",  # (G, S, F) cos of each spike's time, per rotated pair
        "spike_sin",  # (G, S, F) sin
        "spike_bias",  # (G, B, S) 0 where row block b of group g sees the spike, -inf not
        "count_feat",  # (G, B, D+1) [unit-embedding sum of the spikes seen | elapsed]
        "rot_cos",  # (G, B, Dh) [cos | cos] of each block's time (1: unrotated pairs)
        "rot_sin",  # (G, B, Dh) [-sin | sin] (0: unrotated pairs)
        "band_dt",  # (G, B, Wb·n) its time - time of each row of the Wb groups before
        #             its group; inf where not seen (before the stream, a context of 1)
        "band_idx",  # (G, Wb) int64: those groups' places in [the Wb groups before the
        #              chunk | the chunk's G groups], j + i for group j
        "null_k",  # (Hc, 1, Dh)
        "null_v",  # (Hc, 1, Dh)
        "dec_q",  # (Hc, 1, Dh)
        "query",  # (1, D)
        *[f"prev_k{i}" for i in range(depth)],  # (Hs, Wb·n, Dh) the Wb groups before the
        *[f"prev_v{i}" for i in range(depth)],  # chunk, oldest first, rotated at their time
        "prev_dk",  # (Hc, Wb·n, Dh) decoder keys / values of their final states
        "prev_dv",
    ]


CHUNK_OUTPUTS = ["prediction", "new_k", "new_v", "new_dk", "new_dv"]


def _swap(x: torch.Tensor) -> torch.Tensor:
    """Each head's halves swapped: (..., Dh) [x[h:], x[:h]]."""
    h = x.shape[-1] // 2
    return torch.cat([x[..., h:], x[..., :h]], -1)


class _HeadsFirst(nn.Module):
    """An ``_Attn``'s weights laid out per head, (H, D, ·), so projections come out
    heads first (H, rows, Dh) with no transpose, each with its halves-swapped copy, so
    rotating at the rows' times is elementwise: rot(x) = x ⊙ C + swap(x) ⊙ S with
    C = [cos | cos], S = [-sin | sin]. For the chunk graph's large batches, where a
    transpose or a batch of 32 x 32 rotation products costs more than the extra
    projection arithmetic."""

    def __init__(self, att: _Attn) -> None:
        super().__init__()
        self.att = att
        H, Dh = att.heads, att.dim_head

        def per_head(w: torch.Tensor) -> torch.Tensor:  # (D, H·Dh) -> (H, D, Dh)
            return w.reshape(w.shape[0], H, Dh).permute(1, 0, 2)

        wq = att.wq
        wk, wv = att.wkv[:, : H * Dh], att.wkv[:, H * Dh :]
        sw = [_swap_halves(w, H, Dh) for w in (wq, wk)]
        self.register_buffer("wq2", torch.cat([per_head(wq), per_head(sw[0])], 2).contiguous())
        self.register_buffer(
            "wkv3", torch.cat([per_head(wk), per_head(sw[1]), per_head(wv)], 2).contiguous()
        )  # (H, D, 3·Dh): k | swapped k | v
        self.register_buffer("wo3", att.wo.reshape(H, Dh, -1).contiguous())  # (H, Dh, D)

    def query(self, x: torch.Tensor, C: torch.Tensor, S: torch.Tensor, n: int):
        """x (R, D) -> q rotated and unrotated, (H, R/n, n, Dh) each."""
        Dh = self.att.dim_head
        y = self.att.ln(x, "norm_q") @ self.wq2  # (H, R, 2·Dh)
        y = y.reshape(self.att.heads, -1, n, 2 * Dh)
        q, qs = y[..., :Dh], y[..., Dh:]
        return q * C + qs * S, q

    def keys_values(self, x: torch.Tensor, C: torch.Tensor, S: torch.Tensor, n: int):
        """x (R, D) -> k rotated, v, (H, R/n, n, Dh) each."""
        Dh = self.att.dim_head
        y = (self.att.ln(x, "norm_kv") @ self.wkv3).reshape(self.att.heads, -1, n, 3 * Dh)
        return y[..., :Dh] * C + y[..., Dh : 2 * Dh] * S, y[..., 2 * Dh :]

    def out_rows(self, o: torch.Tensor) -> torch.Tensor:
        """o (H, R, Dh) -> (R, D): the output projection, summed over heads."""
        return (o @ self.wo3).sum(0) + self.att.bo


class CausalChunk(nn.Module):
    """Offline causal decoding of G consecutive groups in one run: the same function as
    streaming (``CausalKVStep``) for every query and every group's finish in them.

    Each group g has B row blocks of n latents: block 0 is its finish (at its end time,
    all its spikes), blocks 1.. its queries (padding blocks see only their <null>). A
    finished group's layer-l rows depend on its own spikes and on the layer-l rows of the
    Wb = W-1 groups before it, so every layer runs over all G groups at once: the finish
    blocks' keys and values, after the Wb groups cached before the chunk, form a bank in
    which group j reads its band (bank groups j..j+Wb-1, ``band_idx``), and every block
    reads its group's band and its own n rows. The readout reads the final states' band
    the same way. Rows are kept heads first (``_HeadsFirst``). Outputs: ``prediction``
    (G, B, P); the finish blocks' rows ``new_k``, ``new_v`` (depth·Hs, G, n, Dh),
    ``new_dk``, ``new_dv`` (Hc, G, n, Dh), which the engine keeps as the next chunk's
    ``prev_*`` and finally as its ring.
    """

    def __init__(self, model: POYO) -> None:
        super().__init__()
        self.f = _Folded(model)
        self.Wb = max(model.config.context_groups - 1, 1)
        self.F = int(model.periods.numel())  # rotated pairs per head: the first F of Dh/2
        self.enc = _HeadsFirst(self.f.enc)
        self.self_attn = nn.ModuleList(_HeadsFirst(a) for a in self.f.self_attn)
        self.dec = _HeadsFirst(self.f.dec)
        self.input_names = chunk_inputs(self.f.depth)
        self.output_names = CHUNK_OUTPUTS

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f = self.f
        n, depth, D, Dh, Wb = f.n, f.depth, f.dim, f.dim_head, self.Wb
        (spike_k, spike_v, spike_cos, spike_sin, spike_bias, count_feat) = inputs[:6]
        (rot_cos, rot_sin, band_dt, band_idx, null_k, null_v, dec_q, query) = inputs[6:14]
        prev_k, prev_v = inputs[14 : 14 + depth], inputs[14 + depth : 14 + 2 * depth]
        prev_dk, prev_dv = inputs[14 + 2 * depth], inputs[15 + 2 * depth]
        G, B, S = spike_bias.shape  # dynamic: Shape nodes (an offline graph, run rarely)
        Hc, Hs = f.enc.heads, f.self_attn[0].heads
        C = rot_cos.reshape(1, -1, 1, Dh)  # (1, G·B, 1, Dh): per block, all its rows
        Sn = rot_sin.reshape(1, -1, 1, Dh)

        def band(prev: torch.Tensor, fin: torch.Tensor) -> torch.Tensor:
            """prev (H, Wb·n, Dh), finish rows fin (H, G, n, Dh) -> each group's band
            (H, G, Wb·n, Dh)."""
            bank = torch.cat([prev.reshape(-1, Wb, n, Dh), fin], 1)  # (H, Wb+G, n, Dh)
            return bank[:, band_idx].reshape(bank.shape[0], G, Wb * n, Dh)

        def rotate_spikes(x: torch.Tensor) -> torch.Tensor:
            """x (Hc, G, S, Dh) rotated at its spikes' times: pairs (a_i, b_i) =
            (x[i], x[h+i]) for i < F; the other pairs pass through."""
            h, nf = Dh // 2, self.F
            a, b = x[..., :nf], x[..., h : h + nf]
            ra, rb = a * spike_cos - b * spike_sin, b * spike_cos + a * spike_sin
            if nf == h:  # every pair rotated
                return torch.cat([ra, rb], -1)
            return torch.cat([ra, x[..., nf:h], rb, x[..., h + nf :]], -1)

        spike_k = rotate_spikes(spike_k)
        if f.rotate_values:
            spike_v = rotate_spikes(spike_v)

        # encoder: each block's n latents attend to its <null> + the spikes it sees
        x = f.latent + (count_feat.reshape(-1, D + 1) @ f.count_w + f.count_b)[:, None]
        x = x.reshape(-1, D)  # (R, D), R = G·B·n
        q, qu = self.enc.query(x, C, Sn, n)  # (Hc, G·B, n, Dh)
        s_spk = (q.reshape(Hc, G, B * n, Dh) @ spike_k.transpose(2, 3)).reshape(Hc, G, B, n, S)
        s_spk = s_spk + spike_bias[None, :, :, None, :]
        # the <null> key sits at the block's own time: its score needs no rotation
        s_null = (qu @ null_k.transpose(1, 2)[:, None]).reshape(Hc, G, B, n, 1)
        p = torch.softmax(torch.cat([s_null, s_spk], -1), -1)
        o = (p[..., 1:].reshape(Hc, G, B * n, S) @ spike_v).reshape(Hc, -1, n, Dh)
        if f.rotate_values:  # back from each block's time
            o = o * C - _swap(o) * Sn
        o = o + p[..., :1].reshape(Hc, -1, n, 1) * null_v[:, None]
        x = x + self.enc.out_rows(o.reshape(Hc, -1, Dh))
        x = x + f.enc_ffn(x)

        # processor: every block reads its group's band and its own rows
        dt = band_dt.reshape(1, G, B, 1, Wb * n)
        self_bias = f.self_attn[0].neg_recency.reshape(-1, 1, 1, 1, 1) * dt  # (Hs, G, B, 1, Wb·n)
        new_k, new_v = [], []
        for layer in range(depth):
            a = self.self_attn[layer]
            q, _ = a.query(x, C, Sn, n)  # (Hs, G·B, n, Dh)
            k, v = a.keys_values(x, C, Sn, n)
            k, v = k.reshape(Hs, G, B, n, Dh), v.reshape(Hs, G, B, n, Dh)
            fk, fv = k[:, :, 0], v[:, :, 0]  # (Hs, G, n, Dh) the finished groups' rows
            new_k.append(fk)
            new_v.append(fv)
            bk, bv = band(prev_k[layer], fk), band(prev_v[layer], fv)  # (Hs, G, Wb·n, Dh)
            s_band = (q.reshape(Hs, G, B * n, Dh) @ bk.transpose(2, 3)).reshape(Hs, G, B, n, Wb * n)
            s_own = q.reshape(Hs, G, B, n, Dh) @ k.transpose(3, 4)  # (Hs, G, B, n, n)
            p = torch.softmax(torch.cat([s_band + self_bias, s_own], -1), -1)
            o = (p[..., : Wb * n].reshape(Hs, G, B * n, Wb * n) @ bv).reshape(Hs, G, B, n, Dh)
            o = o + p[..., Wb * n :] @ v
            x = x + a.out_rows(o.reshape(Hs, -1, Dh))
            x = x + f.self_ffn[layer](x)

        # readout: the output query at each block's time reads the final states' band
        # and the block's own rows
        dk, dv = self.dec.keys_values(x, C, Sn, n)
        dk, dv = dk.reshape(Hc, G, B, n, Dh), dv.reshape(Hc, G, B, n, Dh)
        fdk, fdv = dk[:, :, 0], dv[:, :, 0]
        bdk, bdv = band(prev_dk, fdk), band(prev_dv, fdv)  # (Hc, G, Wb·n, Dh)
        qd = dec_q * rot_cos.reshape(1, -1, Dh) + _swap(dec_q) * rot_sin.reshape(1, -1, Dh)
        qd = qd.reshape(Hc, G, B, Dh)  # the output query rotated at each block's time
        s_band = qd @ bdk.transpose(2, 3)  # (Hc, G, B, Wb·n)
        s_band = s_band + f.dec.neg_recency.reshape(-1, 1, 1, 1) * band_dt[None]
        s_own = (qd[:, :, :, None] * dk).sum(-1)  # (Hc, G, B, n)
        p = torch.softmax(torch.cat([s_band, s_own], -1), -1)
        o = p[..., : Wb * n] @ bdv + (p[..., Wb * n :, None] * dv).sum(3)  # (Hc, G, B, Dh)
        pred = f.readout(query + self.dec.out_rows(o.reshape(Hc, -1, Dh))).reshape(G, B, -1)
        return (
            pred,
            torch.stack(new_k).reshape(depth * Hs, G, n, Dh),
            torch.stack(new_v).reshape(depth * Hs, G, n, Dh),
            fdk,
            fdv,
        )
