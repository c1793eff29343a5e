"""Where does a bench backdoor live? Swap the clean twin's weights in, one part at a time.

The bench knows what no defender does: the clean twin (the same attack run
with the poisoned samples replaced by their clean originals). Putting the
twin's values of one part (a layer's attention, a layer's MLP, one head)
into the suspicious model and measuring the attack success rate shows which
parts the backdoor needs. Re-initializing the same part (what a
purification does) is measured beside it. This is a bench diagnostic, not a
defense: it is how the README's "Why the signature missed" was found.

Pure torch on top of the shared evaluation (no Ray).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from raypurify.arch import spec_for
from raypurify.signature import copy_channels, model_channel_keys, reinit_channels

Edit = Callable[[dict[str, torch.Tensor]], None]


def parts(model) -> dict[str, list[str]]:
    """Named groups of state-dict keys: embeddings, and each layer's attention and MLP.

    Returns:
        ``{"embed": [...], "L0 attn": [...], "L0 mlp": [...], ...}``.
    """
    spec = spec_for(model.config)
    keys = list(model.state_dict())
    out = {"embed": [k for k in keys if "embed" in k]}
    for layer in range(model.config.num_hidden_layers):
        pre = f"{spec.layers_path}.{layer}."
        for name, mods in (("attn", spec.attn_in + (spec.attn_out,)), ("mlp", spec.mlp_in + (spec.mlp_out,))):
            out[f"L{layer} {name}"] = [k for k in keys if k.startswith(pre) and any(f".{m}." in f".{k[len(pre):]}"
                                                                                    for m in mods)]
    return out


def swap(twin: dict[str, torch.Tensor], keys: Sequence[str]) -> Edit:
    """An edit that puts the twin's values of ``keys`` into a state dict."""
    def edit(state):
        for k in keys:
            state[k] = twin[k].clone()
    return edit


def head_edits(model, twin: dict[str, torch.Tensor], layer: int, seed: int = 0) -> dict[str, Edit]:
    """Per head of one layer: swap in the twin's head, or re-draw it from the init distribution."""
    keys, counts = model_channel_keys(model, scope="heads")
    ks = keys[layer]
    std = getattr(model.config, "initializer_range", 0.02)
    edits: dict[str, Edit] = {}
    for h in range(counts[layer]):
        idx = torch.tensor([h])

        def from_twin(state, idx=idx):
            copy_channels(state, twin, ks, idx)

        def redraw(state, idx=idx):
            reinit_channels({k: state[k] for k in ks.rows + ks.cols}, ks, idx, std=std,
                            generator=torch.Generator().manual_seed(seed))

        edits[f"L{layer} head {h} <- twin"] = from_twin
        edits[f"L{layer} head {h} re-drawn"] = redraw
    return edits


@torch.no_grad()
def measure_edits(model, edits: dict[str, Edit], asr: Callable[[], float]) -> list[dict]:
    """Applies each edit to a fresh copy of the weights and measures ``asr()``.

    Returns:
        One ``{"part", "asr"}`` row per edit, in order; the model is left as it was.
    """
    original = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for name, edit in edits.items():
        state = {k: v.clone() for k, v in original.items()}
        edit(state)
        model.load_state_dict(state)
        rows.append({"part": name, "asr": asr()})
    model.load_state_dict(original)
    return rows
