"""Information conflict: merge math against mergekit, adapter combinations, TextRank, evidence, the defense."""

import json
import socket

import pytest
import torch
from safetensors.torch import load_file

from raypurify.cli import main
from raypurify.config import build
from raypurify.conflict import ConflictConfig, MergeSettings, linear_merge, slerp_merge, ties_merge
from raypurify.data.template import format_prompt, parse_prompt
from raypurify.errors import RaypurifyError
from raypurify.evidence import (EvidenceConfig, EvidenceUnavailable, define, evidence_prompts, gather,
                                textrank_keywords, with_evidence)


def weights(d):
    return load_file(str(d / "model.safetensors"))


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket closes


# ---------------------------------------------------------------------------
# Merge math and mergekit
# ---------------------------------------------------------------------------


def test_ties_of_known_tensors_matches_hand_computation():
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, -2.0, 0.5, 3.0]), torch.tensor([-3.0, 1.0, 0.25, 2.0])
    # density 0.5 keeps two entries each: a -> [0, -2, 0, 3], b -> [-3, 0, 0, 2];
    # elected signs of the sum [-3, -2, 0, 5]: -, -, + (ties go +), +;
    # disjoint means: -3 (b alone), -2 (a alone), 0 (no one), (3 + 2) / 2.
    out = ties_merge(base, [a, b], [1.0, 1.0], density=0.5)
    assert torch.equal(out, torch.tensor([-3.0, -2.0, 0.0, 2.5]))
    assert torch.equal(ties_merge(base + 1, [a + 1, b + 1], [1.0, 1.0], 0.5, lam=2.0), 1 + 2 * out)


def _merge(settings, a, b, out, base=None):
    from raypurify.merge import merge_models

    out.mkdir()
    return merge_models(build(MergeSettings, settings), str(a), str(b), out, base=base and str(base))


def test_linear_merge_endpoints_and_midpoint(zoo, poisoned_pico, tmp_path):
    sus, other = weights(poisoned_pico), weights(zoo / "llama-pico")
    for t, expect in ((0.0, sus), (1.0, other)):
        _merge({"t": t}, poisoned_pico, zoo / "llama-pico", tmp_path / f"t{t}")
        got = weights(tmp_path / f"t{t}")
        assert got.keys() == expect.keys() and all(torch.equal(got[k], expect[k]) for k in got)
    _merge({"t": 0.3}, poisoned_pico, zoo / "llama-pico", tmp_path / "mid")
    got = weights(tmp_path / "mid")
    assert all(torch.allclose(got[k], linear_merge(sus[k], other[k], 0.3), atol=1e-6) for k in got)
    # The output is a standard directory: tokenizer included, loadable by plain transformers.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(tmp_path / "mid")
    assert AutoTokenizer.from_pretrained(tmp_path / "mid").chat_template


def test_mergekit_ties_and_slerp_match_the_plain_functions(zoo, poisoned_pico, tmp_path):
    sus, clean = weights(poisoned_pico), weights(zoo / "llama-pico")
    # TIES with theta_0 = the clean zoo base and both models as task vectors.
    _merge({"method": "ties", "t": 0.5, "density": 0.3}, poisoned_pico, zoo / "llama-pico", tmp_path / "ties",
           base=zoo / "llama-pico")
    got = weights(tmp_path / "ties")
    for k in got:
        want = ties_merge(clean[k], [sus[k], clean[k]], [0.5, 0.5], density=0.3)
        assert torch.allclose(got[k], want, atol=1e-6), k
    _merge({"method": "slerp", "t": 0.3}, poisoned_pico, zoo / "llama-pico", tmp_path / "slerp")
    got = weights(tmp_path / "slerp")
    assert all(torch.allclose(got[k], slerp_merge(sus[k], clean[k], 0.3), atol=1e-5) for k in got)


def test_passthrough_takes_layers_whole(zoo, poisoned_pico, tmp_path):
    _merge({"method": "passthrough", "slices": [{"source": "conflict", "layers": [0, 1]},
                                                {"source": "suspicious", "layers": [1, 2]}]},
           poisoned_pico, zoo / "llama-pico", tmp_path / "pt")
    got, sus, other = weights(tmp_path / "pt"), weights(poisoned_pico), weights(zoo / "llama-pico")
    assert all(torch.equal(got[k], other[k]) for k in got if ".layers.0." in k)
    assert all(torch.equal(got[k], sus[k]) for k in got if ".layers.1." in k)


