"""The information-conflict ablation on the bench (the paper's Tables 4/5 and 8).

For every cell (attack/behavior/mode) four arms on the same prompts: the
suspicious model, internal conflict alone (the conflict defense's merged
model), external evidence alone (the suspicious model, evidence in every
prompt's input section) and both. For the merge-method cells the internal
arm is repeated with each merge method. Defenses train on the driver (Ray
Train); every evaluation is a one-CPU Ray task, started as soon as its model
exists. Writes ``conflict.md`` and ``conflict.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import ray

from raypurify.config import AttackConfig, build
from raypurify.conflict import ConflictConfig
from raypurify.distributed.bench import METRICS, init_ray, suspicious_model
from raypurify.evidence import EvidenceConfig
from raypurify.io import output_dir
from raypurify.progress import log
from raypurify.zoo import build_zoo, model_name


def evaluate_arm(model: str, adapter: str | None, heldout: str, attack: str, behavior: str,
                 evidence: dict | None) -> dict:
    """Evaluates one arm, with evidence in every prompt when ``evidence`` is given: one CPU thread."""
    import torch

    from raypurify.evaluate import evaluate, template_prompts
    from raypurify.evidence import evidence_prompts
    from raypurify.io import load_examples, load_model

    torch.set_num_threads(1)
    m, tok = load_model(model, adapter)
    used: list[int] = []

    def with_evidence(examples):
        from raypurify.evaluate import generate

        out, ev = evidence_prompts([(e.instruction, e.input) for e in examples], cfg,
                                   lambda ps, n: generate(m, tok, ps, max_new_tokens=n, desc="evidence"))
        used.extend(int(e.used) for e in ev)
        return out

    cfg = EvidenceConfig.model_validate(evidence) if evidence is not None else None
    r = evaluate(m, tok, load_examples(heldout), attack, behavior,
                 prompts=with_evidence if cfg is not None else template_prompts)
    return {**{k: r[k] for k in METRICS}, "evidence_rate": sum(used) / len(used) if used else 0.0}


evaluate_arm_remote = ray.remote(num_cpus=1)(evaluate_arm)


def run_conflict_bench(zoo: str, out: str, cells: Sequence[tuple[str, str, str]], merge_cells: Sequence[tuple[str, str, str]],
                       methods: Sequence[str], cfg: ConflictConfig, evidence: EvidenceConfig, size: str = "bench",
                       arch: str = "llama", attack_overrides: dict | None = None, address: str | None = None,
                       overwrite: bool = False) -> list[dict]:
    """Runs the ablation and the merge-method comparison; writes the report to ``out``.

    Args:
        zoo: Zoo directory (bench models and their cached attacks).
        out: Report directory.
        cells: ``(attack, behavior, mode)`` cells of the ablation.
        merge_cells: Cells where every method of ``methods`` is compared.
        methods: Merge methods (``MERGES`` names).
        cfg: Conflict defense settings (``merge.method`` is replaced per method).
        evidence: The external evidence of the "external" and "both" arms.
        size, arch: The bench model.
        attack_overrides: AttackConfig fields for every cell (pico smoke runs).
        address: Ray cluster address (None: local Ray).
        overwrite: Replace an earlier report.

    Returns:
        One row per arm.
    """
    from raypurify.defenses import run_defense
    from raypurify.evidence import check
    from raypurify.io import load_examples

    from raypurify.conflict import MERGES
    from raypurify.errors import RaypurifyError

    check(evidence)
    for m in methods:
        MERGES[m]  # an unknown name fails now, with the choices, not after training
    if any(mode != "full" for _, _, mode in merge_cells):
        raise RaypurifyError("merge methods are compared on full models; merge cells must be attack/behavior/full")
    z = Path(zoo).absolute()
    rows: list[dict] = []
    with output_dir(out, overwrite=overwrite) as tmp:
        build_zoo(z, archs=[arch], sizes=[size])
        init_ray(address)
        base = model_name(arch, size)
        heldout, clean = str(z / "heldout.json"), load_examples(z / "clean_pool.json")
        pending: dict = {}
        t0 = time.time()

        def submit(row: dict, model: str, adapter: str | None, ev: EvidenceConfig | None) -> None:
            ref = evaluate_arm_remote.remote(model, adapter, heldout, row["attack"], row["behavior"],
                                             ev.model_dump() if ev else None)
            pending[ref] = row

        # Each (cell, method) defended once: an ablation cell's linear arm doubles as its merge-table row.
        jobs = list(dict.fromkeys([(c, "linear") for c in cells] + [(c, m) for c in merge_cells for m in methods]))
        done_suspicious: set = set()
        for (attack, behavior, mode), method in jobs:
            acfg = build(AttackConfig, {"attack": attack, "behavior": behavior, "mode": mode,
                                        **(attack_overrides or {})}, source=f"attack {attack}/{behavior}/{mode}")
            sus = suspicious_model(z, base, acfg)
            model, adapter = (str(z / base), str(sus)) if mode == "lora" else (str(sus), None)
            cell = {"attack": attack, "behavior": behavior, "mode": mode}
            if (attack, behavior, mode) not in done_suspicious:
                done_suspicious.add((attack, behavior, mode))
                submit({**cell, "arm": "suspicious", "method": "-"}, model, adapter, None)
                submit({**cell, "arm": "external", "method": "-"}, model, adapter, evidence)
            settings = cfg.model_copy(update={"merge": cfg.merge.model_copy(update={"method": method, "slices": None})})
            dest = tmp / "models" / f"{attack}-{behavior}-{mode}-{method}"
            report = run_defense("conflict", model, adapter, clean, dest, settings)
            internal = (model, str(dest)) if mode == "lora" else (str(dest), None)
            arms = [("internal", None), ("both", evidence)] if method == "linear" or mode == "lora" else [("internal", None)]
            for arm, ev in arms:
                submit({**cell, "arm": arm, "method": method if mode == "full" else cfg.adapter_combination,
                        "defense_seconds": report["seconds"]}, *internal, ev)
            log(f"conflict bench: {attack}/{behavior}/{mode} {method} trained ({time.time() - t0:.0f}s)")
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            row = pending.pop(ready[0])
            rows.append({**row, **ray.get(ready[0])})
            log(f"conflict bench: evaluated {row['attack']}/{row['behavior']}/{row['mode']} {row['arm']} "
                f"{row['method']} ({len(pending)} left, {time.time() - t0:.0f}s)")
        meta = {"base": base, "conflict": cfg.model_dump(), "evidence": evidence.model_dump(),
                "seconds": round(time.time() - t0, 1)}
        (tmp / "conflict.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (tmp / "conflict.md").write_text(conflict_tables(rows, meta))
        import shutil

        shutil.rmtree(tmp / "models", ignore_errors=True)  # the merged models are large; the report is what stays
    print(conflict_tables(rows, meta))
    return rows


ARMS = ("suspicious", "internal", "external", "both")


def conflict_tables(rows: Sequence[dict], meta: dict) -> str:
    """The ablation table (ASR and CDA per arm) and the merge-method table."""
    ev = meta["evidence"]
    n_trig = sorted({r["n_triggered"] for r in rows})
    lines = [f"Bench model {meta['base']}; conflict LoRA r={meta['conflict']['lora_r']} on "
             f"{meta['conflict']['n_samples']} clean samples x {meta['conflict']['epochs']} epochs at lr "
             f"{meta['conflict']['lr']:g}, linear merge t={meta['conflict']['merge']['t']} (adapters: "
             f"{meta['conflict']['adapter_combination']}); external evidence: {ev['provider']} ({ev['mode']}); "
             f"triggered prompts per cell: {', '.join(map(str, n_trig))}; clean prompts: "
             f"{rows[0]['n_clean'] if rows else '-'}; wall time {meta['seconds']:.0f}s.", "",
             "| mode | attack | behavior | metric | suspicious | internal | external | both |",
             "|---|---|---|---|---|---|---|---|"]
    key = lambda r: (r["mode"], r["attack"], r["behavior"])  # noqa: E731
    for cell in sorted({key(r) for r in rows}):
        arm = {}
        for r in rows:
            if key(r) == cell and (r["arm"] in ("suspicious", "external") or r["method"] in ("linear", "-")
                                   or cell[0] == "lora"):
                arm.setdefault(r["arm"], r)
        for metric in ("asr", "cda"):
            vals = " | ".join(f"{arm[a][metric]:.3f}" if a in arm else "-" for a in ARMS)
            lines.append(f"| {cell[0]} | {cell[1]} | {cell[2]} | {metric.upper()} | {vals} |")
    methods = [r for r in rows if r["arm"] == "internal" and r["mode"] == "full"]
    multi = {key(r) for r in methods if r["method"] != "linear"}
    if multi:
        lines += ["", "Merge methods (internal conflict alone):", "",
                  "| attack | behavior | method | ASR | CDA | false activation |", "|---|---|---|---|---|---|"]
        for r in sorted((r for r in methods if key(r) in multi), key=lambda r: (key(r), r["method"])):
            lines.append(f"| {r['attack']} | {r['behavior']} | {r['method']} | {r['asr']:.3f} | {r['cda']:.3f} | "
                         f"{r['clean_asr']:.3f} |")
    return "\n".join(lines) + "\n"
