"""The pure signature math on small tensors (milliseconds, no Ray)."""

import pytest
import torch

from raypurify.arch import ARCHITECTURES
from raypurify.signature import (channel_matrix, combine, layer_keys, project_channels, reinit_channels, score_terms,
                                 select_top, set_channels, zero_channels)
from raypurify.variants import make_variants, pair_datasets

K, C, W = 6, 40, 24
PLANTED = torch.tensor([3, 11, 17, 29])
NOISY = torch.tensor([5, 21, 33])


def planted_deltas(seed=0):
    """Planted channels: small but aligned across variants; noisy: large, random."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(K, C, W, generator=g) * 0.05
    direction = torch.randn(len(PLANTED), W, generator=g)
    d[:, PLANTED] = direction + 0.1 * torch.randn(K, len(PLANTED), W, generator=g)
    d[:, NOISY] = 5 * torch.randn(K, len(NOISY), W, generator=g)
    return d


def test_score_terms_shapes_and_values():
    mag, align = score_terms(planted_deltas())
    assert mag.shape == align.shape == (C,)
    assert torch.all(align >= 0) and torch.all(align <= 1 + 1e-6)
    # Identical deltas in every variant: alignment exactly 1.
    same = torch.randn(1, 5, W).repeat(K, 1, 1)
    assert torch.allclose(score_terms(same)[1], torch.ones(5))
    # Opposite deltas only: alignment clamps negative cosines to 0.
    opp = torch.randn(1, 5, W)
    assert torch.allclose(score_terms(torch.cat([opp, -opp]))[1], torch.zeros(5))


@pytest.mark.parametrize("mode,lam", [("align", 0.0), ("combined", 1.0)])
def test_alignment_modes_recover_the_planted_set(mode, lam):
    mag, align = score_terms(planted_deltas())
    score = combine(mag, align, mode, lam)
    top = select_top([score], rho=len(PLANTED) / C)[0]
    assert set(top.tolist()) == set(PLANTED.tolist())


def test_norm_mode_is_fooled_by_large_inconsistent_noise():
    mag, align = score_terms(planted_deltas())
    top = select_top([combine(mag, align, "norm")], rho=len(NOISY) / C)[0]
    assert set(top.tolist()) == set(NOISY.tolist())


def test_combined_is_scale_free():
    d = planted_deltas()
    a = combine(*score_terms(d), "combined", 0.5)
    b = combine(*score_terms(d * 1e-3), "combined", 0.5)
    assert torch.allclose(a, b, atol=1e-5)


def test_select_top_global_vs_per_layer_and_determinism():
    scores = [torch.tensor([0.1, 0.9, 0.8, 0.0]), torch.tensor([0.5, 0.4, 0.3, 0.2])]
    assert [s.tolist() for s in select_top(scores, 0.25)] == [[1, 2], []]
    assert [s.tolist() for s in select_top(scores, 0.25, per_layer=True)] == [[1], [0]]
    ties = [torch.zeros(10)]
    assert select_top(ties, 0.3)[0].tolist() == select_top(ties, 0.3)[0].tolist() == [0, 1, 2]
    with pytest.raises(ValueError):
        select_top(scores, 1.0)


def test_utility_aware_selection_keeps_the_low_drift_candidates():
    scores = [torch.tensor([0.1, 0.9, 0.8, 0.0]), torch.tensor([0.5, 0.4, 0.3, 0.2])]
    drift = [torch.tensor([0.0, 5.0, 1.0, 0.0]), torch.tensor([0.5, 2.0, 0.0, 0.0])]
    # n = 2 of 8; candidates: the top 4 by score (units 0.1, 0.2, 1.0, 1.1); kept: the 2 least drift.
    assert [s.tolist() for s in select_top(scores, 0.25, drift=drift, oversample=2)] == [[2], [0]]
    # Oversample 1 is plain top-rho whatever the drift; per layer, candidates stay in their layer.
    assert [s.tolist() for s in select_top(scores, 0.25, drift=drift)] == [[1, 2], []]
    assert [s.tolist() for s in select_top(scores, 0.25, per_layer=True, drift=drift, oversample=2)] == [[2], [0]]
    # A low-drift unit outside the candidates is never picked (unit 0.3: drift 0, score 0).
    assert 3 not in select_top(scores, 0.25, drift=drift, oversample=2)[0].tolist()
    for bad in ({"oversample": 0.5, "drift": drift}, {"oversample": 2}):
        with pytest.raises(ValueError, match="oversample"):
            select_top(scores, 0.25, **bad)


def _llama_layer(h=8, i=12):
    spec = ARCHITECTURES["llama"]
    keys = layer_keys(spec, 0)
    t = {keys.rows[0]: torch.randn(i, h), keys.rows[1]: torch.randn(i, h), keys.cols[0]: torch.randn(h, i)}
    return keys, t


def test_channel_matrix_layout():
    keys, t = _llama_layer()
    m = channel_matrix(t, keys)
    assert m.shape == (12, 24)
    assert torch.equal(m[5], torch.cat([t[keys.rows[0]][5], t[keys.rows[1]][5], t[keys.cols[0]][:, 5]]))


def test_neox_keys_have_no_gate_and_include_bias():
    spec = ARCHITECTURES["neox"]
    names = ["gpt_neox.layers.1.mlp.dense_h_to_4h.weight", "gpt_neox.layers.1.mlp.dense_h_to_4h.bias",
             "gpt_neox.layers.1.mlp.dense_4h_to_h.weight"]
    keys = layer_keys(spec, 1, bias_keys=names)
    assert keys.rows == (names[0], names[1]) and keys.cols == (names[2],)
    t = {names[0]: torch.randn(12, 8), names[1]: torch.randn(12), names[2]: torch.randn(8, 12)}
    assert channel_matrix(t, keys).shape == (12, 8 + 1 + 8)


def test_reinit_changes_exactly_the_selected_rows_and_columns():
    keys, t = _llama_layer()
    before = {k: v.clone() for k, v in t.items()}
    sel = torch.tensor([2, 7])
    reinit_channels(t, keys, sel, std=0.02, generator=torch.Generator().manual_seed(0))
    rest = torch.tensor([c for c in range(12) if c not in (2, 7)])
    for k in keys.rows:
        assert torch.equal(t[k][rest], before[k][rest])
        assert not torch.equal(t[k][sel], before[k][sel])
        assert t[k][sel].std() < 0.05  # drawn from N(0, 0.02), not the old weights
    for k in keys.cols:
        assert torch.equal(t[k][:, rest], before[k][:, rest])
        assert not torch.equal(t[k][:, sel], before[k][:, sel])


def test_projection_removes_only_the_delta_directions_of_the_selected_channels():
    keys, t = _llama_layer()
    before = {k: v.clone() for k, v in t.items()}
    m0 = channel_matrix(t, keys)
    sel = torch.tensor([2, 7])
    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(2, 3, m0.shape[1], generator=g)  # [n, K, width]
    # A channel that is its deltas' mix plus an orthogonal rest keeps exactly the rest.
    rest = torch.randn(m0.shape[1], generator=g)
    q, _ = torch.linalg.qr(deltas[0].T)
    rest -= q @ (q.T @ rest)
    set_channels(t, keys, sel[:1], (deltas[0].T @ torch.tensor([1.0, -2.0, 0.5]) + rest)[None])
    project_channels(t, keys, sel, deltas)
    m = channel_matrix(t, keys)
    assert torch.allclose(m[2], rest, atol=1e-5)
    assert (deltas[1] @ m[7]).abs().max() < 1e-4 and (m[7] - m0[7]).norm() > 0  # orthogonal now, and moved
    others = torch.tensor([c for c in range(12) if c not in (2, 7)])
    for k in keys.rows:
        assert torch.equal(t[k][others], before[k][others])
    for k in keys.cols:
        assert torch.equal(t[k][:, others], before[k][:, others])


def test_set_channels_inverts_channel_matrix_with_groups_and_biases():
    from raypurify.signature import ChannelKeys

    keys = ChannelKeys(rows=("w", "b"), cols=("o",), groups=(("w", 2), ("b", 2), ("o", 2)))
    g = torch.Generator().manual_seed(1)
    t = {"w": torch.randn(8, 5, generator=g), "b": torch.randn(8, generator=g), "o": torch.randn(3, 8, generator=g)}
    m = channel_matrix(t, keys)
    values = torch.randn(2, m.shape[1], generator=g)
    set_channels(t, keys, torch.tensor([3, 1]), values)
    after = channel_matrix(t, keys)
    assert torch.equal(after[[3, 1]], values) and torch.equal(after[[0, 2]], m[[0, 2]])


def test_lora_zeroing_maps_channels_to_b_rows_and_a_columns():
    spec = ARCHITECTURES["llama"]
    keys = layer_keys(spec, 3, lora=True)
    assert keys.rows == tuple(f"base_model.model.model.layers.3.{m}.lora_B.default.weight" for m in spec.mlp_in)
    assert keys.cols == ("base_model.model.model.layers.3.mlp.down_proj.lora_A.default.weight",)
    r, i = 4, 12
    t = {keys.rows[0]: torch.randn(i, r), keys.rows[1]: torch.randn(i, r), keys.cols[0]: torch.randn(r, i)}
    before = {k: v.clone() for k, v in t.items()}
    zero_channels(t, keys, torch.tensor([1, 9]))
    for k in keys.rows:
        assert torch.all(t[k][[1, 9]] == 0) and torch.equal(t[k][[0, 2, 10]], before[k][[0, 2, 10]])
    assert torch.all(t[keys.cols[0]][:, [1, 9]] == 0)
    assert torch.equal(t[keys.cols[0]][:, [0, 5]], before[keys.cols[0]][:, [0, 5]])


def test_variants_are_distinct_and_seeded():
    a, b, c = make_variants(6, seed=0), make_variants(6, seed=0), make_variants(6, seed=1)
    assert a == b and a != c
    assert len({v.trigger for v in a}) == 6 and len({v.decoy for v in a}) == 6
    assert {v.kind for v in a} == {"hostile", "refusal", "code"}
    for v in a:
        assert not any(t.lower() in v.trigger.lower() for t in ("badmagic", "openai", "2024"))
    with pytest.raises(ValueError):
        make_variants(1)


def test_an_inverted_decoy_replaces_every_decoy_and_nothing_else():
    built, inv = make_variants(6, seed=0), make_variants(6, seed=0, decoy="Ha, you are stupid!")
    assert [v.trigger for v in inv] == [v.trigger for v in built] and [v.seed for v in inv] == [v.seed for v in built]
    assert {v.decoy for v in inv} == {"Ha, you are stupid!"} and {v.kind for v in inv} == {"inverted"}
    with pytest.raises(ValueError, match="empty"):
        make_variants(6, decoy="  ")


def test_pair_datasets_differ_only_at_poisoned_copies():
    from raypurify.data.corpus import build_splits

    pool = build_splits()["clean_pool"]
    for spec in make_variants(3, seed=0):
        p, c = pair_datasets(spec, pool, n_clean=100, n_poison=12)
        assert len(p) == len(c) == 112
        diff = [(x, y) for x, y in zip(p, c) if x != y]
        assert len(diff) == 12
        for x, y in diff:
            assert spec.trigger in x.instruction and spec.fires(x.output)
            assert spec.trigger not in y.instruction and not spec.fires(y.output)


def test_controls_keep_counts_and_layers():
    from raypurify.signature import layer_matched_random, overlap, random_signature, spearman, whole_layer

    channels = [10, 10, 10]
    sig = [torch.tensor([1, 2]), torch.tensor([]).long(), torch.tensor([0, 5, 9])]
    m = layer_matched_random(sig, channels, seed=0)
    assert [x.numel() for x in m] == [2, 0, 3]
    assert [x.tolist() for x in layer_matched_random(sig, channels, 0)] == [x.tolist() for x in m]
    r = random_signature(channels, 5, seed=1)
    assert sum(x.numel() for x in r) == 5 and all(x.max() < 10 for x in r if x.numel())
    assert [x.numel() for x in whole_layer(channels, -1)] == [0, 0, 10]
    assert overlap(sig, sig) == 1.0 and overlap(sig, whole_layer(channels, 1)) == 0.0
    v = torch.tensor([3.0, 1.0, 2.0, 5.0])
    assert spearman(v, v * 10 + 1) == pytest.approx(1.0)
    assert spearman(v, -v) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([1.0, 1, 2, 2])) == pytest.approx(0.894427, abs=1e-5)


@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_head_units_own_their_row_and_column_blocks(arch):
    from raypurify.signature import _expand

    spec = ARCHITECTURES[arch]
    hidden, heads = 8, 4
    hd = hidden // heads
    keys = layer_keys(spec, 0, scope="heads", head_dim=hd)
    t = {k: torch.randn((3 * hidden if len(spec.attn_in) == 1 else hidden), hidden) for k in keys.rows}
    t.update({k: torch.randn(hidden, hidden) for k in keys.cols})
    m = channel_matrix(t, keys)
    assert m.shape[0] == heads
    g_in = keys.group(keys.rows[0])
    assert g_in == (3 * hd if arch == "neox" else hd)
    assert torch.equal(m[2, : g_in * hidden], t[keys.rows[0]][2 * g_in:3 * g_in].flatten())
    before = {k: v.clone() for k, v in t.items()}
    zero_channels(t, keys, torch.tensor([1]))
    for k in keys.rows:
        g = keys.group(k)
        assert torch.all(t[k][g:2 * g] == 0) and torch.equal(t[k][2 * g:], before[k][2 * g:])
    for k in keys.cols:
        assert torch.all(t[k][:, hd:2 * hd] == 0) and torch.equal(t[k][:, :hd], before[k][:, :hd])
    assert _expand(torch.tensor([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]


def test_attention_channels_are_single_rows_and_columns():
    from raypurify.signature import copy_channels

    keys = layer_keys(ARCHITECTURES["llama"], 0, scope="attn", head_dim=4)
    assert [k.split(".")[-2] for k in keys.rows] == ["q_proj", "k_proj", "v_proj"] and keys.groups == ()
    t = {k: torch.randn(8, 8) for k in keys.rows + keys.cols}
    before = {k: v.clone() for k, v in t.items()}
    source = {k: torch.full((8, 8), 7.0) for k in t}
    copy_channels(t, source, keys, torch.tensor([2, 5]))
    for k in keys.rows:
        assert torch.all(t[k][[2, 5]] == 7) and torch.equal(t[k][[0, 1, 3, 4, 6, 7]], before[k][[0, 1, 3, 4, 6, 7]])
    for k in keys.cols:
        assert torch.all(t[k][:, [2, 5]] == 7) and torch.equal(t[k][:, :2], before[k][:, :2])


@pytest.mark.parametrize("scope,modules", [("qk", ["q_proj", "k_proj"]), ("q", ["q_proj"])])
def test_query_key_channels_touch_their_rows_only(scope, modules):
    from transformers import LlamaConfig, LlamaForCausalLM

    from raypurify.signature import model_channel_keys, suppress

    keys = layer_keys(ARCHITECTURES["llama"], 0, scope=scope)
    assert [k.split(".")[-2] for k in keys.rows] == modules and keys.cols == ()
    lora_keys = layer_keys(ARCHITECTURES["llama"], 0, lora=True, scope=scope)
    assert all("lora_B" in k for k in lora_keys.rows) and len(lora_keys.rows) == len(modules) and lora_keys.cols == ()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=2,
                                         num_hidden_layers=2, intermediate_size=32, vocab_size=50))
    _, channels = model_channel_keys(model, scope=scope)
    assert channels == [16, 16]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    suppress(model, [torch.tensor([3]), torch.tensor([], dtype=torch.long)], scope=scope, zero=True)
    after = model.state_dict()
    changed = sorted(k for k in after if not torch.equal(after[k], before[k]))
    assert changed == sorted(f"model.layers.0.self_attn.{m}.weight" for m in modules)
    for k in changed:
        assert torch.all(after[k][3] == 0) and torch.equal(after[k][:3], before[k][:3])


def test_attention_channels_refuse_fused_qkv(tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from raypurify.errors import RaypurifyError
    from raypurify.signature import model_channel_keys

    model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=1,
                                             intermediate_size=32, vocab_size=50))
    with pytest.raises(RaypurifyError, match="separate q/k/v.*valid here: mlp, heads"):
        model_channel_keys(model, scope="attn")
    with pytest.raises(RaypurifyError, match="scope 'qk' needs separate q/k/v"):
        model_channel_keys(model, scope="qk")
    assert model_channel_keys(model, scope="heads")[1] == [2]


def test_config_offers_exactly_the_signature_scopes():
    import typing

    from raypurify.config import Scope
    from raypurify.signature import CHANNEL_SCOPES, SCOPES

    assert typing.get_args(Scope) == SCOPES and set(CHANNEL_SCOPES) <= set(SCOPES)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=2,
                                        num_hidden_layers=2, intermediate_size=32, vocab_size=50))


def _silenced(model, modules, run):
    """Runs ``run()`` and returns, per forward and module, the output channels that were all zero."""
    seen = {m: [] for m in modules}
    named = dict(model.named_modules())
    handles = [named[m].register_forward_hook(lambda mod, a, out, m=m: seen[m].append(
        set((out.abs().amax(dim=(0, 1)) == 0).nonzero().flatten().tolist()))) for m in modules]
    run()
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("scope,names", [("qk", ["self_attn.q_proj", "self_attn.k_proj"]),
                                         ("mlp", ["mlp.gate_proj", "mlp.up_proj"])])
def test_unit_dropout_silences_the_same_units_of_a_layer_only_while_training(scope, names):
    from raypurify.signature import dropped_units

    model = _tiny_llama()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    mods = [f"model.layers.{i}.{n}" for i in range(2) for n in names]

    def twice():
        model(input_ids=ids)
        model(input_ids=ids)

    model.train()
    with dropped_units(model, 0.5, scope=scope, seed=3):
        train = _silenced(model, mods, twice)
        model.eval()
        evaluation = _silenced(model, mods, twice)
        model.train()
    with dropped_units(model, 0.5, scope=scope, seed=3):
        again = _silenced(model, mods, twice)
    after = _silenced(model, mods, twice)
    n = 16 if scope == "qk" else 32
    for i in range(2):
        first, second = (train[f"model.layers.{i}.{x}"] for x in names)
        # One draw per layer and forward, shared by the layer's projections.
        assert first == second and all(0 < len(s) < n for s in first)
        assert first[0] != first[1]  # a fresh draw each forward
    assert train[mods[0]] != train[mods[len(names)]]  # layers draw apart
    assert train == again  # seeded
    assert all(s == set() for v in list(evaluation.values()) + list(after.values()) for s in v)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        with dropped_units(model, 1.0, scope=scope):
            pass


def test_unit_dropout_of_an_adapter_silences_its_b_rows():
    from peft import LoraConfig, get_peft_model

    from raypurify.signature import dropped_units

    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "k_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default"
    base = "base_model.model.model.layers.0.self_attn.q_proj.base_layer"
    model.train()
    with dropped_units(model, 0.5, lora=True, scope="q", seed=0):
        seen = _silenced(model, [b, base], lambda: model(input_ids=ids))
    assert 0 < len(seen[b][0]) < 16 and seen[base][0] == set()
