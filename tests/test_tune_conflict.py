"""Blind sweeps over the conflict defense's merge coefficients (and the combined space) on pico models."""

import json
import random

import pytest
import yaml

from raypurify.config import CombinedSpace, ConflictSpace, ImmunizeSpace, build, load_space
from raypurify.conflict import CombinedConfig, ConflictConfig
from raypurify.errors import RaypurifyError
from raypurify.tuning import merge, nested

# Pico budgets: a tiny conflict LoRA, canaries strong enough to fire (as in test_tune.py).
PICO_CONFLICT = {
    "kind": "conflict",
    "fixed": {"n_samples": 32, "epochs": 2, "batch_size": 16, "lr": 3e-3, "lora_r": 4, "lora_alpha": 8,
              "workers": {"num_workers": 2}},
    # linear at t = 0 is the suspicious model itself: a reference point the test can check exactly.
    "space": {"merge.method": ["linear", "ties"], "merge.t": [0.0, 0.8]},
    "canaries": {"n": 2, "implant": {"preset": "custom", "n_clean": 300, "poison_rate": 0.25, "steps": 80,
                                     "lr": 3e-3, "batch_size": 32}},
    "utility": {"heldout": 100, "max_cda_drop": 0.05},
}


@pytest.fixture(scope="module")
def sweep(zoo, poisoned_pico, local_ray, tmp_path_factory):
    """One benchmark-objective conflict sweep on the pico BadNets model, shared by the tests below."""
    from raypurify.config import SWEEPS
    from raypurify.io import load_examples

    out = tmp_path_factory.mktemp("tune-conflict") / "sweep"
    heldout = random.Random(0).sample(load_examples(zoo / "heldout.json"), 60)  # true ASR: a side figure here
    space = build(ConflictSpace, PICO_CONFLICT)
    run = SWEEPS[space.kind].load()  # the entry `raypurify tune` dispatches to
    res = run(space, str(poisoned_pico), None, load_examples(zoo / "clean_pool.json"), str(out),
              objective="benchmark", attack="badnets", behavior="sentiment", heldout=heldout)
    return res, out, space


def test_conflict_loras_are_trained_once_and_trials_only_merge(sweep):
    res, _, _ = sweep
    run = res["run"]
    # Counted from the Ray Train records: one LoRA per model (suspicious + 2
    # canaries) in one fit, after the canaries' own fit; none per trial.
    names = sorted(r["name"] for r in run["train_records"] if r["name"].startswith("conflict"))
    assert names == ["conflict-canary0", "conflict-canary1", "conflict-suspicious"]
    assert run["conflict_finetunes"] == 1 + 2 and run["canary_finetunes"] == 2 and run["train_fits"] == 2
    trials = res["trials"]
    assert len(trials) == 4 and not [t for t in trials if "error" in t]
    assert {(t["point"]["merge.method"], t["point"]["merge.t"]) for t in trials} == \
        {("linear", 0.0), ("linear", 0.8), ("ties", 0.0), ("ties", 0.8)}
    # Linear at t = 0 is the suspicious model and each canary model unchanged:
    # the trial merged each model with its own conflict model, nothing else.
    ref = next(t for t in trials if t["point"] == {"merge.method": "linear", "merge.t": 0.0})
    assert ref["cda_drop"] == 0 and ref["ppl_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert ref["true_asr"] == res["suspicious"]["true_asr"]
    for c in res["canaries"]:
        assert ref[f"canary{c['index']}_asr"] == c["asr_before"]
    # Each trial merged at its own coefficients: at t = 0.8 the two methods
    # give two models, both different from the suspicious one (TIES at t = 0
    # adds nothing, like linear).
    moved = {t["point"]["merge.method"]: t["ppl"] for t in trials if t["point"]["merge.t"] == 0.8}
    assert len({ref["ppl"], moved["linear"], moved["ties"]}) == 3
    # Two trials at a time: some spans overlap, never three at once.
    spans = [t["wall"] for t in trials]
    overlaps = lambda a, b: a[0] < b[1] - 0.05 and b[0] < a[1] - 0.05  # noqa: E731
    assert any(overlaps(a, b) for i, a in enumerate(spans) for b in spans[i + 1:])
    assert not any(overlaps(a, b) and overlaps(a, c) and overlaps(b, c)
                   for i, a in enumerate(spans) for j, b in enumerate(spans[i + 1:], i + 1) for c in spans[j + 1:])


def test_choice_is_the_blind_rule_and_outputs_are_written(sweep):
    from raypurify.tuning import rank

    res, out, space = sweep
    trials = res["trials"]
    ok = [t for t in trials if t["complete"] and t["cda_drop"] <= space.utility.max_cda_drop + 1e-9]
    chosen = res["chosen"]
    assert chosen in ok and chosen["canary_asr"] == min(t["canary_asr"] for t in ok)
    assert res["hindsight"]["true_asr"] == min(t["true_asr"] for t in ok)
    md = (out / "trials.md").read_text()
    assert f"{chosen['trial_id']} **(chosen)**" in md and "conflict LoRA(s)" in md
    # The table lists the trials in the order of the blind choice.
    rows = [line.split(" | ")[0].removeprefix("| ").split(" ")[0] for line in md.splitlines()
            if line.startswith("| ") and not line.startswith("| trial")]
    assert rows == [t["trial_id"] for t in rank(trials, space.utility)]
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "ray_tune" / "conflict").is_dir()
    assert json.loads((out / "trials.json").read_text())["chosen"]["trial_id"] == chosen["trial_id"]


