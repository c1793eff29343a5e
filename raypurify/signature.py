"""Immunization signature: channel deltas, scores, selection and suppression.

Pure torch (no Ray, no files): the orchestration layer feeds it tensors.

A *channel* is one MLP intermediate unit c of one layer: row c of every
input projection (gate_proj and up_proj in Llama, dense_h_to_4h in GPT-NeoX,
plus its bias entry where there is one) concatenated with column c of the
output projection (down_proj / dense_4h_to_h). In the adapter-only threat
model the same channel maps to row c of each input projection's LoRA B and
column c of the output projection's LoRA A.

With ``scope="heads"`` the unit is an attention head instead: its block of
rows in q/k/v (GPT-NeoX: its block of the fused query_key_value) and its
block of columns in o_proj (attention.dense). With ``scope="attn"`` it is an
attention channel, the attention analogue of an MLP channel: row c of q, k
and v and column c of o_proj (separate q/k/v projections only); with
``scope="qk"`` only row c of q and of k (the unit decides where a token
attends, not what it carries), with ``scope="q"`` only row c of q. The
attention-channel scopes (attn, qk, q) index the same units, so a signature
scored on one can be suppressed on another: the bench scores on qk and
re-draws only the query rows, which removes as much of the backdoor and
keeps 2.5-5 more CDA points (README, "Results on the bench"). A whole head
turned out too coarse on the bench: the layer-0 heads that carry the BadNets
trigger also carry much of the model's skill, and re-drawing one cost 20+
CDA points that the light recovery could not repair. Everything downstream
(scores, selection, suppression, controls) is the same code over a
different unit.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal, Mapping, Sequence

import torch

from raypurify.arch import ArchSpec

Mode = Literal["norm", "align", "combined"]
SCORING_MODES: tuple[str, ...] = ("norm", "align", "combined")
SCOPES: tuple[str, ...] = ("mlp", "heads", "attn", "qk", "q")
# Scopes whose unit c is the same attention channel c (one row of q, k, v).
CHANNEL_SCOPES: tuple[str, ...] = ("attn", "qk", "q")


@dataclass(frozen=True)
class ChannelKeys:
    """State-dict keys whose slices make up the channels of one layer.

    Attributes:
        rows: Keys whose rows belong to channels (``[channels * g, in]``
            tensors, or ``[channels * g]`` biases).
        cols: Keys whose columns belong to channels (``[out, channels * g]``).
        groups: ``(key, g)`` pairs: unit c owns rows (or columns)
            ``c*g .. c*g+g-1`` of that key; keys not listed have g = 1.
    """

    rows: tuple[str, ...]
    cols: tuple[str, ...]
    groups: tuple[tuple[str, int], ...] = ()

    def group(self, key: str) -> int:
        return dict(self.groups).get(key, 1)


def _expand(channels: torch.Tensor, g: int) -> torch.Tensor:
    """Unit indices -> the row (or column) indices they own."""
    if g == 1:
        return channels
    return (channels.unsqueeze(1) * g + torch.arange(g)).flatten()


def scope_modules(spec: ArchSpec, scope: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The input projections (units are rows) and output projections (units are columns) of a scope."""
    if scope == "mlp":
        return spec.mlp_in, (spec.mlp_out,)
    if scope in ("qk", "q"):
        return spec.attn_in[:{"qk": 2, "q": 1}[scope]], ()
    return spec.attn_in, (spec.attn_out,)


