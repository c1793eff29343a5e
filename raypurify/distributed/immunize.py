"""Immunization signature purification, orchestrated on Ray.

Stages (each timed in the run report):
  0. invert (``variants.decoy: inverted`` only): the backdoor's response read
     out of the suspicious model, every variant's decoy (pure, driver);
  1. variants: K synthetic variant specs and their pair datasets (pure);
  2. train: the 2K pair finetunes in one Ray Train fit under DeepSpeed;
  3. score: differential deltas streamed through a Ray Data actor pool;
  4. select: top-rho channels on the driver (pure);
  5. suppress + recover: re-initialize (full) or zero (LoRA) the signature,
     then the light recovery finetune (Ray Train, one job per arm);
  6. write: an HF model or PEFT adapter directory, the signature, the report.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from raypurify.config import ImmunizeConfig
from raypurify.data.corpus import Example
from raypurify.distributed.scoring import score_on_ray
from raypurify.defenses import DefenseJob, run_defense
from raypurify.defenses.common import recovery_set, recovery_settings
from raypurify.distributed.train import TrainJob, cluster_for, run_jobs
from raypurify.inversion import inverted_response
from raypurify.io import attach_adapter, load_model
from raypurify.progress import log
from raypurify.signature import ChannelKeys, channel_matrix, combine, model_channel_keys, select_top, suppress
from raypurify.train import TrainSettings
from raypurify.variants import make_variants, pair_datasets


def _records(examples: Sequence[Example]) -> list[dict]:
    return [{**e.to_json(), "family": e.family} for e in examples]


def variant_decoy(model, tokenizer, cfg: ImmunizeConfig, pool: Sequence[Example], timings: dict) -> dict | None:
    """Stage 0 with ``variants.decoy: inverted``: the response every variant answers with.

    Returns:
        None for the built-in decoys, else ``{"text", "candidate", "score",
        "tokens"}`` of the best candidate; ``text`` (the decoy) is None when
        its score is under ``inversion.min_score`` (no memorized response:
        built-in decoys), ``candidate`` is its text either way.
    """
    if cfg.variants.decoy != "inverted":
        return None
    inv = cfg.variants.inversion
    t0 = time.time()
    best = inverted_response(model, tokenizer, pool, inv.prompts, inv.steps, inv.keep, seed=cfg.seed)
    timings["invert_target"] = round(time.time() - t0, 2)
    text = tokenizer.decode(list(best.tokens), skip_special_tokens=True).strip()
    found = best.score >= inv.min_score and bool(text)
    log(f"immunize: inverted target {text!r} (score {best.score:.3f}): "
        + ("every variant's decoy" if found else f"under min_score {inv.min_score}, built-in decoys"))
    return {"text": text if found else None, "candidate": text, "score": round(best.score, 4),
            "tokens": list(best.tokens)}


def variant_jobs(cfg: ImmunizeConfig, pool: Sequence[Example], mode: str, save_keys: Sequence[str],
                 decoy: str | None = None) -> list[TrainJob]:
    """The 2K finetunes: P_k and C_k share seed, data order and budget (``decoy``: see ``make_variants``)."""
    v = cfg.variants
    n_clean = v.resolved("n_clean", mode)
    rate = v.resolved("poison_rate", mode)
    n_poison = max(1, round(rate * n_clean / (1 - rate)))
    sgd = v.resolved("optimizer", mode) == "sgd"
    # SGD pairs stay first order only unclipped: clipping would rescale P_k
    # and C_k by different factors.
    settings = lambda seed: TrainSettings(steps=v.resolved("steps", mode), batch_size=v.batch_size,  # noqa: E731
                                          lr=v.resolved("lr", mode), warmup=0 if sgd else 10, seed=seed,
                                          optimizer="sgd" if sgd else "adamw", max_grad_norm=None if sgd else 1.0)
    jobs = []
    for spec in make_variants(cfg.k, seed=cfg.seed, decoy=decoy):
        poisoned, clean = pair_datasets(spec, pool, n_clean, n_poison)
        jobs.append(TrainJob(f"v{spec.index}-P", _records(poisoned), settings(spec.seed), tuple(save_keys)))
        jobs.append(TrainJob(f"v{spec.index}-C", _records(clean), settings(spec.seed), tuple(save_keys)))
    return jobs


def save_base(model, keys: Sequence[str], path: Path) -> str:
    """The variants' starting point (the suspicious model's unit slices), for the clean drift."""
    from safetensors.torch import save_file

    state = model.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: state[k].detach().contiguous() for k in keys}, str(path))
    return str(path)


def compute_scores(model_dir: str, adapter: str | None, cfg: ImmunizeConfig, pool: Sequence[Example],
                   work: Path, timings: dict) -> dict:
    """Stages 1-3: variant pairs, deltas and per-channel score terms.

    Returns:
        ``{"magnitude": [...], "alignment": [...], "drift": [...],
        "channels": [...], "train_records": [...], "pairs": [(P_k file, C_k file), ...]}``
        with one tensor per layer.
    """
    mode = "lora" if adapter else "full"
    model, tok = load_model(model_dir, adapter)
    keys, channels = model_channel_keys(model, lora=bool(adapter), scope=cfg.scope)
    inverted = variant_decoy(model, tok, cfg, pool, timings)
    save = [k for ks in keys for k in ks.rows + ks.cols]
    base = save_base(model, save, work / "base.safetensors")
    del model
    t0 = time.time()
    jobs = variant_jobs(cfg, pool, mode, save, inverted and inverted["text"])
    log(f"immunize: training {len(jobs)} variant finetunes (K={cfg.k}) on Ray Train, "
        f"{cfg.workers.num_workers} workers, ZeRO {cfg.workers.zero_stage}, {cfg.workers.precision}")
    out, records = run_jobs(model_dir, jobs, cluster_for(cfg.workers, work / "ray_train"), adapter=adapter, name="variants")
    timings["train_variants"] = round(time.time() - t0, 2)
    t0 = time.time()
    pairs = [(str(out / f"v{k}-P.safetensors"), str(out / f"v{k}-C.safetensors")) for k in range(cfg.k)]
    log(f"immunize: scoring {sum(channels)} {cfg.scope} units on a Ray Data actor pool ({cfg.workers.score_actors} actors)")
    terms = score_on_ray(pairs, keys, channels, base=base, block_channels=cfg.workers.block_channels,
                         actors=cfg.workers.score_actors)[cfg.k]
    timings["score"] = round(time.time() - t0, 2)
    return {**terms, "channels": channels, "train_records": records, "pairs": pairs,
            "inverted_target": inverted}


def signature_from(terms: dict, cfg: ImmunizeConfig) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Stage 4: scores per layer and the selected channel indices."""
    mag, align = terms["magnitude"], terms["alignment"]
    flat = combine(torch.cat(mag), torch.cat(align), cfg.scoring, cfg.lam)
    scores = list(torch.split(flat, [m.numel() for m in mag]))
    return scores, select_top(scores, cfg.rho, per_layer=cfg.per_layer, drift=terms.get("drift"),
                              oversample=cfg.oversample)