def test_best_yaml_round_trips_into_purify_defense_conflict(sweep, poisoned_pico, tmp_path, capsys):
    from raypurify.cli import main

    res, out, space = sweep
    cfg = build(ConflictConfig, yaml.safe_load((out / "best.yaml").read_text()))
    assert cfg == ConflictConfig.model_validate(merge(space.fixed, nested(res["chosen"]["point"])))
    # `purify --defense conflict --config best.yaml` accepts it: with too little
    # clean data it stops at the data check, which comes after the config check.
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "hi"}] * 3))
    rc = main(["purify", "--defense", "conflict", "--model", str(poisoned_pico), "--clean-data", str(tiny),
               "--config", str(out / "best.yaml"), "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert rc == 2 and "needs at least 32" in err and "problem" not in err, err


def test_combined_best_files_split_into_the_two_purify_configs(tmp_path):
    from raypurify.distributed.tune import _best_files

    cfg = CombinedConfig.model_validate({"immunize": {"rho": 0.2, "k": 4}, "conflict": {"merge": {"t": 0.3}}})
    chosen = {"trial_id": "t1", "canary_asr": 0.1, "cda_drop": 0.004}
    files = _best_files("combined", cfg, "lowest canary ASR", chosen, 200)
    assert set(files) == {"best.yaml", "best-conflict.yaml", "best-immunize.yaml"}
    assert "--defense conflict --config best-conflict.yaml then" in files["best.yaml"]
    assert CombinedConfig.model_validate(yaml.safe_load(files["best.yaml"])) == cfg
    assert build(ConflictConfig, yaml.safe_load(files["best-conflict.yaml"])) == cfg.conflict
    from raypurify.config import ImmunizeConfig

    assert build(ImmunizeConfig, yaml.safe_load(files["best-immunize.yaml"])) == cfg.immunize


@pytest.mark.parametrize("cls,space,needles", [
    (ConflictSpace, {"space": {"merge.tt": [0.5]}}, ["merge.tt", "valid: merge.method"]),
    (ConflictSpace, {"space": {"merge.t": [0.5, 1.5]}}, ["space.merge.t=1.5"]),
    (ConflictSpace, {"space": {"merge.method": ["lineal"]}}, ["unknown merge method 'lineal'", "slerp"]),
    (ConflictSpace, {"space": {"merge.density": [0.0]}}, ["space.merge.density=0.0"]),
    (ConflictSpace, {"space": {"adapter_combination": ["sum"]}}, ["space.adapter_combination='sum'", "dare_ties"]),
    (ConflictSpace, {"space": {"merge.t": [0.5]}, "fixed": {"mergekit_config": "m.yaml"}}, ["mergekit_config"]),
    (ConflictSpace, {"space": {"merge.t": [0.5]}, "asha": {"enabled": True}}, ["asha"]),
    (ConflictSpace, {"space": {"merge.t": [0.5]}, "repeats": 2}, ["repeats: 2", "valid: 1"]),
    (ConflictSpace, {"space": {"merge.t": [0.5]}, "canaries": {"freeze_signature": True}},
     ["canaries.freeze_signature", "valid: false"]),
    (ConflictSpace, {"space": {"merge.t": [0.5]}, "canaries": {"unit_dropout": 0.1}},
     ["canaries.unit_dropout", "valid: 0"]),
    # Several problems: all of them in one message.
    (ConflictSpace, {"space": {"merge.tt": [0.5], "merge.t": [2.0], "merge.lam": [0]}, "fixed": {"lora_rr": 4}},
     ["merge.tt", "space.merge.t=2.0", "space.merge.lam=0", "fixed.lora_rr", "4 problem(s)"]),
    (CombinedSpace, {"space": {"rho": [0.1], "immunize.rho": [1.5], "conflict.merge.t": [-1]}},
     ["['rho']", "space.immunize.rho=1.5", "space.conflict.merge.t=-1", "3 problem(s)"]),
])
def test_bad_sweep_spaces_are_rejected_with_one_message(cls, space, needles):
    with pytest.raises(RaypurifyError) as e:
        build(cls, space, source="search space")
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_sweeps_peft_or_the_model_cannot_run_are_refused_before_anything_runs(zoo, tmp_path):
    from raypurify.distributed.tune import tune_combined, tune_conflict

    adapter = tmp_path / "adapter"  # only its config is read before anything runs
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 16}')
    space = build(ConflictSpace, {"fixed": {"lora_r": 4}, "space": {"adapter_combination": ["cat", "dare_ties"]}})
    with pytest.raises(RaypurifyError, match=r"\['dare_ties'\] need .* adapter's \(16\)"):
        tune_conflict(space, str(zoo / "llama-pico"), str(adapter), [], str(tmp_path / "out"))
    with pytest.raises(RaypurifyError, match="conflict.adapter_combination is swept, but it only acts on adapters"):
        tune_combined(build(CombinedSpace, {"space": {"conflict.adapter_combination": ["cat", "ties"]}}),
                      str(zoo / "llama-pico"), None, [], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text,needles", [
    ("kind: merges\nspace:\n  merge.t: [0.5]\n", ["unknown kind 'merges'", "immunize, conflict, combined"]),
    ("kind: conflict\nspace:\n  merge.t: [0.5, 3.0]\n  rho: [0.1]\n", ["space.merge.t=3.0", "['rho']"]),
])
def test_tune_cli_dispatches_on_kind_and_rejects_bad_files_before_anything_runs(tmp_path, capsys, text, needles):
    from raypurify.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    rc = main(["tune", "--space", str(bad), "--model", str(tmp_path / "none"), "--clean-data",
               str(tmp_path / "none.json"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and all(n in err for n in needles), err
    assert not (tmp_path / "out").exists()


def test_shipped_spaces_load_as_their_kind():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "tune_spaces"
    assert isinstance(load_space(root / "immunize.yaml"), ImmunizeSpace)  # no `kind:`: immunize
    conflict = load_space(root / "conflict.yaml")
    assert isinstance(conflict, ConflictSpace) and set(conflict.values("merge.method")) >= {"linear", "slerp", "ties"}
    combined = load_space(root / "combined.yaml")
    assert isinstance(combined, CombinedSpace) and combined.immunize_part().values("rho") == [0.05, 0.2]