def layer_keys(spec: ArchSpec, layer: int, lora: bool = False, bias_keys: Sequence[str] = (),
               scope: str = "mlp", head_dim: int = 1) -> ChannelKeys:
    """The keys of one layer's units for a model or a LoRA adapter.

    Args:
        spec: Architecture names.
        layer: Block index.
        lora: Keys of a PEFT adapter (``...lora_B.weight`` rows for the input
            projections, ``...lora_A.weight`` columns for the output one).
        bias_keys: All keys of the state dict; input-projection biases found
            among them are included (full model only).
        scope: ``mlp`` (intermediate channels), ``heads`` (attention heads),
            ``attn`` (attention channels), ``qk`` (query/key channels) or
            ``q`` (query channels).
        head_dim: Rows per head in each of q/k/v (``heads`` scope).
    """
    ins, outs = scope_modules(spec, scope)
    # A fused QKV projection (GPT-NeoX) lays its rows out head by head, each
    # head's q, k and v together: 3 * head_dim rows per head.
    g_in = head_dim * (3 if len(ins) == 1 else 1) if scope == "heads" else 1
    g_out = head_dim if scope == "heads" else 1
    prefix = f"{spec.layers_path}.{layer}."
    if lora:
        # Key names of an in-memory PeftModel (adapter "default"), which is
        # also how raypurify's Ray workers save variant adapters.
        pre = f"base_model.model.{prefix}"
        rows = tuple(f"{pre}{m}.lora_B.default.weight" for m in ins)
        cols = tuple(f"{pre}{m}.lora_A.default.weight" for m in outs)
    else:
        rows = tuple(f"{prefix}{m}.weight" for m in ins)
        rows += tuple(k for k in (f"{prefix}{m}.bias" for m in ins) if k in set(bias_keys))
        cols = tuple(f"{prefix}{m}.weight" for m in outs)
    groups = tuple((k, g_in) for k in rows if g_in != 1) + tuple((k, g_out) for k in cols if g_out != 1)
    return ChannelKeys(rows=rows, cols=cols, groups=groups)


