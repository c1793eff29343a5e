"""Many finetunes in one Ray Train run, each under DeepSpeed.

A prototype paid about 20 s of fixed cost (worker group start, imports,
teardown) per ``TrainerFit`` for 7 s of training. So all jobs of a stage (the
2K variant finetunes) go into ONE ``TorchTrainer.fit()``: its workers are
split into groups of ``group_size``; each group trains its share of the jobs
one after another, data-parallel inside the group under DeepSpeed (ZeRO
shards within the group). ``group_size=1`` (small models) trains
``num_workers`` jobs at once; a model too big for one device uses larger
groups.

DeepSpeed all-reduces over its data-parallel group, which by default is the
whole world; a tiny model-parallel-unit object (``_GroupMPU``) gives it the
group instead, so different groups train different models.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import ray
import ray.train
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raypurify.train import TrainSettings, make_optimizer


@dataclass(frozen=True)
class TrainJob:
    """One finetune of the suspicious model (or its adapter).

    Attributes:
        name: Output file stem (``<name>.safetensors``), unique in a run.
        examples: Training samples as ``{"instruction", "input", "output", "family"}``.
        settings: Budget, learning rate and data-order seed.
        save_keys: State-dict keys to save (``None``: all). Saving only the
            MLP tensors keeps 2K copies of a 7B model off the disk.
        start: Model directory this job starts from (default: the run's).
        start_adapter: Adapter directory this job continues (default: the run's).
        export: Write a standard HF model / PEFT adapter directory ``<name>/``
            (``save_pretrained``) instead of a raw safetensors file.
        fresh: Units to train faster (the re-drawn units of a recovery):
            ``{"scope", "lora", "units": [[index, ...] per layer], "lr_scale"}``;
            with ``"frozen": True`` the units are held instead and the rest
            of their weights trains at ``lr_scale`` (canaries kept out of a
            signature).
        dropout: Unit dropout during the finetune (``signature.dropped_units``):
            ``{"scope", "lora", "p"}``; seeded by the job's seed.
        distill: Distil from a frozen teacher while training
            (``train.distill_loss``): ``{"weight", "model", "adapter"}``, the
            teacher's model directory and adapter (or ``None``).
    """

    name: str
    examples: list[dict]
    settings: TrainSettings
    save_keys: tuple[str, ...] | None = None
    start: str | None = None
    start_adapter: str | None = None
    export: bool = False
    fresh: dict | None = None
    dropout: dict | None = None
    distill: dict | None = None


@dataclass(frozen=True)
class Cluster:
    """How a stage uses Ray Train.

    Attributes:
        num_workers: Ray Train workers (one CPU or GPU each).
        group_size: Workers per data-parallel group (divides ``num_workers``).
        zero_stage: DeepSpeed ZeRO stage (0-3).
        precision: ``fp32`` or ``bf16`` (fp16 is refused on CPU).
        use_gpu: One GPU per worker, NCCL; otherwise gloo on CPU.
        storage: Absolute path where Ray Train keeps its run state and the
            workers write their outputs. On a multi-node cluster it must be a
            filesystem every node mounts (NFS, EFS): workers write there
            directly, since Train V2 (Ray 2.60) dropped the files of non-zero
            ranks inside merged checkpoint subdirectories.
    """

    num_workers: int = 2
    group_size: int = 1
    zero_stage: int = 0
    precision: str = "fp32"
    use_gpu: bool = False
    storage: str = field(default_factory=lambda: str(Path(tempfile.gettempdir()) / "raypurify-train"))


def cluster_for(workers, storage: Path) -> Cluster:
    """The Cluster of a config's ``workers`` settings (``raypurify.config.Workers``)."""
    return Cluster(num_workers=workers.num_workers, group_size=workers.group_size, zero_stage=workers.zero_stage,
                   precision=workers.precision, use_gpu=workers.use_gpu, storage=str(Path(storage).absolute()))


class _GroupMPU:
    """The model-parallel-unit interface DeepSpeed asks for, over one group."""

    def __init__(self, data_group, self_group):
        self.data_group, self.self_group = data_group, self_group

    def get_data_parallel_group(self):
        return self.data_group

    def get_data_parallel_rank(self):
        return torch.distributed.get_rank(self.data_group)

    def get_data_parallel_world_size(self):
        return torch.distributed.get_world_size(self.data_group)

    def get_model_parallel_group(self):
        return self.self_group

    def get_model_parallel_rank(self):
        return 0

    def get_model_parallel_world_size(self):
        return 1


def _save(model, job: dict, out: Path) -> None:
    """Writes a job's result from a worker.

    ``save_pretrained`` is avoided here: under torch.distributed it writes
    only on global rank 0 and ends in a barrier, so other groups' outputs
    would be lost (or hang). The standard files are written directly.
    """
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import save_file

    def dump(state: dict, path: Path) -> None:
        save_file({k: v.detach().float().cpu().clone() for k, v in state.items()}, str(path), metadata={"format": "pt"})

    if job["export"]:
        d = out / job["name"]
        d.mkdir(parents=True, exist_ok=True)
        if isinstance(model, PeftModel):
            dump(get_peft_model_state_dict(model), d / "adapter_model.safetensors")
            model.peft_config["default"].save_pretrained(str(d))
        else:
            dump(model.state_dict(), d / "model.safetensors")
            model.config.save_pretrained(d)
        return
    state = model.state_dict()
    if isinstance(model, PeftModel):
        state = {k: v for k, v in state.items() if "lora_" in k}
    if job["save_keys"] is not None:
        state = {k: state[k] for k in job["save_keys"]}
    dump(state, out / f"{job['name']}.safetensors")


def _worker(config: dict) -> None:
    import deepspeed
    import torch.distributed as dist

    from raypurify.data.corpus import Example
    from raypurify.implant import lora_config
    from raypurify.io import attach_adapter, load_model
    from raypurify.signature import dropped_units, unit_masks
    from raypurify.train import distill_loss, finetune, fresh_groups, lm_loss

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    g = config["group_size"]
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS") or 1)))
    # Every rank must create every group (new_group is collective).
    groups = [dist.new_group(list(range(s, s + g))) for s in range(0, world, g)]
    singles = [dist.new_group([r]) for r in range(world)]
    mpu = _GroupMPU(groups[rank // g], singles[rank])
    local, n_groups = rank % g, world // g
    device = ray.train.torch.get_device()
    out = Path(config["outputs"])
    done = []
    for i, job in enumerate(config["jobs"]):
        if i % n_groups != rank // g:
            continue
        t0 = time.time()
        torch.manual_seed(job["settings"]["seed"])
        model, tok = load_model(job["start"] or config["model"])
        adapter = job["start_adapter"] or config["adapter"]
        if adapter:
            model = attach_adapter(model, adapter, trainable=True)
        elif config["lora"]:
            from peft import get_peft_model

            model = get_peft_model(model, lora_config(model, config["lora"]["r"], config["lora"]["alpha"]))
        model.to(device)
        settings = TrainSettings(**job["settings"])
        params = [p for p in model.parameters() if p.requires_grad]
        if job["fresh"]:
            f = job["fresh"]
            masks = unit_masks(model, [torch.tensor(u, dtype=torch.long) for u in f["units"]], lora=f["lora"],
                               scope=f["scope"])
            if f.get("frozen"):
                masks = {name: ~m for name, m in masks.items()}
            params = fresh_groups(model, masks, f["lr_scale"])
        ds_config = {
            "train_batch_size": settings.batch_size,
            "train_micro_batch_size_per_gpu": max(1, settings.batch_size // g),
            "gradient_accumulation_steps": 1,
            "gradient_clipping": settings.max_grad_norm or 0.0,  # 0: DeepSpeed does not clip
            "zero_optimization": {"stage": config["zero_stage"]},
            "bf16": {"enabled": config["precision"] == "bf16"},
            "steps_per_print": 10**9,
        }
        engine, *_ = deepspeed.initialize(model=model, model_parameters=params, mpu=mpu, config=ds_config,
                                          optimizer=make_optimizer(params, settings))
        examples = [Example(**e) for e in job["examples"]]
        loss_fn = lm_loss
        if job["distill"]:
            teacher, _ = load_model(job["distill"]["model"], job["distill"]["adapter"])
            teacher.to(device=device, dtype=next(engine.module.parameters()).dtype).eval().requires_grad_(False)
            loss_fn = distill_loss(teacher, job["distill"]["weight"])
        drop = job["dropout"]
        with dropped_units(engine.module, drop["p"], lora=drop["lora"], scope=drop["scope"],
                           seed=settings.seed) if drop else contextlib.nullcontext():
            losses = finetune(engine.module, tok, examples, settings, loss_fn=loss_fn, engine=engine,
                              shard=(local, g), desc=f"{job['name']} (rank {rank})")
        if config["zero_stage"] == 3:
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
                if local == 0:
                    _save(engine.module, job, out)
        elif local == 0:
            _save(engine.module, job, out)
        if local == 0:
            done.append({"name": job["name"], "rank": rank, "seconds": round(time.time() - t0, 2),
                         "final_loss": losses[-1], "engine": type(engine).__name__,
                         "unit_dropout": drop["p"] if drop else 0.0})
        del engine, model
    (out / f"jobs-rank{rank}.json").write_text(json.dumps(done))
    ray.train.report({"jobs_done": len(done)})


def run_jobs(model: str, jobs: Sequence[TrainJob], cluster: Cluster, adapter: str | None = None,
             lora: dict | None = None, name: str = "raypurify") -> tuple[Path, list[dict]]:
    """Runs all ``jobs`` in one Ray Train fit.

    Args:
        model: Base model directory (every job starts from it).
        jobs: The finetunes.
        cluster: Workers, groups, ZeRO stage, precision, storage.
        adapter: Suspicious PEFT adapter to continue training (adapter-only
            threat model); ``None`` trains the full model (or a new LoRA).
        lora: ``{"r", "alpha"}`` to train a fresh LoRA on the frozen model.
        name: Run-name prefix; a unique suffix is added, since Train V2
            silently resumes a run of the same name.

    Returns:
        ``(directory, records)``: where ``<job.name>.safetensors`` files lie,
        and one record per job (rank, seconds, final loss, unit dropout).
    """
    if cluster.num_workers % cluster.group_size:
        raise ValueError(f"group_size {cluster.group_size} must divide num_workers {cluster.num_workers}")
    config = {"model": str(Path(model).absolute()), "adapter": str(Path(adapter).absolute()) if adapter else None,
              "lora": lora, "group_size": cluster.group_size, "zero_stage": cluster.zero_stage,
              "precision": cluster.precision,
              "jobs": [{**asdict(j), "save_keys": list(j.save_keys) if j.save_keys is not None else None}
                       for j in jobs]}
    run_name = f"{name}-{uuid.uuid4().hex[:8]}"
    path = Path(cluster.storage) / run_name / "outputs"
    path.mkdir(parents=True)
    config["outputs"] = str(path)
    trainer = TorchTrainer(
        _worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cluster.num_workers, use_gpu=cluster.use_gpu),
        run_config=RunConfig(name=run_name, storage_path=cluster.storage),
    )
    trainer.fit()
    records = [r for f in sorted(path.glob("jobs-rank*.json")) for r in json.loads(f.read_text())]
    missing = {j.name for j in jobs} - {p.stem for p in path.glob("*.safetensors")} - {p.name for p in path.iterdir() if p.is_dir()}
    if missing:
        raise RuntimeError(f"Ray Train run finished without outputs for {sorted(missing)} (in {path})")
    return path, records
