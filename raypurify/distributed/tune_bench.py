"""The tune bench: does the blind choice find what hindsight would have?

For each attack cell (default: the 5 attacks on sentiment, full mode) the
cached suspicious bench model is swept with the benchmark objective: every
trial reports canary ASR (what a defender sees) and the true ASR (what the
bench knows). The table sets the blind choice (lowest canary ASR within the
utility budget) against the best choice in hindsight (lowest true ASR within
the same budget) and gives the Spearman correlation of canary and true ASR
across the trials. Choice and correlation logic: ``raypurify/tuning.py``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

from raypurify.config import AttackConfig, ImmunizeSpace, build
from raypurify.distributed.bench import init_ray, suspicious_model
from raypurify.distributed.tune import decide, load_sweep, tune_immunize
from raypurify.io import load_examples, output_dir
from raypurify.progress import log
from raypurify.tuning import bench_row, bench_table
from raypurify.zoo import build_zoo, model_name


def run_tune_bench(zoo: str, out: str, space: ImmunizeSpace, attacks: Sequence[str], behavior: str = "sentiment",
                   mode: str = "full", arch: str = "llama", size: str = "bench", address: str | None = None,
                   overwrite: bool = False, attack_overrides: dict | None = None) -> list[dict]:
    """Sweeps every attack cell and writes ``tune_bench.md``, ``tune_bench.json`` and one sweep directory per cell.

    Args:
        zoo: Zoo directory (built if missing; suspicious models cached in it).
        out: Report directory.
        space: The immunization search space of every cell.
        attacks: Attack names (one cell each, with ``behavior`` and ``mode``).
        attack_overrides: AttackConfig fields for every implant (pico smoke budgets).

    Returns:
        One ``bench_row`` per cell.
    """
    cfgs = [build(AttackConfig, {"attack": a, "behavior": behavior, "mode": mode, **(attack_overrides or {})},
                  source=f"cell {a}/{behavior}/{mode}") for a in attacks]
    rows = []
    started = time.time()
    with output_dir(out, overwrite=overwrite) as tmp:
        build_zoo(zoo, archs=[arch], sizes=[size])
        init_ray(address)
        z, base = Path(zoo).absolute(), model_name(arch, size)
        pool, heldout = load_examples(z / "clean_pool.json"), load_examples(z / "heldout.json")
        for i, cfg in enumerate(cfgs):
            log(f"tune bench: cell {i + 1}/{len(cfgs)}: {cfg.attack}/{cfg.behavior} ({cfg.mode})")
            susp = suspicious_model(z, base, cfg)
            model, adapter = (str(z / base), str(susp)) if mode == "lora" else (str(susp), None)
            r = tune_immunize(space, model, adapter, pool, str(tmp / f"{cfg.attack}-{cfg.behavior}-{cfg.mode}"),
                              objective="benchmark", attack=cfg.attack, behavior=cfg.behavior, heldout=heldout)
            rows.append(bench_row(r))
            (tmp / "tune_bench.json").write_text(json.dumps(rows, indent=1))
        text = (f"Bench model {base}; {mode} mode, behavior {behavior}; space: {', '.join(space.space)} "
                f"({space.search}, {', '.join(str(r['n_trials']) for r in rows)} completed trials per attack); "
                f"{space.canaries.n} canaries ({', '.join(space.canaries.kinds)}); held-out slice "
                f"{space.utility.heldout}; wall time {time.time() - started:.0f}s.\n\n")
        text += bench_table(rows, space.utility)
        (tmp / "tune_bench.md").write_text(text)
    print(text)
    return rows


def rechoose_tune_bench(srcs: Sequence[str], out: str, space: ImmunizeSpace, overwrite: bool = False) -> list[dict]:
    """The tune bench's choices made again from finished runs under ``space``'s utility budget (no trial re-run).

    Args:
        srcs: Output directories of earlier tune-bench runs of ``space``'s
            trials (their cells are gathered, in order, into one table).
        out: New report directory (same layout as ``run_tune_bench``).
        space: The search space they ran, with the budget to choose under.

    Returns:
        One ``bench_row`` per cell.
    """
    from raypurify.errors import RaypurifyError

    cells = []
    for src in srcs:
        dirs = sorted(d for d in Path(src).iterdir() if (d / "trials.json").is_file()) if Path(src).is_dir() else []
        if not dirs:
            raise RaypurifyError(f"{src}: no tune-bench cell here (a directory with <attack>-<behavior>-<mode>/trials.json)")
        try:  # the run's own cell order; by name where its table is missing or unreadable
            order = [f"{r['attack']}-{r['behavior']}-" for r in json.loads((Path(src) / "tune_bench.json").read_text())]
        except (OSError, ValueError, KeyError, TypeError):
            order = []
        dirs.sort(key=lambda d: next((i for i, o in enumerate(order) if d.name.startswith(o)), len(order)))
        cells += [(d, load_sweep(str(d), space)) for d in dirs]  # every cell checked before anything is written
    names = [d.name for d, _ in cells]
    if len(set(names)) < len(names):
        raise RaypurifyError(f"the same cell in several runs: {sorted({n for n in names if names.count(n) > 1})}; "
                             "name each cell once")
    rows = []
    with output_dir(out, overwrite=overwrite) as tmp:
        for d, result in cells:
            (tmp / d.name).mkdir()
            decide(result, space, tmp / d.name)
            rows.append(bench_row(result))
        text = (f"Re-chosen from the stored trials of {', '.join(map(str, srcs))} (no trial re-run); "
                f"{', '.join(str(r['n_trials']) for r in rows)} completed trials per attack.\n\n"
                + bench_table(rows, space.utility))
        (tmp / "tune_bench.json").write_text(json.dumps(rows, indent=1))
        (tmp / "tune_bench.md").write_text(text)
    print(text)
    return rows
