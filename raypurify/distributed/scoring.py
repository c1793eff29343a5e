"""Channel scoring on Ray Data: deltas streamed block by block into an actor pool.

A row is one block of channels (a layer, or a slice of a wide layer's
channels). The scoring actor opens the 2K safetensors files (and the base
model's slices, for the clean drift) lazily and reads only the block's
slices, so its peak memory is about ``2K x block`` tensors, never K copies
of the model. Per-channel magnitude, alignment and clean drift come back
to the driver, which combines them (the ``combined`` mode needs the global
maximum) and selects the signature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import ray
import torch

from raypurify.signature import ChannelKeys, channel_matrix, score_terms


@dataclass(frozen=True)
class Block:
    """Channels ``[start, stop)`` of one layer."""

    layer: int
    start: int
    stop: int


def read_block(path: str, keys: ChannelKeys, start: int, stop: int) -> dict[str, torch.Tensor]:
    """Reads units ``[start, stop)`` of one layer from a safetensors file, nothing else."""
    from safetensors import safe_open

    out = {}
    with safe_open(path, "pt") as f:
        for k in keys.rows:
            g = keys.group(k)
            out[k] = f.get_slice(k)[start * g:stop * g]
        for k in keys.cols:
            g = keys.group(k)
            out[k] = f.get_slice(k)[:, start * g:stop * g]
    return out


def block_deltas(pairs: Sequence[tuple[str, str]], keys: ChannelKeys, start: int, stop: int,
                 base: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Differential deltas of one block: theta(P_k) - theta(C_k) (equation 1).

    Args:
        base: The suspicious model's slices (the variants' start), to also
            measure how far each clean finetune C_k moved every unit.

    Returns:
        ``(deltas, clean)``: ``[K, stop - start, width]`` each; ``clean`` is
        theta(C_k) - theta(base), or None without ``base``.
    """
    deltas, clean = [], []
    b = read_block(base, keys, start, stop) if base else None
    for p_path, c_path in pairs:
        p, c = read_block(p_path, keys, start, stop), read_block(c_path, keys, start, stop)
        deltas.append(channel_matrix({k: p[k] - c[k] for k in p}, keys))
        if b is not None:
            clean.append(channel_matrix({k: c[k] - b[k] for k in c}, keys))
    return torch.stack(deltas), torch.stack(clean) if b is not None else None


class ScoreBlocks:
    """Ray Data stage: rows of blocks in, per-channel score terms of every K out.

    A block's deltas of the largest K are read once; the terms of every K in
    ``ks`` come from its first K variants (``[:k]``), so a sweep over K reads
    the 2K files once instead of once per K.
    """

    def __init__(self, pairs: Sequence[tuple[str, str]], layer_keys: Sequence[ChannelKeys], ks: Sequence[int],
                 base: str | None = None):
        self.pairs, self.layer_keys, self.ks, self.base = list(pairs), list(layer_keys), list(ks), base
        torch.set_num_threads(1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        terms = "mad" if self.base else "ma"
        out: dict[str, list] = {"layer": [], "start": [], **{f"{t}{k}": [] for k in self.ks for t in terms}}
        for layer, start, stop in zip(batch["layer"], batch["start"], batch["stop"]):
            deltas, clean = block_deltas(self.pairs, self.layer_keys[int(layer)], int(start), int(stop),
                                         self.base)  # [K, C, W] each
            out["layer"].append(int(layer))
            out["start"].append(int(start))
            for k in self.ks:
                mag, align = score_terms(deltas[:k])
                out[f"m{k}"].append(mag.numpy())
                out[f"a{k}"].append(align.numpy())
                if clean is not None:
                    out[f"d{k}"].append(clean[:k].norm(dim=-1).mean(0).numpy())
        return {"layer": np.array(out["layer"]), "start": np.array(out["start"]),
                **{key: np.array(v, dtype=object) for key, v in out.items() if key not in ("layer", "start")}}


def score_on_ray(pairs: Sequence[tuple[str, str]], layer_keys: Sequence[ChannelKeys], channels: Sequence[int],
                 ks: Sequence[int] | None = None, base: str | None = None, block_channels: int = 4096,
                 actors: int = 2) -> dict[int, dict[str, list[torch.Tensor]]]:
    """Scores every unit of every layer through a Ray Data actor pool, for every K in one pass.

    Args:
        pairs: ``(P_k file, C_k file)`` per variant, at least ``max(ks)``.
        layer_keys: Unit keys of each layer.
        channels: Unit count of each layer.
        ks: Variant counts to score, each at least 2 (variant count k uses
            ``pairs[:k]``); default: all pairs.
        base: The suspicious model's unit slices as safetensors: adds each
            unit's clean drift, the mean over k of ``||theta(C_k) - theta(base)||``.
        block_channels: Units per block (bounds an actor's memory).
        actors: Size of the scoring actor pool.

    Returns:
        ``{k: {"magnitude": [...], "alignment": [...], "drift": [...]}}`` with
        one ``[channels_l]`` tensor per layer (``drift`` only with ``base``).
    """
    ks = sorted(set(ks or [len(pairs)]))
    pairs = list(pairs)[: ks[-1]]
    blocks = [Block(l, s, min(s + block_channels, n)) for l, n in enumerate(channels)
              for s in range(0, n, block_channels)]
    ds = ray.data.from_items([{"layer": b.layer, "start": b.start, "stop": b.stop} for b in blocks])
    scored = ds.map_batches(ScoreBlocks, fn_constructor_kwargs={"pairs": pairs, "layer_keys": layer_keys, "ks": ks,
                                                                "base": base},
                            compute=ray.data.ActorPoolStrategy(size=min(actors, len(blocks))),
                            batch_size=1, num_cpus=1)
    names = {"m": "magnitude", "a": "alignment", "d": "drift"}
    terms = "mad" if base else "ma"
    parts = {(k, t): [[None] * len(range(0, n, block_channels)) for n in channels] for k in ks for t in terms}
    # iter_batches on the driver: for small per-unit results it is faster
    # than aggregate()/to_pandas(), which each start another pipeline.
    for batch in scored.iter_batches(batch_size=None):
        for i, (layer, start) in enumerate(zip(batch["layer"], batch["start"])):
            for k, t in parts:
                parts[(k, t)][int(layer)][int(start) // block_channels] = torch.as_tensor(
                    np.asarray(batch[f"{t}{k}"][i], dtype=np.float32))
    return {k: {names[t]: [torch.cat(x) for x in parts[(k, t)]] for t in terms} for k in ks}
