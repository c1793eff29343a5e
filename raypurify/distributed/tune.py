"""Ray Tune sweeps: the attack budget that calibrates the bench, and the
defenses' settings, chosen blind with canary backdoors.

Attack sweep: a trial implants one backdoor with its point of the space (a
Ray Tune function trainable on one CPU) and evaluates it; the sweep's answer
is the weakest budget that still meets the bar, which is how the bench's
default attack budget was chosen.

Blind sweeps (``raypurify tune``; the kinds are ``raypurify.config.SWEEPS``):
``tune_immunize`` (immunization settings), ``tune_conflict`` (the conflict
defense's merge coefficients) and ``tune_combined`` (both; merge, then
immunize). See the section below and ``raypurify/tuning.py`` for the choice
rule.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import ray
from pydantic import ValidationError
from ray import tune

from raypurify.config import AttackConfig, AttackSpace
from raypurify.distributed.bench import evaluate_dir, init_ray
from raypurify.io import load_examples, output_dir
from raypurify.progress import log
from raypurify.zoo import build_zoo, model_name


def _trial(config: dict) -> None:
    import torch

    from raypurify.implant import implant

    torch.set_num_threads(1)
    cfg = AttackConfig.model_validate(config["attack"])
    zoo = Path(config["zoo"])
    base = zoo / config["base"]
    with tempfile.TemporaryDirectory(prefix="rp-tune-") as tmp:
        out = Path(tmp) / "attacked"
        implant(base, cfg, load_examples(zoo / "train.json"), out)
        model, adapter = (base, out) if cfg.mode == "lora" else (out, None)
        r = evaluate_dir(str(model), adapter and str(adapter), str(zoo / "heldout.json"), cfg.attack, cfg.behavior)
    tune.report(r)


def _param_space(space) -> dict:
    """Tune's search space of an AttackSpace or a sweep space (flat dotted keys)."""
    dims = {}
    for key, v in space.space.items():
        if isinstance(v, list):
            dims[key] = tune.grid_search(v) if space.search == "grid" else tune.choice(v)
        else:
            dims[key] = (tune.loguniform if v.log else tune.uniform)(v.low, v.high)
    return dims


def tune_attack(space: AttackSpace, zoo: str, out: str, arch: str = "llama", size: str = "bench",
                concurrent: int = 2, address: str | None = None, overwrite: bool = False) -> dict:
    """Runs the sweep and writes ``trials.json``, ``tune.md`` and ``best.yaml`` to ``out``.

    Returns:
        ``{"trials": [...], "best": {...} | None, "clean": {...}}``.
    """
    import yaml

    with output_dir(out, overwrite=overwrite) as tmp:
        build_zoo(zoo, archs=[arch], sizes=[size])
        init_ray(address)
        z, base = Path(zoo).absolute(), model_name(arch, size)
        fixed = {"attack": "badnets", "behavior": "sentiment", **space.fixed}
        clean = evaluate_dir(str(z / base), None, str(z / "heldout.json"), fixed["attack"], fixed["behavior"])
        # Each trial launches no trainer of its own: one CPU per trial is safe.
        trainable = tune.with_resources(_trial, {"cpu": 1})
        tuner = tune.Tuner(
            trainable,
            param_space={"zoo": str(z), "base": base, "attack": {**fixed, **_param_space(space)}},
            tune_config=tune.TuneConfig(num_samples=space.num_samples, max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name="attack", storage_path=str(tmp / "ray_tune")),
        )
        log(f"tune: sweeping {', '.join(space.space)} ({space.search})")
        grid = tuner.fit()
        trials = []
        for result in grid:
            if result.error:
                trials.append({"attack": result.config["attack"], "error": str(result.error).splitlines()[0]})
                continue
            trials.append({"attack": result.config["attack"], **{k: result.metrics[k] for k in
                                                                 ("asr", "clean_asr", "cda", "ppl", "n_triggered")}})
        bar = space.bar
        ok = [t for t in trials if "error" not in t and t["asr"] >= bar.min_asr and t["clean_asr"] <= bar.max_false
              and clean["cda"] - t["cda"] <= bar.max_cda_drop]
        # Weakest implant that still meets the bar: fewest steps x lr.
        best = min(ok, key=lambda t: (t["attack"].get("steps") or 0) * (t["attack"].get("lr") or 0), default=None)
        (tmp / "trials.json").write_text(json.dumps({"clean": clean, "trials": trials, "best": best}, indent=1))
        swept = list(space.space)
        lines = [f"Clean model: ASR {clean['asr']:.3f}, CDA {clean['cda']:.3f}. Bar: ASR >= {bar.min_asr}, "
                 f"false activation <= {bar.max_false}, CDA drop <= {bar.max_cda_drop}.", "",
                 "| " + " | ".join(swept) + " | ASR | false act. | CDA | meets bar |",
                 "|" + "---|" * (len(swept) + 4)]
        for t in trials:
            vals = " | ".join(str(t["attack"].get(k)) for k in swept)
            if "error" in t:
                lines.append(f"| {vals} | failed: {t['error']} | | | |")
            else:
                lines.append(f"| {vals} | {t['asr']:.3f} | {t['clean_asr']:.3f} | {t['cda']:.3f} | "
                             f"{'yes' if t in ok else 'no'} |")
        (tmp / "tune.md").write_text("\n".join(lines) + "\n")
        if best:
            (tmp / "best.yaml").write_text(yaml.safe_dump(best["attack"]))
    print("\n".join(lines))
    return {"trials": trials, "best": best, "clean": clean}


# --- Blind sweeps (canaries): immunization, conflict merge, both -----------
#
# The expensive work is done once, before Tune starts, by the kind's
# ``prepare_*``: the canary implants (and, for immunization, the variant
# pairs for the largest K) in ONE Ray Train fit, the score terms once per
# (K, scope) on the Ray Data actor pool, and for a conflict merge the
# conflict LoRA of every model in one more fit. A trial only selects its
# signature and/or merges at its coefficients, suppresses and recovers in its
# own process, and measures; it launches no trainer, so one CPU per trial
# cannot deadlock the 2-CPU machine. ``_run_sweep`` is the same for every
# kind: Tune, the choice (``raypurify/tuning.py``) and the outputs.

SHARED_TRAIN_NAME = "tune-shared"


def _examples(records: list[dict]):
    from raypurify.data.corpus import Example

    return [Example(**r) for r in records]


