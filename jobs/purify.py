"""Immunization-signature purification as a Ray job.

Same flags as `raypurify purify` (see `raypurify purify --help`):

    ray start --head --include-dashboard=true --dashboard-host=127.0.0.1
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/purify.py --model /abs/suspicious --clean-data /abs/zoo/clean_pool.json \\
        --out /abs/purified --config configs/immunize.yaml

Inside a job `ray.init()` joins the job's cluster. `--smoke-test` builds the
pico zoo and a backdoored pico model under --out's parent and purifies it
with a tiny budget (about two minutes on 2 cores).
"""

import sys
from pathlib import Path

from raypurify.cli import job_main
from raypurify.zoo import smoke_inputs

SMOKE_CONFIG = """k: 2
rho: 0.25
variants: {preset: custom, n_clean: 64, poison_rate: 0.2, steps: 10, lr: 3.0e-3, batch_size: 16}
recovery: {n_samples: 32, epochs: 1, batch_size: 16}
"""


def smoke(out: Path) -> list[str]:
    work = out.parent / f"{out.name}-smoke-inputs"
    model, pool = smoke_inputs(work)
    (work / "smoke.yaml").write_text(SMOKE_CONFIG)
    return ["--model", str(model), "--clean-data", str(pool), "--config", str(work / "smoke.yaml")]


if __name__ == "__main__":
    sys.exit(job_main("purify", smoke))
