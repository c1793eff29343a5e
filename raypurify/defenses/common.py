"""What the in-process defenses share: loading, the recovery finetune, saving.

Every defense that finetunes uses ``recover`` with the same ``Recovery``
settings (the same 200 clean samples, drawn by the same seed, at the same
ordinary learning rate): the papers' "same data and budget" rule is kept by
construction, not by convention.
"""

from __future__ import annotations

import random
from typing import Sequence

from pydantic import Field

from raypurify.config import Recovery, Strict
from raypurify.data.corpus import Example
from raypurify.defenses import DefenseJob
from raypurify.train import LossFn, TrainSettings, finetune, lm_loss


class WithRecovery(Strict):
    """Settings of a defense that ends in the shared recovery finetune."""

    recovery: Recovery = Recovery()
    seed: int = Field(0, description="seeds the recovery samples, data order and any random draw")

    def min_clean(self) -> int:
        return self.recovery.n_samples


def recovery_set(pool: Sequence[Example], n: int, seed: int) -> list[Example]:
    """The clean samples of the recovery finetune: the same for every defense."""
    idx = list(range(len(pool)))
    random.Random(seed).shuffle(idx)
    return [pool[i] for i in idx[:n]]


def recovery_settings(recovery: Recovery, mode: str, seed: int, lr: float | None = None) -> TrainSettings:
    """The optimizer budget of the recovery finetune (``lr`` overrides the rate)."""
    return TrainSettings(steps=recovery.steps(), batch_size=recovery.batch_size,
                         lr=lr if lr is not None else recovery.resolved_lr(mode), warmup=3, seed=seed)


def load(job: DefenseJob):
    """The suspicious model (full) or base + trainable suspicious adapter (lora).

    Returns:
        ``(model, tokenizer)``; in lora mode only the adapter is trainable.
    """
    import torch

    from raypurify.io import attach_adapter, load_model

    torch.manual_seed(0)
    model, tok = load_model(job.model)
    if job.adapter:
        model = attach_adapter(model, job.adapter, trainable=True)
    return model, tok


def recover(model, tok, job: DefenseJob, cfg: WithRecovery, loss_fn: LossFn = lm_loss, lr: float | None = None,
            desc: str = "recovery") -> dict:
    """Runs the shared recovery finetune in place and summarizes it."""
    data = recovery_set(job.clean, cfg.recovery.n_samples, cfg.seed)
    settings = recovery_settings(cfg.recovery, job.mode, cfg.seed, lr)
    losses = finetune(model, tok, data, settings, loss_fn=loss_fn, desc=desc)
    return {"recovery": {"samples": len(data), "steps": settings.steps, "lr": settings.lr,
                         "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4)}}


def save(model, tok, job: DefenseJob) -> None:
    """Writes an HF model directory (full) or a PEFT adapter directory (lora)."""
    model.save_pretrained(job.out, safe_serialization=True)
    if not job.adapter:
        tok.save_pretrained(job.out)
