"""Choosing a purification setting without knowing the real trigger.

The blind objective of a sweep: every trial purifies the suspicious model
and a few canary models (copies of it with backdoors raypurify implanted
itself, so their trigger is known) with the same signature and recovery,
then reports canary ASR and utility on the defender's own clean held-out
slice. The choice is the lowest canary ASR among the trials within the
utility budget (``UtilityBudget``: at most ``max_cda_drop`` of CDA lost and,
if set, perplexity at most ``max_ppl_ratio`` times the suspicious model's).
On the bench, where the real attack is known, the same trials also carry
the true ASR, and the blind choice is compared with the best choice in
hindsight.

Pure Python (plus torch for the rank correlation): no Ray, no files. The
Ray layer (``raypurify/distributed/tune.py``) feeds it trial records: dicts
with ``canary_asr``, ``cda_drop``, ``complete`` and the trial's ``point``,
whatever the sweep kind (immunization, conflict merge or both).
"""

from __future__ import annotations

import math
import random
import statistics
from typing import Any, Mapping, Sequence

# Keys of ImmunizeConfig a search space may sweep; dotted names are nested
# fields. Everything else is fixed for the whole sweep (its ``fixed`` block),
# because the shared work (variants, canaries) depends on it.
SPACE_KEYS: dict[str, str] = {
    "rho": "float",
    "k": "int",
    "lam": "float",
    "scoring": "choice",
    "per_layer": "choice",
    "oversample": "float",
    "scope": "choice",
    "suppress_scope": "choice",
    "suppression": "choice",
    "recovery.lr": "float",
    "recovery.epochs": "int",
    "recovery.fresh_lr_scale": "float",
    "recovery.distill": "float",
}

# Keys of ConflictConfig a conflict sweep may sweep: the merge coefficients
# only. The conflict LoRA's own settings (n_samples, epochs, lr, rank) are
# fixed, because it is trained once, before Tune starts. The adapter weights
# follow merge.t (``ConflictConfig.adapter_weights``), so sweeping t sweeps them.
CONFLICT_KEYS: dict[str, str] = {
    "merge.method": "choice",
    "merge.t": "float",
    "merge.density": "float",
    "merge.lam": "float",
    "adapter_combination": "choice",
}

# A combined sweep names each key under the defense it belongs to
# (``CombinedConfig``: ``immunize.rho``, ``conflict.merge.t``).
COMBINED_KEYS: dict[str, str] = {**{f"immunize.{k}": v for k, v in SPACE_KEYS.items()},
                                 **{f"conflict.{k}": v for k, v in CONFLICT_KEYS.items()}}


