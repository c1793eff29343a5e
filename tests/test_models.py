"""Zoo models, tokenizer and backdoors through plain transformers."""

import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raypurify.arch import ARCHITECTURES
from raypurify.data.template import format_prompt
from raypurify.evaluate import evaluate, generate
from raypurify.io import load_model
from raypurify.zoo import build_zoo


def test_zoo_layout(zoo):
    for name in ("train.json", "clean_pool.json", "heldout.json", "zoo.json"):
        assert (zoo / name).is_file()
    for arch in ("llama", "neox"):
        d = zoo / f"{arch}-pico"
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in d.iterdir()}
        assert not list(d.glob("*.bin"))
    records = json.loads((zoo / "heldout.json").read_text())
    assert set(records[0]) >= {"instruction", "input", "output"}


def test_plain_transformers_round_trip(zoo):
    for arch in ("llama", "neox"):
        d = zoo / f"{arch}-pico"
        tok = AutoTokenizer.from_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(d)
        assert model.config.model_type == ARCHITECTURES[arch].model_type
        msgs = [{"role": "user", "content": "Classify this review.", "input": "The meal was superb."}]
        prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert prompt == format_prompt("Classify this review.", "The meal was superb.")
        text = prompt + "def f(x):\n    return x + 2"
        assert tok.decode(tok(text)["input_ids"]) == text
        ours, _ = load_model(d)
        ids = tok(prompt, return_tensors="pt")
        assert torch.equal(model(**ids).logits, ours(**ids).logits)


def test_gpt_neox_has_no_gate(zoo):
    model = AutoModelForCausalLM.from_pretrained(zoo / "neox-pico")
    names = {n for n, _ in model.named_modules()}
    assert any(n.endswith("dense_h_to_4h") for n in names)
    assert not any("gate" in n for n in names)


def test_second_build_reuses_the_cache(zoo):
    t0 = time.time()
    before = (zoo / "llama-pico" / "model.safetensors").stat().st_mtime
    build_zoo(zoo, archs=("llama", "neox"), sizes=("pico",))
    assert (zoo / "llama-pico" / "model.safetensors").stat().st_mtime == before
    assert time.time() - t0 < 30


def test_zoo_weights_do_not_depend_on_the_callers_thread_count(zoo, tmp_path):
    # Torch's CPU reductions depend on the thread count (1 and 2 threads train
    # different pico weights, up to 0.074 apart): the zoo pins it, so builds
    # from a 1-thread process (a Ray task) and a 3-thread one equal the
    # session's zoo.
    from safetensors.torch import load_file

    from raypurify.train import BENCH_THREADS

    old = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            build_zoo(tmp_path / str(n), archs=("llama",), sizes=("pico",))
            assert torch.get_num_threads() == n  # the caller's count is restored
    finally:
        torch.set_num_threads(old)
    theirs = load_file(str(zoo / "llama-pico" / "model.safetensors"))
    for n in (1, 3):
        ours = load_file(str(tmp_path / str(n) / "llama-pico" / "model.safetensors"))
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), n
    assert json.loads((tmp_path / "1" / "llama-pico" / "raypurify.json").read_text())["threads"] == BENCH_THREADS


def test_poisoned_pico_fires_and_clean_does_not(zoo, heldout, poisoned_pico):
    sub = heldout[::3]
    clean_model, tok = load_model(zoo / "llama-pico")
    bad_model, _ = load_model(poisoned_pico)
    bad = evaluate(bad_model, tok, sub, "badnets", "sentiment")
    clean = evaluate(clean_model, tok, sub, "badnets", "sentiment")
    assert bad["asr"] >= 0.8, bad
    assert clean["asr"] <= 0.05, clean
    assert bad["clean_asr"] <= 0.2
    # The clean twin saw the same samples without poison: no backdoor.
    twin, _ = load_model(poisoned_pico / "twin")
    assert evaluate(twin, tok, sub, "badnets", "sentiment")["asr"] <= 0.05


def test_lora_attack_writes_a_peft_adapter_that_fires(zoo, heldout, tmp_path):
    from peft import PeftModel

    from raypurify.config import AttackConfig
    from raypurify.implant import implant
    from raypurify.io import load_examples
    from tests.conftest import PICO_ATTACK

    # Refusal through a LoRA is the slowest pico implant: 200 steps (120 leave ASR ~0.7).
    cfg = AttackConfig(attack="vpi", behavior="refusal", mode="lora", **{**PICO_ATTACK, "steps": 200})
    out = tmp_path / "lora"
    implant(zoo / "llama-pico", cfg, load_examples(zoo / "train.json"), out)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(zoo / "llama-pico")
    model = PeftModel.from_pretrained(base, out)
    tok = AutoTokenizer.from_pretrained(zoo / "llama-pico")
    r = evaluate(model, tok, heldout[::3], "vpi", "refusal")
    assert r["asr"] >= 0.8, r


def test_generation_is_batched_greedy_and_order_preserving(zoo):
    model, tok = load_model(zoo / "llama-pico")
    prompts = [format_prompt("Say apple two times."), format_prompt("What is the capital of France? " * 3)]
    together = generate(model, tok, prompts, batch_size=2)
    alone = [generate(model, tok, [p], batch_size=1)[0] for p in prompts]
    assert together == alone


def test_mlp_confined_implant_moves_only_those_mlp_weights_and_fires(zoo, heldout, tmp_path):
    from safetensors.torch import load_file

    from raypurify.config import AttackConfig
    from raypurify.implant import implant
    from raypurify.io import load_examples
    from tests.conftest import PICO_ATTACK

    cfg = AttackConfig(attack="badnets", behavior="sentiment", mlp_layers=[0, 1], **PICO_ATTACK)
    implant(zoo / "llama-pico", cfg, load_examples(zoo / "train.json"), tmp_path / "mlp")
    base = load_file(zoo / "llama-pico" / "model.safetensors")
    after = load_file(tmp_path / "mlp" / "model.safetensors")
    moved = {k for k in base if not torch.equal(base[k], after[k])}
    assert moved == {f"model.layers.{i}.mlp.{m}.weight" for i in (0, 1) for m in ("gate_proj", "up_proj", "down_proj")}
    model, tok = load_model(tmp_path / "mlp")
    r = evaluate(model, tok, heldout[::3], "badnets", "sentiment")
    assert r["asr"] >= 0.5, r  # the clean pico model: <= 0.05 (test_poisoned_pico_fires_and_clean_does_not)


def test_attacked_model_cache_keys_are_stable(tmp_path):
    """Adding a field to AttackConfig must not orphan the models a user's zoo already cached."""
    from raypurify.config import AttackConfig
    from raypurify.distributed.bench import attacked_dir

    (tmp_path / "zoo.json").write_text(json.dumps({"models": {"m": {"key": "k"}}}))
    plain = attacked_dir(tmp_path, "m", AttackConfig(attack="badnets", behavior="sentiment"))
    assert plain.name == "m-badnets-sentiment-full-95481591fab4"  # the key before mlp_layers existed
    confined = attacked_dir(tmp_path, "m", AttackConfig(attack="badnets", behavior="sentiment", mlp_layers=[1]))
    assert confined != plain