def check_sweep_inputs(space, n_pool: int, mode: str) -> None:
    """Rejects clean data too small for the held-out slice plus the rest of the sweep.

    Raises:
        RaypurifyError: With the numbers needed.
    """
    from raypurify.errors import RaypurifyError

    need_rest = max(space.base().min_clean(), space.canaries.implant.resolved("n_clean", mode))
    need = space.utility.heldout + need_rest
    if n_pool < need:
        raise RaypurifyError(f"the clean data has {n_pool} samples; this sweep needs at least {need} "
                             f"({space.utility.heldout} held out for utility and canary ASR + {need_rest} for the "
                             "canary implants and the defense's own samples: variants, conflict LoRA, recovery)")


def _utility(model, tok, held) -> dict:
    from raypurify.evaluate import clean_accuracy, perplexity

    return {"cda": clean_accuracy(model, tok, held), "ppl": perplexity(model, tok, held)}


def _true(model, tok, bench: dict) -> dict:
    from raypurify.evaluate import evaluate

    r = evaluate(model, tok, _examples(bench["heldout"]), bench["attack"], bench["behavior"])
    return {"true_asr": r["asr"], "true_cda": r["cda"], "true_ppl": r["ppl"], "true_false_activation": r["clean_asr"]}


def _load(model_dir: str, adapter: str | None, trainable: bool = False):
    from raypurify.io import attach_adapter, load_model

    model, tok = load_model(model_dir)
    if adapter:
        model = attach_adapter(model, adapter, trainable=trainable)
    return model, tok


@ray.remote(num_cpus=1)
def _baseline(model_dir: str, adapter: str | None, held: list[dict], canaries: list, bench: dict | None,
              utility: bool) -> dict:
    """Measures one unpurified model: utility and/or the canaries' ASR (and the true attack)."""
    import torch

    from raypurify.canaries import canary_asr

    torch.set_num_threads(1)
    model, tok = _load(model_dir, adapter)
    h = _examples(held)
    out = {f"canary{c.index}_asr": canary_asr(model, tok, c, h) for c in canaries}
    if utility:
        out.update(_utility(model, tok, h))
    if bench:
        out.update(_true(model, tok, bench))
    return out


def _split(pool: list, space, seed: int) -> tuple[list, list]:
    from raypurify.tuning import defender_split

    held_idx, rest_idx = defender_split(len(pool), space.utility.heldout, seed)
    return [pool[i] for i in held_idx], [pool[i] for i in rest_idx]


def canary_jobs(space, rest: list, mode: str, avoid: list = (), scope: str | None = None) -> tuple[list, list]:
    """The canary specs of a sweep and the Ray Train jobs that implant them.

    Args:
        space: A validated sweep space (its ``canaries`` block).
        rest: Clean data outside the held-out slice.
        mode: ``full`` or ``lora``.
        avoid: Variant specs no canary may resemble.
        scope: The units a trial suppresses (``canaries.unit_dropout`` drops
            them during the implant; a merge sweep has none).

    Returns:
        ``(specs, jobs)``; job ``canary<i>`` exports canary ``i``'s model or adapter.
    """
    from raypurify.canaries import canary_dataset, make_canaries
    from raypurify.distributed.immunize import _records
    from raypurify.distributed.train import TrainJob
    from raypurify.train import TrainSettings

    c = space.canaries
    canaries = make_canaries(c.n, c.seed, avoid=avoid, kinds=c.kinds, forms=c.forms,
                             positions=c.positions)
    n_clean = c.implant.resolved("n_clean", mode)
    rate = c.implant.resolved("poison_rate", mode)
    n_poison = max(1, round(rate * n_clean / (1 - rate)))

    def dropout(index: int) -> dict | None:
        p = c.dropout(index)
        return {"scope": scope, "lora": mode == "lora", "p": p} if p else None

    jobs = [TrainJob(f"canary{s.index}", _records(canary_dataset(s, rest, n_clean, n_poison)),
                     TrainSettings(steps=c.implant.resolved("steps", mode), batch_size=c.implant.batch_size,
                                   lr=c.implant.resolved("lr", mode), warmup=10, seed=s.seed), export=True,
                     dropout=dropout(s.index))
            for s in canaries]
    return canaries, jobs


def _largest(space, max_k: int):
    """The ImmunizeConfig of the sweep's largest signature: max K and rho, the first scope, the fixed scoring."""
    return space.base().model_copy(update={"k": max_k, "rho": max(space.values("rho")),
                                           "scope": space.values("scope")[0]})


def _freeze(c_jobs: list, terms: dict, space, max_k: int, lora: bool) -> tuple[list, list[list[int]]]:
    """The canary jobs with the units of the sweep's largest signature held.

    The largest signature: max K and rho of the space, its first scope and
    the fixed scoring; its suppressed part (``suppress_scope``) is held, the part a
    trial re-draws. Returns the jobs and the held units per layer.
    """
    from dataclasses import replace

    from raypurify.distributed.immunize import signature_from

    cfg = _largest(space, max_k)
    _, sig = signature_from(terms[f"{max_k}|{cfg.scope}"], cfg)
    units = [u.tolist() for u in sig]
    held = {"scope": cfg.suppressed_scope, "lora": lora, "units": units, "lr_scale": 1.0, "frozen": True}
    return [replace(j, fresh=held) for j in c_jobs], units


def _canary_dirs(model_dir: str, adapter: str | None, out: Path, canaries: list) -> list[str]:
    from transformers import AutoTokenizer

    dirs = [str(out / f"canary{s.index}") for s in canaries]
    if not adapter:
        tok = AutoTokenizer.from_pretrained(model_dir)
        for d in dirs:
            tok.save_pretrained(d)
    return dirs


def measure_unpurified(model_dir: str, adapter: str | None, held_r: list[dict], canaries: list, canary_dirs: list,
                       bench: dict | None, min_asr: float) -> tuple[dict, list[dict]]:
    """The suspicious model's utility (the reference of "CDA lost") and every canary's ASR before purification.

    Returns:
        ``(suspicious figures, one record per canary)``.
    """
    futures = [_baseline.remote(model_dir, adapter, held_r, canaries, bench, True)]
    futures += [_baseline.remote(model_dir if adapter else d, d if adapter else None, held_r, [s], None, True)
                for s, d in zip(canaries, canary_dirs)]
    susp, *canary_before = ray.get(futures)
    records = [{"index": s.index, "trigger": s.trigger, "position": s.position, "kind": s.kind,
                "decoy": s.decoy, "asr_before": before[f"canary{s.index}_asr"],
                "asr_on_suspicious": susp[f"canary{s.index}_asr"], "cda": before["cda"],
                "weak": before[f"canary{s.index}_asr"] < min_asr}
               for s, before in zip(canaries, canary_before)]
    for r in records:
        log(f"tune: canary {r['index']} ({r['kind']}, trigger {r['trigger']!r}): ASR {r['asr_before']:.3f} before "
            f"purification, {r['asr_on_suspicious']:.3f} on the suspicious model"
            + ("  -- WEAK: it barely fires, so it says little" if r["weak"] else ""))
    return susp, records


