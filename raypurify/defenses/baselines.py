"""The baselines the papers compare against, in one process each.

- finetune: the recovery finetune alone;
- prune: magnitude pruning of MLP channels, the signature's structure and
  ratio, lowest-norm channels zeroed (no finetune);
- fineprune: Wanda-scored channels (full) or random channels (adapter-only,
  where input activations say nothing about an adapter's rows) zeroed, then
  the recovery finetune;
- int4: weight-only 4-bit round-to-nearest with per-group scales.
"""

from __future__ import annotations

from typing import Sequence

import torch
from pydantic import Field

from raypurify.config import Strict
from raypurify.defenses import DefenseJob
from raypurify.defenses.common import WithRecovery, load, recover, recovery_set, save
from raypurify.signature import channel_matrix, model_channel_keys, random_signature, select_top, suppress


class FinetuneConfig(WithRecovery):
    """Recovery finetune alone (same samples and rate as the main method)."""


class PruneConfig(Strict):
    """Magnitude pruning of MLP channels."""

    rho: float = Field(0.05, gt=0, lt=1, description="fraction of channels zeroed (the signature's default ratio)")
    per_layer: bool = False

    def min_clean(self) -> int:
        return 0


class FinePruneConfig(WithRecovery):
    """Fine-pruning: prune (Wanda, or random on an adapter), then finetune."""

    rho: float = Field(0.05, gt=0, lt=1, description="fraction of channels zeroed")
    per_layer: bool = False
    n_calib: int = Field(64, ge=1, le=200, description="clean samples whose activations weigh the channels "
                                                        "(taken from the recovery samples)")


class Int4Config(Strict):
    """Weight-only INT4 round-to-nearest (optimum-quanto, groups of 128 inputs)."""

    exclude: list[str] = Field(["lm_head"], description="modules kept in full precision (the usual practice)")

    def min_clean(self) -> int:
        return 0


def channel_norms(model, lora: bool) -> list[torch.Tensor]:
    """``[channels]`` per layer: the norm of each MLP channel's weights (or adapter rows)."""
    keys, _ = model_channel_keys(model, lora=lora)
    state = model.state_dict()
    return [channel_matrix({k: state[k] for k in ks.rows + ks.cols}, ks).norm(dim=1) for ks in keys]


def lowest(scores: Sequence[torch.Tensor], rho: float, per_layer: bool) -> list[torch.Tensor]:
    """The lowest-scoring ``rho`` fraction of channels, per layer indices."""
    return select_top([-s for s in scores], rho, per_layer=per_layer)


def wanda_channel_scores(down_weight: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """Structured Wanda score of each MLP channel.

    Wanda scores a weight by ``|W_ij| * ||X_j||`` (its magnitude times the norm
    of its input feature over calibration tokens). An MLP channel c is input
    feature c of the down projection, so its structured score sums the Wanda
    scores of that input column.

    Args:
        down_weight: ``[hidden, channels]`` down-projection weight.
        act_norm: ``[channels]`` L2 norm of each channel's activation (the
            down projection's input) over all calibration tokens.

    Returns:
        ``[channels]`` scores; low means prunable.
    """
    return down_weight.abs().float().sum(dim=0) * act_norm.float()


@torch.no_grad()
def activation_norms(model, tok, examples, mlp_out: str) -> list[torch.Tensor]:
    """``[channels]`` per layer: L2 norm of the down projection's input over the examples' tokens."""
    from raypurify.train import collate, encode

    layers = [m for n, m in model.named_modules() if n.endswith(f".{mlp_out}") and hasattr(m, "in_features")]
    sq = [torch.zeros(m.in_features) for m in layers]
    current = {}  # the batch's attention mask: padding tokens must not count

    def hook(i):
        def fn(_m, inputs, _out):
            x = inputs[0].float() * current["mask"][..., None]
            sq[i].add_(x.pow(2).sum(dim=(0, 1)))
        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(layers)]
    try:
        data = encode(tok, examples)
        for start in range(0, len(data), 16):
            batch = collate(data[start:start + 16], tok.pad_token_id)
            current["mask"] = batch["attention_mask"].float()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return [s.sqrt() for s in sq]


def finetune_defense(job: DefenseJob, cfg: FinetuneConfig) -> dict:
    model, tok = load(job)
    report = recover(model, tok, job, cfg)
    save(model, tok, job)
    return report


def _n(sig: Sequence[torch.Tensor]) -> dict:
    return {"n_pruned": int(sum(s.numel() for s in sig)), "pruned_per_layer": [int(s.numel()) for s in sig]}


def prune_defense(job: DefenseJob, cfg: PruneConfig) -> dict:
    model, tok = load(job)
    lora = bool(job.adapter)
    sig = lowest(channel_norms(model, lora), cfg.rho, cfg.per_layer)
    suppress(model, sig, lora=lora, zero=True)
    save(model, tok, job)
    return _n(sig)


def fineprune_defense(job: DefenseJob, cfg: FinePruneConfig) -> dict:
    from raypurify.arch import spec_for

    model, tok = load(job)
    lora = bool(job.adapter)
    keys, channels = model_channel_keys(model, lora=lora)
    if lora:
        sig = random_signature(channels, round(cfg.rho * sum(channels)), cfg.seed)
        how = "random"
    else:
        calib = recovery_set(job.clean, cfg.recovery.n_samples, cfg.seed)[: cfg.n_calib]
        norms = activation_norms(model, tok, calib, spec_for(model.config).mlp_out)
        state = model.state_dict()
        scores = [wanda_channel_scores(state[ks.cols[0]], n) for ks, n in zip(keys, norms)]
        sig = lowest(scores, cfg.rho, cfg.per_layer)
        how = "wanda"
    suppress(model, sig, lora=lora, zero=True)
    report = {"selection": how, **_n(sig), **recover(model, tok, job, cfg)}
    save(model, tok, job)
    return report


def int4_defense(job: DefenseJob, cfg: Int4Config) -> dict:
    """Quantizes with optimum-quanto, then writes the INT4 grid as plain weights.

    optimum-quanto is used because it runs weight-only INT4 on CPU with
    per-group scales and no custom kernels (torchao's INT4 paths need CUDA or
    a specific CPU layout; bitsandbytes' CPU backend lacks 4-bit matmuls on
    older CPUs). The dequantized values written are exactly the quantization
    grid, so a plain transformers load evaluates the quantized model.
    """
    import copy

    from optimum.quanto import freeze, qint4, quantize

    model, tok = load(job)
    q = copy.deepcopy(model)
    quantize(q, weights=qint4, exclude=cfg.exclude or None)
    freeze(q)
    n, worst = 0, 0.0
    with torch.no_grad():
        for name, module in q.named_modules():
            w = getattr(module, "weight", None)
            if w is None or not hasattr(w, "dequantize"):
                continue
            target = model.get_submodule(name).weight
            deq = w.dequantize().to(target.dtype)
            worst = max(worst, float((deq - target).abs().max()))
            target.copy_(deq)
            n += 1
    save(model, tok, job)
    return {"quantized_modules": n, "max_abs_weight_error": round(worst, 6), "library": "optimum-quanto qint4"}
