"""Every registered defense, table-driven, plus the math of each baseline.

A new in-process defense registered in ``raypurify.defenses`` joins the
end-to-end matrix below without a new test.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from raypurify.defenses import defenses, run_defense
from raypurify.errors import RaypurifyError

TINY = {"recovery": {"n_samples": 32, "epochs": 1, "batch_size": 16}}
SETTINGS = {"finetune": TINY, "fineprune": {**TINY, "rho": 0.1, "n_calib": 16}, "prune": {"rho": 0.1},
            "int4": {}, "crow": TINY, "ulrl": {**TINY, "max_unlearn_steps": 5}}
IN_PROCESS = [(n, m) for n, d in defenses().items() if not d.uses_ray for m in d.modes]


def test_every_in_process_defense_has_test_settings():
    assert {n for n, _ in IN_PROCESS} == set(SETTINGS)


@pytest.mark.parametrize("name,mode", IN_PROCESS)
def test_defense_changes_the_model_and_output_loads_in_plain_transformers(name, mode, zoo, poisoned_pico,
                                                                          poisoned_pico_lora, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raypurify.io import load_examples

    pool = load_examples(zoo / "clean_pool.json")
    if mode == "full":
        model, adapter, before = str(poisoned_pico), None, load_file(poisoned_pico / "model.safetensors")
    else:
        model, adapter = str(zoo / "llama-pico"), str(poisoned_pico_lora)
        before = load_file(poisoned_pico_lora / "adapter_model.safetensors")
    out = tmp_path / "out"
    report = run_defense(name, model, adapter, pool, out, SETTINGS[name])
    assert json.loads((out / "report.json").read_text())["defense"] == name == report["defense"]
    after = load_file(out / ("adapter_model.safetensors" if adapter else "model.safetensors"))
    assert set(after) == set(before)
    assert any(not torch.equal(before[k], after[k]) for k in before), "the defense left every weight as it was"
    if adapter:
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), out)
    else:
        loaded = AutoModelForCausalLM.from_pretrained(out)
        AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(loaded(input_ids=ids).logits).all()


def test_crow_consistency_is_zero_for_identical_layers_and_positive_otherwise():
    from raypurify.defenses.crow import consistency_loss

    h = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5)
    assert consistency_loss([h, h.clone(), 3 * h], mask).abs() < 1e-6  # scaling keeps the direction
    assert consistency_loss([h, torch.randn(2, 5, 8)], mask) > 0.1
    # Padding does not count: a different vector on a masked token changes nothing.
    g = h.clone()
    g[1, 4] = -g[1, 4]
    mask[1, 4] = 0
    assert consistency_loss([h, g], mask).abs() < 1e-6


def test_crow_fgsm_moves_each_coordinate_by_epsilon_along_the_gradient_sign():
    from raypurify.defenses.crow import fgsm

    e, g = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    moved = fgsm(e, g, 0.1)
    assert torch.allclose((moved - e).abs(), torch.full_like(e, 0.1))
    assert torch.equal(torch.sign(moved - e), torch.sign(g))


def test_ulrl_modified_z_flags_the_planted_outlier_and_nothing_else():
    from raypurify.defenses.ulrl import flag

    gen = torch.Generator().manual_seed(0)
    change = [1 + 0.05 * torch.randn(16, generator=gen) for _ in range(3)]
    change[1][7] = 5.0
    flagged = flag(change, 3.5)
    assert [f.tolist() for f in flagged] == [[], [7], []]


def test_wanda_channel_score_matches_hand_computation():
    from raypurify.defenses.baselines import wanda_channel_scores

    w = torch.tensor([[1.0, -2.0, 0.5], [-1.0, 0.0, 0.5]])  # [hidden 2, channels 3]
    act = torch.tensor([2.0, 1.0, 4.0])
    # channel c: (|w0c| + |w1c|) * ||x_c||
    assert torch.allclose(wanda_channel_scores(w, act), torch.tensor([4.0, 2.0, 4.0]))


def test_int4_error_stays_within_half_a_quantization_step(poisoned_pico, zoo, tmp_path):
    from raypurify.io import load_examples

    run_defense("int4", str(poisoned_pico), None, load_examples(zoo / "clean_pool.json")[:4], tmp_path / "q", {})
    before, after = load_file(poisoned_pico / "model.safetensors"), load_file(tmp_path / "q" / "model.safetensors")
    checked = 0
    for k, w in before.items():
        if w.dim() != 2 or "proj" not in k:
            continue
        # 16 levels over each group's range (groups never span rows): the
        # error is at most half a step of the row's range.
        step = (w.max(dim=1).values - w.min(dim=1).values) / 15
        err = (after[k] - w).abs().max(dim=1).values
        assert (err <= step / 2 * 1.01 + 1e-6).all(), k
        assert not torch.equal(after[k], w)
        checked += 1
    assert checked >= 8


def test_unknown_defense_unsupported_threat_model_and_zero_budget_fail_before_work(zoo, poisoned_pico, tmp_path):
    from raypurify.cli import main

    common = ["purify", "--model", str(zoo / "llama-pico"), "--clean-data", str(zoo / "clean_pool.json"),
              "--out", str(tmp_path / "o")]
    assert main([*common, "--defense", "sanitize"]) == 2
    assert main([*common, "--defense", "int4", "--adapter", str(tmp_path)]) == 2
    (tmp_path / "zero.yaml").write_text("recovery: {n_samples: 0}\n")
    assert main([*common, "--defense", "finetune", "--config", str(tmp_path / "zero.yaml")]) == 2
    assert not (tmp_path / "o").exists()
    with pytest.raises(RaypurifyError, match="does not support the lora threat model"):
        from raypurify.defenses import settings_for

        settings_for("ulrl", "lora")