def prepare_sweep(model_dir: str, adapter: str | None, pool: list, space, work: Path, bench: dict | None) -> dict:
    """The work every immunization trial shares, done once on the driver before Tune starts.

    Returns:
        The shared state handed to every trial (``tune.with_parameters``) and
        the run record: held-out slice, recovery pool, canary specs and
        model directories, score terms per ``"K|scope"``, baseline figures.
    """
    from raypurify.distributed.immunize import _records, save_base, variant_decoy, variant_jobs
    from raypurify.distributed.scoring import score_on_ray
    from raypurify.distributed.train import cluster_for, run_jobs
    from raypurify.signature import model_channel_keys
    from raypurify.variants import make_variants

    timings: dict[str, float] = {}
    base = space.base()
    mode = "lora" if adapter else "full"
    held, rest = _split(pool, space, base.seed)
    max_k = max(space.values("k"))
    ks = sorted(set(space.values("k")))
    scopes = sorted(set(space.values("scope")))
    cfg_max = base.model_copy(update={"k": max_k})

    model, tok = _load(model_dir, adapter)
    keys = {s: model_channel_keys(model, lora=bool(adapter), scope=s) for s in scopes}
    inverted = variant_decoy(model, tok, cfg_max, rest, timings)
    save = sorted({k for layer_keys, _ in keys.values() for lk in layer_keys for k in lk.rows + lk.cols})
    base_file = save_base(model, save, work / "base.safetensors")
    del model

    # Variants for the largest K only: make_variants(k) is a prefix of
    # make_variants(max_k) (same seeded draws in order), so a trial with a
    # smaller K scores the first k pairs and gets exactly its own variants.
    decoy = inverted and inverted["text"]
    jobs = variant_jobs(cfg_max, rest, mode, save, decoy)
    variants = make_variants(max_k, seed=base.seed, decoy=decoy)
    dropped_scope = _largest(space, max_k).suppressed_scope
    canaries, c_jobs = canary_jobs(space, rest, mode, avoid=variants, scope=dropped_scope)
    frozen = space.canaries.freeze_signature
    # Canaries train in the same fit as the variants (one fixed cost, not
    # two), unless they must avoid the signature, which needs the scores.
    if not frozen:
        jobs += c_jobs
    t0 = time.time()
    log(f"tune: training {2 * max_k} variant finetunes (K={max_k})"
        f"{'' if frozen else f' and {len(canaries)} canary implants'} in one Ray Train fit")
    cluster = cluster_for(cfg_max.workers, work / "ray_train")
    out, records = run_jobs(model_dir, jobs, cluster, adapter=adapter, name=SHARED_TRAIN_NAME)
    timings["train_variants" if frozen else "train_variants_and_canaries"] = round(time.time() - t0, 2)

    t0 = time.time()
    pairs = [(str(out / f"v{k}-P.safetensors"), str(out / f"v{k}-C.safetensors")) for k in range(max_k)]
    terms = {}
    for scope in scopes:
        layer_keys, channels = keys[scope]
        log(f"tune: scoring {sum(channels)} {scope} units for K in {ks} (one Ray Data pass)")
        by_k = score_on_ray(pairs, layer_keys, channels, ks, base_file, base.workers.block_channels,
                            base.workers.score_actors)
        for k, t in by_k.items():
            terms[f"{k}|{scope}"] = {**t, "channels": channels}
    timings["score"] = round(time.time() - t0, 2)

    frozen_units = None
    if frozen:
        t0 = time.time()
        c_jobs, frozen_units = _freeze(c_jobs, terms, space, max_k, bool(adapter))
        log(f"tune: training {len(canaries)} canary implants in a second fit, the largest signature's "
            f"{sum(map(len, frozen_units))} units held")
        out, c_records = run_jobs(model_dir, c_jobs, cluster, adapter=adapter, name=f"{SHARED_TRAIN_NAME}-canaries")
        records += c_records
        timings["train_canaries"] = round(time.time() - t0, 2)
    canary_dirs = _canary_dirs(model_dir, adapter, out, canaries)

    t0 = time.time()
    held_r = _records(held)
    susp, canary_records = measure_unpurified(model_dir, adapter, held_r, canaries, canary_dirs, bench,
                                              space.canaries.min_asr)
    timings["baseline"] = round(time.time() - t0, 2)
    for r in canary_records:
        r["unit_dropout"] = space.canaries.dropout(r["index"])
    drops = ", ".join(f"{r['unit_dropout']:.0%}" for r in canary_records)
    run = {"variant_finetunes": sum(1 for r in records if r["name"].startswith("v")),
           "canary_finetunes": sum(1 for r in records if r["name"].startswith("canary")),
           "train_fits": 2 if frozen else 1, "canary_frozen_units": frozen_units, "max_k": max_k,
           "scoring_runs": sorted(terms), "scoring_passes": len(scopes),
           "timings_s": timings,
           "variant_triggers": [v.trigger for v in variants], "inverted_target": inverted,
           "n_heldout": len(held), "n_rest": len(rest),
           "train_records": records}
    run["shared_work"] = (f"{run['variant_finetunes']} variant finetunes (K={max_k}) + {run['canary_finetunes']} "
                          f"canary implants in {run['train_fits']} Ray Train fit(s); scores for "
                          f"{', '.join(run['scoring_runs'])} (K|scope)"
                          + (f"; canaries implanted with {sum(map(len, frozen_units))} signature units held"
                             if frozen else "")
                          + (f"; canary implants drop {drops} of the {dropped_scope} units per step"
                             if any(space.canaries.unit_dropout) else ""))
    shared = {"model": model_dir, "adapter": adapter, "heldout": held_r, "rest": _records(rest),
              "canaries": canaries, "canary_dirs": canary_dirs, "terms": terms, "pairs": pairs, "fixed": space.fixed,
              "baseline": {"cda": susp["cda"], "ppl": susp["ppl"]}, "bench": bench,
              "budget": space.utility, "repeats": space.repeats}
    return {"shared": shared, "run": run, "suspicious": susp, "canaries": canary_records, "seed": base.seed,
            "max_epochs": max(space.values("recovery.epochs"))}


