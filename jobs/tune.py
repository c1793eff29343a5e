"""Blind sweep on Ray Tune, chosen with canary backdoors (Ray job).

Same flags as `raypurify tune` (see `raypurify tune --help`); the space
file's `kind` picks immunization (the default), conflict-merge coefficients
(tune_spaces/conflict.yaml) or both (tune_spaces/combined.yaml):

    ray start --head --include-dashboard=true --dashboard-host=127.0.0.1
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/tune.py --space tune_spaces/immunize.yaml --model /abs/suspicious \\
        --clean-data /abs/zoo/clean_pool.json --objective blind --out /abs/tune-out

Writes best.yaml (accepted by `raypurify purify --config`; a combined sweep
adds best-conflict.yaml and best-immunize.yaml), trials.json, trials.md,
pareto.png and the Tune storage ray_tune/ under --out.
`--smoke-test` builds the pico zoo and a BadNets pico model under --out's
parent and sweeps 4 tiny trials with the benchmark objective (a few minutes
on 2 cores).
"""

import sys
from pathlib import Path

from raypurify.cli import job_main
from raypurify.zoo import smoke_inputs

SMOKE_SPACE = """search: grid
max_concurrent: 2
fixed:
  variants: {preset: custom, n_clean: 64, poison_rate: 0.2, steps: 10, lr: 3.0e-3, batch_size: 16}
  recovery: {n_samples: 32, batch_size: 16}
space:
  rho: [0.1, 0.3]
  k: [2, 3]
  recovery.epochs: [2]
canaries:
  n: 2
  implant: {preset: custom, n_clean: 300, poison_rate: 0.25, steps: 80, lr: 3.0e-3, batch_size: 32}
utility: {heldout: 120, max_cda_drop: 0.05}
asha: {enabled: true, grace_period: 1}
"""


def smoke(out: Path) -> list[str]:
    work = out.parent / f"{out.name}-smoke-inputs"
    model, pool = smoke_inputs(work)
    (work / "smoke-space.yaml").write_text(SMOKE_SPACE)
    return ["--model", str(model), "--clean-data", str(pool), "--space", str(work / "smoke-space.yaml"),
            "--objective", "benchmark", "--attack", "badnets", "--behavior", "sentiment",
            "--heldout", str(model.parent / "zoo" / "heldout.json")]


if __name__ == "__main__":
    sys.exit(job_main("tune", smoke))
