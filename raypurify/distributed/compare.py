"""Every defense on the same bench, under the same budget, on Ray.

For each cell (attack x behavior x threat model) the suspicious model comes
from the bench's cache (implanted as parallel Ray tasks when missing). Each
in-process defense then runs with its evaluation as one Ray task of one CPU,
so a 2-core machine runs two at a time and a cluster as many as it has
cores; defenses that drive Ray themselves (Ray Train, Ray Data) run from the
driver, their evaluations as tasks. A failing cell is reported as failed
with its error; the others complete.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import ray

from raypurify.config import AttackConfig, CompareConfig, build
from raypurify.distributed.bench import eval_set, evaluate_dir, evaluate_remote, init_ray, suspicious_model
from raypurify.io import load_examples, output_dir
from raypurify.progress import log
from raypurify.zoo import build_zoo, model_name


def _attack_cfg(cfg: CompareConfig, attack: str, behavior: str, mode: str) -> AttackConfig:
    return build(AttackConfig, {"attack": attack, "behavior": behavior, "mode": mode, **cfg.attack},
                 source=f"cell {attack}/{behavior}/{mode}")


@ray.remote(num_cpus=1)
def _implant(zoo: str, base: str, ac: AttackConfig) -> str:
    import torch

    torch.set_num_threads(1)
    return str(suspicious_model(Path(zoo), base, ac))


def _defend_and_evaluate(name: str, settings: dict, model: str, adapter: str | None, pool: str, heldout: str,
                         attack: str, behavior: str, dest: str, keep: bool) -> dict:
    """One defense on one cell, then its evaluation (runs as a Ray task, or on the driver)."""
    import torch

    from raypurify.defenses import run_defense

    torch.set_num_threads(1)
    report = run_defense(name, model, adapter, load_examples(pool), dest, settings)
    try:
        r = evaluate_dir(model, dest, heldout, attack, behavior) if adapter else \
            evaluate_dir(dest, None, heldout, attack, behavior)
    finally:
        if not keep:
            shutil.rmtree(dest, ignore_errors=True)
    small = {k: v for k, v in report.items() if k not in ("variant_runs", "config", "model", "adapter")}
    return {**r, "report": small}


_defend_remote = ray.remote(num_cpus=1)(_defend_and_evaluate)


def run_compare(cfg: CompareConfig, out: str | Path, address: str | None = None, overwrite: bool = False) -> dict:
    """Runs the comparison and writes the report directory.

    ``out`` receives ``results.json`` (every row), ``report.md`` (the ASR
    table in the layout of the immunization paper's Table 5.1, utility,
    prompt counts, failures), ``asr_vs_cda.png``, ``asr_by_attack.png`` and
    ``report.html`` (self-contained).

    Returns:
        ``{"meta": ..., "rows": [...]}`` as written to ``results.json``.
    """
    from raypurify.defenses import defenses
    from raypurify.report import order_rows, write_report

    registry = defenses()
    cells = cfg.cells()
    started = time.time()
    with output_dir(out, overwrite=overwrite) as tmp:
        build_zoo(cfg.zoo, archs=[cfg.arch], sizes=[cfg.size])
        init_ray(address)
        zoo, base = Path(cfg.zoo).absolute(), model_name(cfg.arch, cfg.size)
        work = Path(tempfile.mkdtemp(prefix="rp-compare-")) if not cfg.keep_models else tmp / "models"
        pool, heldout = str(zoo / "clean_pool.json"), eval_set(zoo / "heldout.json", cfg.max_eval, tmp)
        rows: list[dict] = []

        def cell_of(a, b, m):
            return {"attack": a, "behavior": b, "mode": m}

        log(f"compare: {len(cells)} cells x {len(cfg.defenses)} defenses; implanting missing suspicious models")
        futures = {_implant.remote(str(zoo), base, _attack_cfg(cfg, *c)): c for c in cells}
        suspicious: dict[tuple, str] = {}
        for f, c in futures.items():
            try:
                suspicious[c] = ray.get(f)
            except Exception as e:  # noqa: BLE001 - a failed cell is reported, the rest go on
                rows.append({**cell_of(*c), "defense": "none", "error": f"implant failed: {e}"})
        pending: dict = {}
        driver_jobs = []
        for c, path in suspicious.items():
            a, b, m = c
            model, adapter = (str(zoo / base), path) if m == "lora" else (path, None)
            pending[evaluate_remote.remote(model, adapter, heldout, a, b)] = {**cell_of(*c), "defense": "none"}
            pending[evaluate_remote.remote(str(zoo / base), None, heldout, a, b)] = {**cell_of(*c), "defense": "clean model"}
            for name in cfg.defenses:
                if m not in registry[name].modes:
                    continue
                dest = str(work / f"{a}-{b}-{m}" / name)
                args = (name, cfg.settings.get(name, {}), model, adapter, pool, heldout, a, b, dest, cfg.keep_models)
                if registry[name].uses_ray:
                    driver_jobs.append((args, {**cell_of(*c), "defense": name}))
                else:
                    pending[_defend_remote.remote(*args)] = {**cell_of(*c), "defense": name}
        total = len(pending) + len(driver_jobs)
        # Driver-side defenses start while the tasks queue: Ray Train waits for
        # CPUs the tasks free, and the tasks never wait on the driver.
        for args, key in driver_jobs:
            log(f"compare: {key['defense']} on {key['attack']}/{key['behavior']} ({key['mode']}) from the driver")
            t0 = time.time()
            try:
                rows.append({**key, **_defend_and_evaluate(*args), "seconds": round(time.time() - t0, 1)})
            except Exception as e:  # noqa: BLE001
                rows.append({**key, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=3)})
            log(f"compare: {len(rows)}/{total} done ({time.time() - started:.0f}s)")
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            key = pending.pop(done[0])
            try:
                rows.append({**key, **ray.get(done[0])})
            except Exception as e:  # noqa: BLE001
                rows.append({**key, "error": f"{type(e).__name__}: {str(e).splitlines()[-1] if str(e) else ''}"})
            log(f"compare: {len(rows)}/{total} done ({time.time() - started:.0f}s)")
        if not cfg.keep_models:
            shutil.rmtree(work, ignore_errors=True)
        meta = {"bench_model": base, "config": cfg.model_dump(), "cells": [list(c) for c in cells],
                "attack_seed": _attack_cfg(cfg, *cells[0]).seed, "eval_seed": 1234,
                "n_clean_pool": len(load_examples(pool)), "heldout": str(zoo / "heldout.json") if cfg.max_eval is None else
                f"heldout-subset.json ({cfg.max_eval} of {zoo / 'heldout.json'})", "wall_s": round(time.time() - started, 1)}
        result = {"meta": meta, "rows": order_rows(rows, cells, cfg.defenses)}
        (tmp / "results.json").write_text(json.dumps(result, indent=1))
        write_report(tmp, result)
    log(f"compare: wrote {out} in {time.time() - started:.0f}s")
    return result
