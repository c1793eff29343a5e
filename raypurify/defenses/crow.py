"""CROW (Min et al., ICML 2025): internal-consistency regularized finetuning.

A backdoor trigger makes the hidden states swerve between consecutive
layers; CROW finetunes on clean data while penalizing that swerve, measured
on inputs whose embeddings were pushed one FGSM step toward more of it.
Reference code: NayMyatMin/CROW. Choices of this port (stated in reports):
  - consistency is over consecutive transformer-layer outputs
    (``hidden_states[1:]``), per token, padding masked out;
  - both the LM loss and the consistency loss are taken on the perturbed
    embeddings, as in the reference;
  - the learning rate is the shared recovery rate by default; the reference's
    1e-3 is one flag away (``reference_lr``), since the immunization paper's
    appendix C.2 traces much of CROW's reported gain to that large rate.
"""

from __future__ import annotations

from typing import Sequence

import torch
from pydantic import Field

from raypurify.defenses import DefenseJob
from raypurify.defenses.common import WithRecovery, load, recover, save

REFERENCE_LR = 1e-3


class CrowConfig(WithRecovery):
    """CROW settings (reference defaults: alpha 5.5, epsilon 0.1)."""

    alpha: float = Field(5.5, ge=0, description="weight of the consistency loss")
    epsilon: float = Field(0.1, ge=0, description="FGSM step on the input embeddings")
    reference_lr: bool = Field(False, description=f"use the reference's rate {REFERENCE_LR:g} instead of the shared one")


def consistency_loss(hidden_states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers and tokens of 1 - cos(h_l, h_{l+1}).

    Args:
        hidden_states: Layer outputs, each ``[batch, seq, hidden]`` (the
            embedding output excluded).
        mask: ``[batch, seq]`` 1 on real tokens, 0 on padding.

    Returns:
        A scalar; 0 when consecutive layers agree exactly.
    """
    m = mask.float()
    terms = []
    for a, b in zip(hidden_states[:-1], hidden_states[1:]):
        cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
        terms.append(((1 - cos) * m).sum() / m.sum().clamp(min=1))
    return torch.stack(terms).mean()


def fgsm(embeds: torch.Tensor, grad: torch.Tensor, epsilon: float) -> torch.Tensor:
    """One FGSM step: ``embeds + epsilon * sign(grad)``, detached.

    Args:
        embeds: ``[batch, seq, hidden]`` input embeddings.
        grad: Gradient of the consistency loss w.r.t. ``embeds`` (same shape).
    """
    return (embeds + epsilon * grad.sign()).detach()


def crow_loss(alpha: float, epsilon: float):
    """``(model, batch) -> loss`` for the shared finetune loop."""

    def loss_fn(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        embed = model.get_input_embeddings()
        embeds = embed(batch["input_ids"]).detach().requires_grad_(True)
        out = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], output_hidden_states=True)
        grad, = torch.autograd.grad(consistency_loss(out.hidden_states[1:], batch["attention_mask"]), embeds)
        adv = fgsm(embeds, grad, epsilon)
        out = model(inputs_embeds=adv, attention_mask=batch["attention_mask"], labels=batch["labels"],
                    output_hidden_states=True)
        return out.loss + alpha * consistency_loss(out.hidden_states[1:], batch["attention_mask"])

    return loss_fn


def defend(job: DefenseJob, cfg: CrowConfig) -> dict:
    model, tok = load(job)
    lr = REFERENCE_LR if cfg.reference_lr else None
    report = recover(model, tok, job, cfg, loss_fn=crow_loss(cfg.alpha, cfg.epsilon), lr=lr, desc="crow")
    save(model, tok, job)
    return {**report, "lr_used": "reference 1e-3" if cfg.reference_lr else "shared recovery rate"}
