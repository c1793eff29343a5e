"""The end-to-end demo on an embedded local Ray (the README's main command).

1. builds the zoo (first run about 12 minutes on 2 cores; then cached);
2. implants the BadNets sentiment backdoor into the bench Llama (and its
   clean twin, the oracle reference);
3. purifies it with the immunization signature as measured on the bench
   (configs/immunize-bench-q.yaml: K = 6 first-order variant pairs on Ray
   Train + DeepSpeed, query/key channels scored on a Ray Data actor pool,
   their query rows re-drawn) at three intervention ratios, each recovered
   with the re-drawn units 30x faster over 3 seeds (also shown recovered
   100x faster);
4. evaluates, on the same triggered and clean held-out prompts, the clean,
   suspicious and purified models beside every control at the same budget
   (finetune only, random and layer-matched random channels, last-layer
   re-initialization, each over 3 seeds; the oracle signature).

This is the first cell of `jobs/immunize_bench.py` with the same settings,
so its table is the README's BadNets row.

    python jobs/demo.py [--zoo DIR] [--out DIR] [--smoke-test] [--address ADDR]
"""

import argparse
import sys
from pathlib import Path

from raypurify.config import ImmunizeConfig, build, load_yaml
from raypurify.errors import RaypurifyError

# The bench's config, sweep, evaluation subset and ablation (README, "Results on the bench").
CONFIG = "immunize-bench-q.yaml"
RHOS, MAX_EVAL, OTHER_SCALES = [0.016, 0.024, 0.032], 300, [100.0]

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default="zoo", help="zoo directory (cache)")
    p.add_argument("--out", default="runs/demo", help="report directory (replaced if raypurify wrote it)")
    p.add_argument("--smoke-test", action="store_true", help="pico models: the whole path in a few minutes")
    p.add_argument("--address", help="Ray cluster address (default: embedded local Ray)")
    a = p.parse_args()
    from raypurify.distributed.immunize_bench import run_immunize_bench
    from raypurify.zoo import build_zoo

    try:
        build_zoo(a.zoo)
        cfg = build(ImmunizeConfig, load_yaml(Path(__file__).parent.parent / "configs" / CONFIG),
                    source=f"configs/{CONFIG}")
        rhos, max_eval = RHOS, MAX_EVAL
        size, seeds = "bench", 3
        if a.smoke_test:
            size, seeds = "pico", 1
            cfg = ImmunizeConfig.model_validate({
                "k": 2, "rho": 0.25, "variants": {"preset": "custom", "n_clean": 64, "poison_rate": 0.2,
                                                  "steps": 10, "lr": 3e-3, "batch_size": 16},
                "scope": cfg.scope, "suppress_scope": cfg.suppress_scope,
                "recovery": {**cfg.recovery.model_dump(), "n_samples": 32, "epochs": 1, "batch_size": 16}})
            rhos, max_eval = [cfg.rho], None
        run_immunize_bench(a.zoo, a.out, [("badnets", "sentiment", "full")], rhos, cfg, seeds=seeds,
                           size=size, address=a.address, overwrite=True, max_eval=max_eval, twins=True,
                           other_scales=OTHER_SCALES)
    except RaypurifyError as e:
        print(f"raypurify: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"report: {Path(a.out).absolute() / 'immunize.md'}")
