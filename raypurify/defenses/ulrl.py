"""ULRL (Min et al., TIFS) ported from image classifiers to LLM MLP channels.

The reference unlearns a backdoored classifier on clean data, finds the
neurons whose weights moved anomalously, re-initializes them and relearns.
This port's choices:
  - unit: an MLP intermediate channel (gate/up rows + down column, the
    signature's unit), so the defenses stay comparable;
  - unlearning: gradient ascent on the recovery samples at the recovery
    rate until the clean LM loss rose by ``loss_rise`` nats (or
    ``max_unlearn_steps``), the LLM analogue of "until clean accuracy drops";
  - flagging: modified z-score (0.6745 (x - median) / MAD) of each channel's
    weight-change norm over all channels, flagged above ``z_threshold``;
  - relearning: the recovery finetune from the ORIGINAL weights with flagged
    channels re-initialized, plus ``beta`` times the mean positive cosine of
    each flagged channel with its original vector (pushing it away from the
    direction the backdoor used).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from pydantic import Field

from raypurify.defenses import DefenseJob
from raypurify.defenses.common import WithRecovery, load, recover, recovery_set, recovery_settings, save
from raypurify.signature import channel_matrix, model_channel_keys, suppress
from raypurify.train import batches, collate, encode, lm_loss, lr_at


class UlrlConfig(WithRecovery):
    """ULRL settings."""

    loss_rise: float = Field(1.0, gt=0, description="stop unlearning when the clean loss rose this much (nats)")
    max_unlearn_steps: int = Field(60, ge=1)
    unlearn_lr: float | None = Field(None, gt=0, le=1e-2, description="default: the recovery rate")
    z_threshold: float = Field(3.5, gt=0, description="modified z-score above which a channel is flagged")
    beta: float = Field(1.0, ge=0, description="weight of the push-away penalty while relearning")


def modified_z(x: torch.Tensor) -> torch.Tensor:
    """Modified z-scores (Iglewicz-Hoaglin): robust to the outliers they find.

    Args:
        x: ``[n]`` values.

    Returns:
        ``[n]``: ``0.6745 * (x - median) / MAD`` (0 where MAD is 0 and x is the median).
    """
    med = x.median()
    mad = (x - med).abs().median()
    return 0.6745 * (x - med) / mad.clamp(min=1e-12)


def flag(change: list[torch.Tensor], threshold: float) -> list[torch.Tensor]:
    """Per layer, the channels whose change has a modified z-score above ``threshold`` (over all channels)."""
    z = modified_z(torch.cat(change))
    flagged = (z > threshold).nonzero().flatten()
    out, start = [], 0
    for c in change:
        out.append(flagged[(flagged >= start) & (flagged < start + c.numel())] - start)
        start += c.numel()
    return out


def unlearn(model, tok, examples, cfg: UlrlConfig, mode: str) -> list[float]:
    """Gradient ascent on clean samples until the loss rose by ``loss_rise``."""
    settings = replace(recovery_settings(cfg.recovery, mode, cfg.seed, cfg.unlearn_lr),
                       steps=cfg.max_unlearn_steps, warmup=1)
    data = encode(tok, examples)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr)
    model.train()
    losses: list[float] = []
    for step, idx in enumerate(batches(len(data), settings)):
        loss = lm_loss(model, collate([data[i] for i in idx], tok.pad_token_id))
        losses.append(float(loss.detach()))
        if losses[-1] - losses[0] >= cfg.loss_rise:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, settings)
        (-loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return losses


def push_away(model, keys, flagged, original) -> torch.Tensor:
    """Mean positive cosine of the flagged channels with their original vectors."""
    params = dict(model.named_parameters())
    terms = []
    for ks, idx, orig in zip(keys, flagged, original):
        if idx.numel() == 0:
            continue
        now = channel_matrix({k: params[k] for k in ks.rows + ks.cols}, ks)[idx]
        terms.append(torch.nn.functional.cosine_similarity(now, orig[idx], dim=1).clamp(min=0))
    return torch.cat(terms).mean() if terms else torch.zeros(())


def defend(job: DefenseJob, cfg: UlrlConfig) -> dict:
    model, tok = load(job)
    keys, _ = model_channel_keys(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    original = [channel_matrix({k: state[k] for k in ks.rows + ks.cols}, ks) for ks in keys]
    samples = recovery_set(job.clean, cfg.recovery.n_samples, cfg.seed)
    losses = unlearn(model, tok, samples, cfg, job.mode)
    now = model.state_dict()
    change = [channel_matrix({k: now[k] - state[k] for k in ks.rows + ks.cols}, ks).norm(dim=1) for ks in keys]
    flagged = flag(change, cfg.z_threshold)
    with torch.no_grad():
        model.load_state_dict(state)
    suppress(model, flagged, seed=cfg.seed)

    def loss_fn(m, batch):
        return lm_loss(m, batch) + cfg.beta * push_away(m, keys, flagged, original)

    report = recover(model, tok, job, cfg, loss_fn=loss_fn, desc="ulrl relearn")
    save(model, tok, job)
    return {"unlearn_steps": len(losses), "unlearn_loss": [round(losses[0], 4), round(losses[-1], 4)],
            "n_flagged": int(sum(f.numel() for f in flagged)),
            "flagged_per_layer": [int(f.numel()) for f in flagged], **report}