def nested(point: Mapping[str, Any]) -> dict[str, Any]:
    """``{"recovery.lr": x, "rho": y}`` -> ``{"recovery": {"lr": x}, "rho": y}``."""
    out: dict[str, Any] = {}
    for key, value in point.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def flat(point: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The inverse of ``nested``."""
    out: dict[str, Any] = {}
    for key, value in point.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat(value, f"{name}."))
        else:
            out[name] = value
    return out


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of two config dicts (``update`` wins)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def defender_split(n_pool: int, n_heldout: int, seed: int) -> tuple[list[int], list[int]]:
    """Splits the defender's clean data into a held-out slice and the rest.

    The held-out slice measures utility (and canary ASR); the rest feeds the
    variants, the canaries and the recovery finetune, so the recovery samples
    never appear in the slice that judges them.

    Returns:
        ``(heldout indices, rest indices)``, disjoint, both sorted.
    """
    if n_heldout >= n_pool:
        raise ValueError(f"the held-out slice ({n_heldout}) must be smaller than the clean data ({n_pool})")
    idx = list(range(n_pool))
    # Its own seed stream: the recovery set draws from the rest with the
    # config seed, so the two draws must not be the same shuffle.
    random.Random(f"heldout-{seed}").shuffle(idx)
    return sorted(idx[:n_heldout]), sorted(idx[n_heldout:])


def epoch_ends(steps: int, epochs: int) -> list[int]:
    """Step counts at which each recovery epoch ends (the last is ``steps``).

    A trial reports once per epoch, which is what ASHA stops on.
    """
    return [max(1, round((e + 1) * steps / epochs)) for e in range(epochs)]


def excess(trial: Mapping[str, Any], budget) -> float:
    """How far a trial is past the utility budget (0 inside it).

    Args:
        trial: A record with ``cda_drop`` and ``ppl_ratio``.
        budget: A ``UtilityBudget`` (``max_cda_drop``, ``max_ppl_ratio`` or None).

    Returns:
        CDA lost past ``max_cda_drop`` plus perplexity ratio past ``max_ppl_ratio``.
    """
    over = max(0.0, trial["cda_drop"] - budget.max_cda_drop)
    if budget.max_ppl_ratio is not None:
        over += max(0.0, trial["ppl_ratio"] - budget.max_ppl_ratio)
    return over


def within_budget(trial: Mapping[str, Any], budget) -> bool:
    return excess(trial, budget) <= 1e-9


def describe(budget) -> str:
    """The budget in words, for every statement and table that applies it."""
    ppl = "" if budget.max_ppl_ratio is None else f" and raise perplexity at most {budget.max_ppl_ratio:g}x"
    return f"lose at most {budget.max_cda_drop * 100:.1f} CDA points{ppl}"


def objective(trial: Mapping[str, Any], budget) -> float:
    """One number to minimize (for ASHA and Optuna): canary ASR, with utility lost past the budget.

    Inside the budget only canary ASR counts, as in the final choice; every
    point of CDA (or 0.01 of perplexity ratio) past the budget costs as much
    as all of ASR, so a trial outside it never ranks above one inside it.
    """
    over = excess(trial, budget)
    return trial["canary_asr"] + (1.0 + 100.0 * over if over > 1e-9 else 0.0)


# What "milder" means per sweep kind: less suppressed, then less merged in.
_MILDNESS = ("rho", "immunize.rho", "merge.t", "conflict.merge.t")


def _tiebreak(t: Mapping[str, Any]) -> tuple:
    # Equal ASR: the smaller CDA loss, then the milder intervention.
    return (t["cda_drop"], *(t["point"].get(k, 0.0) for k in _MILDNESS), str(t.get("trial_id", "")))


def choose(trials: Sequence[Mapping[str, Any]], budget, metric: str = "canary_asr") -> tuple[Mapping[str, Any] | None, str]:
    """The chosen trial and a sentence that states why.

    Only trials that ran their whole recovery (``complete``) are candidates:
    an early-stopped trial was measured mid-schedule, which its config would
    not reproduce.

    Args:
        trials: Trial records.
        budget: The utility budget (``UtilityBudget``), against the suspicious model.
        metric: ``canary_asr`` (blind) or ``true_asr`` (hindsight, bench only).

    Returns:
        ``(trial or None, statement)``. With no trial inside the budget, the
        one losing the least CDA is returned and the statement says so.
    """
    done = [t for t in trials if t.get("complete") and metric in t]
    if not done:
        return None, "no trial completed its recovery; nothing to choose"
    ok = [t for t in done if within_budget(t, budget)]
    what = "canary ASR" if metric == "canary_asr" else "true ASR"
    if ok:
        best = min(ok, key=lambda t: (t[metric], *_tiebreak(t)))
        return best, (f"lowest {what} ({best[metric]:.3f}) among the {len(ok)} of {len(done)} completed trials "
                      f"that {describe(budget)} on the defender's held-out slice")
    best = min(done, key=lambda t: (excess(t, budget), t[metric], *_tiebreak(t)))
    return best, (f"NO trial stayed within the utility budget (trials that {describe(budget)}); falling back "
                  f"to the one closest to it ({best['cda_drop'] * 100:.1f} CDA points lost, perplexity "
                  f"{best['ppl_ratio']:.3f}x, {what} {best[metric]:.3f})")


def rank(trials: Sequence[Mapping[str, Any]], budget) -> list[Mapping[str, Any]]:
    """Trials in the order of the blind choice: complete and within budget first, by canary ASR."""
    def key(t):
        return (not t.get("complete"), not within_budget(t, budget), t["canary_asr"], *_tiebreak(t))
    return sorted([t for t in trials if "canary_asr" in t], key=key)


def spearman_of(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman correlation of two lists; None with fewer than 3 points or a constant list."""
    import torch

    from raypurify.signature import spearman

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return spearman(torch.tensor(list(x), dtype=torch.float64), torch.tensor(list(y), dtype=torch.float64))


def reliability(means: Sequence[float], sds: Sequence[float], repeats: int) -> float | None:
    """How much of the spread of a measurement across trials is real, not seed noise.

    Each trial's value is the mean of ``repeats`` runs that differ only in
    their seeds (re-draw, recovery order). The within-trial variance of that
    mean is sd^2 / repeats; the reliability is the share of the variance
    across trials that it leaves (the intraclass correlation of a mean of
    ``repeats`` runs). Why it matters: two measurements with reliabilities
    r1 and r2 correlate at most about sqrt(r1 * r2) however well one
    predicts the other (Spearman's correction for attenuation), so it
    estimates the ceiling of the canary/true correlation a sweep can show.

    Args:
        means: Per trial, the mean over its runs.
        sds: Per trial, the sample sd over its runs.
        repeats: Runs per trial.

    Returns:
        A value in [0, 1]; None with fewer than 2 runs or 3 trials, or no spread.
    """
    if repeats < 2 or len(means) < 3 or len(sds) != len(means):
        return None
    total = statistics.variance(means)
    if total <= 0:
        return None
    noise = statistics.fmean(sd ** 2 for sd in sds) / repeats
    return min(1.0, max(0.0, 1 - noise / total))


def repeats_for(rel: float, repeats: int, target: float) -> int | None:
    """Runs per trial that would bring reliability ``rel`` (measured with ``repeats``) to ``target``.

    Spearman-Brown: averaging m times as many runs turns r into
    m r / (1 + (m - 1) r). None where ``rel`` is 0 (no number of runs helps).
    """
    if rel <= 0:
        return None
    if rel >= 1:
        return 1
    return max(1, math.ceil(repeats * target * (1 - rel) / (rel * (1 - target)) - 1e-9))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes.

    Args:
        points: ``(utility, attack success)``: higher utility and lower
            attack success are better.

    Returns:
        Indices of the front, by increasing utility.
    """
    front = []
    for i, (u, a) in enumerate(points):
        dominated = any((u2 >= u and a2 <= a) and (u2 > u or a2 < a) for j, (u2, a2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def trials_table(trials: Sequence[Mapping[str, Any]], swept: Sequence[str], budget,
                 chosen_id: str | None, benchmark: bool) -> str:
    """Markdown: one row per trial in ranked order, the chosen one marked."""
    head = ["trial", *swept, "epochs run", "canary ASR", "CDA", "CDA lost", "PPL ratio"]
    if benchmark:
        head += ["true ASR", "true CDA"]
    head += ["in budget"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in rank(trials, budget) + [t for t in trials if "canary_asr" not in t]:
        mark = " **(chosen)**" if t.get("trial_id") == chosen_id else ""
        cells = [f"{t.get('trial_id', '?')}{mark}", *(_fmt(t["point"].get(k)) for k in swept)]
        if "canary_asr" not in t:
            lines.append("| " + " | ".join(cells + [f"failed: {t.get('error', '?')}"] + [""] * (len(head) - len(cells) - 1)) + " |")
            continue
        # ± sd over the trial's repeats, where it ran several.
        sd = lambda k: f" ± {t[k + '_sd']:.3f}" if k + "_sd" in t else ""  # noqa: E731
        cells += [f"{t['epochs_run']}{'' if t.get('complete') else ' (stopped)'}", f"{t['canary_asr']:.3f}"
                  + sd("canary_asr"), f"{t['cda']:.3f}", f"{t['cda_drop'] * 100:+.1f}", f"{t['ppl_ratio']:.3f}"]
        if benchmark:
            cells += [f"{t['true_asr']:.3f}{sd('true_asr')}" if "true_asr" in t else "-",
                      f"{t['true_cda']:.3f}" if "true_cda" in t else "-"]
        cells += ["yes" if within_budget(t, budget) else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bench_row(result: Mapping[str, Any]) -> dict[str, Any]:
    """One attack's line of the tune bench: the blind choice against the best in hindsight.

    Args:
        result: What ``tune_immunize(..., objective="benchmark")`` returned.
    """
    def pick(t):
        if t is None:
            return None
        return {"trial_id": t["trial_id"], "point": t["point"], "canary_asr": t["canary_asr"],
                "true_asr": t["true_asr"], "true_cda": t["true_cda"], "cda_drop": t["cda_drop"]}

    blind, hind = pick(result["chosen"]), pick(result["hindsight"])
    done = [t for t in result["trials"] if t.get("complete")]
    each = [f"canary{c['index']}_asr" for c in result["canaries"]]
    return {"attack": result["attack"], "behavior": result["behavior"],
            "suspicious_true_asr": result["suspicious"].get("true_asr"),
            "suspicious_true_cda": result["suspicious"].get("true_cda"),
            "canary_asr_before": [c["asr_before"] for c in result["canaries"]],
            "blind": blind, "hindsight": hind,
            "gap": None if not (blind and hind) else blind["true_asr"] - hind["true_asr"],
            "spearman": result["spearman_canary_true"],
            # Which canaries rank the trials like the real backdoor (README, "Which canaries track").
            "canary_spearman": [{"kind": c["kind"], "spearman": spearman_of([t[k] for t in done],
                                                                            [t["true_asr"] for t in done])}
                                for c, k in zip(result["canaries"], each) if all(k in t for t in done)],
            "n_trials": len(done),
            "repeats": result.get("repeats", 1),
            "trials": [{"point": t["point"], **{k: t[k] for k in ("canary_asr", "true_asr", "canary_asr_sd",
                                                                   "true_asr_sd") if k in t}} for t in done],
            "in_budget": result["statement"] is not None and not str(result["statement"]).startswith("NO trial")}


def bench_table(rows: Sequence[Mapping[str, Any]], budget) -> str:
    """Markdown of the tune bench, with the mean over attacks and the issue's targets."""
    def f(v, p=3):
        return "-" if v is None else f"{v:.{p}f}"

    lines = ["| attack | suspicious ASR | blind: canary ASR | blind: true ASR | blind: true CDA | "
             "hindsight: true ASR | hindsight: true CDA | gap (pts) | Spearman | trials |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, h = r["blind"] or {}, r["hindsight"] or {}
        gap = "-" if r["gap"] is None else f"{r['gap'] * 100:+.1f}"
        lines.append(f"| {r['attack']} | {f(r['suspicious_true_asr'])} | {f(b.get('canary_asr'))} | "
                     f"{f(b.get('true_asr'))} | {f(b.get('true_cda'))} | {f(h.get('true_asr'))} | {f(h.get('true_cda'))} | "
                     f"{gap} | "
                     f"{f(r['spearman'])} | {r['n_trials']} |")
    gaps = [r["gap"] for r in rows if r["gap"] is not None]
    rhos = [r["spearman"] for r in rows if r["spearman"] is not None]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    lines.append(f"| **mean** | {f(mean([r['suspicious_true_asr'] for r in rows if r['suspicious_true_asr'] is not None]))} | "
                 f"{f(mean([r['blind']['canary_asr'] for r in rows if r['blind']]))} | "
                 f"{f(mean([r['blind']['true_asr'] for r in rows if r['blind']]))} | "
                 f"{f(mean([r['blind']['true_cda'] for r in rows if r['blind']]))} | "
                 f"{f(mean([r['hindsight']['true_asr'] for r in rows if r['hindsight']]))} | "
                 f"{f(mean([r['hindsight']['true_cda'] for r in rows if r['hindsight']]))} | "
                 f"{'-' if not gaps else f'{mean(gaps) * 100:+.1f}'} | {f(mean(rhos))} | |")
    within = sum(1 for g in gaps if g <= 0.03 + 1e-9)
    strong = sum(1 for r in rhos if r >= 0.7)
    lines += ["", f"Utility budget: trials that {describe(budget)} on the defender's held-out "
              "slice, for the blind choice and the hindsight choice alike. Targets: blind true ASR within 3 points "
              f"of hindsight ({within}/{len(gaps)} attacks meet it); Spearman(canary ASR, true ASR) >= 0.7 "
              f"({strong}/{len(rhos)} attacks meet it)."]
    return "\n".join(lines + noise_ceiling(rows) + per_canary(rows) + by_setting(rows)) + "\n"


def noise_ceiling(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown lines: per attack, how reliable the trials' canary and true ASR are, and the correlation ceiling.

    Only for sweeps with repeats (the sd over a trial's runs is what it is
    computed from). A Spearman far under the ceiling is canaries ranking
    trials differently from the real backdoor; a ceiling under 0.7 says
    the seeds alone may keep the target out of reach at these repeats. It
    is an estimate from the sweep's few trials (CTBA's 0.52 at 3 runs was
    0.87 at 8; README, "How much of the ranking is seed noise").
    """
    lines = []
    for r in rows:
        n, done = r.get("repeats", 1), [t for t in r.get("trials", []) if "true_asr_sd" in t and "canary_asr_sd" in t]
        rel_t = reliability([t["true_asr"] for t in done], [t["true_asr_sd"] for t in done], n)
        rel_c = reliability([t["canary_asr"] for t in done], [t["canary_asr_sd"] for t in done], n)
        if rel_t is None or rel_c is None:
            continue
        need = repeats_for(rel_t, n, 0.9)
        rho = "-" if r["spearman"] is None else f"{r['spearman']:.3f}"
        lines.append(f"| {r['attack']} | {rel_t:.2f} | {rel_c:.2f} | {(rel_t * rel_c) ** 0.5:.2f} | {rho} | "
                     f"{'-' if need is None else need} |")
    if not lines:
        return []
    return ["", f"Noise ceiling (each trial's ASR is the mean of {rows[0].get('repeats', 1)} runs with other seeds; "
            "reliability = share of the spread across trials that is not seed noise, estimated from the trials' sd; "
            "ceiling = sqrt of the product, about the highest correlation two measurements this noisy can show "
            "(Spearman's attenuation; an estimate from these few trials, not a bound):", "",
            "| attack | reliability: true ASR | reliability: canary ASR | ceiling | Spearman | runs for 0.9 (true ASR) |",
            "|---|---|---|---|---|---|", *lines]


def per_canary(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown lines: the Spearman of each canary's own ASR with the true ASR, per attack and per decoy kind.

    The blind choice reads the canaries' mean; this shows whether some
    canaries rank the trials like the real backdoor and others against it
    (on the bench: a canary that dies from damage the real implant survives).
    """
    rows = [r for r in rows if len(r.get("canary_spearman", [])) > 1]
    if not rows:
        return []
    f = lambda v: "-" if v is None else f"{v:+.3f}"  # noqa: E731
    lines = ["", "Spearman of each canary's ASR with the true ASR over the completed trials (the blind choice reads "
             "their mean, the last column):", "", "| attack | each canary (decoy kind: Spearman) | mean of the canaries |",
             "|---|---|---|"]
    kinds: dict[str, list[float]] = {}
    for r in rows:
        each = "; ".join(f"{c['kind']}: {f(c['spearman'])}" for c in r["canary_spearman"])
        lines.append(f"| {r['attack']} | {each} | {f(r['spearman'])} |")
        for c in r["canary_spearman"]:
            if c["spearman"] is not None:
                kinds.setdefault(c["kind"], []).append(c["spearman"])
    if len(rows) > 1:
        lines.append("| **mean by kind** | " + "; ".join(f"{k}: {sum(v) / len(v):+.3f} ({len(v)})"
                                                       for k, v in kinds.items()) + " | |")
    return lines


def by_setting(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown lines: canary and true ASR per value of each swept key, over every attack's completed trials.

    Shows where canaries misread the real backdoor (e.g. canaries that die at
    a slow recovery rate where the real backdoor survives).
    """
    trials = [t for r in rows for t in r.get("trials", [])]
    if not trials:
        return []
    lines = ["", "Mean (min-max) over the attacks' completed trials, by swept value:", "",
             "| setting | canary ASR | true ASR | trials |", "|---|---|---|---|"]
    cell = lambda xs: f"{sum(xs) / len(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"  # noqa: E731
    for key in sorted({k for t in trials for k in t["point"]}):
        values = {t["point"][key] for t in trials if key in t["point"]}
        # Numbers in order; mixed or named values (scoring modes) by name.
        for value in sorted(values) if all(isinstance(v, (int, float)) for v in values) else sorted(values, key=str):
            at = [t for t in trials if t["point"].get(key) == value]
            lines.append(f"| {key} = {value} | {cell([t['canary_asr'] for t in at])} | "
                         f"{cell([t['true_asr'] for t in at])} | {len(at)} |")
    return lines