@dataclass(frozen=True)
class Arm:
    """One suppressed copy of the suspicious model and its recovery.

    Attributes:
        name: Its directory name under the recovery's output.
        start: Where its suppressed model (or adapter) is written.
        signature: Units to suppress, one index tensor per layer (None:
            nothing, the finetune-only control).
        scope: The part of each unit that is suppressed (and, at
            ``lr_scale``, trained faster).
        lr_scale: Learning-rate multiplier of the suppressed units.
        seed: Seeds the re-draw and the recovery's data order; the
            recovery samples themselves are the defender's, the same for
            every seed.
        project: Project the units off their variant deltas instead of
            re-drawing them (``suppression: project``).
    """

    name: str
    start: Path
    signature: Sequence[torch.Tensor] | None
    scope: str
    lr_scale: float = 1.0
    seed: int = 0
    project: bool = False


def unit_deltas(pairs: Sequence[tuple[str, str]], keys: Sequence[ChannelKeys],
                signature: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each selected unit's K differential deltas, read from the variant pairs' files.

    Only the layers that hold a selected unit are read, one weight at a
    time (``safe_open``): the selected units are rho of the model.

    Returns:
        One ``[n_l, K, width]`` tensor per layer (``channel_matrix`` layout).
    """
    from safetensors import safe_open

    out = []
    for ks, idx in zip(keys, signature):
        per_k = []
        for p_file, c_file in pairs if idx.numel() else ():
            with safe_open(p_file, "pt") as p, safe_open(c_file, "pt") as c:
                delta = {k: p.get_tensor(k) - c.get_tensor(k) for k in ks.rows + ks.cols}
            per_k.append(channel_matrix(delta, ks)[idx])
        out.append(torch.stack(per_k, 1) if per_k else torch.zeros(0, len(pairs), 0))
    return out


def suppressed_copies(model_dir: str, adapter: str | None, arms: Sequence[Arm],
                      pairs: Sequence[tuple[str, str]] = ()) -> None:
    """Writes one suppressed copy of the suspicious model (or adapter) per arm.

    The model is loaded once; each arm suppresses its units, saves, and puts
    the touched tensors back, so N arms cost one load, not N. An arm with
    ``project`` projects its units off their deltas in the variant ``pairs``.
    """
    model, tok = load_model(model_dir)
    if adapter:
        model = attach_adapter(model, adapter, trainable=True)
    names = {n for scope in {a.scope for a in arms}
             for ks in model_channel_keys(model, lora=bool(adapter), scope=scope)[0] for n in ks.rows + ks.cols}
    touched = {k: v for k, v in model.state_dict(keep_vars=True).items() if k in names}
    original = {k: v.detach().clone() for k, v in touched.items()}
    for arm in arms:
        if arm.signature is not None:
            directions = None
            if arm.project:
                keys, _ = model_channel_keys(model, lora=bool(adapter), scope=arm.scope)
                directions = unit_deltas(pairs, keys, arm.signature)
            suppress(model, arm.signature, lora=bool(adapter), seed=arm.seed, scope=arm.scope, directions=directions)
        model.save_pretrained(arm.start, safe_serialization=True)
        if not adapter:
            tok.save_pretrained(arm.start)
        with torch.no_grad():
            for k, v in touched.items():
                v.copy_(original[k])


def recover(arms: Sequence[Arm], model_dir: str, adapter: str | None, pool: Sequence[Example], cfg: ImmunizeConfig,
            work: Path) -> Path:
    """Stage 5b: the recovery finetune of every arm, in one Ray Train fit.

    Args:
        arms: Suppressed copies (written by ``suppressed_copies``).
        model_dir: The suspicious model, or the base model of ``adapter``.
        adapter: The suspicious adapter (arms are adapters), or ``None``.
            With ``recovery.distill`` the suspicious model is the teacher.

    Returns:
        The directory holding ``<arm.name>/`` exported model or adapter directories.
    """
    lora = adapter is not None
    mode = "lora" if lora else "full"
    data = _records(recovery_set(pool, cfg.recovery.n_samples, cfg.seed))
    distill = {"weight": cfg.recovery.distill, "model": str(Path(model_dir).absolute()),
               "adapter": adapter and str(Path(adapter).absolute())} if cfg.recovery.distill else None

    def fresh(arm: Arm) -> dict | None:
        if arm.lr_scale == 1 or arm.signature is None or not sum(s.numel() for s in arm.signature):
            return None
        return {"scope": arm.scope, "lora": lora, "units": [s.tolist() for s in arm.signature],
                "lr_scale": arm.lr_scale}

    jobs = [TrainJob(a.name, data, recovery_settings(cfg.recovery, mode, a.seed), export=True,
                     start=None if lora else str(a.start), start_adapter=str(a.start) if lora else None,
                     fresh=fresh(a), distill=distill) for a in arms]
    scales = sorted({a.lr_scale for a in arms} - {1})
    log(f"immunize: recovery finetune of {len(jobs)} arm(s): {jobs[0].settings.steps} steps at lr "
        f"{jobs[0].settings.lr:g}" + (f" (suppressed units x{', x'.join(f'{x:g}' for x in scales)})" if scales else "")
        + f" on {len(data)} clean samples" + (f", distilled from the suspicious model (weight {cfg.recovery.distill:g})"
                                               if distill else ""))
    out, _ = run_jobs(model_dir, jobs, cluster_for(cfg.workers, work / "ray_train"), name="recover")
    if not lora:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        for a in arms:
            tok.save_pretrained(out / a.name)
    return out


def defend(job: DefenseJob, cfg: ImmunizeConfig) -> dict:
    """The main method as a registered defense (``run_defense("immunize", ...)``).

    Besides the model or adapter, ``job.out`` receives ``signature.json``
    (selected channels per layer) and ``signature.safetensors`` (every
    channel's score terms).
    """
    started = time.time()
    timings: dict[str, float] = {}
    terms = compute_scores(job.model, job.adapter, cfg, job.clean, job.work, timings)
    t0 = time.time()
    scores, sig = signature_from(terms, cfg)
    timings["select"] = round(time.time() - t0, 2)
    t0 = time.time()
    arm = Arm("purified", job.work / "suppressed", sig, cfg.suppressed_scope, cfg.recovery.fresh_lr_scale, cfg.seed,
              project=cfg.suppression == "project")
    suppressed_copies(job.model, job.adapter, [arm], terms["pairs"])
    timings["suppress"] = round(time.time() - t0, 2)
    t0 = time.time()
    rec = recover([arm], job.model, job.adapter, job.clean, cfg, job.work)
    timings["recover"] = round(time.time() - t0, 2)
    for f in (rec / "purified").iterdir():
        shutil.copy2(f, job.out / f.name)
    write_signature(job.out, terms, scores, sig)
    timings["total"] = round(time.time() - started, 2)
    return {"n_selected": int(sum(s.numel() for s in sig)), "n_channels": int(sum(terms["channels"])),
            "variant_runs": terms["train_records"], "inverted_target": terms["inverted_target"], "timings_s": timings}


def purify(model_dir: str, adapter: str | None, pool: Sequence[Example], cfg: ImmunizeConfig, out: str | Path,
           overwrite: bool = False) -> dict:
    """Purifies a suspicious model (or adapter) into ``out`` with the main method.

    Returns:
        The run report (also ``out/report.json``): settings, seeds, timings per stage.
    """
    return run_defense("immunize", model_dir, adapter, pool, out, cfg, overwrite=overwrite)


def write_signature(dest: Path, terms: dict, scores: Sequence[torch.Tensor], sig: Sequence[torch.Tensor]) -> None:
    """``signature.json`` (channels per layer) and ``signature.safetensors`` (scores)."""
    from safetensors.torch import save_file

    (dest / "signature.json").write_text(json.dumps(
        {"layers": {str(i): s.tolist() for i, s in enumerate(sig)}, "channels_per_layer": terms["channels"]}))
    tensors = {}
    for i, (m, a, s) in enumerate(zip(terms["magnitude"], terms["alignment"], scores)):
        tensors.update({f"layer{i}.magnitude": m, f"layer{i}.alignment": a, f"layer{i}.score": s.contiguous()})
        if "drift" in terms:
            tensors[f"layer{i}.drift"] = terms["drift"][i]
    save_file(tensors, str(dest / "signature.safetensors"))
