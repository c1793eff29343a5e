"""Where does a bench backdoor live? (Ray-free bench diagnostic.)

Swaps the clean twin's weights into the suspicious model one part at a time
(embeddings, each layer's attention, each layer's MLP), then, in the
attention layer that matters most, per projection (and q and k together) and
per head (twin's head, or the head re-drawn from the init distribution as a
purification would), and measures ASR on the first
``--n`` triggered held-out prompts. Writes locate.md and locate.json.

    python jobs/locate.py --zoo zoo --cell badnets/sentiment --out reports/locate

Trains the clean twin first if the zoo has none for the cell (~150 s here).

`--canary I` locates a canary of a blind sweep instead (README, "Blind
tuning"): canary I of `--space` is implanted into the cell's suspicious
model with the sweep's recipe (the same defender split, data and budget; in
this process, not on Ray Train), and the SUSPICIOUS model's weights are
swapped into the canary model one part at a time, measuring the canary's
ASR. Does a canary live where the real backdoor does?

    python jobs/locate.py --zoo zoo --cell ctba/sentiment --canary 0 --out reports/locate-canary0-ctba
"""

import argparse
import json
import sys
import time
from pathlib import Path

from raypurify.errors import RaypurifyError


def canary_recipe(space, pool: list, index: int):
    """Canary ``index`` of a blind sweep and its implant: the sweep's own split, data and settings.

    Returns:
        ``(spec, training examples, TrainSettings)``.
    """
    from raypurify.distributed.tune import _examples, _split, canary_jobs
    from raypurify.variants import make_variants

    # As tune.prepare_*sweep do: the same split; canaries avoid the variants' triggers (conflict sweeps have none).
    part = space.immunize_part() if space.kind == "combined" else space
    _, rest = _split(pool, space, part.base().seed)
    avoid = make_variants(max(part.values("k")), seed=part.base().seed) if space.kind != "conflict" else ()
    specs, jobs = canary_jobs(space, rest, "full", avoid=avoid)
    return specs[index], _examples(jobs[index].examples), jobs[index].settings


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default="zoo")
    p.add_argument("--cell", default="badnets/sentiment", help="attack/behavior (full-model cell)")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=160, help="triggered prompts per measurement")
    p.add_argument("--size", default="bench")
    p.add_argument("--canary", type=int, help="locate this canary of --space instead of the attack")
    p.add_argument("--space", default="tune_spaces/immunize-bench-q-repeats.yaml",
                   help="the blind sweep whose canary --canary implants")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--smoke-test", action="store_true", help="the pico model, 20 prompts")
    a = p.parse_args()
    if a.smoke_test:
        a.size, a.n = "pico", 20
    try:
        from raypurify.attacks import BEHAVIORS
        from raypurify.canaries import triggered
        from raypurify.config import AttackConfig, build, load_space
        from raypurify.distributed.bench import suspicious_model
        from raypurify.evaluate import generate, template_prompts, triggered_set
        from raypurify.io import load_examples, load_model, output_dir
        from raypurify.locate import head_edits, measure_edits, parts, swap
        from raypurify.progress import log
        from raypurify.train import finetune, pinned_threads
        from raypurify.zoo import PICO_ATTACK, build_zoo, model_name

        attack, behavior = a.cell.split("/")
        cfg = build(AttackConfig, {"attack": attack, "behavior": behavior, "mode": "full",
                                   **(PICO_ATTACK if a.size == "pico" else {})}, source=f"cell {a.cell}")
        if a.n < 10:
            raise RaypurifyError(f"--n must be at least 10, got {a.n}")
        space = load_space(a.space) if a.canary is not None else None
        if space is not None and not 0 <= a.canary < space.canaries.n:
            raise RaypurifyError(f"--canary must be in 0..{space.canaries.n - 1} (the space has "
                                 f"{space.canaries.n} canaries), got {a.canary}")
        started = time.time()
        with output_dir(a.out, overwrite=a.overwrite) as tmp:
            build_zoo(a.zoo, archs=["llama"], sizes=[a.size])
            zoo, base = Path(a.zoo).absolute(), model_name("llama", a.size)
            susp = suspicious_model(zoo, base, cfg)
            model, tok = load_model(susp)
            heldout = load_examples(zoo / "heldout.json")
            if a.canary is None:
                twin = load_model(suspicious_model(zoo, base, cfg, twin=True))[0].state_dict()
                _, trig = triggered_set(heldout, attack, behavior)
                prompts, rule, what = template_prompts(trig[:a.n]), BEHAVIORS[behavior].fires, a.cell
            else:
                # The reference is the suspicious model itself: what the canary implant added.
                twin = {k: v.clone() for k, v in model.state_dict().items()}
                spec, examples, settings = canary_recipe(space, load_examples(zoo / "clean_pool.json"),
                                                         a.canary)
                log(f"locate: implanting canary {a.canary} ({spec.kind}, trigger {spec.trigger!r}, "
                    f"{settings.steps} steps)")
                with pinned_threads():
                    finetune(model, tok, examples, settings, desc=f"canary {a.canary}")
                prompts, rule = template_prompts(triggered(spec, heldout)[:a.n]), spec.fires
                what = f"canary {a.canary} ({spec.kind}, trigger {spec.trigger!r}) of {a.space} on {a.cell}"

            def asr():
                return sum(map(rule, generate(model, tok, prompts, desc="triggered"))) / len(prompts)

            groups = parts(model)
            log(f"locate: {len(groups)} parts swapped one at a time, {len(prompts)} triggered prompts each")
            edits = {"nothing": lambda state: None,
                     **{f"{name} <- twin": swap(twin, keys) for name, keys in groups.items()},
                     "every part above <- twin": swap(twin, [k for keys in groups.values() for k in keys])}
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
            if a.canary is not None:  # the reference a canary is located against is the suspicious model
                rows = [{**r, "part": r["part"].replace("<- twin", "<- suspicious")} for r in rows]
            result = {"cell": a.cell, "located": what, "model": str(susp), "n_triggered": len(prompts), "rows": rows,
                      "head_layer": layer, "wall_s": round(time.time() - started, 1)}
            (tmp / "locate.json").write_text(json.dumps(result, indent=1))
            ref = "the clean twin's" if a.canary is None else "the suspicious model's"
            into = "the suspicious model" if a.canary is None else "the canary model"
            text = (f"{what} on {base}: ASR on {len(prompts)} triggered prompts after putting {ref} "
                    f"weights of one part into {into} (wall time {result['wall_s']:.0f}s).\n\n"
                    "| part | ASR |\n|---|---|\n" + "".join(f"| {r['part']} | {r['asr']:.3f} |\n" for r in rows))
            (tmp / "locate.md").write_text(text)
        print(text)
    except RaypurifyError as e:
        print(f"raypurify: error: {e}", file=sys.stderr)
        sys.exit(2)
