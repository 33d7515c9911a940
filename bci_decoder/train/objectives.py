"""Training objectives: the supervised regression loss and the masked Poisson loss (MtM).

Both average over each sample's valid entries first, then over samples, so equal shards
of a batch average to the whole batch's loss (DDP equivalence).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bci_decoder.config import MtMSettings, TrainConfig
from bci_decoder.data.session import Session, time_split
from bci_decoder.decode import to_torch
from bci_decoder.model.masking import MTM_KEYS
from bci_decoder.train.checkpoint import Decoder
from bci_decoder.train.data import MtMSampler, MtMSource


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each sample's valid entries, then over samples, so that equal shards of a
    batch average to the whole batch's loss (DDP equivalence)."""
    pred = pred[..., : target.shape[-1]]
    m = mask.float()
    per_sample = ((pred - target) ** 2 * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp(min=1)
    return per_sample.mean()


def masked_poisson_nll(
    log_rate: torch.Tensor, counts: torch.Tensor, scored: torch.Tensor, bin_width: float
) -> torch.Tensor:
    """Poisson NLL (nats per scored entry) of counts under rates exp(log_rate) Hz.

    log_rate, counts, scored: (B, U, T). Entries that are not scored add nothing, so the
    visible (unmasked) pairs never enter the loss. The log(k!) term is left out (it does
    not depend on the model).
    """
    log_mu = log_rate + torch.log(torch.tensor(bin_width, dtype=log_rate.dtype))
    nll = F.poisson_nll_loss(log_mu, counts, log_input=True, full=False, reduction="none")
    m = scored.to(nll.dtype)
    per_sample = (nll * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp(min=1)
    return per_sample.mean()


class MtMObjective:
    """The masked objective of a training run: its sampler and one batch's loss per step."""

    def __init__(self, decoder: Decoder, cfg: TrainConfig, sessions: list[Session]) -> None:
        self.settings = st = cfg.mtm
        self.window = st.window or cfg.model.context
        sources = []
        for s in sessions:
            split = time_split(s, cfg.data.train_fraction, cfg.data.valid_fraction)
            sources.append(
                MtMSource(
                    session=s,
                    session_index=decoder.sessions[s.session_id],
                    unit_index=decoder.units.session_units(s.session_id, s.unit_ids),
                    span=split.train,
                )
            )
        self.sampler = MtMSampler(
            sources, cfg.model.latent_step, self.window, st, seed=cfg.seed + 1_000_003
        )

    def loss(self, model: torch.nn.Module, step: int) -> tuple[str, torch.Tensor]:
        scheme, batch = self.sampler.batch(step)
        log_rate = model(mode="mtm", **to_torch(batch, MTM_KEYS))
        return scheme, masked_poisson_nll(
            log_rate,
            torch.from_numpy(batch["mtm_counts"]),
            torch.from_numpy(batch["mtm_scored"]),
            self.settings.bin_width,
        )


def attach_mtm_head(decoder: Decoder, latents: str | None = None) -> Decoder:
    """A copy of ``decoder`` with a fresh MtM head; every pretrained weight kept as is.
    ``latents``: which latents the head reads (``POYOConfig.mtm_latents``); None: the
    model's setting."""
    from bci_decoder.model.poyo import POYO

    if decoder.model.mtm is not None:
        return decoder.clone()
    old = decoder.model
    update: dict = {"mtm_head": True} | ({"mtm_latents": latents} if latents else {})
    cfg = old.config.model_copy(update=update)
    model = POYO(
        cfg,
        num_units=old.unit_emb.num_embeddings,
        num_sessions=old.session_emb.num_embeddings,
        outputs=old.output_dims,
    )
    load_without_mtm(model, old.state_dict())
    dec = decoder.clone()
    dec.model = model
    return dec


def load_without_mtm(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a state that may lack the MtM head's weights (a model trained without it);
    any other missing or unexpected key is an error."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    other = [k for k in missing if not k.startswith("mtm.")]
    if other or unexpected:
        raise ValueError(f"state does not fit the model: missing {other}, unexpected {unexpected}")


def train_mtm_head(
    decoder: Decoder,
    sessions: list[Session],
    settings: MtMSettings,
    steps: int,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = False,
    latents: str | None = None,
) -> tuple[Decoder, list[float]]:
    """Fit only the MtM head of ``decoder`` (every other weight frozen) on the training
    parts of ``sessions`` (known to the model): a supervised model learns to reconstruct
    spiking without its behaviour readout moving. Returns the decoder and the losses."""
    from tqdm import tqdm

    dec = attach_mtm_head(decoder, latents)
    model = dec.model
    window = settings.window or dec.config.context
    sources = [
        MtMSource(
            session=s,
            session_index=dec.sessions[s.session_id],
            unit_index=dec.units.session_units(s.session_id, s.unit_ids),
            span=time_split(s).train,
        )
        for s in sessions
    ]
    sampler = MtMSampler(sources, dec.config.latent_step, window, settings, seed=seed)
    head = list(model.mtm.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(head, lr=lr, weight_decay=0.01)
    losses = []
    model.train()
    for step in tqdm(range(steps), desc="mtm head", disable=not progress, dynamic_ncols=True):
        for g in opt.param_groups:  # warm-up 5%, then cosine
            w = min(1.0, (step + 1) / max(1, 0.05 * steps))
            g["lr"] = lr * w * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        scheme, batch = sampler.batch(step)
        log_rate = model(mode="mtm", **to_torch(batch, MTM_KEYS))
        loss = masked_poisson_nll(
            log_rate,
            torch.from_numpy(batch["mtm_counts"]),
            torch.from_numpy(batch["mtm_scored"]),
            settings.bin_width,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    dec.info = dict(dec.info) | {
        "train_config": dict(dec.info.get("train_config", {}))
        | {"mtm": settings.model_dump() | {"enabled": True, "head_only_steps": steps}}
    }
    return dec, losses


class ChannelTie:
    """A pull of each subject's same-channel unit rows toward their mean across days.

    A chronic array's channel records related activity day after day, but the unit
    vocabulary is per session, so nothing in the supervised loss makes a channel's row on
    one day mean anything on another: a new day warm-started from the nearest day's rows
    decoded at R² 0.28 zero-shot (benchmarks/results/across_days.json). This penalty,
    ``weight`` x the mean over tied rows of ||e_u - mean of its channel group||², makes a
    channel's rows agree across days wherever the data let them, so the warm start
    (``subjects.plan_warm_start``) inherits a row that means the same thing.

    Groups: units of sessions with the same subject and the same parsed channel
    (``subjects.channel_key``), two days or more; other units are not touched.
    """

    def __init__(self, decoder: Decoder, sessions: list[Session], weight: float) -> None:
        from bci_decoder.subjects import channel_key

        self.weight = weight
        groups: dict[tuple[str, str], list[int]] = {}
        for s in sessions:
            if not s.subject:
                continue
            rows = decoder.units.session_units(s.session_id, s.unit_ids)
            for name, row in zip(s.unit_ids, rows, strict=True):
                key = channel_key(name)
                if key is not None:
                    groups.setdefault((s.subject, key), []).append(int(row))
        groups = {k: v for k, v in groups.items() if len(v) >= 2}
        rows = [r for v in groups.values() for r in v]
        gid = [g for g, v in enumerate(groups.values()) for _ in v]
        self.rows = torch.tensor(rows, dtype=torch.int64)  # (R,)
        self.group = torch.tensor(gid, dtype=torch.int64)  # (R,) group of each row
        self.num_groups = len(groups)
        self.size = torch.bincount(self.group, minlength=self.num_groups).clamp(min=1)  # (G,)

    def loss(self, unit_emb: torch.Tensor) -> torch.Tensor:
        if self.num_groups == 0 or self.weight == 0:
            return unit_emb.new_zeros(())
        e = unit_emb[self.rows]  # (R, D)
        sums = e.new_zeros(self.num_groups, e.shape[1]).index_add_(0, self.group, e)  # (G, D)
        mean = sums / self.size.unsqueeze(1).to(e.dtype)
        return self.weight * ((e - mean[self.group]) ** 2).sum(1).mean()
