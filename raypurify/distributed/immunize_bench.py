"""The main method against its controls, on the bench, on Ray.

For each attack cell: the variants are trained and scored once; then every
arm (the purified model at each rho, and each control at the same rho and
budget) is suppressed, recovered in ONE Ray Train fit, and evaluated as
parallel Ray tasks. The controls, from the prototype's lessons:
  - finetune only: the recovery finetune with nothing suppressed;
  - random: the same number of channels drawn over the whole model;
  - layer-matched random: the signature's count in each layer, random inside
    (does the signature know more than which layer?);
  - last layer: every unit of the last layer (the whole last MLP, or all
    its heads) re-initialized;
  - oracle: top-rho of ||suspicious - clean twin|| per channel, where the
    bench has the twin, with Spearman and top-rho overlap against it.
    Twins cost an implant each (~150 s a cell here): the bench trains them
    only when asked (``twins=True``) and otherwise uses the cached ones.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Sequence

import ray
import torch

from raypurify.config import AttackConfig, ImmunizeConfig, build
from raypurify.distributed.bench import eval_set, evaluate_remote, init_ray, suspicious_model
from raypurify.distributed.immunize import Arm, compute_scores, recover, signature_from, suppressed_copies
from raypurify.errors import RaypurifyError
from raypurify.io import MARKER, attach_adapter, load_examples, load_model, output_dir
from raypurify.progress import log
from raypurify.signature import (channel_matrix, layer_matched_random, model_channel_keys, overlap,
                                 random_signature, select_top, spearman, whole_layer)
from raypurify.zoo import build_zoo, model_name


def oracle_scores(model_dir: str, suspicious: str, twin: str, lora: bool, scope: str = "mlp") -> list[torch.Tensor]:
    """Per-channel ||theta(suspicious) - theta(twin)||: where the real backdoor sits.

    Returns:
        One ``[channels_l]`` tensor per layer.
    """
    def load(path):
        return attach_adapter(load_model(model_dir)[0], path) if lora else load_model(path)[0]

    suspicious_model_ = load(suspicious)
    keys, _ = model_channel_keys(suspicious_model_, lora=lora, scope=scope)
    s, t = suspicious_model_.state_dict(), load(twin).state_dict()
    return [channel_matrix({k: s[k] - t[k] for k in ks.rows + ks.cols}, ks).norm(dim=1) for ks in keys]


UNRECOVERED = "not recovered"


def purified_name(scale: float | None = None, scope: str | None = None) -> str:
    """An ablation of the purified arm: its units recovered at ``scale`` times
    the rate, or only their ``scope`` part suppressed."""
    return f"purified, units x{scale:g}" if scale is not None else f"purified, {scope} suppressed"


def arms_for(sig_by_rho: dict, channels: Sequence[int], oracle, seeds: int, scale: float, scope: str,
             other_scales: Sequence[float] = (), other_scopes: Sequence[str] = ()) -> list[dict]:
    """Every arm of one cell: name, rho, seed, signature (None: nothing), rate multiplier and suppressed scope.

    Every arm but the oracle runs ``seeds`` times: the seed draws the
    random controls' units, and for every arm the re-draw and the recovery's
    data order, so each spread is the whole pipeline's after scoring. Every
    suppressing arm suppresses ``scope`` and recovers its units at
    ``scale`` (the config's), controls included; ``other_scales`` and
    ``other_scopes`` add purified arms that differ in one of them.
    """
    arms = []
    for seed in range(seeds):
        arms += [{"arm": "finetune only", "rho": 0.0, "seed": seed, "sig": None},
                 {"arm": "last layer", "rho": round(1 / len(channels), 4), "seed": seed,
                  "sig": whole_layer(channels, -1)}]
    for rho, sig in sig_by_rho.items():
        n = sum(s.numel() for s in sig)
        for seed in range(seeds):
            arms.append({"arm": "purified", "rho": rho, "seed": seed, "sig": sig})
            arms += [{"arm": purified_name(scale=x), "rho": rho, "seed": seed, "sig": sig, "scale": x}
                     for x in other_scales if x != scale]
            arms += [{"arm": purified_name(scope=x), "rho": rho, "seed": seed, "sig": sig, "scope": x}
                     for x in other_scopes if x != scope]
            arms.append({"arm": "random", "rho": rho, "seed": seed, "sig": random_signature(channels, n, seed)})
            arms.append({"arm": "layer-matched random", "rho": rho, "seed": seed,
                         "sig": layer_matched_random(sig, channels, seed)})
        if oracle is not None:
            arms.append({"arm": "oracle", "rho": rho, "seed": 0, "sig": select_top(oracle, rho)})
    return [{"scale": scale, "scope": scope, **a} for a in arms]


def run_cell(zoo: Path, base: str, attack_cfg: AttackConfig, cfg: ImmunizeConfig, rhos: Sequence[float],
             seeds: int, work: Path, heldout: str, twins: bool = False, other_scales: Sequence[float] = (),
             other_scopes: Sequence[str] = (), unrecovered: bool = False) -> dict:
    """One attack cell: variants once, every arm recovered and evaluated.

    Args:
        heldout: The evaluation file (all of the zoo's held-out set or a
            seeded subset, the same for every arm).
        twins: Train the clean twin if the bench has none cached.
        other_scales: Extra purified arms, recovered with the units at these
            rate multipliers.
        other_scopes: Extra purified arms, suppressing only this part of
            each unit (e.g. ``q`` of a ``qk`` signature).
        unrecovered: Also evaluate the purified arm and the random controls
            before their recovery (arms "<arm>, not recovered"): which
            units the clean task needs, before the recovery relearns it.
    """
    lora = attack_cfg.mode == "lora"
    t0 = time.time()
    susp = suspicious_model(zoo, base, attack_cfg)
    cached = (susp.parent / f"{susp.name}.twin" / "attack.json").is_file()
    twin = suspicious_model(zoo, base, attack_cfg, twin=True) if twins or cached else None
    model_dir, adapter = (str(zoo / base), str(susp)) if lora else (str(susp), None)
    pool = load_examples(zoo / "clean_pool.json")
    timings: dict[str, float] = {"implant": round(time.time() - t0, 1)}
    terms = compute_scores(model_dir, adapter, cfg, pool, work, timings)
    scores, _ = signature_from(terms, cfg)
    sig_by_rho = {rho: signature_from(terms, cfg.model_copy(update={"rho": rho}))[1] for rho in rhos}
    agreement = {"signature_layers": {str(r): [int(x.numel()) for x in s] for r, s in sig_by_rho.items()},
                 "signature_units": {str(r): [x.tolist() for x in s] for r, s in sig_by_rho.items()}}
    oracle = None
    if twin is not None:
        oracle = oracle_scores(str(zoo / base), str(susp), str(twin), lora, cfg.scope)
        agreement.update({
            "spearman": round(spearman(torch.cat(scores), torch.cat(oracle)), 4),
            "overlap": {str(r): round(overlap(s, select_top(oracle, r)), 4) for r, s in sig_by_rho.items()},
            "oracle_layers": {str(r): [int(x.numel()) for x in select_top(oracle, r)] for r in rhos}})
    arms = arms_for(sig_by_rho, terms["channels"], oracle, seeds, cfg.recovery.fresh_lr_scale, cfg.suppressed_scope,
                    other_scales, other_scopes)
    t0 = time.time()
    # Every suppressing arm, controls included, suppresses the same way.
    runs = [Arm(f"arm{i}", work / "arms" / f"arm{i}", a["sig"], a["scope"], a["scale"], cfg.seed + a["seed"],
                project=cfg.suppression == "project") for i, a in enumerate(arms)]
    suppressed_copies(model_dir, adapter, runs, terms["pairs"])
    timings["suppress"] = round(time.time() - t0, 1)
    t0 = time.time()
    recovered = recover(runs, model_dir, adapter, pool, cfg, work)
    timings["recover"] = round(time.time() - t0, 1)
    t0 = time.time()
    a_, b_ = attack_cfg.attack, attack_cfg.behavior
    evaluated = [(a, str(recovered / f"arm{i}")) for i, a in enumerate(arms)]
    if unrecovered:  # the same suppressed copies before their recovery
        evaluated += [({**a, "arm": f"{a['arm']}, {UNRECOVERED}"}, str(runs[i].start)) for i, a in enumerate(arms)
                      if a["arm"] in ("purified", "layer-matched random", "random")]
    # (model, adapter) pairs: arms are adapters of model_dir in lora mode; then the suspicious and clean models.
    where = [(model_dir, p) if lora else (p, None) for _, p in evaluated]
    where += [(model_dir, adapter), (model_dir, None)] if lora else [(model_dir, None), (str(zoo / base), None)]
    log(f"immunize bench: evaluating {len(where)} models as Ray tasks")
    results = ray.get([evaluate_remote.remote(m, ad, heldout, a_, b_) for m, ad in where])
    timings["evaluate"] = round(time.time() - t0, 1)
    rows = [{"arm": a["arm"], "rho": a["rho"], "seed": a["seed"],
             "n_suppressed": 0 if a["sig"] is None else int(sum(s.numel() for s in a["sig"])), **r}
            for (a, _), r in zip(evaluated, results)]
    rows.append({"arm": "suspicious", "rho": 0.0, "seed": 0, "n_suppressed": 0, **results[-2]})
    rows.append({"arm": "clean model", "rho": 0.0, "seed": 0, "n_suppressed": 0, **results[-1]})
    return {"attack": a_, "behavior": b_, "mode": attack_cfg.mode, "rows": rows, "agreement": agreement,
            "timings_s": timings, "config": cfg.model_dump(), "variant_runs": terms["train_records"],
            "inverted_target": terms["inverted_target"]}


# The target for one purification: ASR at most 5 % with CDA within 2
# points of the suspicious model's.
TARGET_ASR, TARGET_CDA_DROP = 0.05, 0.02


def summarize(cell: dict) -> list[dict]:
    """Mean and spread over seeds per (arm, rho), and how many seeds' runs meet the target."""
    groups: dict[tuple, list[dict]] = {}
    for r in cell["rows"]:
        groups.setdefault((r["arm"], r["rho"]), []).append(r)
    floor = next(r["cda"] for r in cell["rows"] if r["arm"] == "suspicious") - TARGET_CDA_DROP - 1e-9
    out = []
    for (arm, rho), rs in groups.items():
        asr, cda = [r["asr"] for r in rs], [r["cda"] for r in rs]
        out.append({"arm": arm, "rho": rho, "n": len(rs), "asr": statistics.mean(asr),
                    "meets": sum(r["asr"] <= TARGET_ASR and r["cda"] >= floor for r in rs),
                    "asr_sd": statistics.stdev(asr) if len(asr) > 1 else 0.0, "cda": statistics.mean(cda),
                    "cda_sd": statistics.stdev(cda) if len(cda) > 1 else 0.0,
                    "clean_asr": statistics.mean(r["clean_asr"] for r in rs),
                    "n_suppressed": rs[0]["n_suppressed"], "n_triggered": rs[0]["n_triggered"]})
    return out


ARM_ORDER = ["clean model", "suspicious", "finetune only", "last layer", "purified", "layer-matched random", "random", "oracle"]


def _order(arm: str) -> float:
    """Table position of an arm; an ablation ("<arm>, ...") follows its arm."""
    base = arm.split(", ")[0]
    return ARM_ORDER.index(base) + (0.5 if base != arm else 0)


def cell_table(cell: dict) -> str:
    """Markdown: one row per arm and rho, ASR and CDA mean ± sd over seeds."""
    rows = sorted(summarize(cell), key=lambda r: (r["rho"] if r["arm"] not in ("clean model", "suspicious", "finetune only", "last layer") else -1,
                                                  _order(r["arm"])))
    ag = cell["agreement"]
    head = f"**{cell['attack']} / {cell['behavior']} ({cell['mode']})**"
    if "spearman" in ag:
        head += (f" — Spearman(signature, oracle) {ag['spearman']:.3f}; top-rho overlap with the oracle: "
                 + ", ".join(f"rho {r}: {v:.2f}" for r, v in ag["overlap"].items()))
    else:
        head += " — no clean twin cached (oracle not computed; `--twins` trains one)"
    lines = [head, "", "| arm | rho | channels | ASR | CDA | false act. | seeds | runs meeting the target |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sd = (lambda k: f" ± {r[k + '_sd']:.3f}" if r["n"] > 1 else "")  # noqa: E731
        lines.append(f"| {r['arm']} | {r['rho']:g} | {r['n_suppressed']} | {r['asr']:.3f}{sd('asr')} | "
                     f"{r['cda']:.3f}{sd('cda')} | "
                     f"{r['clean_asr']:.3f} | {r['n']} | {r['meets']}/{r['n']} |")
    return "\n".join(lines) + "\n"


def summary_table(cells: Sequence[dict]) -> str:
    """Markdown: per cell and rho, purified against each control (ASR, CDA), with means per threat model."""
    cols = ["suspicious", "finetune only", "last layer", "purified", "layer-matched random", "random"]
    for arm in sorted({r["arm"] for c in cells for r in c["rows"] if ", " in r["arm"]}, reverse=True):
        cols.insert(cols.index(arm.split(", ")[0]) + 1, arm)  # an ablation after its arm
    head = "| cell | rho | " + " | ".join(cols) + " |\n" + "|---" * (len(cols) + 2) + "|\n"
    lines, per_rho = [], {}
    for cell in cells:
        arms = {}
        for r in summarize(cell):
            arms.setdefault(r["arm"], {})[r["rho"]] = r
        for rho in sorted(arms["purified"]):
            row = [arms[c].get(rho) or next(iter(arms[c].values())) for c in cols]
            per_rho.setdefault((cell["mode"], rho), []).append(row)
            fmt = [f"{r['asr']:.3f}" + (f" ± {r['asr_sd']:.3f}" if r["n"] > 1 else "") + f" / {r['cda']:.3f}"
                   for r in row]
            lines.append(f"| {cell['attack']} {cell['mode']} | {rho:g} | " + " | ".join(fmt) + " |")
    for (mode, rho), rows in sorted(per_rho.items()):
        means = [(sum(r[i]["asr"] for r in rows) / len(rows), sum(r[i]["cda"] for r in rows) / len(rows))
                 for i in range(len(cols))]
        lines.append(f"| **mean, {len(rows)} {mode} cells** | {rho:g} | " + " | ".join(f"{a:.3f} / {c:.3f}" for a, c in means) + " |")
    return "ASR / CDA per arm (mean over seeds; ± sd of ASR over seeds).\n\n" + head + "\n".join(lines) + "\n"


def run_immunize_bench(zoo: str, out: str, cells: Sequence[tuple[str, str, str]], rhos: Sequence[float],
                       cfg: ImmunizeConfig, seeds: int = 3, arch: str = "llama", size: str = "bench",
                       address: str | None = None, overwrite: bool = False,
                       attack_overrides: dict | None = None, max_eval: int | None = None,
                       twins: bool = False, other_scales: Sequence[float] = (),
                       other_scopes: Sequence[str] = (), unrecovered: bool = False) -> list[dict]:
    """Runs every cell and writes ``immunize.json`` and ``immunize.md`` to ``out``.

    ``attack_overrides`` (AttackConfig fields) changes every cell's implant,
    e.g. a stronger budget for pico models. ``max_eval`` evaluates every arm
    on the same seeded subset of the held-out set; ``twins`` trains missing
    clean twins for the oracle; ``other_scales`` adds purified arms whose
    units recover at other rate multipliers than the config's,
    ``other_scopes`` purified arms that suppress another part of each unit;
    ``unrecovered`` also evaluates the purified and random arms before
    their recovery.
    """
    attack_cfgs = [build(AttackConfig, {"attack": a, "behavior": b, "mode": m, **(attack_overrides or {})},
                         source=f"cell {a}/{b}/{m}") for a, b, m in cells]
    if seeds < 1:
        raise RaypurifyError(f"seeds must be at least 1; got {seeds}")
    bad = [r for r in rhos if not 0 < r < 1]
    if bad:
        raise RaypurifyError(f"every rho must be in (0, 1); got {bad}")
    bad = [x for x in other_scales if not 1 <= x <= 100]
    if bad:
        raise RaypurifyError(f"every recovery rate multiplier must be in [1, 100]; got {bad}")
    for scope in other_scopes:  # the config's own check, before anything runs
        build(ImmunizeConfig, {**cfg.model_dump(), "suppress_scope": scope}, source=f"suppressed scope {scope!r}")
    results = []
    started = time.time()
    with output_dir(out, overwrite=overwrite) as tmp:
        build_zoo(zoo, archs=[arch], sizes=[size])
        init_ray(address)
        z, base = Path(zoo).absolute(), model_name(arch, size)
        heldout = eval_set(z / "heldout.json", max_eval, tmp)
        for i, ac in enumerate(attack_cfgs):
            log(f"immunize bench: cell {i + 1}/{len(attack_cfgs)}: {ac.attack}/{ac.behavior} ({ac.mode})")
            work = Path(tempfile.mkdtemp(prefix="rp-ibench-"))
            try:
                results.append(run_cell(z, base, ac, cfg, rhos, seeds, work, heldout, twins, other_scales,
                                        other_scopes, unrecovered))
            finally:
                shutil.rmtree(work, ignore_errors=True)
            (tmp / "immunize.json").write_text(json.dumps(results, indent=1))
        recovery = f"suppressed units x{cfg.recovery.fresh_lr_scale:g} the rate" + (
            f", distilled from the suspicious model at {cfg.recovery.distill:g}" if cfg.recovery.distill else "")
        suppression = "projected off their variant deltas" if cfg.suppression == "project" else "re-drawn"
        implant = f"; implants with {attack_overrides}" if attack_overrides else ""
        text = (f"Bench model {base}{implant}; units: {cfg.scope} (suppressed: {cfg.suppressed_scope}); K={cfg.k}, scoring {cfg.scoring} (lambda {cfg.lam}), variants "
                f"{cfg.variants.preset}, recovery {cfg.recovery.n_samples} samples x {cfg.recovery.epochs} epochs "
                f"({recovery}, every arm); units {suppression} (every suppressing arm); "
                f"every arm but the oracle over {seeds} seeds of re-draw and recovery order (random controls: "
                f"and of their units; mean ± sd); evaluated on "
                f"{'all of heldout.json' if max_eval is None else f'a seeded {max_eval}-sample subset of heldout.json'}; "
                f"wall time {time.time() - started:.0f}s.\n\n")
        text += tables(results)
        (tmp / "immunize.md").write_text(text)
    print(text)
    return results


def tables(cells: Sequence[dict]) -> str:
    """The tables of ``immunize.md``: the summary, then every cell's arms."""
    return (summary_table(cells) + f"\nA run meets the target at ASR <= {TARGET_ASR:g} with CDA at most "
            f"{TARGET_CDA_DROP * 100:g} points under the suspicious model's.\n\n" + "\n".join(cell_table(c) for c in cells))


def retable(src: str) -> str:
    """Rewrites the tables of a finished run's ``immunize.md`` from its ``immunize.json`` (no arm re-run).

    The first paragraph (settings and wall time) is kept. For table formats
    added after a run; the figures are the stored ones.
    """
    d = Path(src)
    if not (d / MARKER).is_file() or not (d / "immunize.json").is_file() or not (d / "immunize.md").is_file():
        raise RaypurifyError(f"{src}: not an immunize bench run written by raypurify (immunize.json, immunize.md)")
    try:
        cells = json.loads((d / "immunize.json").read_text())
        text = (d / "immunize.md").read_text().split("\n\n", 1)[0] + "\n\n" + tables(cells)
    except (ValueError, KeyError, TypeError, StopIteration) as e:
        raise RaypurifyError(f"{src}/immunize.json is not an immunize bench record ({type(e).__name__}: {e})") from None
    tmp = d / ".immunize.md.partial"
    tmp.write_text(text)
    tmp.replace(d / "immunize.md")
    return text
