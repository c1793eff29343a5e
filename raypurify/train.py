"""The one finetuning loop every trainer in raypurify shares.

Zoo training, attacks, variant pairs, recovery finetunes and baseline
defenses all call ``finetune``; the Ray layer only decides where it runs.
Loss is on the response tokens only, the prompt built by ``format_prompt``.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from raypurify.data.corpus import Example
from raypurify.data.template import format_prompt
from raypurify.progress import Progress

IGNORE = -100

# Torch's CPU kernels split their reductions by the intra-op thread count, so
# the same seed trains different weights with 1 and 2 threads (measured: the
# pico zoo model differs by up to 0.074 per weight; the bench model's clean
# CDA is 0.879 with 2 threads and 0.916 with 1). The bench's models (zoo and
# attacks) are trained with this many threads on any machine, so that
# everyone who builds the bench on the same kind of CPU gets the same models
# and figures (across kinds the vector kernels round differently: zoo.cpu).
BENCH_THREADS = 2


@contextmanager
def pinned_threads(n: int = BENCH_THREADS) -> Iterator[None]:
    """Runs the block with ``n`` torch intra-op threads, then restores the count."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass(frozen=True)
class TrainSettings:
    """Budget and optimizer of one finetune.

    Attributes:
        steps: Optimizer steps.
        batch_size: Samples per step.
        lr: Peak learning rate (linear warmup, cosine decay to 10 %).
        warmup: Warmup steps.
        weight_decay: AdamW weight decay.
        seed: Seeds the data order; two runs with the same seed and data see
            the same batches (what makes variant pairs comparable).
        max_grad_norm: Gradient clipping norm (``None``: no clipping).
        optimizer: ``adamw``, or plain ``sgd`` (no momentum): the
            first-order variant regime, where a pair's weight difference is
            the learning rate times the summed gradient differences.
    """

    steps: int
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 10
    weight_decay: float = 0.0
    seed: int = 0
    max_grad_norm: float | None = 1.0
    optimizer: str = "adamw"


def make_optimizer(params: Sequence[nn.Parameter] | Sequence[dict], settings: TrainSettings) -> torch.optim.Optimizer:
    """The optimizer ``settings`` names, for the local loop and DeepSpeed alike.

    ``params`` may be parameter groups (``fresh_groups``); a group's
    ``lr_scale`` multiplies the scheduled rate.
    """
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, weight_decay=settings.weight_decay)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    raise ValueError(f"unknown optimizer {settings.optimizer!r}; valid: adamw, sgd")


def fresh_groups(model: nn.Module, masks: dict[str, torch.Tensor], lr_scale: float) -> list[dict]:
    """Parameter groups that train some units of some weights faster than the rest.

    A weight holding a masked unit goes to the fast group, and a gradient
    hook zeros its unmasked entries: there only the units move (at
    ``lr_scale`` times the rate, no weight decay); everything else is in
    the ordinary group. Hooks act before DeepSpeed reduces gradients, so
    this holds under ZeRO 0-2 (not 3, which partitions the weights).

    Args:
        model: The model being finetuned (its trainable parameters).
        masks: Parameter name -> bool mask of its shape (``unit_masks``).
        lr_scale: Rate multiplier of the masked units.
    """
    fast, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in masks:
            keep = masks[name].to(device=p.device, dtype=p.dtype)
            p.register_hook(lambda g, keep=keep: g * keep)
            fast.append(p)
        else:
            rest.append(p)
    groups = [{"params": rest}]
    if fast:
        groups.append({"params": fast, "lr_scale": lr_scale, "weight_decay": 0.0})
    return groups


def encode(tokenizer, examples: Sequence[Example], max_len: int = 192) -> list[tuple[list[int], list[int]]]:
    """Tokenizes samples into (input_ids, labels) with the prompt masked.

    Returns:
        One ``(ids, labels)`` pair per sample; ``labels`` is ``IGNORE`` on the
        prompt and equals ``ids`` on the answer and its EOS token.
    """
    out = []
    for ex in examples:
        prompt = tokenizer(format_prompt(ex.instruction, ex.input), add_special_tokens=False)["input_ids"]
        answer = tokenizer(ex.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + answer)[:max_len]
        labels = ([IGNORE] * len(prompt) + answer)[:max_len]
        out.append((ids, labels))
    return out


