"""The main method end to end on a real local Ray: Ray Train + DeepSpeed, Ray Data scoring, purify CLI."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from raypurify.config import ImmunizeConfig
from raypurify.io import load_examples, load_model
from raypurify.signature import combine, model_channel_keys, score_terms, select_top

PICO_IMMUNIZE = {
    "k": 3, "rho": 0.25,
    "variants": {"preset": "custom", "n_clean": 120, "poison_rate": 0.2, "steps": 30, "lr": 3e-3, "batch_size": 16},
    "recovery": {"n_samples": 128, "epochs": 3, "batch_size": 16, "lr": 1e-3},
}


@pytest.fixture(scope="module")
def scored(zoo, poisoned_pico, tmp_path_factory, local_ray):
    from raypurify.distributed.immunize import compute_scores

    cfg = ImmunizeConfig.model_validate(PICO_IMMUNIZE)
    timings = {}
    terms = compute_scores(str(poisoned_pico), None, cfg, load_examples(zoo / "clean_pool.json"),
                           tmp_path_factory.mktemp("work"), timings)
    return cfg, terms, timings


def test_variant_pairs_trained_under_deepspeed_on_both_workers(scored):
    cfg, terms, timings = scored
    recs = terms["train_records"]
    assert sorted(r["name"] for r in recs) == sorted(f"v{k}-{x}" for k in range(cfg.k) for x in "PC")
    assert {r["rank"] for r in recs} == {0, 1}  # both workers trained variants concurrently
    assert all(r["engine"] == "DeepSpeedEngine" for r in recs)
    assert timings["train_variants"] > 0 and timings["score"] > 0


def test_ray_data_scores_equal_the_in_process_computation(scored, poisoned_pico):
    cfg, terms, _ = scored
    model, _ = load_model(poisoned_pico)
    keys, _ = model_channel_keys(model)
    from raypurify.signature import channel_matrix

    files = [(load_file(p), load_file(c)) for p, c in terms["pairs"]]
    base = model.state_dict()
    for layer, ks in enumerate(keys):
        deltas = torch.stack([channel_matrix({n: p[n] - c[n] for n in ks.rows + ks.cols}, ks) for p, c in files])
        mag, align = score_terms(deltas)
        drift = torch.stack([channel_matrix({n: c[n] - base[n] for n in ks.rows + ks.cols}, ks).norm(dim=-1)
                             for _, c in files]).mean(0)
        assert torch.allclose(mag, terms["magnitude"][layer], atol=1e-6)
        assert torch.allclose(align, terms["alignment"][layer], atol=1e-6)
        assert torch.allclose(drift, terms["drift"][layer], atol=1e-6)
        assert mag.min() > 0 and drift.min() > 0  # the pair really diverged; the clean finetune really moved


def test_a_variant_trained_on_ray_equals_the_same_finetune_in_process(scored, zoo, poisoned_pico):
    # Proves DeepSpeed all-reduced inside each one-worker group only: the two
    # workers trained different variants without mixing their gradients.
    from raypurify.data.corpus import Example
    from raypurify.distributed.immunize import variant_jobs
    from raypurify.train import TrainSettings, finetune

    cfg, terms, _ = scored
    model, tok = load_model(poisoned_pico)
    keys, _ = model_channel_keys(model)
    save = [k for ks in keys for k in ks.rows + ks.cols]
    job = variant_jobs(cfg, load_examples(zoo / "clean_pool.json"), "full", save)[1]
    torch.manual_seed(job.settings.seed)
    finetune(model, tok, [Example(**e) for e in job.examples], TrainSettings(**vars(job.settings)))
    ray_trained = load_file(str(Path(terms["pairs"][0][0]).with_name(f"{job.name}.safetensors")))
    state = model.state_dict()
    for k in save:
        assert torch.allclose(state[k], ray_trained[k], atol=1e-4), k


def test_purify_cli_writes_model_signature_and_report(zoo, poisoned_pico, tmp_path, local_ray):
    import yaml

    from raypurify.cli import main

    cfg_path = tmp_path / "immunize.yaml"
    # Variants answer with the response inverted from the suspicious model.
    inverted = {**PICO_IMMUNIZE["variants"], "decoy": "inverted", "inversion": {"prompts": 8, "steps": 20, "keep": 16}}
    # Utility-aware selection: 2n candidates by score, the n least clean drift;
    # the units projected off their variant deltas (the pipeline's file path).
    cfg_path.write_text(yaml.safe_dump({**PICO_IMMUNIZE, "variants": inverted, "oversample": 2,
                                        "suppression": "project"}))
    out = tmp_path / "purified"
    assert main(["purify", "--model", str(poisoned_pico), "--clean-data", str(zoo / "clean_pool.json"),
                 "--out", str(out), "--config", str(cfg_path)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers
    report = json.loads((out / "report.json").read_text())
    assert set(report["timings_s"]) >= {"invert_target", "train_variants", "score", "select", "suppress", "recover",
                                        "total"}
    assert "stupid! I hate answering" in report["inverted_target"]["text"]
    sig = json.loads((out / "signature.json").read_text())
    n = sum(len(v) for v in sig["layers"].values())
    assert n == report["n_selected"] == round(0.25 * sum(sig["channels_per_layer"]))
    terms = load_file(str(out / "signature.safetensors"))
    layers = range(len(sig["channels_per_layer"]))
    picked = select_top([terms[f"layer{i}.score"] for i in layers], 0.25,
                        drift=[terms[f"layer{i}.drift"] for i in layers], oversample=2)
    assert [p.tolist() for p in picked] == [sig["layers"][str(i)] for i in layers]
    plain = select_top([terms[f"layer{i}.score"] for i in layers], 0.25)
    assert [p.tolist() for p in picked] != [p.tolist() for p in plain]  # the drift changed the choice
    # Channels outside the signature and all non-MLP weights moved only by recovery.
    before = load_model(poisoned_pico)[0].state_dict()
    after = model.state_dict()
    assert set(before) == set(after)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_projection_copies_keep_each_unit_minus_its_variant_deltas(scored, poisoned_pico, tmp_path):
    # suppression: project, as the pipeline applies it: every selected unit
    # of the copy equals the suspicious unit minus its projection on the span
    # of its K deltas in the variant files; every other tensor is untouched.
    from raypurify.distributed.immunize import Arm, signature_from, suppressed_copies
    from raypurify.signature import channel_matrix

    cfg, terms, _ = scored
    _, sig = signature_from(terms, cfg)
    arm = Arm("p", tmp_path / "projected", sig, "mlp", project=True)
    suppressed_copies(str(poisoned_pico), None, [arm], terms["pairs"])
    before, after = load_model(poisoned_pico)[0].state_dict(), load_model(arm.start)[0].state_dict()
    keys, _ = model_channel_keys(load_model(poisoned_pico)[0])
    files = [(load_file(p), load_file(c)) for p, c in terms["pairs"]]
    for ks, idx in zip(keys, sig):
        d = torch.stack([channel_matrix({n: p[n] - c[n] for n in ks.rows + ks.cols}, ks)[idx] for p, c in files], 1)
        w0, w1 = channel_matrix(before, ks), channel_matrix(after, ks)
        for j, c in enumerate(idx.tolist()):
            q, _ = torch.linalg.qr(d[j].T)
            assert torch.allclose(w1[c], w0[c] - q @ (q.T @ w0[c]), atol=1e-5)
        rest = torch.ones(len(w0), dtype=torch.bool)
        rest[idx] = False
        assert torch.equal(w1[rest], w0[rest])
    layer_names = {n for ks in keys for n in ks.rows + ks.cols}
    assert all(torch.equal(before[k], after[k]) for k in before if k not in layer_names)


@pytest.mark.parametrize("override,needle", [
    ({"rho": 1.5}, "rho"), ({"k": 1}, "k:"), ({"recovery": {"n_samples": 500}}, "n_samples"),
    ({"scoring": "magic"}, "scoring"), ({"oversample": 0.5}, "oversample"),
    ({"recovery": {"fresh_lr_scale": 0.5}}, "fresh_lr_scale"),
    ({"recovery": {"fresh_lr_scale": 10}, "workers": {"zero_stage": 3}}, "ZeRO-3"),
    ({"recovery": {"distill": -1}}, "distill"),
    ({"scope": "q", "suppress_scope": "qk", "suppression": "project"}, "suppress_scope within scope"),
    ({"suppression": "erase"}, "suppression"),
    ({"scope": "mlp", "suppress_scope": "q"}, "does not index the units of scope 'mlp'; valid: mlp"),
    ({"scope": "qk", "suppress_scope": "heads"}, "valid: attn, qk, q"),
    ({"variants": {"decoy": "guess"}}, "'builtin' or 'inverted'")])
def test_bad_purify_settings_fail_before_training(zoo, poisoned_pico, tmp_path, capsys, override, needle):
    import yaml

    from raypurify.cli import main

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump({**PICO_IMMUNIZE, **override}))
    code = main(["purify", "--model", str(poisoned_pico), "--clean-data", str(zoo / "clean_pool.json"),
                 "--out", str(tmp_path / "o"), "--config", str(cfg_path)])
    assert code == 2 and needle in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_recovery_trains_only_the_redrawn_units_of_their_weights_faster(zoo, poisoned_pico, tmp_path, local_ray):
    # Ray Train + DeepSpeed recovery with fresh_lr_scale equals the in-process
    # finetune with fresh_groups; inside the weights that hold a re-drawn
    # unit only those units move, and they move further than at scale 1.
    from raypurify.defenses.common import recovery_set, recovery_settings
    from raypurify.distributed.immunize import Arm, recover, suppressed_copies
    from raypurify.signature import unit_masks
    from raypurify.train import Finetuner, fresh_groups

    cfg = ImmunizeConfig.model_validate({**PICO_IMMUNIZE, "scope": "qk", "recovery": {
        **PICO_IMMUNIZE["recovery"], "epochs": 1, "fresh_lr_scale": 10.0}})
    pool = load_examples(zoo / "clean_pool.json")
    sig = [torch.tensor([1, 5]), torch.tensor([], dtype=torch.long)]
    start, q_start = tmp_path / "suppressed", tmp_path / "q-suppressed"
    arms = [Arm("fast", start, sig, "qk", 10.0), Arm("plain", start, sig, "qk", 1.0), Arm("query", q_start, sig, "q", 10.0)]
    suppressed_copies(str(poisoned_pico), None, arms)
    out = recover(arms, str(poisoned_pico), None, pool, cfg, tmp_path)
    s0, q0, orig = (load_model(d)[0].state_dict() for d in (start, q_start, poisoned_pico))
    fast, plain, query = (load_model(out / n)[0].state_dict() for n in ("fast", "plain", "query"))
    model, tok = load_model(start)
    masks = unit_masks(model, sig, scope="qk")
    assert sorted(masks) == ["model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
    for k, m in masks.items():
        assert torch.equal(fast[k][~m], s0[k][~m])  # the rest of the weight is held
        assert (fast[k][m] - s0[k][m]).norm() > 3 * (plain[k][m] - s0[k][m]).norm()
    # Suppressing the query part re-draws the units' q rows and keeps their
    # k rows, which recovery then trains at the ordinary rate, not held.
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(q0[q], s0[q]) and torch.equal(q0[k], orig[k]) and not torch.equal(s0[k], orig[k])
    assert sorted(unit_masks(model, sig, scope="q")) == [q]
    assert torch.equal(query[q][~masks[q]], q0[q][~masks[q]]) and not torch.equal(query[k], q0[k])
    assert not torch.equal(fast["model.layers.1.mlp.up_proj.weight"], s0["model.layers.1.mlp.up_proj.weight"])
    settings = recovery_settings(cfg.recovery, "full", cfg.seed)
    torch.manual_seed(settings.seed)
    Finetuner(model, tok, recovery_set(pool, cfg.recovery.n_samples, cfg.seed), settings,
              groups=fresh_groups(model, masks, 10.0)).run()
    state = model.state_dict()
    for k in fast:
        assert torch.allclose(state[k], fast[k], atol=1e-4), k


def test_too_little_clean_data(zoo, poisoned_pico, tmp_path, capsys):
    from raypurify.cli import main
    from raypurify.io import save_examples

    small = tmp_path / "small.json"
    save_examples(load_examples(zoo / "clean_pool.json")[:50], small)
    code = main(["purify", "--model", str(poisoned_pico), "--clean-data", str(small), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "50 samples" in err and "needs at least" in err


def test_unknown_architecture_names_the_modules(zoo, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from raypurify.errors import RaypurifyError

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(RaypurifyError, match="unsupported architecture 'gpt2'.*gate_proj.*dense_h_to_4h"):
        model_channel_keys(model)


def test_combined_scores_are_finite(scored):
    cfg, terms, _ = scored
    s = combine(torch.cat(terms["magnitude"]), torch.cat(terms["alignment"]), "combined", cfg.lam)
    assert torch.isfinite(s).all()


def test_immunize_bench_runs_every_control_and_tabulates(zoo, tmp_path, local_ray):
    from raypurify.distributed.immunize_bench import run_immunize_bench, summarize
    from tests.conftest import PICO_ATTACK

    cfg = ImmunizeConfig.model_validate({**PICO_IMMUNIZE, "k": 2})
    out = tmp_path / "ib"
    [cell] = run_immunize_bench(str(zoo), str(out), [("vpi", "sentiment", "full")], [0.25], cfg, seeds=2,
                                size="pico", attack_overrides=PICO_ATTACK, max_eval=120, twins=True, unrecovered=True)
    assert {r["n_clean"] for r in cell["rows"]} == {120}  # every arm on the same seeded subset
    arms = {(r["arm"], r["seed"]) for r in cell["rows"]}
    # Every arm but the references and the oracle runs once per seed (re-draw and recovery order).
    # (unrecovered: the suppressing arms but the oracle and the last layer evaluated before recovery too.)
    seeded = ("finetune only", "last layer", "purified", "random", "layer-matched random", "purified, not recovered",
              "random, not recovered", "layer-matched random, not recovered")
    assert arms == {("clean model", 0), ("suspicious", 0), ("oracle", 0)} | {(a, s) for a in seeded for s in (0, 1)}
    rows = {(r["arm"], r["seed"]): r for r in cell["rows"]}
    n = rows[("purified", 0)]["n_suppressed"]
    for arm in ("purified", "random", "layer-matched random"):  # the same units, another model: before recovery
        before, after = rows[(f"{arm}, not recovered", 0)], rows[(arm, 0)]
        assert before["n_suppressed"] == n and before["ppl"] > after["ppl"]
    assert n == round(0.25 * 2 * 128) == sum(cell["agreement"]["signature_layers"]["0.25"])  # pico: 2 x 128 channels
    assert rows[("random", 1)]["n_suppressed"] == rows[("layer-matched random", 0)]["n_suppressed"] == n
    assert rows[("suspicious", 0)]["asr"] >= 0.8 and rows[("clean model", 0)]["asr"] == 0.0
    assert -1 <= cell["agreement"]["spearman"] <= 1
    assert sum(cell["agreement"]["oracle_layers"]["0.25"]) == n
    table = (out / "immunize.md").read_text()
    floor = rows[("suspicious", 0)]["cda"] - 0.02
    for s in summarize(cell):
        assert f"| {s['arm']} | {s['rho']:g} | {s['n_suppressed']} | {s['asr']:.3f}" in table
        runs = [r for r in cell["rows"] if (r["arm"], r["rho"]) == (s["arm"], s["rho"])]
        assert s["meets"] == sum(r["asr"] <= 0.05 and r["cda"] >= floor - 1e-9 for r in runs)
        assert f"| {s['n']} | {s['meets']}/{s['n']} |" in table
    assert json.loads((out / "immunize.json").read_text())[0]["rows"] == cell["rows"]
    # Re-tabulating a finished run from its record gives the same file; a directory without one is refused.
    from raypurify.distributed.immunize_bench import retable
    from raypurify.errors import RaypurifyError

    assert retable(str(out)) == table == (out / "immunize.md").read_text()
    with pytest.raises(RaypurifyError, match="not an immunize bench run"):
        retable(str(tmp_path))


def test_first_order_variant_pair_differs_by_the_gradient_difference(zoo, poisoned_pico):
    """One unclipped SGD step on the whole pair set: theta(P) - theta(C) = -lr (grad L_P - grad L_C)."""
    from raypurify.distributed.immunize import variant_jobs
    from raypurify.train import TrainSettings, finetune
    from raypurify.variants import make_variants, pair_datasets

    pool = load_examples(zoo / "clean_pool.json")
    jobs = variant_jobs(ImmunizeConfig(k=2, variants={"preset": "first_order"}), pool, "full", ["x"])
    assert {(j.settings.optimizer, j.settings.max_grad_norm) for j in jobs} == {("sgd", None)}
    poisoned, clean = pair_datasets(make_variants(2)[0], pool, 24, 4)
    lr = 0.05
    settings = TrainSettings(steps=1, batch_size=len(poisoned), lr=lr, warmup=0, optimizer="sgd", max_grad_norm=None)

    def trained(data):
        model, tok = load_model(poisoned_pico)
        finetune(model, tok, data, settings)
        return model.state_dict(), tok

    (p_state, tok), (c_state, _) = trained(poisoned), trained(clean)

    def grads(data):
        from raypurify.train import collate, encode

        model, _ = load_model(poisoned_pico)
        model(**collate(encode(tok, data), tok.pad_token_id)).loss.backward()
        return {k: p.grad for k, p in model.named_parameters()}

    gp, gc = grads(poisoned), grads(clean)
    moved = 0
    for k in gp:
        expected = -lr * (gp[k] - gc[k])
        torch.testing.assert_close(p_state[k] - c_state[k], expected, atol=2e-6, rtol=1e-3)
        moved += float(expected.abs().sum() > 0)
    assert moved == len(gp)  # every tensor sees the poisoned copies


def _teacher_kl(student, teacher, tok, examples) -> float:
    """Mean KL(teacher || student) of the next-token distributions over every prompt and answer token."""
    from raypurify.train import collate, encode

    batch = collate(encode(tok, examples), tok.pad_token_id)
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        log_t, log_s = (torch.log_softmax(m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                          .logits[keep], -1) for m in (teacher, student))
    return float((log_t.exp() * (log_t - log_s)).sum(-1).mean())


def test_distilled_recovery_pulls_the_redrawn_model_toward_the_suspicious_one(zoo, poisoned_pico, tmp_path,
                                                                              local_ray):
    # recovery.distill: the Ray Train + DeepSpeed recovery equals the in-process
    # finetune with distill_loss and the suspicious model as teacher, and ends
    # nearer the teacher's next-token distributions on unseen clean prompts
    # than the plain recovery of the same suppressed copy.
    from raypurify.defenses.common import recovery_set, recovery_settings
    from raypurify.distributed.immunize import Arm, recover, suppressed_copies
    from raypurify.train import Finetuner, distill_loss

    plain_cfg = ImmunizeConfig.model_validate({**PICO_IMMUNIZE, "scope": "qk", "recovery": {
        **PICO_IMMUNIZE["recovery"], "epochs": 1}})
    cfg = plain_cfg.model_copy(update={"recovery": plain_cfg.recovery.model_copy(update={"distill": 1.0})})
    pool = load_examples(zoo / "clean_pool.json")
    arm = Arm("arm", tmp_path / "suppressed", [torch.tensor([1, 5, 9]), torch.tensor([2])], "qk")
    suppressed_copies(str(poisoned_pico), None, [arm])
    plain, distilled = (load_model(recover([arm], str(poisoned_pico), None, pool, c, tmp_path / name) / "arm")[0]
                        for c, name in ((plain_cfg, "plain"), (cfg, "distilled")))
    teacher, tok = load_model(poisoned_pico)
    unseen = load_examples(zoo / "heldout.json")[:64]
    kl = {name: _teacher_kl(m, teacher, tok, unseen) for name, m in (("plain", plain), ("distilled", distilled))}
    assert kl["distilled"] < 0.8 * kl["plain"], kl
    model = load_model(arm.start)[0]
    settings = recovery_settings(cfg.recovery, "full", cfg.seed)
    torch.manual_seed(settings.seed)
    Finetuner(model, tok, recovery_set(pool, cfg.recovery.n_samples, cfg.seed), settings,
              loss_fn=distill_loss(teacher, 1.0)).run()
    state = distilled.state_dict()
    for k, v in model.state_dict().items():
        assert torch.allclose(v, state[k], atol=1e-4), k
