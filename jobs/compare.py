"""Every defense on the bench, one report (Ray job).

Same flags as `raypurify compare` (see `raypurify compare --help`):

    python jobs/compare.py --config configs/compare.yaml --out reports/compare
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/compare.py --config configs/compare.yaml --zoo /abs/zoo --out /abs/report

`--smoke-test` runs the pico bench: one attack, both threat models, every
defense at a tiny budget (a few minutes on 2 cores).
"""

import sys
from pathlib import Path

from raypurify.cli import job_main

SMOKE_CONFIG = """size: pico
attacks: [badnets]
behaviors: [sentiment]
modes: [full, lora]
lora_cells: [badnets/sentiment]
max_eval: 200
attack: {n_clean: 300, n_poison: 100, steps: 120, lr: 3.0e-3}
defenses: [finetune, prune, fineprune, int4, crow, ulrl, immunize]
settings:
  finetune: {recovery: {n_samples: 32, epochs: 1, batch_size: 16}}
  fineprune: {rho: 0.1, n_calib: 16, recovery: {n_samples: 32, epochs: 1, batch_size: 16}}
  crow: {recovery: {n_samples: 32, epochs: 1, batch_size: 16}}
  ulrl: {max_unlearn_steps: 5, recovery: {n_samples: 32, epochs: 1, batch_size: 16}}
  immunize:
    k: 2
    rho: 0.25
    variants: {preset: custom, n_clean: 64, poison_rate: 0.2, steps: 10, lr: 3.0e-3, batch_size: 16}
    recovery: {n_samples: 32, epochs: 1, batch_size: 16}
"""


def smoke(out: Path) -> list[str]:
    cfg = out.parent / f"{out.name}-smoke.yaml"
    cfg.write_text(SMOKE_CONFIG)
    return ["--config", str(cfg)]


if __name__ == "__main__":
    sys.exit(job_main("compare", smoke))