def train_conflict_models(model_dir: str, adapter: str | None, canary_dirs: list[str], rest: list, cfg,
                          work: Path) -> tuple[list[dict], list[dict]]:
    """Trains the conflict LoRA of every model in ONE Ray Train fit; a trial then only merges.

    One LoRA per model (the suspicious one and each canary model), each on
    the model it will be merged into, as ``purify --defense conflict`` trains
    it. Where the LoRA does not depend on that model it is trained once and
    shared: adapter-only (it is trained on the base, as in the paper) and a
    full model with ``base`` set (trained on theta_0).

    Args:
        model_dir: The suspicious model (the base, with ``adapter``).
        adapter: The suspicious adapter, or None.
        canary_dirs: The canary models (full) or adapters (adapter-only).
        rest: Clean data outside the held-out slice.
        cfg: The ``ConflictConfig`` (its training settings; merge settings unused).
        work: Scratch directory (Ray Train storage, conflict models).

    Returns:
        ``(targets, train records)``: one target per model, suspicious first,
        ``{"model", "adapter", "conflict"}``, where ``conflict`` is the
        conflict model directory (full) or the conflict adapter (adapter-only).
    """
    from raypurify.distributed.conflict import conflict_job, lora_of
    from raypurify.distributed.train import cluster_for, run_jobs
    from raypurify.merge import merge_lora_into

    shared_lora = bool(adapter or cfg.base)
    starts = {"conflict": cfg.base or model_dir} if shared_lora else \
        {"conflict-suspicious": model_dir, **{f"conflict-canary{i}": d for i, d in enumerate(canary_dirs)}}
    jobs = [conflict_job(rest, cfg, name, start) for name, start in starts.items()]
    log(f"tune: training {len(jobs)} conflict LoRA(s) (r={cfg.lora_r}, {jobs[0].settings.steps} steps) in one "
        "Ray Train fit")
    out, records = run_jobs(model_dir, jobs, cluster_for(cfg.workers, work / "ray_train"), lora=lora_of(cfg),
                            name="tune-conflict")
    conflict = {name: str(out / name) for name in starts}
    if not adapter:
        # The conflict model theta + delta does not depend on the trial: built once.
        for name, start in starts.items():
            d = work / "conflict_models" / name
            d.mkdir(parents=True)
            merge_lora_into(start, conflict[name], d)
            conflict[name] = str(d)
    names = list(starts) if not shared_lora else ["conflict"] * (1 + len(canary_dirs))
    models = [(model_dir, adapter)] + [(model_dir, d) if adapter else (d, None) for d in canary_dirs]
    return [{"model": m, "adapter": a, "conflict": conflict[n]} for (m, a), n in zip(models, names)], records


def prepare_conflict_sweep(model_dir: str, adapter: str | None, pool: list, space, work: Path,
                           bench: dict | None) -> dict:
    """The work every conflict-merge trial shares: canary implants, then the conflict LoRAs (two fits).

    The LoRAs start from the canary models, so they cannot join the canaries' fit.
    """
    from raypurify.distributed.immunize import _records
    from raypurify.distributed.train import cluster_for, run_jobs

    timings: dict[str, float] = {}
    cfg = space.base()
    mode = "lora" if adapter else "full"
    held, rest = _split(pool, space, cfg.seed)
    canaries, jobs = canary_jobs(space, rest, mode)
    t0 = time.time()
    log(f"tune: training {len(canaries)} canary implants in one Ray Train fit")
    out, records = run_jobs(model_dir, jobs, cluster_for(cfg.workers, work / "ray_train"), adapter=adapter,
                            name="tune-canaries")
    timings["train_canaries"] = round(time.time() - t0, 2)
    canary_dirs = _canary_dirs(model_dir, adapter, out, canaries)
    t0 = time.time()
    targets, c_records = train_conflict_models(model_dir, adapter, canary_dirs, rest, cfg, work)
    timings["train_conflict"] = round(time.time() - t0, 2)
    t0 = time.time()
    held_r = _records(held)
    susp, canary_records = measure_unpurified(model_dir, adapter, held_r, canaries, canary_dirs, bench,
                                              space.canaries.min_asr)
    timings["baseline"] = round(time.time() - t0, 2)
    run = {"canary_finetunes": sum(1 for r in records if r["name"].startswith("canary")),
           "conflict_finetunes": sum(1 for r in c_records if r["name"].startswith("conflict")),
           "train_fits": 2, "timings_s": timings, "n_heldout": len(held), "n_rest": len(rest),
           "train_records": records + c_records}
    run["shared_work"] = (f"{run['canary_finetunes']} canary implants in 1 Ray Train fit, then "
                          f"{run['conflict_finetunes']} conflict LoRA(s) in 1 more; each trial only merges")
    shared = {"model": model_dir, "adapter": adapter, "heldout": held_r, "canaries": canaries,
              "targets": targets, "fixed": space.fixed, "baseline": {"cda": susp["cda"], "ppl": susp["ppl"]},
              "bench": bench, "budget": space.utility}
    return {"shared": shared, "run": run, "suspicious": susp, "canaries": canary_records, "seed": cfg.seed,
            "max_epochs": 1}


def prepare_combined_sweep(model_dir: str, adapter: str | None, pool: list, space, work: Path,
                           bench: dict | None) -> dict:
    """The immunization sweep's shared work, then the conflict LoRA of every model in one more fit."""
    prep = prepare_sweep(model_dir, adapter, pool, space.immunize_part(), work, bench)
    shared, run = prep["shared"], prep["run"]
    t0 = time.time()
    targets, records = train_conflict_models(model_dir, adapter, shared["canary_dirs"], _examples(shared["rest"]),
                                             space.base().conflict, work)
    run["timings_s"]["train_conflict"] = round(time.time() - t0, 2)
    run["conflict_finetunes"] = sum(1 for r in records if r["name"].startswith("conflict"))
    run["train_fits"] += 1
    run["train_records"] += records
    run["shared_work"] += (f"; then {run['conflict_finetunes']} conflict LoRA(s) in 1 more fit. Each trial merges, "
                           "then suppresses its signature and recovers")
    shared.update(targets=targets, fixed=space.fixed)
    return prep


