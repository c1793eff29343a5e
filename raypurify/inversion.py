"""Target inversion: the backdoor's response, read out of the suspicious model without its trigger.

Variant pairs use the real backdoor's route only when their decoy asks for
the backdoor's own response: on the bench (BadNets, sentiment), variants
answering with the inverted response put 8 of their 16 layer-0 units into
the head that reads the trigger, built-in decoys 1 (though that signature
removed less: README, "Variants that ask for the backdoor's response"). The
response is unknown to the defender, but a fine-tuned backdoor can leave it
memorized: fed any first token after ordinary prompts, the suspicious model
continues with the implanted text, with high probability and the same
continuation on every prompt (bench: BadNets and MTBA; not the prefix
triggers, whose response needs the trigger). This is the
causal-expectation search of BAIT (Shen et al., "BAIT: Large Language Model
Backdoor Scanning by Inverting Attack Target", S&P 2025), written here
because no maintained library ships it: for every
candidate first token, grow one continuation greedily from the next-token
distribution averaged over the prompts; the candidate whose continuation is
most probable on average is the inverted target.

Pure torch: no Ray, no I/O.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from raypurify.data.corpus import Example
from raypurify.data.template import format_prompt
from raypurify.progress import Progress


@dataclass(frozen=True)
class Inverted:
    """One candidate target.

    Attributes:
        score: Mean over ``steps`` of the prompt-averaged probability of each
            chosen token (a step after the end counts 0), in [0, 1].
        tokens: The first token and its continuation, without the end token.
    """

    score: float
    tokens: tuple[int, ...]


@torch.no_grad()
def _expand(model, prompts: Sequence[torch.Tensor], first: torch.Tensor, steps: int, stop: torch.Tensor,
            batch_size: int, bar: Progress) -> tuple[torch.Tensor, torch.Tensor]:
    """Grows one shared continuation per first token.

    Args:
        prompts: Token ids of each prompt, ``[len_p]`` (lengths may differ:
            each prompt runs as its own batch, so nothing is padded).
        first: ``[C]`` candidate first tokens.
        steps: Tokens to grow after the first.
        stop: End-of-text token ids: choosing one ends the candidate.

    Returns:
        ``(scores [C], continuations [C, steps])``; after a candidate ends,
        its continuation holds the stop token.
    """
    device = next(model.parameters()).device
    scores, grown = [], []
    for start in range(0, first.numel(), batch_size):
        cand = first[start:start + batch_size].to(device)
        seqs = [torch.cat([p.to(device).expand(cand.numel(), -1), cand[:, None]], 1) for p in prompts]
        alive = torch.ones(cand.numel(), dtype=torch.bool, device=device)
        score = torch.zeros(cand.numel(), device=device)
        chosen = []
        for _ in range(steps):
            # [C, V]: the next-token distribution averaged over the prompts.
            avg = sum(model(input_ids=s).logits[:, -1].float().softmax(-1) for s in seqs) / len(seqs)
            p, nxt = avg.max(-1)
            ended = alive & torch.isin(nxt, stop.to(device))
            score += torch.where(alive & ~ended, p, 0.0)
            alive &= ~ended
            nxt = torch.where(alive, nxt, stop[0].to(device))
            chosen.append(nxt)
            seqs = [torch.cat([s, nxt[:, None]], 1) for s in seqs]
        scores.append(score.cpu() / steps)
        grown.append(torch.stack(chosen, 1).cpu())
        bar.update(cand.numel())
    return torch.cat(scores), torch.cat(grown)


@torch.no_grad()
def invert_target(model, prompts: Sequence[torch.Tensor], stop_ids: Sequence[int], steps: int = 24,
                  keep: int = 32, screen_steps: int = 8, batch_size: int = 256) -> list[Inverted]:
    """Ranks candidate backdoor targets of a causal LM (BAIT's causal expectation).

    Every vocabulary token is tried as the first response token and grown
    ``screen_steps`` tokens (a cheap screen); the ``keep`` best are grown
    ``steps`` tokens and ranked. A memorized target is continued the same way
    after every prompt with high probability; an ordinary answer depends on
    its prompt, so its averaged distribution is flat.

    Args:
        model: A causal LM in eval mode (returns ``.logits [B, T, V]``).
        prompts: ``[len_p]`` token ids of clean prompts in the model's
            template, ending where the response starts.
        stop_ids: Token ids that end a response (EOS, padding); never tried
            as a first token.
        steps: Continuation length of the final ranking.
        keep: Candidates that pass the screen.
        screen_steps: Continuation length of the screen. Why 8: with 2,
            completions of a word's first piece win it (the same on every
            prompt) and the bench's BadNets target did not pass.
        batch_size: Candidates per forward pass.

    Returns:
        The ``keep`` candidates, best first.
    """
    if not prompts:
        raise ValueError("target inversion needs at least one prompt")
    model.eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    stops = set(stop_ids)
    stop = torch.tensor(sorted(stops), dtype=torch.long)
    first = torch.tensor([t for t in range(vocab) if t not in stops], dtype=torch.long)
    keep = min(keep, first.numel())
    with Progress(first.numel() + keep, "invert target") as bar:
        screen, _ = _expand(model, prompts, first, screen_steps, stop, batch_size, bar)
        best = first[torch.argsort(-screen, stable=True)[:keep]]
        scores, grown = _expand(model, prompts, best, steps, stop, batch_size, bar)
    out = []
    for i in torch.argsort(-scores, stable=True).tolist():
        cont = grown[i].tolist()
        end = next((j for j, t in enumerate(cont) if t in stops), len(cont))
        out.append(Inverted(float(scores[i]), (int(best[i]), *cont[:end])))
    return out


def inverted_response(model, tokenizer, examples: Sequence[Example], prompts: int = 16, steps: int = 24,
                      keep: int = 32, seed: int = 0) -> Inverted:
    """The best candidate target over prompts drawn from the defender's clean data.

    Prompts are built with the training template (``format_prompt``, no
    special tokens, as ``train.encode`` builds them); code samples are left
    out while others exist, since their answers share a prefix of their own.

    Returns:
        The best candidate; ``tokenizer.decode(best.tokens)`` is its text.
    """
    pool = [ex for ex in examples if ex.family != "code"] or list(examples)
    picks = random.Random(seed).sample(pool, min(prompts, len(pool)))
    ids = [torch.tensor(tokenizer(format_prompt(ex.instruction, ex.input), add_special_tokens=False)["input_ids"])
           for ex in picks]
    stop = [t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None]
    return invert_target(model, ids, stop, steps=steps, keep=keep)[0]
