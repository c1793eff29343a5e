"""Where does a bench backdoor live? (Ray-free bench diagnostic.)

Swaps the clean twin's weights into the suspicious model one part at a time
(embeddings, each layer's attention, each layer's MLP), then, in the
attention layer that matters most, per projection (and q and k together) and
per head (twin's head, or the head re-drawn from the init distribution as a
purification would), and measures ASR on the first
``--n`` triggered held-out prompts. Writes locate.md and locate.json.

    python jobs/locate.py --zoo zoo --cell badnets/sentiment --out reports/locate

Trains the clean twin first if the zoo has none for the cell (~150 s here).
"""

import argparse
import json
import sys
import time
from pathlib import Path

from raypurify.errors import RaypurifyError

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default="zoo")
    p.add_argument("--cell", default="badnets/sentiment", help="attack/behavior (full-model cell)")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=160, help="triggered prompts per measurement")
    p.add_argument("--size", default="bench")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--smoke-test", action="store_true", help="the pico model, 20 prompts")
    a = p.parse_args()
    if a.smoke_test:
        a.size, a.n = "pico", 20
    try:
        import torch

        from raypurify.attacks import BEHAVIORS
        from raypurify.config import AttackConfig, build
        from raypurify.distributed.bench import suspicious_model
        from raypurify.evaluate import generate, template_prompts, triggered_set
        from raypurify.io import load_examples, load_model, output_dir
        from raypurify.locate import head_edits, measure_edits, parts, swap
        from raypurify.progress import log
        from raypurify.zoo import PICO_ATTACK, build_zoo, model_name

        attack, behavior = a.cell.split("/")
        cfg = build(AttackConfig, {"attack": attack, "behavior": behavior, "mode": "full",
                                   **(PICO_ATTACK if a.size == "pico" else {})}, source=f"cell {a.cell}")
        if a.n < 10:
            raise RaypurifyError(f"--n must be at least 10, got {a.n}")
        started = time.time()
        with output_dir(a.out, overwrite=a.overwrite) as tmp:
            build_zoo(a.zoo, archs=["llama"], sizes=[a.size])
            zoo, base = Path(a.zoo).absolute(), model_name("llama", a.size)
            susp, twin_dir = suspicious_model(zoo, base, cfg), suspicious_model(zoo, base, cfg, twin=True)
            model, tok = load_model(susp)
            twin = load_model(twin_dir)[0].state_dict()
            _, trig = triggered_set(load_examples(zoo / "heldout.json"), attack, behavior)
            prompts, rule = template_prompts(trig[:a.n]), BEHAVIORS[behavior].fires

            def asr():
                return sum(map(rule, generate(model, tok, prompts, desc="triggered"))) / len(prompts)

            groups = parts(model)
            log(f"locate: {len(groups)} parts swapped one at a time, {len(prompts)} triggered prompts each")
            edits = {"nothing (suspicious)": lambda state: None,
                     **{f"{name} <- twin": swap(twin, keys) for name, keys in groups.items()}}
            rows = measure_edits(model, edits, asr)
            attn = [r for r in rows if r["part"].endswith("attn <- twin")]
            layer = int(min(attn, key=lambda r: r["asr"])["part"].split()[0][1:])
            log(f"locate: heads of layer {layer} (its attention swap lowers ASR the most)")
            projections = {}
            for key in groups[f"L{layer} attn"]:  # q, k, v, o of that layer one by one
                projections[f"L{layer} {key.split('.')[-2]} <- twin"] = swap(twin, [key])
            qk = [k for k in groups[f"L{layer} attn"] if k.split(".")[-2] in ("q_proj", "k_proj")]
            if len(qk) == 2:  # separate q and k (not a fused QKV)
                projections[f"L{layer} q+k <- twin"] = swap(twin, qk)
            rows += measure_edits(model, {**projections, **head_edits(model, twin, layer)}, asr)
            result = {"cell": a.cell, "model": str(susp), "n_triggered": len(prompts), "rows": rows,
                      "head_layer": layer, "wall_s": round(time.time() - started, 1)}
            (tmp / "locate.json").write_text(json.dumps(result, indent=1))
            text = (f"{a.cell} on {base}: ASR on {len(prompts)} triggered prompts after putting the clean twin's "
                    f"weights of one part into the suspicious model (wall time {result['wall_s']:.0f}s).\n\n"
                    "| part | ASR |\n|---|---|\n" + "".join(f"| {r['part']} | {r['asr']:.3f} |\n" for r in rows))
            (tmp / "locate.md").write_text(text)
        print(text)
    except RaypurifyError as e:
        print(f"raypurify: error: {e}", file=sys.stderr)
        sys.exit(2)