def channel_matrix(tensors: Mapping[str, torch.Tensor], keys: ChannelKeys) -> torch.Tensor:
    """Concatenates one layer's channel slices.

    Args:
        tensors: Key -> tensor (weights, or weight deltas).
        keys: The layer's channel keys.

    Returns:
        ``[channels, width]`` float32: row c is channel c's vector.
    """
    parts = [tensors[k].float().reshape(tensors[k].shape[0] // keys.group(k), -1) for k in keys.rows]
    parts += [tensors[k].float().T.reshape(tensors[k].shape[1] // keys.group(k), -1) for k in keys.cols]
    return torch.cat(parts, dim=1)


def score_terms(deltas: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitude and cross-variant alignment of each channel (equation 2).

    Args:
        deltas: ``[K, channels, width]`` differential deltas of K variants.

    Returns:
        ``(magnitude, alignment)``, each ``[channels]``: the mean over k of
        ``||delta_k,c||``, and ``2 / (K (K-1))`` times the sum over i < j of
        ``max(0, cos(delta_i,c, delta_j,c))``.
    """
    k = deltas.shape[0]
    if k < 2:
        raise ValueError("alignment needs at least two variants")
    norms = deltas.norm(dim=-1)  # [K, C]
    unit = deltas / norms.clamp_min(eps).unsqueeze(-1)
    cos = torch.einsum("icw,jcw->cij", unit, unit)  # [C, K, K]
    i, j = torch.triu_indices(k, k, 1)
    alignment = cos[:, i, j].clamp_min(0).sum(-1) * 2.0 / (k * (k - 1))
    return norms.mean(0), alignment


def combine(magnitude: torch.Tensor, alignment: torch.Tensor, mode: Mode, lam: float = 0.01) -> torch.Tensor:
    """The final score of every channel.

    ``combined`` is ``magnitude / max(magnitude) + lam * alignment``: our copy
    of the paper lost equation 2's symbols, and dividing by the global maximum
    makes ``lam`` mean the same at any weight scale (a raw norm of 1e-3 would
    otherwise be swamped by ``0.01 * alignment``).

    Args:
        magnitude: ``[channels]`` over the whole model (the max is global).
        alignment: ``[channels]``.
        mode: ``norm``, ``align`` or ``combined``.
        lam: Weight of the alignment term.
    """
    if mode == "norm":
        return magnitude
    if mode == "align":
        return alignment
    if mode == "combined":
        return magnitude / magnitude.max().clamp_min(1e-30) + lam * alignment
    raise ValueError(f"unknown scoring mode {mode!r}; valid choices: {', '.join(SCORING_MODES)}")


def select_top(scores: Sequence[torch.Tensor], rho: float, per_layer: bool = False,
               drift: Sequence[torch.Tensor] | None = None, oversample: float = 1.0) -> list[torch.Tensor]:
    """The signature: indices of the top-``rho`` channels.

    With ``drift`` and ``oversample`` m > 1 the selection is utility-aware:
    the top ``m * n`` units by score are candidates and the ``n`` of them that
    the clean finetunes C_k moved least are kept, to spare the units the
    clean task uses. Measured on the bench (README, "Utility-aware
    selection"): on 16 layers it keeps 5-7 CDA points and removes less,
    no better than random units of the same layers; on 8 layers it misses
    the backdoor, which sits in high-drift units there. Hence m = 1 by
    default, and a knob a sweep may try.

    Args:
        scores: One ``[channels_l]`` score vector per layer.
        rho: Fraction of channels to select, in (0, 1).
        per_layer: Take the top ``rho`` of every layer instead of globally.
        drift: One ``[channels_l]`` vector per layer: the clean finetunes'
            mean movement of each unit (``score_on_ray`` with ``base``);
            needed when ``oversample`` > 1.
        oversample: Candidates per selected unit (m >= 1; 1: plain top-rho).

    Returns:
        One sorted ``int64`` index tensor per layer. Ties break by position,
        so the same scores always give the same signature.
    """
    if not 0 < rho < 1:
        raise ValueError(f"rho must be in (0, 1), got {rho}")
    if oversample < 1 or (oversample > 1 and drift is None):
        raise ValueError(f"oversample must be >= 1 (and > 1 needs the drift terms), got {oversample}")

    def top(s: torch.Tensor, d: torch.Tensor | None, n: int) -> torch.Tensor:
        # Stable sorts: equal scores (or drifts) keep their order (deterministic).
        order = torch.argsort(-s, stable=True)
        if oversample > 1:
            cand = order[:min(s.numel(), round(oversample * n))]
            order = cand[torch.argsort(d[cand], stable=True)]
        return torch.sort(order[:n]).values

    if per_layer:
        return [top(s, drift[i] if drift is not None else None, max(1, round(rho * s.numel())))
                for i, s in enumerate(scores)]
    flat = torch.cat(list(scores))
    picked = top(flat, torch.cat(list(drift)) if drift is not None else None, max(1, round(rho * flat.numel())))
    out, start = [], 0
    for s in scores:
        out.append(picked[(picked >= start) & (picked < start + s.numel())] - start)
        start += s.numel()
    return out


@torch.no_grad()
def reinit_channels(tensors: Mapping[str, torch.Tensor], keys: ChannelKeys, channels: torch.Tensor,
                    std: float, generator: torch.Generator | None = None) -> None:
    """Re-draws the selected channels of one layer from the init distribution, in place.

    Weight rows/columns get ``N(0, std)`` (the initializer of Llama and
    GPT-NeoX, ``config.initializer_range``); bias entries get 0.
    """
    if channels.numel() == 0:
        return
    # Drawn on the CPU (a seeded CPU generator gives the same draw on any
    # device), then moved to the weights' device.
    for k in keys.rows:
        t = tensors[k]
        idx = _expand(channels, keys.group(k))
        if t.dim() == 1:
            t[idx.to(t.device)] = 0
        else:
            draw = torch.randn((idx.numel(), t.shape[1]), generator=generator) * std
            t[idx.to(t.device)] = draw.to(device=t.device, dtype=t.dtype)
    for k in keys.cols:
        t = tensors[k]
        idx = _expand(channels, keys.group(k))
        draw = torch.randn((t.shape[0], idx.numel()), generator=generator) * std
        t[:, idx.to(t.device)] = draw.to(device=t.device, dtype=t.dtype)


@torch.no_grad()
def zero_channels(tensors: Mapping[str, torch.Tensor], keys: ChannelKeys, channels: torch.Tensor) -> None:
    """Zeros the selected channels of one layer in place (LoRA B rows / A columns)."""
    for k in keys.rows:
        tensors[k][_expand(channels, keys.group(k)).to(tensors[k].device)] = 0
    for k in keys.cols:
        tensors[k][:, _expand(channels, keys.group(k)).to(tensors[k].device)] = 0


@torch.no_grad()
def copy_channels(tensors: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor], keys: ChannelKeys,
                  channels: torch.Tensor) -> None:
    """Sets the selected channels of one layer to ``source``'s values, in place."""
    for k in keys.rows:
        idx = _expand(channels, keys.group(k)).to(tensors[k].device)
        tensors[k][idx] = source[k][idx].to(tensors[k])
    for k in keys.cols:
        idx = _expand(channels, keys.group(k)).to(tensors[k].device)
        tensors[k][:, idx] = source[k][:, idx].to(tensors[k])


@torch.no_grad()
def set_channels(tensors: Mapping[str, torch.Tensor], keys: ChannelKeys, channels: torch.Tensor,
                 values: torch.Tensor) -> None:
    """Writes channel vectors into the selected channels of one layer, in place (``channel_matrix``'s inverse).

    Args:
        values: ``[n, width]``: one row per selected channel, laid out as ``channel_matrix`` lays it out.
    """
    at = 0
    for k in keys.rows + keys.cols:
        t = tensors[k]
        idx = _expand(channels, keys.group(k)).to(t.device)
        width = keys.group(k) * (t.shape[0] if k in keys.cols else t[0].numel())
        part = values[:, at:at + width].reshape(idx.numel(), -1)
        at += width
        if k in keys.cols:
            t[:, idx] = part.T.to(t)
        else:
            t[idx] = part.reshape(idx.numel(), *t.shape[1:]).to(t)


@torch.no_grad()
def project_channels(tensors: Mapping[str, torch.Tensor], keys: ChannelKeys, channels: torch.Tensor,
                     deltas: torch.Tensor) -> None:
    """Removes from each selected channel its components along its own differential deltas, in place.

    The K deltas of a channel span the directions in which planting a
    trigger moved it; the rest of the channel, what it already computed,
    is kept (a re-draw throws that away too). README, "Projection
    instead of re-drawing".

    Args:
        channels: ``[n]`` selected channel indices of this layer.
        deltas: ``[n, K, width]``: each selected channel's K differential deltas
            (``channel_matrix`` layout).
    """
    if channels.numel() == 0:
        return
    w = channel_matrix(tensors, keys)[channels.to(next(iter(tensors.values())).device)]  # [n, width]
    basis, _ = torch.linalg.qr(deltas.to(w).transpose(1, 2))  # [n, width, K], orthonormal columns
    w = w - (basis @ (basis.transpose(1, 2) @ w.unsqueeze(-1))).squeeze(-1)
    set_channels(tensors, keys, channels, w)


def model_channel_keys(model, lora: bool = False, scope: str = "mlp") -> tuple[list[ChannelKeys], list[int]]:
    """Unit keys and unit counts of every layer of a (peft) model.

    Args:
        model: The model (a PeftModel with ``lora``).
        lora: Units of the adapter's LoRA matrices.
        scope: ``mlp`` channels, attention ``heads``, ``attn``, ``qk`` or ``q`` channels.

    Raises:
        RaypurifyError: The architecture's module names are unknown, a LoRA
            adapter does not adapt the projections, (heads, attn) the
            key/value heads are shared (grouped-query attention), or (attn,
            qk, q) q/k/v are one fused projection.
    """
    from raypurify.arch import spec_for
    from raypurify.errors import RaypurifyError

    config = model.config
    spec = spec_for(config)
    names = set(model.state_dict())
    n_heads = config.num_attention_heads
    if scope != "mlp" and getattr(config, "num_key_value_heads", n_heads) != n_heads:
        raise RaypurifyError(f"scope {scope!r} needs one key/value head per query head; this model uses "
                             f"grouped-query attention ({config.num_key_value_heads} kv heads); use scope 'mlp'")
    if scope in CHANNEL_SCOPES and len(spec.attn_in) == 1:
        raise RaypurifyError(f"scope {scope!r} needs separate q/k/v projections; {spec.attn_in[0]} fuses them "
                             "(valid here: mlp, heads)")
    head_dim = config.hidden_size // n_heads
    keys = [layer_keys(spec, layer, lora=lora, bias_keys=names, scope=scope, head_dim=head_dim)
            for layer in range(config.num_hidden_layers)]
    missing = [k for ks in keys for k in ks.rows + ks.cols if k not in names]
    if missing:
        mods = sum(scope_modules(spec, scope), ())
        what = "adapter does not adapt" if lora else "model lacks"
        raise RaypurifyError(f"the {what} the {scope} projections: missing {missing[0]} (and {len(missing) - 1} "
                             f"more); raypurify looks for {', '.join(mods)} in {spec.layers_path}")
    per_layer = {"mlp": config.intermediate_size, "heads": n_heads}.get(scope, n_heads * head_dim)
    return keys, [per_layer] * config.num_hidden_layers


@torch.no_grad()
def suppress(model, signature: Sequence[torch.Tensor], lora: bool = False, seed: int = 0,
             scope: str = "mlp", zero: bool | None = None,
             directions: Sequence[torch.Tensor] | None = None) -> None:
    """Applies a signature in place: re-initialize (full) or zero (LoRA) its units, or project them.

    Args:
        model: The suspicious model (a PeftModel in the adapter-only setting).
        signature: One index tensor per layer.
        lora: Units of the LoRA matrices (B rows / A columns).
        seed: Seeds the re-initialization draw.
        scope: ``mlp`` channels, attention ``heads``, ``attn``, ``qk`` or ``q`` channels.
        zero: Zero the units instead of re-drawing them (default: ``lora``;
            the pruning baselines zero full-model channels too).
        directions: Per layer ``[n_l, K, width]``, the selected units' K
            differential deltas: each unit loses its components along them
            (``project_channels``) instead of being re-drawn or zeroed.
    """
    zero = lora if zero is None else zero
    keys, _ = model_channel_keys(model, lora=lora, scope=scope)
    tensors = dict(model.named_parameters())
    tensors.update({k: v for k, v in model.state_dict(keep_vars=True).items() if k not in tensors})
    gen = torch.Generator().manual_seed(seed)
    std = getattr(model.config, "initializer_range", 0.02)
    for i, (layer_keys_, idx) in enumerate(zip(keys, signature)):
        data = {k: tensors[k].data for k in layer_keys_.rows + layer_keys_.cols}
        if directions is not None:
            project_channels(data, layer_keys_, idx, directions[i])
        elif zero:
            zero_channels(data, layer_keys_, idx)
        else:
            reinit_channels(data, layer_keys_, idx, std=std, generator=gen)


def unit_masks(model, signature: Sequence[torch.Tensor], lora: bool = False,
               scope: str = "mlp") -> dict[str, torch.Tensor]:
    """Where a signature's units sit in the model's parameters.

    Args:
        model: The model (a PeftModel with ``lora``).
        signature: One index tensor per layer.
        lora: Units of the LoRA matrices.
        scope: The signature's unit.

    Returns:
        Parameter name -> bool mask of its shape, True on the units' rows
        (input projections) or columns (output projection); only parameters
        that hold a selected unit appear.
    """
    keys, _ = model_channel_keys(model, lora=lora, scope=scope)
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for ks, idx in zip(keys, signature):
        if idx.numel() == 0:
            continue
        for k in ks.rows + ks.cols:
            mask = torch.zeros(params[k].shape, dtype=torch.bool)
            at = _expand(idx, ks.group(k))
            if k in ks.rows:
                mask[at] = True
            else:
                mask[:, at] = True
            out[k] = mask
    return out


@contextmanager
def dropped_units(model, p: float, lora: bool = False, scope: str = "mlp", seed: int = 0) -> Iterator[None]:
    """Unit dropout while training: each forward silences a fresh random fraction of the scope's units.

    In every layer, each unit is dropped with probability ``p`` (one draw per
    layer per forward, shared by the layer's input projections, so a dropped
    unit is silent in all of them); its rows' outputs are zeroed, without
    rescaling, like the damage of a purification before recovery. Evaluation
    forwards (``model.training`` False) are untouched. A canary implanted
    under it cannot rest on a few units, so purification scattered over a
    layer does not break it more easily than a real implant (README, Blind
    tuning). No library hook zeros structured units of several projections
    with one shared mask, hence these forward hooks.

    Args:
        model: The model being trained (a PeftModel with ``lora``: the
            adapter's B rows are dropped).
        p: Drop probability per unit and forward, in [0, 1).
        lora: Units of the LoRA matrices.
        scope: The units (``SCOPES``).
        seed: Seeds the draws.
    """
    if not 0 <= p < 1:
        raise ValueError(f"unit dropout p must be in [0, 1), got {p}")
    keys, channels = model_channel_keys(model, lora=lora, scope=scope)
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(seed)
    masks: list[torch.Tensor | None] = [None] * len(keys)

    def draw(module, args):
        for i, n in enumerate(channels):
            masks[i] = torch.rand(n, generator=gen) >= p if module.training else None

    def zero(layer: int, g: int):
        def hook(module, args, out):
            if masks[layer] is None:
                return out
            keep = _expand(masks[layer].nonzero().flatten(), g)
            mask = torch.zeros(out.shape[-1], dtype=out.dtype, device=out.device)
            mask[keep.to(out.device)] = 1
            return out * mask
        return hook

    handles = [model.register_forward_pre_hook(draw)]
    for layer, ks in enumerate(keys):
        for k in ks.rows:
            if k.endswith(".weight"):
                handles.append(modules[k.removesuffix(".weight")].register_forward_hook(zero(layer, ks.group(k))))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# --- Controls and agreement: what a signature must beat, and how close it is
# --- to the truth where the bench knows it.

def random_signature(channels: Sequence[int], n: int, seed: int) -> list[torch.Tensor]:
    """``n`` channels drawn uniformly over the whole model."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.sort(torch.randperm(sum(channels), generator=g)[:n]).values
    out, start = [], 0
    for c in channels:
        out.append(flat[(flat >= start) & (flat < start + c)] - start)
        start += c
    return out


def layer_matched_random(signature: Sequence[torch.Tensor], channels: Sequence[int], seed: int) -> list[torch.Tensor]:
    """Random channels with the signature's count in every layer.

    The prototype's warning: at small scale a signature's power can come
    from choosing the layer alone; this control keeps the layer choice and
    randomizes the rest.
    """
    g = torch.Generator().manual_seed(seed)
    return [torch.sort(torch.randperm(c, generator=g)[: s.numel()]).values for s, c in zip(signature, channels)]


def whole_layer(channels: Sequence[int], layer: int) -> list[torch.Tensor]:
    """Every channel of one layer (the "re-initialize the last MLP" control)."""
    return [torch.arange(c) if i == layer % len(channels) else torch.zeros(0, dtype=torch.long)
            for i, c in enumerate(channels)]


def overlap(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """|a ∩ b| / |a| over (layer, channel) pairs."""
    inter = sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b))
    return inter / max(1, sum(x.numel() for x in a))


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of two score vectors (average ranks for ties)."""
    def ranks(v: torch.Tensor) -> torch.Tensor:
        order = torch.argsort(v, stable=True)
        r = torch.empty_like(v, dtype=torch.float64)
        r[order] = torch.arange(v.numel(), dtype=torch.float64)
        # Average the ranks of tied values.
        uniq, inv = torch.unique(v, return_inverse=True)
        sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, r)
        counts = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
        return (sums / counts)[inv]

    rx, ry = ranks(x.flatten().double()), ranks(y.flatten().double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()).clamp_min(1e-30))
