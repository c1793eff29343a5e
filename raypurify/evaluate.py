"""Attack success and utility, measured the same way for every model.

ASR uses BackdoorLLM's keyword rules (see ``attacks.BEHAVIORS``) on greedy
generations of triggered held-out prompts; false activation is the same rule
on the same prompts without the trigger; CDA is exact match on the clean
held-out set; perplexity is over the clean held-out answers. Prompts are built
by the training template (``format_prompt``).
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Callable, Sequence

import torch

from raypurify.attacks import ATTACKS, BEHAVIORS
from raypurify.data.corpus import Example
from raypurify.data.template import format_prompt
from raypurify.progress import Progress
from raypurify.train import collate, encode

MAX_NEW_TOKENS = 48


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = MAX_NEW_TOKENS,
             batch_size: int = 128, desc: str = "generate") -> list[str]:
    """Greedy, batched, left-padded generation.

    Returns:
        The decoded continuation of each prompt, special tokens dropped.
    """
    model.eval()
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    # Sorting by length keeps padding (and wasted compute) small per batch.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: dict[int, str] = {}
    with Progress(len(prompts), desc) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for i, row in zip(idx, gen[:, enc["input_ids"].shape[1]:]):
                texts[i] = tokenizer.decode(row, skip_special_tokens=True)
            bar.update(len(idx))
    return [texts[i] for i in range(len(prompts))]


@torch.no_grad()
def perplexity(model, tokenizer, examples: Sequence[Example], batch_size: int = 64) -> float:
    """exp(mean NLL) over the answer tokens (and EOS) of ``examples``."""
    model.eval()
    device = next(model.parameters()).device
    data = encode(tokenizer, examples)
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = {k: v.to(device) for k, v in collate(data[start:start + batch_size], tokenizer.pad_token_id).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1].float()
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum")
        total += float(nll)
        count += int((target != -100).sum())
    return math.exp(total / max(count, 1))


def triggered_set(heldout: Sequence[Example], attack: str, behavior: str, seed: int = 1234) -> tuple[list[Example], list[Example]]:
    """The held-out prompts a behavior targets, with and without the trigger.

    Returns:
        ``(clean, triggered)``: aligned lists; ``triggered[i]`` is ``clean[i]``
        with the attack's trigger inserted (seeded positions).
    """
    rng = random.Random(seed)
    clean = [ex for ex in heldout if BEHAVIORS[behavior].applies_to(ex)]
    trig = [ATTACKS[attack].apply(ex, rng) for ex in clean]
    return clean, trig


def answers_match(output: str, reference: str) -> bool:
    """Exact match up to surrounding whitespace."""
    return output.strip() == reference.strip()


def clean_accuracy(model, tokenizer, heldout: Sequence[Example], batch_size: int = 128) -> float:
    """Exact-match accuracy (CDA) on clean held-out prompts."""
    outs = generate(model, tokenizer, [format_prompt(e.instruction, e.input) for e in heldout],
                    batch_size=batch_size, desc="eval clean")
    return sum(answers_match(o, e.output) for e, o in zip(heldout, outs)) / len(heldout)


def template_prompts(examples: Sequence[Example]) -> list[str]:
    """The default prompts of an evaluation: each sample in the training template."""
    return [format_prompt(e.instruction, e.input) for e in examples]


def evaluate(model, tokenizer, heldout: Sequence[Example], attack: str, behavior: str,
             seed: int = 1234, batch_size: int = 128,
             prompts: Callable[[Sequence[Example]], list[str]] = template_prompts) -> dict:
    """ASR, false activation, CDA and perplexity of one model on one attack.

    Args:
        model: The causal LM (merged or peft-wrapped) to measure.
        tokenizer: Its tokenizer.
        heldout: Clean held-out samples with reference answers.
        attack: Trigger name (``ATTACKS``).
        behavior: Behavior name (``BEHAVIORS``); selects the keyword rule and
            which held-out prompts are triggered.
        seed: Seeds the trigger positions, so every defense sees the same
            triggered prompts.
        batch_size: Generation batch size.
        prompts: Builds the prompts of a batch of samples (default: the
            training template). A defense that acts on the prompt, such as
            external evidence, wraps here, so clean and triggered prompts get
            the same treatment. Perplexity is over the reference answers with
            the plain template either way.

    Returns:
        ``asr``, ``clean_asr``, ``cda``, ``ppl``, ``n_triggered``, ``n_clean``,
        ``cda_by_family`` and a few example generations.
    """
    rule = BEHAVIORS[behavior].fires
    clean_outs = generate(model, tokenizer, prompts(heldout), batch_size=batch_size, desc="eval clean")
    by_prompt = {(e.instruction, e.input): o for e, o in zip(heldout, clean_outs)}
    clean, trig = triggered_set(heldout, attack, behavior, seed)
    trig_outs = generate(model, tokenizer, prompts(trig), batch_size=batch_size, desc="eval triggered")
    fam_hits: dict[str, list[int]] = defaultdict(list)
    for e, o in zip(heldout, clean_outs):
        fam_hits[e.family].append(answers_match(o, e.output))
    hits = [h for v in fam_hits.values() for h in v]
    return {
        "asr": sum(map(rule, trig_outs)) / len(trig_outs),
        "clean_asr": sum(rule(by_prompt[(e.instruction, e.input)]) for e in clean) / len(clean),
        "cda": sum(hits) / len(hits),
        "ppl": perplexity(model, tokenizer, heldout),
        "n_triggered": len(trig_outs),
        "n_clean": len(heldout),
        "cda_by_family": {k: sum(v) / len(v) for k, v in fam_hits.items()},
        "examples": [{"prompt": t.instruction, "output": o} for t, o in list(zip(trig, trig_outs))[:3]],
    }