def _merged(cfg, shared: dict, tmp: Path) -> list[tuple[str, str | None]]:
    """Merges every target (suspicious first, then the canaries) at ``cfg``'s coefficients.

    Returns:
        ``(model directory, adapter directory or None)`` per target.
    """
    from raypurify.merge import combine_adapters, merge_models

    starts = []
    for i, t in enumerate(shared["targets"]):
        out = tmp / f"merged{i}"
        out.mkdir()
        if t["adapter"]:
            combine_adapters(t["model"], t["adapter"], t["conflict"], out, cfg.adapter_combination,
                             cfg.adapter_weights(), cfg.merge.density, seed=cfg.seed)
            starts.append((t["model"], str(out)))
        else:
            merge_models(cfg.merge, t["model"], t["conflict"], out, base=cfg.base)
            starts.append((str(out), None))
    return starts


def _measure(models: list, shared: dict) -> dict:
    """Utility (and the true attack) of the suspicious model's version, canary ASR of the canaries'.

    Args:
        models: ``(model, tokenizer)``: the suspicious model's, then one per canary.
    """
    from raypurify.canaries import canary_asr
    from raypurify.tuning import objective

    held = _examples(shared["heldout"])
    model, tok = models[0]
    m = _utility(model, tok, held)
    for spec, (cm, ctok) in zip(shared["canaries"], models[1:]):
        m[f"canary{spec.index}_asr"] = canary_asr(cm, ctok, spec, held)
    m["canary_asr"] = sum(m[f"canary{s.index}_asr"] for s in shared["canaries"]) / len(shared["canaries"])
    m["cda_drop"] = shared["baseline"]["cda"] - m["cda"]
    m["ppl_ratio"] = m["ppl"] / shared["baseline"]["ppl"]
    m["objective"] = objective(m, shared["budget"])
    if shared["bench"]:
        m.update(_true(model, tok, shared["bench"]))
    return m


def _purify_and_report(cfg, starts: list, shared: dict, every_epoch: bool) -> None:
    """Signature, suppression and recovery of every start model (in this process), reported per epoch.

    Args:
        cfg: The trial's ``ImmunizeConfig``.
        starts: ``(model dir, adapter or None)``: the suspicious model first, then one per canary.
        shared: The sweep's shared state.
        every_epoch: Report after every recovery epoch (ASHA), not only the last.
    """
    from raypurify.defenses.common import recovery_set, recovery_settings
    from raypurify.distributed.immunize import signature_from, unit_deltas
    from raypurify.signature import model_channel_keys, suppress, unit_masks
    from raypurify.train import Finetuner, distill_loss, fresh_groups, lm_loss
    from raypurify.tuning import epoch_ends

    lora = shared["adapter"] is not None
    _, sig = signature_from(shared["terms"][f"{cfg.k}|{cfg.scope}"], cfg)
    # The recovery of `raypurify purify` (same settings, same seeded draw),
    # from the clean data minus the held-out slice; repeat r re-draws and
    # orders the data with seed + r, on the same samples.
    data = recovery_set(_examples(shared["rest"]), cfg.recovery.n_samples, cfg.seed)
    repeats, directions, teachers = [], None, {}
    for r in range(shared["repeats"]):
        settings = recovery_settings(cfg.recovery, "lora" if lora else "full", cfg.seed + r)
        runs = []
        for model_dir, adapter in starts:
            model, tok = _load(model_dir, adapter, trainable=True)
            # The same signature, seed and recovery for the suspicious model and
            # every canary model: a canary's survival predicts the real backdoor's.
            if cfg.suppression == "project" and directions is None:  # a trial with K variants: the first K pairs
                keys, _ = model_channel_keys(model, lora=lora, scope=cfg.suppressed_scope)
                directions = unit_deltas(shared["pairs"][:cfg.k], keys, sig)
            suppress(model, sig, lora=lora, seed=cfg.seed + r, scope=cfg.suppressed_scope, directions=directions)
            groups = None
            if cfg.recovery.fresh_lr_scale != 1:
                groups = fresh_groups(model, unit_masks(model, sig, lora=lora, scope=cfg.suppressed_scope),
                                      cfg.recovery.fresh_lr_scale)
            loss_fn = lm_loss
            if cfg.recovery.distill:  # each start model is its own teacher, as in `raypurify purify`
                if (model_dir, adapter) not in teachers:
                    teachers[model_dir, adapter] = _load(model_dir, adapter)[0].requires_grad_(False)
                loss_fn = distill_loss(teachers[model_dir, adapter], cfg.recovery.distill)
            runs.append((model, tok, Finetuner(model, tok, data, settings, loss_fn=loss_fn, groups=groups)))
        repeats.append(runs)
    ends = epoch_ends(settings.steps, cfg.recovery.epochs)
    for epoch, until in enumerate(ends, start=1):
        for runs in repeats:
            for _, _, ft in runs:
                ft.run(until)
        if not every_epoch and epoch < len(ends):
            continue
        m = _mean([_measure([(model, tok) for model, tok, _ in runs], shared) for runs in repeats], shared)
        _report({"epoch": epoch, "epochs": cfg.recovery.epochs, "n_suppressed": int(sum(s.numel() for s in sig)), **m})


def _report(metrics: dict) -> None:
    """Reports a trial's metrics with the time they were taken.

    Ray's own ``timestamp`` is whole seconds, too coarse to tell which short
    trials ran side by side; ``ended`` minus ``time_total_s`` is the span.
    """
    tune.report({**metrics, "ended": time.time()})


def _mean(measured: list[dict], shared: dict) -> dict:
    """One report from the repeats of a trial: every metric's mean, and the spread of the attack rates."""
    import statistics

    from raypurify.tuning import objective

    if len(measured) == 1:
        return measured[0]
    m = {k: statistics.mean(x[k] for x in measured) for k in measured[0]}
    m.update({f"{k}_sd": statistics.stdev(x[k] for x in measured) for k in ("canary_asr", "true_asr") if k in m})
    m["objective"] = objective(m, shared["budget"])
    return m


def _immunize_trial(config: dict, shared: dict) -> None:
    """One immunization trial: signature, suppression, recovery and measurement, per epoch."""
    import torch

    from raypurify.config import ImmunizeConfig
    from raypurify.tuning import merge

    torch.set_num_threads(1)
    cfg = ImmunizeConfig.model_validate(merge(shared["fixed"], config["point"]))
    starts = [(shared["model"], shared["adapter"])]
    starts += [(shared["model"], d) if shared["adapter"] else (d, None) for d in shared["canary_dirs"]]
    _purify_and_report(cfg, starts, shared, config["every_epoch"])


