"""The information-conflict defense, orchestrated on Ray (internal conflict).

Our reading of the paper (Chen et al., "Neutralizing Backdoors through
Information Conflicts for Large Language Models", sections 3.3-3.4, 5.2-5.3):

- Conflict model (eq. 7-8): a LoRA trained on a small clean set (the paper
  uses 10 % of the training data; here ``n_samples``, default 200 of the
  2,000-sample clean pool) on top of a pre-trained model theta_0, then merged
  with the suspicious model: linear by default (eq. 9, t = 0.5 for two
  models), SLERP (eq. 10), TIES (eq. 11, which needs theta_0 as its base) or
  passthrough (eq. 12, whole layers from either model).
- The paper's theta_0 is the public pre-trained model the suspicious one was
  finetuned from. On this bench the zoo base is a fully trained clean model
  of the very tasks, i.e. a clean reference model, which raypurify's threat
  model does not grant. So by default (full threat model) the conflict LoRA is
  trained on the suspicious model itself, merged into it to form the conflict
  model (theta~ + delta), and that is merged with the suspicious model. With
  ``base`` set (the paper's exact setting) the LoRA is trained on theta_0 and
  TIES uses theta_0 as its base.
- Adapter-only threat model: the defender holds the base the suspicious
  adapter was trained on, which is theta_0, so the paper applies as written:
  a conflict adapter is trained on the base and combined with the suspicious
  adapter by peft's weighted-adapter API; the output is a PEFT adapter.
- External conflict (section 3.4, evidence in the prompt) acts at inference
  and lives in ``raypurify.evidence``; the endpoint and the bench apply it.

The conflict LoRA is trained with ``run_jobs``, the Ray Train path every
finetune of raypurify uses.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from raypurify.conflict import ConflictConfig
from raypurify.data.corpus import Example
from raypurify.defenses.common import recovery_set
from raypurify.distributed.train import TrainJob, cluster_for, run_jobs
from raypurify.errors import RaypurifyError
from raypurify.io import check_model_dir
from raypurify.merge import combine_adapters, copy_model_files, merge_lora_into, merge_models, model_config
from raypurify.progress import log
from raypurify.train import TrainSettings


def conflict_job(clean: Sequence[Example], cfg: ConflictConfig, name: str = "conflict",
                 start: str | None = None) -> TrainJob:
    """The conflict LoRA's finetune as a Ray Train job (run with ``run_jobs(..., lora=lora_of(cfg))``).

    Args:
        clean: The defender's clean data.
        cfg: The settings.
        name: Output directory name in the run.
        start: Model the LoRA is trained on (default: the run's model).
    """
    # The same seeded draw as every recovery finetune's samples.
    data = [{**e.to_json(), "family": e.family} for e in recovery_set(clean, cfg.n_samples, cfg.seed)]
    settings = TrainSettings(steps=cfg.steps(), batch_size=cfg.batch_size, lr=cfg.lr, warmup=3, seed=cfg.seed)
    return TrainJob(name, data, settings, start=start, export=True)


def lora_of(cfg: ConflictConfig) -> dict:
    return {"r": cfg.lora_r, "alpha": cfg.lora_alpha}


def train_conflict_lora(model_dir: str, clean: Sequence[Example], cfg: ConflictConfig, work: Path) -> tuple[Path, dict]:
    """Trains a fresh LoRA on ``model_dir`` with clean data, on Ray Train.

    Returns:
        ``(adapter directory, training record)``.
    """
    job = conflict_job(clean, cfg)
    cluster = cluster_for(cfg.workers, work / "ray_train")
    log(f"conflict: training the conflict LoRA (r={cfg.lora_r}) on {len(job.examples)} clean samples, "
        f"{job.settings.steps} steps at lr {job.settings.lr:g}")
    out, records = run_jobs(model_dir, [job], cluster, lora=lora_of(cfg), name="conflict")
    return out / "conflict", records[0] if records else {}


def check_job(model: str, adapter: str | None, cfg: ConflictConfig) -> None:
    """Input checks that fail before any training starts."""
    check_model_dir(model)
    if cfg.base is not None:
        if adapter is not None:
            raise RaypurifyError("conflict setting `base` is for the full threat model; with an adapter the "
                                 "model it sits on is already the base")
        from raypurify.conflict import check_compatible

        check_compatible(model_config(model), model_config(cfg.base), model, cfg.base)
    if cfg.mergekit_config is not None and not Path(cfg.mergekit_config).is_file():
        raise RaypurifyError(f"mergekit config {cfg.mergekit_config!r} does not exist")


def defend(job, cfg: ConflictConfig) -> dict:
    """Runs the internal-conflict defense (the ``conflict`` entry of ``DEFENSES``).

    Args:
        job: A ``raypurify.defenses.DefenseJob``.
        cfg: The settings.

    Returns:
        Report fields: the merge that ran, the conflict LoRA's training
        record and seconds per stage.
    """
    check_job(job.model, job.adapter, cfg)
    timings: dict[str, float] = {}
    t0 = time.time()
    if job.adapter:
        lora_dir, record = train_conflict_lora(job.model, job.clean, cfg, job.work)
        timings["train_conflict"] = round(time.time() - t0, 2)
        t0 = time.time()
        merged = combine_adapters(job.model, job.adapter, str(lora_dir), job.out, cfg.adapter_combination,
                                  cfg.adapter_weights(), cfg.merge.density, seed=cfg.seed)
        timings["combine"] = round(time.time() - t0, 2)
        return {"conflict_train": record, "adapter_merge": merged, "timings_s": timings}
    start = cfg.base or job.model
    lora_dir, record = train_conflict_lora(start, job.clean, cfg, job.work)
    timings["train_conflict"] = round(time.time() - t0, 2)
    t0 = time.time()
    conflict_model = job.work / "conflict_model"
    conflict_model.mkdir()
    merge_lora_into(start, str(lora_dir), conflict_model)
    merged_dir = job.work / "merged"
    merged_dir.mkdir()
    merged = merge_models(cfg.merge, job.model, str(conflict_model), merged_dir, base=cfg.base,
                          mergekit_yaml=cfg.mergekit_config)
    copy_model_files(merged_dir, job.out)
    timings["merge"] = round(time.time() - t0, 2)
    log(f"conflict: merged ({'mergekit YAML' if cfg.mergekit_config else cfg.merge.method}) in {timings['merge']:.1f}s")
    return {"conflict_train": record, **merged, "timings_s": timings}