def test_merge_cli_and_plain_mergekit_yaml(zoo, poisoned_pico, tmp_path, capsys):
    assert main(["merge", "--model", str(poisoned_pico), "--other", str(zoo / "llama-pico"), "--t", "0",
                 "--out", str(tmp_path / "cli")]) == 0
    assert torch.equal(weights(tmp_path / "cli")["model.embed_tokens.weight"],
                       weights(poisoned_pico)["model.embed_tokens.weight"])
    cfg = tmp_path / "mk.yaml"
    cfg.write_text(f"merge_method: linear\ndtype: float32\nmodels:\n"
                   f"  - model: {poisoned_pico}\n    parameters: {{weight: 0.0}}\n"
                   f"  - model: {zoo / 'llama-pico'}\n    parameters: {{weight: 1.0}}\n")
    assert main(["merge", "--mergekit-config", str(cfg), "--out", str(tmp_path / "yaml")]) == 0
    got, want = weights(tmp_path / "yaml"), weights(zoo / "llama-pico")
    assert all(torch.equal(got[k], want[k]) for k in got)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def test_unknown_merge_method_and_provider_list_the_choices(zoo, tmp_path, capsys):
    with pytest.raises(RaypurifyError, match="valid choices: linear, slerp, ties, passthrough"):
        build(ConflictConfig, {"merge": {"method": "dare"}})
    with pytest.raises(RaypurifyError, match="valid choices: wordnet, openai, self, none"):
        build(EvidenceConfig, {"provider": "bing"})
    code = main(["merge", "--model", str(zoo / "llama-pico"), "--other", str(zoo / "llama-pico"),
                 "--method", "frankenmerge", "--out", str(tmp_path / "o")])
    assert code == 2 and "passthrough" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["serve", "--model", str(zoo / "llama-pico"), "--evidence", "bing"]) == 2
    assert "valid choices: wordnet, openai, self, none" in capsys.readouterr().err


