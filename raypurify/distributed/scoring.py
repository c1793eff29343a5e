"""Channel scoring on Ray Data: deltas streamed block by block into an actor pool.

A row is one block of channels (a layer, or a slice of a wide layer's
channels). The scoring actor opens the 2K safetensors files lazily and reads
only the block's slices, so its peak memory is about ``2K x block`` tensors,
never K copies of the model. Per-channel magnitude and alignment come back to
the driver, which combines them (the ``combined`` mode needs the global
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


def block_deltas(pairs: Sequence[tuple[str, str]], keys: ChannelKeys, start: int, stop: int) -> torch.Tensor:
    """Differential deltas of one block: theta(P_k) - theta(C_k) (equation 1).

    Returns:
        ``[K, stop - start, width]``.
    """
    deltas = []
    for p_path, c_path in pairs:
        p, c = read_block(p_path, keys, start, stop), read_block(c_path, keys, start, stop)
        deltas.append(channel_matrix({k: p[k] - c[k] for k in p}, keys))
    return torch.stack(deltas)


class ScoreBlocks:
    """Ray Data stage: rows of blocks in, per-channel score terms out."""

    def __init__(self, pairs: Sequence[tuple[str, str]], layer_keys: Sequence[ChannelKeys]):
        self.pairs, self.layer_keys = list(pairs), list(layer_keys)
        torch.set_num_threads(1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {"layer": [], "start": [], "magnitude": [], "alignment": []}
        for layer, start, stop in zip(batch["layer"], batch["start"], batch["stop"]):
            mag, align = score_terms(block_deltas(self.pairs, self.layer_keys[int(layer)], int(start), int(stop)))
            out["layer"].append(int(layer))
            out["start"].append(int(start))
            out["magnitude"].append(mag.numpy())
            out["alignment"].append(align.numpy())
        return {"layer": np.array(out["layer"]), "start": np.array(out["start"]),
                "magnitude": np.array(out["magnitude"], dtype=object),
                "alignment": np.array(out["alignment"], dtype=object)}


def score_on_ray(pairs: Sequence[tuple[str, str]], layer_keys: Sequence[ChannelKeys], channels: Sequence[int],
                 block_channels: int = 4096, actors: int = 2) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Scores every channel of every layer through a Ray Data actor pool.

    Args:
        pairs: ``(P_k file, C_k file)`` per variant.
        layer_keys: Channel keys of each layer.
        channels: Channel count of each layer.
        block_channels: Channels per block (bounds an actor's memory).
        actors: Size of the scoring actor pool.

    Returns:
        ``(magnitude, alignment)``: one ``[channels_l]`` tensor per layer.
    """
    blocks = [Block(l, s, min(s + block_channels, n)) for l, n in enumerate(channels)
              for s in range(0, n, block_channels)]
    ds = ray.data.from_items([{"layer": b.layer, "start": b.start, "stop": b.stop} for b in blocks])
    scored = ds.map_batches(ScoreBlocks, fn_constructor_kwargs={"pairs": pairs, "layer_keys": layer_keys},
                            compute=ray.data.ActorPoolStrategy(size=min(actors, len(blocks))),
                            batch_size=1, num_cpus=1)
    mag = [[None] * len(range(0, n, block_channels)) for n in channels]
    align = [[None] * len(range(0, n, block_channels)) for n in channels]
    # iter_batches on the driver: for small per-channel results it is faster
    # than aggregate()/to_pandas(), which each start another pipeline.
    for batch in scored.iter_batches(batch_size=None):
        for layer, start, m, a in zip(batch["layer"], batch["start"], batch["magnitude"], batch["alignment"]):
            mag[int(layer)][int(start) // block_channels] = torch.as_tensor(np.asarray(m, dtype=np.float32))
            align[int(layer)][int(start) // block_channels] = torch.as_tensor(np.asarray(a, dtype=np.float32))
    return [torch.cat(m) for m in mag], [torch.cat(a) for a in align]


class ScorePrefixes:
    """Ray Data stage: like ``ScoreBlocks``, for several K at once.

    A block's deltas of the largest K are read once; the score terms of every
    K in ``ks`` come from its first K variants (``[:k]``), so a sweep over K
    reads the 2K files once instead of once per K.
    """

    def __init__(self, pairs: Sequence[tuple[str, str]], layer_keys: Sequence[ChannelKeys], ks: Sequence[int]):
        self.pairs, self.layer_keys, self.ks = list(pairs), list(layer_keys), list(ks)
        torch.set_num_threads(1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"layer": [], "start": [], **{f"{t}{k}": [] for k in self.ks for t in ("m", "a")}}
        for layer, start, stop in zip(batch["layer"], batch["start"], batch["stop"]):
            deltas = block_deltas(self.pairs, self.layer_keys[int(layer)], int(start), int(stop))  # [K, C, W]
            out["layer"].append(int(layer))
            out["start"].append(int(start))
            for k in self.ks:
                mag, align = score_terms(deltas[:k])
                out[f"m{k}"].append(mag.numpy())
                out[f"a{k}"].append(align.numpy())
        return {"layer": np.array(out["layer"]), "start": np.array(out["start"]),
                **{key: np.array(v, dtype=object) for key, v in out.items() if key not in ("layer", "start")}}


def score_prefixes_on_ray(pairs: Sequence[tuple[str, str]], layer_keys: Sequence[ChannelKeys],
                          channels: Sequence[int], ks: Sequence[int], block_channels: int = 4096,
                          actors: int = 2) -> dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """``score_on_ray`` for every K in ``ks`` in one pass (variant k uses ``pairs[:k]``).

    Args:
        pairs: ``(P_k file, C_k file)`` per variant, at least ``max(ks)``.
        ks: Variant counts to score (each at least 2).

    Returns:
        ``{k: (magnitude, alignment)}``, each one ``[channels_l]`` tensor per layer.
    """
    ks = sorted(set(ks))
    pairs = list(pairs)[: ks[-1]]
    blocks = [Block(l, s, min(s + block_channels, n)) for l, n in enumerate(channels)
              for s in range(0, n, block_channels)]
    ds = ray.data.from_items([{"layer": b.layer, "start": b.start, "stop": b.stop} for b in blocks])
    scored = ds.map_batches(ScorePrefixes, fn_constructor_kwargs={"pairs": pairs, "layer_keys": layer_keys, "ks": ks},
                            compute=ray.data.ActorPoolStrategy(size=min(actors, len(blocks))),
                            batch_size=1, num_cpus=1)
    parts = {(k, t): [[None] * len(range(0, n, block_channels)) for n in channels] for k in ks for t in "ma"}
    for batch in scored.iter_batches(batch_size=None):
        for i, (layer, start) in enumerate(zip(batch["layer"], batch["start"])):
            for k in ks:
                for t in "ma":
                    parts[(k, t)][int(layer)][int(start) // block_channels] = torch.as_tensor(
                        np.asarray(batch[f"{t}{k}"][i], dtype=np.float32))
    return {k: ([torch.cat(x) for x in parts[(k, "m")]], [torch.cat(x) for x in parts[(k, "a")]]) for k in ks}
