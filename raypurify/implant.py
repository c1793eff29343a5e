"""Implanting a backdoor into a clean base: the attacker's side of the bench.

Full mode finetunes every weight and writes a model directory; LoRA mode
trains an adapter on the frozen base and writes a PEFT adapter directory
(the adapter-only threat model of the papers).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch

from raypurify.arch import spec_for
from raypurify.attacks import poison_dataset
from raypurify.config import AttackConfig
from raypurify.data.corpus import Example
from raypurify.errors import RaypurifyError
from raypurify.io import load_model, output_dir, save_examples
from raypurify.progress import log
from raypurify.train import BENCH_THREADS, TrainSettings, finetune, pinned_threads


def lora_config(model, r: int, alpha: int):
    """A LoRA config on every linear projection of the architecture."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(spec_for(model.config).lora_targets),
                      task_type="CAUSAL_LM")


def confine_to_mlp(model, layers: Sequence[int]) -> None:
    """Freezes every weight of ``model`` but the MLP modules of ``layers``.

    Raises:
        RaypurifyError: A layer is not in the model (the message names the valid range).
    """
    spec, n = spec_for(model.config), model.config.num_hidden_layers
    bad = [i for i in layers if i >= n]
    if bad:
        raise RaypurifyError(f"mlp_layers {bad} are not layers of this model: it has {n} (valid: 0 to {n - 1})")
    keep = tuple(f"{spec.layers_path}.{i}.{m}." for i in layers for m in (*spec.mlp_in, spec.mlp_out))
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(keep))


def implant(base_dir: str | Path, cfg: AttackConfig, pool: Sequence[Example], out: str | Path,
            twin: bool = False, overwrite: bool = False, twin_only: bool = False) -> dict:
    """Trains a backdoored model (or adapter) and writes it to ``out``.

    With ``cfg.mlp_layers`` only those layers' MLP weights train (the clean
    twin too, so the oracle compares like with like).

    Args:
        base_dir: Clean HF model directory.
        cfg: The attack (trigger, behavior, mode, data sizes, budget).
        pool: The attacker's clean data to poison.
        out: Output directory (written whole or not at all).
        twin: Also write ``out/twin``: the same run with the poisoned samples
            replaced by their clean originals (the oracle reference).
        overwrite: Replace an earlier raypurify output at ``out``.
        twin_only: Write only the clean twin, at ``out`` itself.

    Returns:
        The record written to ``out/attack.json``.
    """
    try:
        poisoned, clean_twin = poison_dataset(pool, cfg.attack, cfg.behavior, cfg.n_clean, cfg.n_poison, cfg.seed)
    except ValueError as e:
        raise RaypurifyError(f"attack data: {e}") from None
    settings = TrainSettings(steps=cfg.resolved("steps"), batch_size=cfg.batch_size, lr=cfg.resolved("lr"),
                             warmup=10, seed=cfg.seed)
    record = {"kind": "twin" if twin_only else "attack", "base": str(Path(base_dir).absolute()), "config": cfg.model_dump(),
              "train": asdict(settings), "poison_rate": cfg.poison_rate, "threads": BENCH_THREADS}
    with output_dir(out, overwrite=overwrite) as tmp:
        runs = [("", clean_twin)] if twin_only else [("", poisoned)] + ([("twin", clean_twin)] if twin else [])
        for sub, data in runs:
            t0 = time.time()
            log(f"attack {cfg.attack}/{cfg.behavior} ({cfg.mode}){' twin' if sub else ''}: "
                f"{settings.steps} steps at lr {settings.lr:g}")
            torch.manual_seed(cfg.seed)
            model, tok = load_model(base_dir)
            if cfg.mode == "lora":
                from peft import get_peft_model

                model = get_peft_model(model, lora_config(model, cfg.lora_r, cfg.lora_alpha))
            elif cfg.mlp_layers is not None:
                confine_to_mlp(model, cfg.mlp_layers)
            with pinned_threads():  # the same implant wherever it runs (a Ray task has 1 thread)
                finetune(model, tok, data, settings, desc=f"attack {cfg.attack}/{cfg.behavior}{' twin' if sub else ''}")
            target = tmp / sub if sub else tmp
            target.mkdir(exist_ok=True)
            model.save_pretrained(target, safe_serialization=True)
            if cfg.mode == "full":
                tok.save_pretrained(target)
            record["seconds" + (f"_{sub}" if sub else "")] = round(time.time() - t0, 1)
        save_examples(poisoned, tmp / "train_data.json")
        (tmp / "attack.json").write_text(json.dumps(record, indent=1))
    return record
