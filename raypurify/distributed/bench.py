"""The backdoor bench on Ray: implant every attack cell, evaluate, tabulate.

Each cell (attack x behavior x mode) is one Ray task of one CPU, so a 2-core
machine runs two at a time and a cluster runs as many as it has cores.
Backdoored models are cached under ``<zoo>/attacked/<key>`` by a hash of the
attack settings, so a rerun (or another job needing the same suspicious
model) only evaluates.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Sequence

import ray

from raypurify.config import AttackConfig, build
from raypurify.errors import RaypurifyError
from raypurify.io import load_examples, output_dir
from raypurify.progress import log
from raypurify.zoo import build_zoo, model_name


def attacked_dir(zoo: Path, base: str, cfg: AttackConfig) -> Path:
    """Cache location of a backdoored zoo model, keyed by its settings."""
    manifest = json.loads((zoo / "zoo.json").read_text())
    attack = cfg.model_dump()
    if attack["mlp_layers"] is None:  # keys of models cached before the field existed stay valid
        del attack["mlp_layers"]
    key_src = json.dumps({"base": manifest["models"][base]["key"], "attack": attack}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:12]
    return zoo / "attacked" / f"{base}-{cfg.attack}-{cfg.behavior}-{cfg.mode}-{key}"


def suspicious_model(zoo: Path, base: str, cfg: AttackConfig, twin: bool = False) -> Path:
    """Returns the cached backdoored model (or its clean twin), training it first if needed."""
    from raypurify.implant import implant
    from raypurify.io import load_examples

    out = attacked_dir(zoo, base, cfg)
    if twin:
        out = out.with_name(out.name + ".twin")
    if not (out / "attack.json").is_file():
        implant(zoo / base, cfg, load_examples(zoo / "train.json"), out, overwrite=True, twin_only=twin)
    return out


METRICS = ("asr", "clean_asr", "cda", "ppl", "n_triggered", "n_clean")


def evaluate_dir(model: str, adapter: str | None, heldout: str, attack: str, behavior: str) -> dict:
    """Loads a model (and adapter) directory and evaluates it: one CPU thread."""
    import torch

    from raypurify.evaluate import evaluate
    from raypurify.io import load_examples, load_model

    torch.set_num_threads(1)
    m, tok = load_model(model, adapter)
    r = evaluate(m, tok, load_examples(heldout), attack, behavior)
    return {k: r[k] for k in METRICS}


evaluate_remote = ray.remote(num_cpus=1)(evaluate_dir)


@ray.remote(num_cpus=1)
def _cell(zoo: str, base_name: str, cfg: AttackConfig) -> dict:
    t0 = time.time()
    z = Path(zoo)
    path = suspicious_model(z, base_name, cfg)
    model, adapter = (z / base_name, path) if cfg.mode == "lora" else (path, None)
    r = evaluate_dir(str(model), adapter and str(adapter), str(z / "heldout.json"), cfg.attack, cfg.behavior)
    return {"attack": cfg.attack, "behavior": cfg.behavior, "mode": cfg.mode, "model": str(path),
            "seed": cfg.seed, "poison_rate": cfg.poison_rate, "seconds": round(time.time() - t0, 1), **r}


@ray.remote(num_cpus=1)
def _clean_cell(zoo: str, base_name: str, pairs: Sequence[tuple[str, str]]) -> list[dict]:
    model, heldout = str(Path(zoo) / base_name), str(Path(zoo) / "heldout.json")
    return [{"attack": a, "behavior": b, "mode": "clean", **evaluate_dir(model, None, heldout, a, b)} for a, b in pairs]


def eval_set(heldout: Path, limit: int | None, report: Path) -> str:
    """The held-out file every defense is evaluated on: all of it, or a seeded subset kept in the report."""
    if limit is None:
        return str(heldout)
    import random

    from raypurify.io import save_examples

    data = load_examples(heldout)
    random.Random(1234).shuffle(data)
    save_examples(data[:limit], report / "heldout-subset.json")
    return str(report / "heldout-subset.json")


def init_ray(address: str | None) -> None:
    """Connects to a cluster, or starts the embedded local Ray."""
    if ray.is_initialized():
        return
    ray.init(address=address, log_to_driver=True) if address else ray.init(log_to_driver=True)


def run_bench(zoo: str, out: str, attacks: Sequence[str], behaviors: Sequence[str], modes: Sequence[str],
              arch: str = "llama", size: str = "bench", address: str | None = None, overwrite: bool = False,
              lora_cells: Sequence[str] | None = None, seed: int = 0, overrides: dict | None = None) -> list[dict]:
    """Runs the bench and writes ``bench.json`` and ``bench.md`` to ``out``.

    Args:
        zoo: Zoo directory (built first if missing).
        out: Report directory.
        attacks, behaviors, modes: The grid of cells.
        arch: Architecture of the bench model.
        size: Zoo size of the bench model (``pico`` for a quick check).
        address: Ray cluster address; ``None`` starts a local Ray.
        overwrite: Replace an earlier report at ``out``.
        lora_cells: ``attack/behavior`` names run in LoRA mode (None: all).
        seed: Attack seed of every cell.
        overrides: AttackConfig fields applied to every cell (budget, lr).

    Returns:
        One result row per cell, the clean model's rows first.
    """
    cfgs = []
    for mode in modes:
        for attack in attacks:
            for behavior in behaviors:
                if mode == "lora" and lora_cells is not None and f"{attack}/{behavior}" not in lora_cells:
                    continue
                cfgs.append(build(AttackConfig, {"attack": attack, "behavior": behavior, "mode": mode, "seed": seed,
                                                  **(overrides or {})},
                                  source=f"bench cell {attack}/{behavior}/{mode}"))
    if not cfgs:
        raise RaypurifyError("the bench grid is empty: check --attacks, --behaviors, --modes and --lora-cells")
    with output_dir(out, overwrite=overwrite) as tmp:
        build_zoo(zoo, archs=[arch], sizes=[size])
        init_ray(address)
        zoo_abs, base = str(Path(zoo).absolute()), model_name(arch, size)
        pairs = sorted({(c.attack, c.behavior) for c in cfgs})
        pending = {_clean_cell.remote(zoo_abs, base, pairs): "clean model"}
        pending.update({_cell.remote(zoo_abs, base, c): f"{c.attack}/{c.behavior}/{c.mode}" for c in cfgs})
        rows: list[dict] = []
        t0 = time.time()
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(done[0])
            result = ray.get(done[0])
            rows.extend(result if isinstance(result, list) else [result])
            log(f"bench: {name} done ({len(cfgs) + 1 - len(pending)}/{len(cfgs) + 1}, {time.time() - t0:.0f}s)")
        (tmp / "bench.json").write_text(json.dumps(rows, indent=1))
        (tmp / "bench.md").write_text(bench_table(rows, base))
    print(bench_table(rows, base))
    return rows


def bench_table(rows: Sequence[dict], base: str) -> str:
    """The README's bench table: one line per cell beside the clean model."""
    clean = {(r["attack"], r["behavior"]): r for r in rows if r["mode"] == "clean"}
    cells = [r for r in rows if r["mode"] != "clean"]
    n_trig = sorted({r["n_triggered"] for r in cells})
    lines = [f"Bench model: {base}; triggered prompts per cell: {', '.join(map(str, n_trig))}; "
             f"clean prompts: {cells[0]['n_clean'] if cells else '-'}; attack seed {cells[0]['seed'] if cells else '-'}.",
             "", "| mode | attack | behavior | ASR | false activation | CDA | clean CDA | PPL | clean model ASR |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(cells, key=lambda r: (r["mode"], r["behavior"], r["attack"])):
        c = clean.get((r["attack"], r["behavior"]), {})
        lines.append(f"| {r['mode']} | {r['attack']} | {r['behavior']} | {r['asr']:.3f} | {r['clean_asr']:.3f} | "
                     f"{r['cda']:.3f} | {c.get('cda', float('nan')):.3f} | {r['ppl']:.3f} | {c.get('asr', float('nan')):.3f} |")
    return "\n".join(lines) + "\n"