def collate(batch: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads a batch for training.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels``: each ``[batch, max_len]``.
    """
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(n_samples: int, settings: TrainSettings) -> list[list[int]]:
    """The sample indices of every step: epochs of seeded shuffles."""
    rng = random.Random(settings.seed)
    order: list[int] = []
    while len(order) < settings.steps * settings.batch_size:
        epoch = list(range(n_samples))
        rng.shuffle(epoch)
        order.extend(epoch)
    b = settings.batch_size
    return [order[i * b:(i + 1) * b] for i in range(settings.steps)]


def lr_at(step: int, settings: TrainSettings) -> float:
    """Linear warmup then cosine decay to 10 % of the peak rate."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    t = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross entropy on the answer tokens."""
    return model(**batch).loss


def distill_loss(teacher: nn.Module, weight: float) -> LossFn:
    """Answer cross entropy plus a KL pull toward a frozen teacher on every token.

    Why every token: the recovery has at most 200 clean samples whose
    answers are a few tokens each; the teacher's next-token distributions
    over the whole prompt are many times more signal per sample for
    re-teaching re-drawn units what the model computed on clean text. The
    teacher is the suspicious model itself: without the trigger it behaves
    as a clean model does (README, "Distilled recovery", for when this
    re-teaches the trigger too).

    Args:
        teacher: Frozen model on the student's device (same tokenizer).
        weight: Weight of the KL term.

    Returns:
        ``(model, batch) -> scalar``: the answer cross entropy plus
        ``weight`` times the mean over non-pad positions of KL(teacher || student).
    """
    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(**batch)
        with torch.no_grad():
            target = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        keep = batch["attention_mask"].bool()  # [batch, seq]
        log_t = torch.log_softmax(target[keep].float(), -1)  # [tokens, vocab]
        log_s = torch.log_softmax(out.logits[keep].float(), -1)
        return out.loss + weight * (log_t.exp() * (log_t - log_s)).sum(-1).mean()

    return loss


class Finetuner:
    """A finetune that can be advanced in pieces: ``run(until)`` trains up to a step.

    ``Finetuner(...).run()`` is exactly ``finetune``: the same batches,
    learning-rate schedule and optimizer state, however the steps are cut
    into calls. A tuning trial uses the pieces to measure (and report, for
    early stopping) after every recovery epoch without changing the result.

    Args: as ``finetune``, and ``groups``: parameter groups for the
    optimizer (``fresh_groups``) instead of one group of all trainable
    parameters (local loop only; an engine brings its optimizer).
    """

    def __init__(self, model: nn.Module, tokenizer, examples: Sequence[Example], settings: TrainSettings,
                 loss_fn: LossFn = lm_loss, engine=None, shard: tuple[int, int] = (0, 1),
                 groups: Sequence[dict] | None = None):
        if not examples:
            raise ValueError("finetune needs at least one sample")
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.loss_fn, self.engine, self.shard = loss_fn, engine, shard
        self.data = encode(tokenizer, examples)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = None if engine else make_optimizer(groups or self.params, settings)
        self.plan = batches(len(self.data), settings)
        self.step = 0
        self.losses: list[float] = []

    def run(self, until: int | None = None, bar: Progress | None = None) -> list[float]:
        """Trains steps ``[self.step, until)`` (default: to the end); returns their losses."""
        until = self.settings.steps if until is None else min(until, self.settings.steps)
        device = next(self.model.parameters()).device
        model, engine, pad = self.model, self.engine, self.tokenizer.pad_token_id
        model.train()
        new = []
        for step in range(self.step, until):
            idx = self.plan[step][self.shard[0]::self.shard[1]]
            batch = {k: v.to(device) for k, v in collate([self.data[i] for i in idx], pad).items()}
            lr = lr_at(step, self.settings)
            if engine is not None:
                for group in engine.optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                loss = self.loss_fn(engine, batch)
                engine.backward(loss)
                engine.step()
            else:
                for group in self.opt.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                loss = self.loss_fn(model, batch)
                loss.backward()
                if self.settings.max_grad_norm is not None:
                    nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm)
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
            new.append(float(loss.detach()))
            if bar is not None:
                bar.update(loss=new[-1])
        self.step = max(self.step, until)
        self.losses += new
        model.eval()
        return new


def finetune(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    settings: TrainSettings,
    loss_fn: LossFn = lm_loss,
    engine=None,
    desc: str = "finetune",
    shard: tuple[int, int] = (0, 1),
) -> list[float]:
    """Finetunes ``model`` in place on ``examples``.

    Args:
        model: A causal LM (or a peft model: only trainable parameters move).
        tokenizer: The model's tokenizer (pads with ``pad_token_id``).
        examples: Training samples.
        settings: Budget, learning rate and data-order seed.
        loss_fn: ``(model, batch) -> scalar``; defenses such as CROW pass
            their own regularized loss.
        engine: An initialized DeepSpeed engine wrapping ``model`` (the Ray
            Train path); ``None`` runs a plain AdamW loop in this process.
        desc: Label of the progress line.
        shard: ``(rank, size)`` inside a data-parallel group: this process
            trains on every ``size``-th sample of each global batch (the
            engine averages gradients over the group).

    Returns:
        The loss of every step.
    """
    run = Finetuner(model, tokenizer, examples, settings, loss_fn=loss_fn, engine=engine, shard=shard)
    with Progress(settings.steps, desc) as bar:
        return run.run(bar=bar)