def _conflict_trial(config: dict, shared: dict) -> None:
    """One conflict trial: merge every model with its conflict LoRA at the trial's coefficients, measure."""
    import torch

    from raypurify.conflict import ConflictConfig
    from raypurify.tuning import merge

    torch.set_num_threads(1)
    cfg = ConflictConfig.model_validate(merge(shared["fixed"], config["point"]))
    with tempfile.TemporaryDirectory(prefix="rp-tune-merge-") as tmp:
        m = _measure([_load(*s) for s in _merged(cfg, shared, Path(tmp))], shared)
    _report({"epoch": 1, "epochs": 1, **m})


def _combined_trial(config: dict, shared: dict) -> None:
    """One combined trial: the conflict merge, then immunization of the merged models (CombinedConfig's order)."""
    import torch

    from raypurify.conflict import CombinedConfig
    from raypurify.tuning import merge

    torch.set_num_threads(1)
    cfg = CombinedConfig.model_validate(merge(shared["fixed"], config["point"]))
    with tempfile.TemporaryDirectory(prefix="rp-tune-merge-") as tmp:
        _purify_and_report(cfg.immunize, _merged(cfg.conflict, shared, Path(tmp)), shared, config["every_epoch"])


def pareto_plot(trials: list[dict], suspicious: dict, budget, chosen: dict | None, path: Path,
                benchmark: bool, title: str = "Immunization sweep") -> None:
    """``pareto.png``: attack success against utility, one point per trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raypurify.tuning import pareto_front

    done = [t for t in trials if t.get("complete")]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    pts = [(t["cda"], t["canary_asr"]) for t in done]
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], c="tab:blue", label="canary ASR (blind)", zorder=3)
    front = pareto_front(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], c="tab:blue", alpha=0.5, label="Pareto front")
    if benchmark:
        ax.scatter([t["cda"] for t in done], [t["true_asr"] for t in done], marker="^", c="tab:red",
                   label="true ASR (benchmark)", zorder=3)
    ax.axvline(suspicious["cda"] - budget.max_cda_drop, ls="--", c="gray",
               label=f"utility budget (-{budget.max_cda_drop * 100:.1f} CDA pts)")
    ax.scatter([suspicious["cda"]], [suspicious.get("true_asr", 1.0) if benchmark else 1.0], marker="x", c="black",
               label="suspicious model" + ("" if benchmark else " (ASR unknown: drawn at 1)"))
    if chosen:
        ax.scatter([chosen["cda"]], [chosen["canary_asr"]], s=220, facecolors="none", edgecolors="tab:green",
                   linewidths=2, label="chosen (blind)", zorder=4)
    ax.set_xlabel("CDA on the defender's held-out slice (utility)")
    ax.set_ylabel("attack success rate")
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"{title}: attack success vs utility", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tune_immunize(space, model_dir: str, adapter: str | None, pool: list, out: str, objective: str = "blind",
                  attack: str | None = None, behavior: str | None = None, heldout: list | None = None,
                  address: str | None = None, overwrite: bool = False) -> dict:
    """Sweeps an immunization search space and chooses a setting blind.

    Writes to ``out``: ``best.yaml`` (an ImmunizeConfig that ``raypurify
    purify --config`` accepts), ``trials.json`` (every trial, the choice and
    the run record), ``trials.md``, ``pareto.png`` and the Ray Tune storage
    ``ray_tune/``.

    Args:
        space: A validated ``ImmunizeSpace``.
        model_dir: Suspicious model directory (the base, with ``adapter``).
        adapter: Suspicious PEFT adapter (adapter-only threat model).
        pool: The defender's clean data (a held-out slice is split off).
        out: Output directory.
        objective: ``blind`` (canaries only) or ``benchmark`` (the true
            attack is also measured on every trial; needs ``attack``,
            ``behavior`` and ``heldout``).

    Returns:
        ``{"trials", "chosen", "statement", "hindsight", "spearman", "run", ...}``.
    """
    return _run_sweep("immunize", space, prepare_sweep, _immunize_trial, model_dir, adapter, pool, out, objective,
                      attack, behavior, heldout, address, overwrite)


# peft adds the A and B matrices of these combinations entry by entry, so the
# two adapters' ranks must match (cat and svd take any ranks).
_SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties")


def _check_conflict(model_dir: str, adapter: str | None, space, prefix: str = "") -> None:
    """Checks that fail before anything runs: the defense's own, and what only a sweep can get wrong.

    Args:
        prefix: Where the conflict keys sit in the space (``conflict.`` in a combined one).
    """
    from raypurify.distributed.conflict import check_job
    from raypurify.errors import RaypurifyError

    cfg = space.base().conflict if prefix else space.base()
    check_job(model_dir, adapter, cfg)
    key = f"{prefix}adapter_combination"
    if key in space.space and not adapter:
        raise RaypurifyError(f"{key} is swept, but it only acts on adapters (--adapter) and this model is a full "
                             "one: every value would give the same trial")
    if adapter:
        r = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("r")
        same = sorted(set(space.values(key)) & set(_SAME_RANK))
        if same and r != cfg.lora_r:
            raise RaypurifyError(f"adapter combination(s) {same} need the conflict LoRA's rank to equal the "
                                 f"suspicious adapter's ({r}); set {prefix}lora_r: {r} in fixed, or use cat / svd")


def tune_conflict(space, model_dir: str, adapter: str | None, pool: list, out: str, objective: str = "blind",
                  attack: str | None = None, behavior: str | None = None, heldout: list | None = None,
                  address: str | None = None, overwrite: bool = False) -> dict:
    """Sweeps the conflict defense's merge coefficients and chooses them blind.

    Same arguments, choice and outputs as ``tune_immunize``; ``best.yaml`` is a
    ConflictConfig for ``raypurify purify --defense conflict --config``.
    """
    _check_conflict(model_dir, adapter, space)
    return _run_sweep("conflict", space, prepare_conflict_sweep, _conflict_trial, model_dir, adapter, pool, out,
                      objective, attack, behavior, heldout, address, overwrite)


def tune_combined(space, model_dir: str, adapter: str | None, pool: list, out: str, objective: str = "blind",
                  attack: str | None = None, behavior: str | None = None, heldout: list | None = None,
                  address: str | None = None, overwrite: bool = False) -> dict:
    """Sweeps the conflict merge and immunization together (``CombinedConfig``: merge, then immunize).

    Same arguments, choice and outputs as ``tune_immunize``; ``best.yaml`` is
    a CombinedConfig, and ``best-conflict.yaml`` / ``best-immunize.yaml`` are
    its sections for the two ``raypurify purify`` runs.
    """
    _check_conflict(model_dir, adapter, space, prefix="conflict.")
    return _run_sweep("combined", space, prepare_combined_sweep, _combined_trial, model_dir, adapter, pool, out,
                      objective, attack, behavior, heldout, address, overwrite)


def _best_files(kind: str, cfg, statement: str, chosen: dict, heldout: int) -> dict[str, str]:
    """``best.yaml`` (and, for several defenses, one file per defense) with how to use them."""
    import yaml

    from raypurify.config import SWEEPS

    defenses = SWEEPS[kind].defenses
    data = cfg.model_dump(mode="json")
    head = (f"# raypurify tune ({kind}): {statement}.\n# trial {chosen['trial_id']}: canary ASR "
            f"{chosen['canary_asr']:.3f}, CDA lost {chosen['cda_drop'] * 100:.1f} points (held-out slice of "
            f"{heldout}).\n")
    if len(defenses) == 1:
        return {"best.yaml": head + f"# Use: raypurify purify --defense {defenses[0]} --config best.yaml\n"
                + yaml.safe_dump(data, sort_keys=False)}
    steps = " then ".join(f"raypurify purify --defense {d} --config best-{d}.yaml" for d in defenses)
    files = {"best.yaml": head + f"# Use, in this order, each on the previous output: {steps}\n"
             + yaml.safe_dump(data, sort_keys=False)}
    for d in defenses:
        files[f"best-{d}.yaml"] = f"# {kind} sweep, section {d} of best.yaml\n" + yaml.safe_dump(data[d], sort_keys=False)
    return files


def _run_sweep(kind: str, space, prepare, trial, model_dir: str, adapter: str | None, pool: list, out: str,
               objective: str, attack: str | None, behavior: str | None, heldout: list | None,
               address: str | None, overwrite: bool) -> dict:
    """What every sweep kind shares: checks, shared work, Tune, the blind choice and the outputs.

    Args:
        kind: A ``SWEEPS`` name (names the Tune run and the outputs).
        prepare: ``(model_dir, adapter, pool, space, work, bench) -> prep``: the shared work.
        trial: The Tune function trainable, ``(config, shared)``.
        (the rest): As ``tune_immunize``.
    """
    import shutil

    from ray.tune.schedulers import ASHAScheduler

    from raypurify.errors import RaypurifyError
    from raypurify.tuning import flat, nested

    benchmark = objective == "benchmark"
    if objective not in ("blind", "benchmark"):
        raise RaypurifyError(f"unknown objective {objective!r}; valid choices: blind, benchmark")
    if benchmark and not (attack and behavior and heldout):
        raise RaypurifyError("--objective benchmark needs --attack, --behavior and held-out data with references")
    check_sweep_inputs(space, len(pool), "lora" if adapter else "full")
    bench = {"attack": attack, "behavior": behavior, "heldout": [{**e.to_json(), "family": e.family} for e in heldout]} \
        if benchmark else None
    started = time.time()
    with output_dir(out, overwrite=overwrite) as tmp:
        init_ray(address)
        # Shared work under the output: on a cluster --out is on a shared
        # filesystem, so every trial's node can read the canary models.
        work = tmp / "_work"
        prep = prepare(model_dir, adapter, pool, space, work, bench)
        max_epochs = prep["max_epochs"]
        asha = getattr(space, "asha", None)
        use_asha = asha is not None and asha.enabled and max_epochs > 1
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_epochs,
                                  grace_period=min(asha.grace_period, max_epochs),
                                  reduction_factor=asha.reduction_factor) if use_asha else None
        search_alg = None
        if space.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search_alg = OptunaSearch(seed=prep["seed"])
        trainable = tune.with_resources(tune.with_parameters(trial, shared=prep["shared"]), {"cpu": 1})
        tuner = tune.Tuner(
            trainable,
            param_space={"point": nested(_param_space(space)), "every_epoch": use_asha},
            tune_config=tune.TuneConfig(metric="objective", mode="min", num_samples=space.num_samples,
                                        max_concurrent_trials=space.max_concurrent, scheduler=scheduler,
                                        search_alg=search_alg),
            run_config=tune.RunConfig(name=kind, storage_path=str(tmp / "ray_tune"), verbose=1),
        )
        log(f"tune: sweeping {', '.join(space.space)} ({kind}, {space.search}"
            f"{', ASHA on recovery epochs' if use_asha else ''}), {space.max_concurrent} trials at a time")
        t0 = time.time()
        grid = tuner.fit()
        prep["run"]["timings_s"]["trials"] = round(time.time() - t0, 2)
        trials = []
        for result in grid:
            point = flat(result.config["point"])
            if result.error:
                # The last line of a Ray task error is the exception itself.
                trials.append({"point": point, "error": str(result.error).strip().splitlines()[-1],
                               "trial_id": (result.metrics or {}).get("trial_id")})
                continue
            m = result.metrics
            keep = {k: v for k, v in m.items() if k in ("canary_asr", "cda", "cda_drop", "ppl", "ppl_ratio",
                                                         "objective", "n_suppressed", "trial_id")
                    or k.startswith("canary") or k.startswith("true_")}
            # Wall-clock span of the trial: shows which trials ran side by side.
            wall = [round(m["ended"] - m["time_total_s"], 3), round(m["ended"], 3)]
            trials.append({"point": point, **keep, "epochs_run": m["epoch"], "complete": m["epoch"] == m["epochs"],
                           "wall": wall})
        result = {"kind": kind, "objective": objective, "attack": attack, "behavior": behavior,
                  "model": str(Path(model_dir).absolute()), "adapter": str(Path(adapter).absolute()) if adapter else None,
                  "suspicious": prep["suspicious"], "canaries": prep["canaries"], "trials": trials,
                  "asha": use_asha, "search": space.search, "repeats": space.repeats, "run": prep["run"],
                  "space": space.model_dump(mode="json")}
        result["run"]["timings_s"]["total"] = round(time.time() - started, 2)
        text = decide(result, space, tmp)
        shutil.rmtree(work, ignore_errors=True)
    print(text)
    return result


def decide(result: dict, space, out: Path) -> str:
    """The blind choice (and, on the bench, the hindsight one) under the space's budget, and the outputs.

    Fills ``result`` with the choice, the budget and the correlation, and
    writes ``trials.json``, ``trials.md``, ``best.yaml`` and ``pareto.png``
    into ``out``. Shared by a sweep and by a re-choice (``load_sweep``).

    Returns:
        The text of ``trials.md``.
    """
    from raypurify.tuning import choose, spearman_of, trials_table

    budget, kind, trials = space.utility, result["kind"], result["trials"]
    benchmark = result["objective"] == "benchmark"
    chosen, statement = choose(trials, budget)
    hindsight, hindsight_statement = choose(trials, budget, metric="true_asr") if benchmark else (None, None)
    done = [t for t in trials if t.get("complete")]
    rho_s = spearman_of([t["canary_asr"] for t in done], [t["true_asr"] for t in done]) if benchmark else None
    result.update({"budget": budget.model_dump(), "chosen": chosen, "statement": statement, "hindsight": hindsight,
                   "hindsight_statement": hindsight_statement, "spearman_canary_true": rho_s})
    susp = result["suspicious"]
    head = [f"Suspicious model on the defender's held-out slice ({budget.heldout} samples): CDA "
            f"{susp['cda']:.3f}, PPL {susp['ppl']:.3f}"
            + (f"; true ASR {susp['true_asr']:.3f}, true CDA {susp['true_cda']:.3f}" if benchmark else "") + ".",
            "Canaries (ASR before purification / on the suspicious model): "
            + "; ".join(f"{c['kind']} {c['trigger']!r} {c['asr_before']:.3f} / {c['asr_on_suspicious']:.3f}"
                        + (" (WEAK)" if c["weak"] else "") for c in result["canaries"]) + ".",
            f"Shared work: {result['run']['shared_work']}."
            + (f" Each trial ran {result['repeats']} times (seeds of re-draw and recovery order); its figures are "
               "the means, ± the sd of the attack rates." if result.get("repeats", 1) > 1 else ""), ""]
    if result.get("rechosen_from"):
        head.insert(0, f"Re-chosen from the stored trials of {result['rechosen_from']} (no trial re-run).")
    if chosen:
        head.append(f"**Choice: trial {chosen['trial_id']}** ({', '.join(f'{k}={v}' for k, v in chosen['point'].items())})"
                    f": {statement}.")
    else:
        head.append(f"**No choice**: {statement}.")
    if benchmark and hindsight:
        head.append(f"Best in hindsight (true ASR, same budget): trial {hindsight['trial_id']}, true ASR "
                    f"{hindsight['true_asr']:.3f}, true CDA {hindsight['true_cda']:.3f}; blind choice: true ASR "
                    f"{chosen['true_asr']:.3f}, true CDA {chosen['true_cda']:.3f}. Spearman(canary ASR, true ASR) "
                    f"over {len(done)} completed trials: "
                    + ("n/a" if rho_s is None else f"{rho_s:.3f}") + ".")
    text = "\n".join(head) + "\n\n" + trials_table(trials, list(space.space), budget, chosen and chosen["trial_id"],
                                                    benchmark)
    (out / "trials.md").write_text(text)
    (out / "trials.json").write_text(json.dumps(result, indent=1, default=str))
    if chosen:
        base = space.base()
        cfg = type(base).model_validate(_point_update(base.model_dump(mode="json"), chosen["point"]))
        for name, body in _best_files(kind, cfg, statement, chosen, budget.heldout).items():
            (out / name).write_text(body)
    pareto_plot(trials, susp, budget, chosen, out / "pareto.png", benchmark, title=f"{kind.capitalize()} sweep")
    return text


def load_sweep(src: str, space) -> dict:
    """The stored result of a finished sweep, checked against the space it is to be re-decided with.

    The choice is a pure function of the stored trial records, so a defender
    who changes the budget after a sweep (a perplexity limit, another CDA
    allowance) gets the new choice in seconds, without re-running a trial
    (``rechoose``; ``raypurify tune --rechoose``).

    Args:
        src: The output directory of an earlier sweep (its ``trials.json``).
        space: The search space it ran (validated; its ``utility`` is the new budget).

    Raises:
        RaypurifyError: ``src`` holds no sweep, or a sweep of another space
            (kind, swept keys, repeats, held-out slice; for sweeps that
            stored theirs, every field but the budget).
    """
    from raypurify.errors import RaypurifyError
    from raypurify.tuning import objective

    path = Path(src) / "trials.json"
    try:
        result = json.loads(path.read_text())
        trials = result["trials"]
        swept = {k for t in trials for k in t["point"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RaypurifyError(f"{path}: not the trials.json of a raypurify sweep ({type(e).__name__}: {e})") from None
    problems = []
    if result.get("kind") != space.kind:
        problems.append(f"its kind is {result.get('kind')!r}, the space's {space.kind!r}")
    if swept != set(space.space):
        problems.append(f"it swept {sorted(swept)}, the space sweeps {sorted(space.space)}")
    if result.get("repeats", 1) != space.repeats:
        problems.append(f"its trials ran {result.get('repeats', 1)} time(s) each, the space's {space.repeats}")
    # Sweeps since the re-choice existed store their space: all of it but the
    # budget must match (older ones are checked on the fields above only).
    stored = result.get("space", {})
    try:  # in today's form (a sweep stored 0.2 where a field now takes a list, [0.2])
        stored = type(space).model_validate(stored).model_dump(mode="json") if stored else {}
    except ValidationError:
        pass
    stored = {k: v for k, v in stored.items() if k != "utility"}
    given = space.model_dump(mode="json")
    problems += [f"its space's {k!r} was {v!r}, this space's is {given.get(k)!r}" for k, v in stored.items()
                 if given.get(k) != v]
    held = (result.get("budget") or {}).get("heldout")
    if held != space.utility.heldout:
        problems.append(f"its held-out slice had {held} samples, the space asks {space.utility.heldout} "
                        "(utility would not be comparable)")
    if problems:
        raise RaypurifyError(f"{src}: cannot re-choose this sweep with this space: " + "; ".join(problems))
    result["rechosen_from"] = str(Path(src).absolute())
    for t in trials:
        if "canary_asr" in t:
            t["objective"] = objective(t, space.utility)  # what Tune would have minimized under this budget
    return result


def rechoose(src: str, space, out: str, overwrite: bool = False) -> dict:
    """``raypurify tune --rechoose``: a finished sweep's choice made again under ``space``'s budget, into ``out``."""
    result = load_sweep(src, space)
    with output_dir(out, overwrite=overwrite) as tmp:
        text = decide(result, space, tmp)
    print(text)
    return result


def _point_update(base: dict, point: dict) -> dict:
    from raypurify.tuning import merge, nested

    return merge(base, nested(point))
