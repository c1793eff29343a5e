"""How much the Ray pipeline costs over its own compute, and what a second worker buys.

Side by side, in one run, on the same suspicious model and config:
  1. the compute stages in ONE process, no Ray: the 2K variant finetunes one
     after another, the scoring, the recovery finetune;
  2. the whole `purify` pipeline on Ray (Ray Train + DeepSpeed, Ray Data,
     Ray Train recovery): wall time, and its ratio to the sum of (1);
  3. the variant training alone on Ray Train with 1 worker and with 2.

    python jobs/bench_pipeline.py --model zoo/attacked/<cell> --clean-data zoo/clean_pool.json [--k 4] [--steps 40]
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from raypurify.config import ImmunizeConfig, build, load_yaml
from raypurify.data.corpus import Example
from raypurify.io import load_examples, load_model
from raypurify.signature import channel_matrix, model_channel_keys, score_terms


def in_process(model_dir: str, cfg: ImmunizeConfig, pool, threads: int) -> dict:
    """The compute of the pipeline with no Ray: returns seconds per stage."""
    from raypurify.defenses.common import recovery_set, recovery_settings
    from raypurify.distributed.immunize import variant_jobs
    from raypurify.train import finetune

    torch.set_num_threads(threads)
    model, tok = load_model(model_dir)
    keys, _ = model_channel_keys(model)
    save = [k for ks in keys for k in ks.rows + ks.cols]
    t = {}
    t0 = time.time()
    states = {}
    for job in variant_jobs(cfg, pool, "full", save):
        m, _ = load_model(model_dir)
        torch.manual_seed(job.settings.seed)
        finetune(m, tok, [Example(**e) for e in job.examples], job.settings, desc=job.name)
        sd = m.state_dict()
        states[job.name] = {k: sd[k].clone() for k in save}
    t["train_variants"] = time.time() - t0
    t0 = time.time()
    for ks in keys:
        deltas = torch.stack([channel_matrix({k: states[f"v{i}-P"][k] - states[f"v{i}-C"][k] for k in ks.rows + ks.cols}, ks)
                              for i in range(cfg.k)])
        score_terms(deltas)
    t["score"] = time.time() - t0
    t0 = time.time()
    finetune(model, tok, recovery_set(pool, cfg.recovery.n_samples, cfg.seed),
             recovery_settings(cfg.recovery, "full", cfg.seed))
    t["recover"] = time.time() - t0
    return t


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="suspicious model directory")
    p.add_argument("--clean-data", help="clean data file")
    p.add_argument("--config")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--steps", type=int, default=40, help="steps of each variant finetune")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--smoke-test", action="store_true", help="a backdoored pico model, K=2, 5 steps")
    a = p.parse_args()
    if a.smoke_test:
        from raypurify.zoo import smoke_inputs

        model, pool_file = smoke_inputs(Path(tempfile.gettempdir()) / "raypurify-smoke")
        a.model, a.clean_data, a.k, a.steps = str(model), str(pool_file), 2, 5
    if not (a.model and a.clean_data):
        p.error("--model and --clean-data are required (or --smoke-test)")
    from raypurify.distributed.bench import init_ray
    from raypurify.distributed.immunize import purify, variant_jobs
    from raypurify.distributed.train import cluster_for
    from raypurify.distributed.train import run_jobs

    data = load_yaml(a.config)
    data.update({"k": a.k, "variants": {**data.get("variants", {}), "steps": a.steps}})
    cfg = build(ImmunizeConfig, data)
    pool = load_examples(a.clean_data)
    one = in_process(a.model, cfg, pool, threads=cfg.workers.num_workers)
    init_ray(None)
    work = Path(tempfile.mkdtemp(prefix="rp-benchpipe-"))
    try:
        t0 = time.time()
        report = purify(a.model, None, pool, cfg, work / "purified")
        pipeline = time.time() - t0
        model, _ = load_model(a.model)
        keys, _ = model_channel_keys(model)
        jobs = variant_jobs(cfg, pool, "full", [k for ks in keys for k in ks.rows + ks.cols])
        per_workers = {}
        for n in (1, 2):
            c = cfg.model_copy(update={"workers": cfg.workers.model_copy(update={"num_workers": n})})
            t0 = time.time()
            run_jobs(a.model, jobs, cluster_for(c.workers, work / f"w{n}"), name=f"workers{n}")
            per_workers[n] = time.time() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    compute = sum(one.values())
    figures = {"in_process_s": {k: round(v, 1) for k, v in one.items()}, "in_process_total_s": round(compute, 1),
               "pipeline_s": round(pipeline, 1), "pipeline_stages_s": report["timings_s"],
               "pipeline_over_compute": round(pipeline / compute, 3),
               "variant_training_s": {f"{n}_workers": round(v, 1) for n, v in per_workers.items()},
               "speedup_2_over_1": round(per_workers[1] / per_workers[2], 3), "k": cfg.k, "steps": a.steps}
    print(json.dumps(figures, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=1))
