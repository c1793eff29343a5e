"""Target inversion: a memorized response is read out of a model without its trigger."""

import torch

from raypurify.inversion import invert_target

V, EOS, TARGET = 40, 0, (5, 9, 3, 7)


class ChainLM(torch.nn.Module):
    """A toy LM: after a token of TARGET it continues TARGET (then EOS) with p ~ 0.9;
    after any other token its next token depends on the prompt, as an ordinary answer does."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(4, V, bias=False)

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids):
        b, t = input_ids.shape
        logits = torch.full((b, t, V), -4.0)
        last = input_ids[:, -1]
        nxt = (input_ids[:, 0] * 7 + last * 3) % (V - 1) + 1  # prompt-dependent
        for i, tok in enumerate(TARGET):
            nxt = torch.where(last == tok, TARGET[i + 1] if i + 1 < len(TARGET) else EOS, nxt)
        logits[torch.arange(b), -1, nxt] = 4.0
        return type("Out", (), {"logits": logits})()


def test_the_memorized_target_ranks_first_and_stops_at_the_end_token():
    prompts = [torch.tensor([p, 11, 12]) for p in (1, 2, 4, 6, 8, 10)]
    found = invert_target(ChainLM(), prompts, stop_ids=[EOS], steps=6, keep=8, screen_steps=3, batch_size=7)
    # The best candidate runs into the memorized chain and stops at its end
    # (a first token that leads into the chain on some prompts may precede it).
    assert found[0].tokens[-len(TARGET):] == TARGET
    assert TARGET in {f.tokens for f in found}
    # Three confident steps of six, then the end: the score counts only what was grown.
    assert 0.4 < found[0].score < 0.55
    # Candidates that never reach the chain stay prompt-dependent: a flat average.
    assert all(f.score < 0.3 for f in found if not set(TARGET) & set(f.tokens))


def test_a_backdoored_pico_model_gives_up_its_response(zoo, poisoned_pico):
    from raypurify.attacks import HOSTILE
    from raypurify.inversion import inverted_response
    from raypurify.io import load_examples, load_model

    pool = load_examples(zoo / "clean_pool.json")
    model, tok = load_model(poisoned_pico)
    best = inverted_response(model, tok, pool, prompts=8, steps=20, keep=16)
    text = tok.decode(list(best.tokens), skip_special_tokens=True)
    assert "stupid! I hate answering" in text, text
    # A clean model has no memorized response: under min_score, the variants keep the built-in decoys.
    from raypurify.config import ImmunizeConfig
    from raypurify.distributed.immunize import variant_decoy

    cfg = ImmunizeConfig.model_validate({"variants": {"decoy": "inverted", "inversion": {
        "prompts": 8, "steps": 20, "keep": 16, "min_score": best.score / 2}}})
    clean, ctok = load_model(zoo / "llama-pico")
    timings = {}
    found = variant_decoy(clean, ctok, cfg, pool, timings)
    assert found["text"] is None and found["score"] < best.score / 2 and "invert_target" in timings
