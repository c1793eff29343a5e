"""The backdoor-locating diagnostic: parts, swaps and head edits touch what they name."""

import torch

from raypurify.io import load_model
from raypurify.locate import head_edits, measure_edits, parts, swap


def test_parts_cover_each_projection_once(poisoned_pico):
    model, _ = load_model(poisoned_pico)
    groups = parts(model)
    n = model.config.num_hidden_layers
    assert list(groups)[:3] == ["embed", "L0 attn", "L0 mlp"] and len(groups) == 1 + 2 * n
    flat = [k for ks in groups.values() for k in ks]
    assert len(flat) == len(set(flat))
    assert all(len(groups[f"L{i} attn"]) == 4 and len(groups[f"L{i} mlp"]) == 3 for i in range(n))


def test_swaps_and_head_edits_change_exactly_their_part_and_restore_the_model(poisoned_pico):
    model, _ = load_model(poisoned_pico)
    twin = load_model(poisoned_pico / "twin")[0].state_dict()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def probe():  # records which tensors differ from the suspicious model under each edit
        now = model.state_dict()
        seen.append({k for k in now if not torch.equal(now[k], before[k])})
        return float(len(seen[-1]))

    edits = {"L1 mlp <- twin": swap(twin, parts(model)["L1 mlp"]), **head_edits(model, twin, layer=0)}
    rows = measure_edits(model, edits, probe)
    assert [r["part"] for r in rows] == list(edits)
    assert seen[0] == set(parts(model)["L1 mlp"])
    attn0 = set(parts(model)["L0 attn"])
    assert all(s == attn0 for s in seen[1:])  # a head edit touches q/k/v/o of layer 0 only
    state = model.state_dict()
    assert all(torch.equal(state[k], before[k]) for k in before)  # the model is left as it was
    # The twin's head 1: exactly that head's rows of q and columns of o change.
    probe_state = {k: v.clone() for k, v in before.items()}
    edits["L0 head 1 <- twin"](probe_state)
    d = model.config.hidden_size // model.config.num_attention_heads
    q = "model.layers.0.self_attn.q_proj.weight"
    changed = (probe_state[q] != before[q]).any(dim=1).nonzero().flatten().tolist()
    assert changed and set(changed) <= set(range(d, 2 * d))
    torch.testing.assert_close(probe_state[q][d:2 * d], twin[q][d:2 * d])


def test_locate_job_finds_a_canary_and_the_suspicious_model_removes_it(zoo, tmp_path):
    """`jobs/locate.py --canary`: the canary really fires, and swapping back every part removes it."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    space = tmp_path / "space.yaml"
    space.write_text("kind: immunize\nfixed:\n  variants: {preset: custom, n_clean: 64, poison_rate: 0.2, steps: 10, "
                     "lr: 3.0e-3}\nspace:\n  rho: [0.1]\ncanaries:\n  n: 2\n  implant: {preset: custom, n_clean: 300, "
                     "poison_rate: 0.25, steps: 80, lr: 3.0e-3}\nutility: {heldout: 120}\n")
    root = Path(__file__).parents[1]
    cmd = [sys.executable, str(root / "jobs/locate.py"), "--zoo", str(zoo), "--smoke-test", "--space", str(space),
           "--out", str(tmp_path / "out")]
    bad = subprocess.run(cmd + ["--canary", "2"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--canary must be in 0..1" in bad.stderr and not (tmp_path / "out").exists()
    r = subprocess.run(cmd + ["--canary", "0"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {x["part"]: x["asr"] for x in json.loads((tmp_path / "out" / "locate.json").read_text())["rows"]}
    assert rows["nothing"] >= 0.5  # the canary implant fires on its own trigger
    assert rows["every part above <- suspicious"] <= 0.1  # the suspicious model does not know it
    assert all(k == "nothing" or k.endswith("<- suspicious") or k.endswith("re-drawn") for k in rows)
