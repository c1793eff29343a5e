"""Every defense behind one interface: one registry, one config shape, one output.

A defense gets a suspicious model directory (or, in the adapter-only threat
model, the base directory plus the suspicious adapter), the defender's clean
data and its own pydantic settings, and writes a standard HF model directory
(full) or a PEFT adapter directory (lora) into an empty output directory.
``run_defense`` wraps every one of them the same way: settings validated and
the threat model checked before anything loads, the output written whole or
not at all, and a ``report.json`` beside the weights.

Adding a defense is one module (a settings class and a ``defend(job, cfg)``
function) plus one line in ``DEFENSES`` below; ``raypurify purify
--defense``, ``raypurify compare`` and the table-driven tests pick it up.
"""

from __future__ import annotations

import importlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from raypurify.config import Strict, build
from raypurify.data.corpus import Example
from raypurify.errors import RaypurifyError
from raypurify.registry import Registry


@dataclass(frozen=True)
class DefenseJob:
    """What a defense works on.

    Attributes:
        model: The suspicious model directory (full), or the clean base the
            suspicious adapter was trained on (lora).
        adapter: The suspicious PEFT adapter directory; ``None`` in the
            full-model threat model.
        clean: The defender's clean instruction data.
        out: Empty directory the defense writes the model or adapter into.
        work: Scratch directory, removed afterwards.
    """

    model: str
    adapter: str | None
    clean: Sequence[Example]
    out: Path
    work: Path

    @property
    def mode(self) -> str:
        return "lora" if self.adapter else "full"


@dataclass(frozen=True)
class Defense:
    """One registered defense.

    Attributes:
        describe: One line for ``raypurify list defenses``.
        modes: Threat models it supports (``full``, ``lora``).
        config: Its pydantic settings class (a ``Strict`` model with defaults).
        entry: ``module:function`` of its ``defend(job, cfg) -> dict``,
            imported on use so that this registry imports neither torch nor
            Ray (the Ray-driven defenses live in ``raypurify.distributed``).
        uses_ray: It drives Ray itself (Ray Train / Ray Data), so it runs from
            the driver, never inside a Ray task (a task holding a CPU while
            its trainer waits for two would deadlock a 2-CPU machine).
    """

    describe: str
    modes: tuple[str, ...]
    config: type[Strict]
    entry: str
    uses_ray: bool = False

    def load(self):
        module, fn = self.entry.split(":")
        return getattr(importlib.import_module(module), fn)


def _registry() -> Registry[Defense]:
    # Imported here, not at the top: the settings classes live beside their
    # defenses, which import this module for DefenseJob.
    from raypurify.config import ImmunizeConfig
    from raypurify.conflict import ConflictConfig
    from raypurify.defenses import baselines, crow, ulrl

    return Registry("defense", {
        "immunize": Defense("immunization signature purification (the main method): K variant pairs, "
                            "top-rho channels re-initialized (full) or zeroed (LoRA), recovery finetune",
                            ("full", "lora"), ImmunizeConfig, "raypurify.distributed.immunize:defend", uses_ray=True),
        "conflict": Defense("information conflict: a LoRA trained on clean data merged into the model "
                            "(mergekit; peft weighted adapters for LoRA)",
                            ("full", "lora"), ConflictConfig, "raypurify.distributed.conflict:defend", uses_ray=True),
        "finetune": Defense("recovery finetune alone on the same clean samples and rate",
                            ("full", "lora"), baselines.FinetuneConfig, "raypurify.defenses.baselines:finetune_defense"),
        "prune": Defense("magnitude pruning: lowest-norm MLP channels zeroed, same structure and ratio as the signature",
                         ("full", "lora"), baselines.PruneConfig, "raypurify.defenses.baselines:prune_defense"),
        "fineprune": Defense("fine-pruning: lowest Wanda-score channels (full) or random channels (LoRA) zeroed, "
                             "then the recovery finetune",
                             ("full", "lora"), baselines.FinePruneConfig, "raypurify.defenses.baselines:fineprune_defense"),
        "int4": Defense("weight-only INT4 round-to-nearest with group scaling (optimum-quanto), evaluated quantized",
                        ("full",), baselines.Int4Config, "raypurify.defenses.baselines:int4_defense"),
        "crow": Defense("CROW: finetune with the internal-consistency loss on FGSM-perturbed embeddings",
                        ("full", "lora"), crow.CrowConfig, "raypurify.defenses.crow:defend"),
        "ulrl": Defense("ULRL ported to LLM MLP channels: unlearn, flag by modified z-score, re-initialize, relearn",
                        ("full",), ulrl.UlrlConfig, "raypurify.defenses.ulrl:defend"),
    })


_REGISTRY: Registry[Defense] | None = None


def defenses() -> Registry[Defense]:
    """The defense registry (built on first use: its settings import torch)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = _registry()
    return _REGISTRY


def settings_for(name: str, mode: str, data: dict[str, Any] | None = None, source: str | None = None) -> Strict:
    """Checks a defense name, its threat model and its settings, all before any work.

    Raises:
        RaypurifyError: Unknown name, unsupported threat model or bad settings
            (every problem listed).
    """
    d = defenses()[name]
    if mode not in d.modes:
        raise RaypurifyError(f"defense {name!r} does not support the {mode} threat model; "
                             f"it supports: {', '.join(d.modes)}")
    return build(d.config, data or {}, source=source or f"{name} settings")


def check_budget(name: str, cfg: Strict, clean: Sequence[Example]) -> None:
    """Rejects clean data smaller than what the settings ask for."""
    need = cfg.min_clean() if hasattr(cfg, "min_clean") else 1
    if len(clean) < need:
        raise RaypurifyError(f"the clean data has {len(clean)} samples; defense {name!r} needs at least {need} "
                             "with these settings (its variant subsets or recovery samples)")


def run_defense(name: str, model: str, adapter: str | None, clean: Sequence[Example], out: str | Path,
                settings: Strict | dict[str, Any] | None = None, overwrite: bool = False) -> dict:
    """Runs one registered defense and writes its output directory.

    ``out`` receives the model (full) or adapter (lora) files and
    ``report.json``: defense, threat model, settings, inputs, timings and what
    the defense itself reports (channels touched, losses, ...).

    Returns:
        The report.
    """
    from raypurify.io import output_dir
    from raypurify.progress import log

    mode = "lora" if adapter else "full"
    cfg = settings if isinstance(settings, Strict) else settings_for(name, mode, settings)
    check_budget(name, cfg, clean)
    fn = defenses()[name].load()
    work = Path(tempfile.mkdtemp(prefix=f"rp-{name}-"))
    t0 = time.time()
    try:
        with output_dir(out, overwrite=overwrite) as tmp:
            log(f"defense {name} ({mode}): starting")
            extras = fn(DefenseJob(model, adapter, clean, tmp, work), cfg)
            report = {"kind": "defense", "defense": name, "threat_model": mode,
                      "model": str(Path(model).absolute()),
                      "adapter": str(Path(adapter).absolute()) if adapter else None,
                      "config": cfg.model_dump(), "n_clean_available": len(clean), **extras,
                      "seconds": round(time.time() - t0, 2)}
            (tmp / "report.json").write_text(json.dumps(report, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"defense {name} ({mode}): wrote {out} in {report['seconds']:.0f}s")
    return report