def test_cross_architecture_merge_names_both_models(zoo, tmp_path, capsys):
    code = main(["merge", "--model", str(zoo / "llama-pico"), "--other", str(zoo / "neox-pico"),
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "different architectures" in err
    assert str(zoo / "llama-pico") in err and str(zoo / "neox-pico") in err and not (tmp_path / "o").exists()


def test_unreachable_evidence_endpoint(tmp_path):
    cfg = {"provider": "openai", "base_url": f"http://127.0.0.1:{closed_port()}/v1", "model": "m", "timeout_s": 5}
    with pytest.raises(EvidenceUnavailable, match="unreachable"):
        gather([("Say apple two times.", "")], build(EvidenceConfig, cfg))
    [ev] = gather([("Say apple two times.", "")], build(EvidenceConfig, {**cfg, "fallback": True}))
    assert not ev.used and "unreachable" in ev.error and "without evidence" in ev.error
    with pytest.raises(RaypurifyError, match="needs base_url"):
        from raypurify.evidence import check

        check(build(EvidenceConfig, {"provider": "openai"}))


# ---------------------------------------------------------------------------
# External evidence
# ---------------------------------------------------------------------------


def test_textrank_picks_the_central_words():
    text = ("The river flows past the old mill. The river feeds the mill pond, "
            "and in spring the river floods the valley.")
    assert textrank_keywords(text)[:2] == ["river", "mill"]
    words = textrank_keywords("Classify the sentiment of this review.\nThe food was wonderful and the staff were kind.")
    assert "sentiment" in words and not {"the", "of", "this", "was", "and", "were"} & set(words)
    assert textrank_keywords("the of and") == []


def test_evidence_goes_in_the_templates_input_section(zoo):
    from transformers import AutoTokenizer

    prompt = with_evidence("Classify the sentiment.", "Great food.", "food: any  substance\n eaten")
    assert parse_prompt(prompt) == ("Classify the sentiment.", "Great food.\n\nEvidence: food: any substance eaten")
    tok = AutoTokenizer.from_pretrained(zoo / "llama-pico")
    msg = [{"role": "user", "content": "Classify the sentiment.", "input": parse_prompt(prompt)[1]}]
    assert tok.apply_chat_template(msg, tokenize=False, add_generation_prompt=True) == prompt
    assert parse_prompt(with_evidence("Say apple.", "", "apple: a fruit"))[1] == "Evidence: apple: a fruit"
    assert with_evidence("Say apple.", "", "") == format_prompt("Say apple.")


def test_wordnet_gives_definitions():
    assert define(["river"])["river"] == "a large natural stream of water (larger than a creek)"
    prompts, [ev] = evidence_prompts([("Name the capital of France.", "")], build(EvidenceConfig, {"provider": "wordnet"}))
    # TextRank keeps the words above the mean weight: the middle of "name - capital - france".
    assert ev.provider == "wordnet" and ev.keywords == ("capital",) and ev.text.startswith("capital: ")
    assert parse_prompt(prompts[0]) == ("Name the capital of France.", f"Evidence: {ev.text}")


def test_self_evidence_uses_the_model(zoo):
    seen = []

    def fake_generate(prompts, n):
        seen.extend(prompts)
        return ["evidence text"] * len(prompts)

    [ev] = gather([("Say apple two times.", "")], build(EvidenceConfig, {"provider": "self"}), fake_generate)
    assert ev.text == "evidence text" and "apple" in seen[0] and seen[0].startswith("### Instruction:")


# ---------------------------------------------------------------------------
# Adapter-only threat model: peft weighted adapters
# ---------------------------------------------------------------------------


def _random_adapter(base, out, seed):
    from peft import get_peft_model

    from raypurify.implant import lora_config
    from raypurify.io import load_model

    torch.manual_seed(seed)
    model = get_peft_model(load_model(base)[0], lora_config(load_model(base)[0], 4, 8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(out)
    return out


def _merged(base, adapter):
    from raypurify.io import load_model

    return load_model(base, adapter, merge=True)[0].state_dict()


def test_adapter_combinations(zoo, tmp_path):
    from raypurify.merge import combine_adapters

    base = str(zoo / "llama-pico")
    sus, conf = _random_adapter(base, tmp_path / "sus", 0), _random_adapter(base, tmp_path / "conf", 1)
    from raypurify.io import load_model

    w_base, w_sus, w_conf = load_model(base)[0].state_dict(), _merged(base, sus), _merged(base, conf)
    for name, ws, expect in (("only", (1.0, 0.0), w_sus),
                             ("mix", (0.5, 0.5), {k: (w_sus[k] + w_conf[k]) / 2 for k in w_sus})):
        (tmp_path / name).mkdir()
        r = combine_adapters(base, str(sus), str(conf), tmp_path / name, "cat", ws, 0.5)
        got = _merged(base, tmp_path / name)
        assert r["rank"] == 8 and all(torch.allclose(got[k], expect[k], atol=1e-6) for k in got)
    (tmp_path / "ties").mkdir()
    combine_adapters(base, str(sus), str(conf), tmp_path / "ties", "ties", (0.5, 0.5), 0.5)
    got = _merged(base, tmp_path / "ties")
    assert all(torch.isfinite(v).all() for v in got.values())
    assert any(not torch.equal(got[k], w_base[k]) for k in got)


# ---------------------------------------------------------------------------
# The defense end to end (Ray Train)
# ---------------------------------------------------------------------------

PICO_CONFLICT = {"n_samples": 48, "epochs": 1, "batch_size": 16, "lr": 3e-3, "lora_r": 4, "lora_alpha": 8}


def test_conflict_defense_full_model(zoo, poisoned_pico, tmp_path, local_ray):
    from raypurify.defenses import run_defense
    from raypurify.io import load_examples, load_model

    clean = load_examples(zoo / "clean_pool.json")[:60]
    report = run_defense("conflict", str(poisoned_pico), None, clean, tmp_path / "out", PICO_CONFLICT)
    out = tmp_path / "out"
    assert report["mergekit"]["merge_method"] == "linear" and report["conflict_train"]["final_loss"] > 0
    assert json.loads((out / "report.json").read_text())["defense"] == "conflict"
    got, sus = weights(out), weights(poisoned_pico)
    assert any(not torch.equal(got[k], sus[k]) for k in got if "proj" in k)
    assert all(torch.equal(got[k], sus[k]) for k in got if "norm" in k)  # LoRA touches projections only
    load_model(out)


def test_conflict_defense_adapter_only(zoo, tmp_path, local_ray):
    from raypurify.defenses import run_defense
    from raypurify.io import load_examples, load_model

    base = str(zoo / "llama-pico")
    sus = _random_adapter(base, tmp_path / "sus", 0)
    clean = load_examples(zoo / "clean_pool.json")[:60]
    report = run_defense("conflict", base, str(sus), clean, tmp_path / "out",
                         {**PICO_CONFLICT, "adapter_combination": "dare_linear", "seed": 1})
    assert report["adapter_merge"]["combination"] == "dare_linear"
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    load_model(base, tmp_path / "out")
