"""`raypurify compare` end to end on pico, and the report's faithfulness to its JSON."""

import json
import re

import pytest

from raypurify.report import asr_blocks, markdown, pct

SMALL = {"recovery": {"n_samples": 32, "epochs": 1, "batch_size": 16}}


@pytest.fixture(scope="module")
def compared(zoo, local_ray, tmp_path_factory):
    from raypurify.config import CompareConfig, build
    from raypurify.distributed.compare import run_compare
    from tests.conftest import PICO_ATTACK

    cfg = build(CompareConfig, {"zoo": str(zoo), "size": "pico", "attacks": ["badnets"], "behaviors": ["sentiment"],
                                "modes": ["full", "lora"], "lora_cells": ["badnets/sentiment"],
                                "attack": PICO_ATTACK, "max_eval": 200, "defenses": ["finetune", "prune", "int4"],
                                "settings": {"finetune": SMALL, "prune": {"rho": 0.1}}})
    out = tmp_path_factory.mktemp("compare") / "report"
    return out, run_compare(cfg, out)


def test_compare_runs_every_supported_cell_and_writes_the_report(compared):
    out, result = compared
    got = {(r["mode"], r["defense"]) for r in result["rows"] if "error" not in r}
    # int4 supports only the full-model threat model: it is not run on the adapter.
    assert got == {(m, d) for m in ("full", "lora") for d in ("none", "clean model", "finetune", "prune")} | {("full", "int4")}
    for f in ("results.json", "report.md", "report.html", "asr_vs_cda.png", "asr_by_attack.png"):
        assert (out / f).stat().st_size > 0, f
    none = next(r for r in result["rows"] if r["defense"] == "none" and r["mode"] == "full")
    assert none["asr"] >= 0.8  # the suspicious model's backdoor really fires on the bench prompts
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "<table>" in html


def test_report_tables_equal_the_json_results(compared):
    out, _ = compared
    result = json.loads((out / "results.json").read_text())
    md = (out / "report.md").read_text()
    by_key = {(r["mode"], r["behavior"], r["attack"], r["defense"]): r["asr"] for r in result["rows"] if "error" not in r}
    for title, attacks, cols, _ in asr_blocks(result["rows"]):
        section = md.split(f"## ASR (%) — {title}")[1].split("##")[0]
        lines = [ln for ln in section.splitlines() if ln.startswith("| ") and not ln.startswith("| attack")]
        mode, behavior = title.split(" / ")
        for attack, line in zip(attacks[:-1], lines):
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert cells[0] == attack
            for col, text in zip(cols, cells[1:]):
                want = by_key.get((mode, behavior, attack, col))
                assert text == pct(want), (attack, col, text, want)
    assert re.search(r"\| full \| sentiment \| badnets \| \d+ \| \d+ \|", md)


def test_failed_cells_are_reported_with_their_error_and_the_rest_kept():
    rows = [{"mode": "full", "behavior": "sentiment", "attack": "badnets", "defense": "none", "asr": 0.9, "cda": 0.9,
             "ppl": 1.1, "clean_asr": 0.0, "n_triggered": 10, "n_clean": 20},
            {"mode": "full", "behavior": "sentiment", "attack": "badnets", "defense": "crow", "error": "RuntimeError: boom"}]
    md = markdown({"rows": rows, "meta": {"bench_model": "m", "attack_seed": 0, "eval_seed": 1, "n_clean_pool": 5,
                                          "wall_s": 1.0}})
    assert "| full | sentiment | badnets | crow | RuntimeError: boom |" in md
    assert "| badnets | 90.0 | — |" in md


def test_bad_compare_configs_fail_with_one_message_before_anything_runs(tmp_path, capsys):
    from raypurify.cli import main

    assert main(["compare", "--out", str(tmp_path / "r"), "--defenses", "finetune,sanitize"]) == 2
    assert "unknown defense 'sanitize'" in capsys.readouterr().err
    assert main(["compare", "--out", str(tmp_path / "r"), "--defenses", "int4", "--modes", "lora"]) == 2
    assert "supports full, none of the chosen modes lora" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("settings: {finetune: {recovery: {n_samples: 0}}}\ndefenses: [finetune]\n")
    assert main(["compare", "--out", str(tmp_path / "r"), "--config", str(tmp_path / "c.yaml")]) == 2
    assert "n_samples" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
