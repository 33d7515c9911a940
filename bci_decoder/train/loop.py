"""Multi-session training: sampling, AdamW with warm-up + cosine, validation R² each
epoch, checkpoints, resume, and distributed data parallel under torchrun."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from bci_decoder.config import TrainConfig
from bci_decoder.data.nwb import load_sessions
from bci_decoder.data.session import Session, time_split
from bci_decoder.data.simulate import simulate_sessions
from bci_decoder.decode import CAUSAL_KEYS, WINDOW_KEYS, decode_causal, to_torch
from bci_decoder.metrics import r2_score
from bci_decoder.model.poyo import POYO
from bci_decoder.model.vocab import UnitVocab, Vocab, unit_key
from bci_decoder.subjects import session_unit_rates
from bci_decoder.train.checkpoint import Decoder, Normalizer
from bci_decoder.train.data import BatchSampler, SessionSource
from bci_decoder.train.objectives import ChannelTie, MtMObjective, masked_mse

__all__ = ["build_decoder", "gather_sessions", "masked_mse", "train", "validate"]


def selected_sessions(cfg: TrainConfig) -> list[Session]:
    """Every session the config selects (data.real, data.simulate, include/exclude),
    with or without behaviour, each file read once."""
    sessions: list[Session] = []
    for path in cfg.data.real:
        sessions.extend(load_sessions(path))
    if cfg.data.simulate is not None:
        sessions.extend(simulate_sessions(cfg.data.simulate))
    if cfg.data.include:
        sessions = [s for s in sessions if s.session_id in cfg.data.include]
    return [s for s in sessions if s.session_id not in cfg.data.exclude]


def gather_sessions(cfg: TrainConfig, selected: list[Session] | None = None) -> list[Session]:
    """The selected sessions that have behaviour (the supervised objective's)."""
    sessions = selected_sessions(cfg) if selected is None else selected
    unlabelled = [s.session_id for s in sessions if not s.behavior]
    if unlabelled:  # nothing to regress on; the masked objective (MtM) is what can use them
        print(f"skipping sessions without behaviour: {', '.join(unlabelled)}")
        sessions = [s for s in sessions if s.behavior]
    if not sessions:
        raise ValueError("the config selects no sessions (data.real / data.simulate)")
    ids = [s.session_id for s in sessions]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate session ids: {ids}")
    return sessions


def pretraining_unit_rates(sessions: list[Session], cfg: TrainConfig) -> dict[str, float]:
    """Each pretraining unit's firing rate (Hz) over its session's training part."""
    rates: dict[str, float] = {}
    for s in sessions:
        rates |= session_unit_rates(s, time_split(s, cfg.data.train_fraction).train)
    return rates


def build_decoder(
    cfg: TrainConfig, sessions: list[Session], unlabelled: list[Session] | None = None
) -> tuple[Decoder, list[SessionSource]]:
    """Fresh model with vocabularies and normalisers for ``sessions``.

    ``unlabelled`` sessions (masked objective only) get units and a session row after the
    labelled ones; with ``mtm.enabled`` the model has its masked readout (MtMHead)."""
    every = sessions + list(unlabelled or [])
    units = UnitVocab(unit_key(s.session_id, u) for s in every for u in s.unit_ids)
    svocab = Vocab(s.session_id for s in every)
    outputs: dict[str, int] = {}
    for s in sessions:
        name = s.default_output()
        outputs.setdefault(name, s.behavior[name].dim)
    mcfg = cfg.model.model_copy(update={"mtm_head": True}) if cfg.mtm.enabled else cfg.model
    model = POYO(mcfg, num_units=len(units), num_sessions=len(svocab), outputs=outputs)
    norms: dict[str, dict[str, Normalizer]] = {}
    sources = []
    for s in sessions:
        split = time_split(s, cfg.data.train_fraction, cfg.data.valid_fraction)
        name = s.default_output()
        beh = s.behavior[name].between(*split.train)
        norm = Normalizer.fit(beh.data)
        norms[s.session_id] = {name: norm}
        sources.append(
            SessionSource(
                session=s,
                session_index=svocab[s.session_id],
                unit_index=units.session_units(s.session_id, s.unit_ids),
                output=name,
                output_index=list(outputs).index(name),
                norm=norm,
                span=split.train,
            )
        )
    dec = Decoder(model, units, svocab, norms, modes=list(cfg.modes))
    return dec, sources


def warm_start(decoder: Decoder, folder: Path) -> dict[str, int]:
    """Load a trained model's weights into ``decoder`` (a second training stage).

    Shared weights are copied as they are. Embedding rows are copied by name: units,
    sessions and output kinds the earlier model knew keep their rows; new ones (sessions
    this stage adds) start at the mean of the earlier model's rows, as a calibration
    does. Heads present in only one of the two models (the MtM head, an output kind) are
    left out of the copy: a head this stage adds starts fresh, one it drops is not loaded.
    Any other weight missing, or of another shape, is an error. Returns how many rows
    were copied and how many are new."""
    from bci_decoder.train.checkpoint import Decoder as _Decoder

    prev = _Decoder.load(folder)
    new_state = decoder.model.state_dict()
    old_state = prev.model.state_dict()
    by_name = {
        "unit_emb.weight": (prev.units.to_list(), decoder.units.to_list()),
        "session_emb.weight": (prev.sessions.to_list(), decoder.sessions.to_list()),
        "output_emb.weight": (prev.model.output_names, decoder.model.output_names),
    }
    counts = {"copied": 0, "new": 0}
    for key, value in new_state.items():
        if key in by_name:
            old_names, new_names = by_name[key]
            old_index = {n: i for i, n in enumerate(old_names)}
            old_rows = old_state[key]  # (V_old, D)
            rows = old_rows.mean(0, keepdim=True).repeat(len(new_names), 1)  # (V_new, D)
            for i, n in enumerate(new_names):
                if n in old_index:
                    rows[i] = old_rows[old_index[n]]
                    counts["copied"] += 1
                else:
                    counts["new"] += 1
            new_state[key] = rows
        elif key in old_state:
            if old_state[key].shape != value.shape:
                raise ValueError(
                    f"init model {folder}: {key} is {tuple(old_state[key].shape)}, "
                    f"this config's is {tuple(value.shape)} (other model dimensions?)"
                )
            new_state[key] = old_state[key]
        elif not key.startswith(("mtm.", "heads.")):
            raise ValueError(f"init model {folder} has no {key}: other architecture?")
    extra = [k for k in old_state if k not in new_state and not k.startswith(("mtm.", "heads."))]
    if extra:
        raise ValueError(f"init model {folder} has weights this config lacks: {extra[:5]}")
    decoder.model.load_state_dict(new_state)
    return counts


def lr_at(step: int, total: int, base: float, warmup: float) -> float:
    w = max(1, int(warmup * total))
    if step < w:
        return base * (step + 1) / w
    p = (step - w) / max(1, total - w)
    return base * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def validate(decoder: Decoder, sources: list[SessionSource], cfg: TrainConfig) -> dict[str, float]:
    """Causal-mode R² on each session's validation tail (at most eval_seconds of it)."""
    out = {}
    for src in sources:
        s = src.session
        split = time_split(s, cfg.data.train_fraction, cfg.data.valid_fraction)
        lo, hi = split.valid
        beh = s.behavior[src.output].between(lo, min(hi, lo + cfg.eval_seconds))
        if len(beh.timestamps) < 10:
            continue
        times, units = src.spikes()
        z = decode_causal(decoder, times, units, src.session_index, src.output, beh.timestamps)
        out[s.session_id] = r2_score(beh.data, src.norm.inverse(z))
    return out


def train(
    cfg: TrainConfig, resume: bool = False, progress: bool = True, stop_at: int | None = None
) -> Decoder:
    """Train per ``cfg``; writes ``cfg.out``/{model.safetensors, meta.json, state.pt, log.jsonl}.

    ``resume`` continues from ``state.pt`` (saved each epoch); ``stop_at`` ends the run
    early after that step, as an interruption would (the schedule is unchanged).
    """
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = 0, 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    out = Path(cfg.out)
    selected = selected_sessions(cfg)
    sessions = gather_sessions(cfg, selected)
    extra = (
        [s for s in selected if not s.behavior] if cfg.mtm.enabled and cfg.mtm.unlabelled else []
    )
    if distributed and cfg.mtm.enabled:
        raise ValueError("mtm.enabled is not supported under torchrun yet: train on one process")
    decoder, sources = build_decoder(cfg, sessions, extra)
    decoder.info = {
        "train_config": cfg.model_dump(),
        "sessions": [s.session_id for s in sessions],
        # who and when each session is: a new day of a known subject starts from these
        # (calibrate.warm_start_tables)
        "session_meta": {
            s.session_id: {"subject": s.subject, "recorded_at": s.recorded_at} for s in sessions
        },
        "unit_rates": pretraining_unit_rates(sessions, cfg),
    }
    model = decoder.model
    if cfg.init:
        rows = warm_start(decoder, Path(cfg.init))
        if rank == 0:
            print(
                f"init from {cfg.init}: {rows['copied']} embedding rows copied, {rows['new']} new"
            )
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    start = 0
    if resume and (out / "state.pt").exists():
        state = torch.load(out / "state.pt", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        start = state["step"]
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    sampler = BatchSampler(
        sources,
        cfg.model.latent_step,
        cfg.model.context,
        cfg.sampler,
        seed=cfg.seed,
        modes=tuple(cfg.modes),
    )
    mtm = MtMObjective(decoder, cfg, sessions + extra) if cfg.mtm.enabled else None
    tie = ChannelTie(decoder, sessions + extra, cfg.channel_tie) if cfg.channel_tie else None
    if tie is not None and rank == 0:
        print(f"channel tie: {tie.num_groups} channel groups, {len(tie.rows)} unit rows")
    is_main = rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    log = (out / "log.jsonl").open("a") if is_main else None
    bar = tqdm(
        range(start, cfg.optim.steps),
        initial=start,
        total=cfg.optim.steps,
        disable=not (progress and is_main),
        desc="train",
        dynamic_ncols=True,
    )
    best = -np.inf
    t0 = time.time()
    for step in bar:
        model.train()
        mode, batch = sampler.batch(step, rank, world)
        keys = CAUSAL_KEYS if mode == "causal" else WINDOW_KEYS
        tb = to_torch(batch, keys)
        target = torch.from_numpy(batch["target"])
        tmask = torch.from_numpy(batch["target_mask"])
        if mtm is not None and cfg.mtm.supervised_weight == 0:
            loss = torch.zeros(())  # the masked objective alone: no supervised forward
        else:
            pred = ddp_model(mode=mode, **tb)
            loss = masked_mse(pred, target, tmask)
        record = {}
        if mtm is not None:  # the masked objective mixed in, one window-mode batch a step
            scheme, mtm_loss = mtm.loss(model, step)
            record = {"mtm_scheme": scheme, "mtm_loss": float(mtm_loss.detach())}
            loss = cfg.mtm.supervised_weight * loss + cfg.mtm.weight * mtm_loss
        if tie is not None:
            tie_loss = tie.loss(model.unit_emb.weight)
            record["tie_loss"] = float(tie_loss.detach())
            loss = loss + tie_loss
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.optim.steps, cfg.optim.lr, cfg.optim.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        if distributed:  # log the global batch's loss, not this rank's share
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world
        if log is not None:
            log.write(
                json.dumps(
                    {
                        "step": step,
                        "mode": mode,
                        "loss": float(loss.detach()),
                        "t": round(time.time() - t0, 2),
                    }
                    | record
                )
                + "\n"
            )
            log.flush()
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", mode=mode[0])
        last = step + 1 == cfg.optim.steps or step + 1 == stop_at
        if is_main and ((step + 1) % cfg.eval_every == 0 or last):
            r2 = validate(decoder, sources, cfg)
            mean = float(np.mean(list(r2.values()))) if r2 else float("nan")
            summary = " ".join(f"{k}={v:.3f}" for k, v in r2.items())
            tqdm.write(f"step {step + 1}: valid R² mean {mean:.3f} | {summary}")
            log.write(json.dumps({"step": step + 1, "valid_r2": r2, "valid_mean": mean}) + "\n")
            log.flush()
            decoder.info["steps"] = step + 1
            decoder.info["valid_r2"] = r2
            decoder.save(out)
            torch.save(
                {"model": model.state_dict(), "optim": opt.state_dict(), "step": step + 1},
                out / "state.pt",
            )
            if mean > best:
                best = mean
                decoder.save(out / "best")
        if step + 1 == stop_at:
            break
    if log is not None:
        log.close()
    if distributed:
        # Rank 0 validates and saves after the last step while the others are done; without
        # this barrier a rank that tears gloo down first can abort the one still working.
        dist.barrier()
        dist.destroy_process_group()
    return decoder
