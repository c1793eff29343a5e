"""Information-conflict defense: settings, merge methods and merge math (pure).

The defense of "Neutralizing Backdoors through Information Conflicts for
Large Language Models" (Chen et al.), sections 3.3-3.4. This module holds what
needs neither Ray nor files: the settings (``ConflictConfig``; ``CombinedConfig``
for a merge followed by immunization), the merge-method registry
(``MERGES``) that turns settings into a mergekit configuration, the
compatibility check of two model configs, and plain-tensor versions of the
merges (linear, SLERP, TIES) that the tests hold mergekit's output against.
The mergekit and peft calls live in ``raypurify.merge``; the orchestration
(training the conflict LoRA on Ray Train) in ``raypurify.distributed.conflict``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
from pydantic import Field, field_validator, model_validator

from raypurify.config import ImmunizeConfig, Strict, Workers
from raypurify.errors import RaypurifyError
from raypurify.registry import Registry

# ---------------------------------------------------------------------------
# Merge math on plain tensors (mergekit's semantics; used to check its output)
# ---------------------------------------------------------------------------


def linear_merge(suspicious: torch.Tensor, conflict: torch.Tensor, t: float) -> torch.Tensor:
    """The paper's eq. 9: ``(1 - t) * suspicious + t * conflict``.

    Args:
        suspicious: One weight of the suspicious model, any shape.
        conflict: The same weight of the conflict model, same shape.
        t: Share of the conflict model in [0, 1].

    Returns:
        The merged weight, same shape.
    """
    return (1 - t) * suspicious + t * conflict


def slerp_merge(suspicious: torch.Tensor, conflict: torch.Tensor, t: float, eps: float = 1e-8) -> torch.Tensor:
    """The paper's eq. 10 on one whole weight tensor, as mergekit 0.1.5 does it.

    The tensor is flattened into one vector and interpolated along the great
    circle between the two vectors (their norms interpolated as well, through
    the unnormalized combination); nearly (anti)parallel tensors fall back to
    linear interpolation, where the angle is numerically undefined.

    Args:
        suspicious: ``[...]`` weight of the suspicious model.
        conflict: Same shape, the conflict model's.
        t: Interpolation parameter in [0, 1].

    Returns:
        ``[...]`` merged weight.
    """
    a, b = suspicious.reshape(-1).double(), conflict.reshape(-1).double()
    dot = torch.dot(a / a.norm().clamp_min(eps), b / b.norm().clamp_min(eps)).clamp(-1, 1)
    if dot.abs() > 0.9995:
        out = (1 - t) * a + t * b
    else:
        theta = torch.arccos(dot)
        out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return out.reshape(suspicious.shape).to(suspicious.dtype)


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keeps the ``density`` fraction of largest-magnitude entries of a task vector.

    Args:
        delta: ``[...]`` task vector (tuned minus base).
        density: Fraction kept, in (0, 1]; at least one entry survives.

    Returns:
        ``delta`` with the other entries set to zero, same shape.
    """
    if density >= 1:
        return delta.clone()
    k = max(1, int(density * delta.numel()))
    keep = torch.zeros(delta.numel(), dtype=delta.dtype)
    keep[torch.argsort(delta.abs().reshape(-1).float(), descending=True)[:k]] = 1
    return delta * keep.reshape(delta.shape)


def ties_merge(base: torch.Tensor, tuned: Sequence[torch.Tensor], weights: Sequence[float],
               density: float, lam: float = 1.0) -> torch.Tensor:
    """TIES merging (the paper's eq. 11; Yadav et al. 2023), as mergekit computes it.

    1. Trim: each task vector ``tuned[i] - base`` keeps its top-``density``
       entries by magnitude.
    2. Elect: per entry, the sign of the weighted sum of trimmed vectors.
    3. Disjoint mean: the weighted mean of the vectors that agree with the
       elected sign (entries where none agree stay at the base).

    Args:
        base: ``[...]`` the base weight (theta_0).
        tuned: One ``[...]`` weight per merged model.
        weights: One weight per merged model.
        density: Fraction of each task vector kept.
        lam: Scale of the merged task vector (the paper's lambda).

    Returns:
        ``[...]`` merged weight.
    """
    deltas = torch.stack([magnitude_trim(t - base, density) for t in tuned])  # [n, ...]
    w = torch.tensor(list(weights), dtype=deltas.dtype).reshape(-1, *([1] * base.dim()))
    deltas = deltas * w
    elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    agree = (deltas.sign() == elected).to(deltas.dtype)  # zeros never agree
    total = (deltas * agree).sum(dim=0)
    divisor = (w * agree).sum(dim=0)
    divisor[divisor == 0] = 1
    return base + lam * total / divisor


# ---------------------------------------------------------------------------
# Merge methods: settings -> mergekit configuration
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeMethod:
    """One registered full-model merge.

    Attributes:
        describe: One line for ``raypurify list merges``.
        build: ``(settings, suspicious, conflict, base, n_layers) -> dict``, a
            mergekit configuration (paths absolute; ``base`` may be None).
    """

    describe: str
    build: Callable[[MergeSettings, str, str, str | None, int], dict[str, Any]]


def _linear(s: MergeSettings, suspicious: str, conflict: str, base: str | None, n_layers: int) -> dict:
    return {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": suspicious, "parameters": {"weight": 1 - s.t}},
                       {"model": conflict, "parameters": {"weight": s.t}}]}


def _slerp(s: MergeSettings, suspicious: str, conflict: str, base: str | None, n_layers: int) -> dict:
    # mergekit's SLERP goes from base_model (t = 0) to the other model (t = 1).
    return {"merge_method": "slerp", "dtype": "float32", "base_model": suspicious,
            "models": [{"model": suspicious}, {"model": conflict}], "parameters": {"t": s.t}}


def _ties(s: MergeSettings, suspicious: str, conflict: str, base: str | None, n_layers: int) -> dict:
    # Without theta_0 the suspicious model is the base: its own task vector is
    # then zero and TIES adds the top-density part of the conflict update at
    # t (unnormalized, so t means what it means for linear: t * delta).
    models = [{"model": conflict, "parameters": {"weight": s.t, "density": s.density}}]
    if base is not None:
        models.insert(0, {"model": suspicious, "parameters": {"weight": 1 - s.t, "density": s.density}})
    return {"merge_method": "ties", "dtype": "float32", "base_model": base or suspicious, "models": models,
            "parameters": {"lambda": s.lam, "normalize": base is not None}}


def default_slices(n_layers: int) -> list[LayerSlice]:
    """Passthrough default: early layers from the conflict model, late ones kept."""
    half = max(1, n_layers // 2)
    out = [LayerSlice(source="conflict", layers=(0, half))]
    if half < n_layers:
        out.append(LayerSlice(source="suspicious", layers=(half, n_layers)))
    return out


def _passthrough(s: MergeSettings, suspicious: str, conflict: str, base: str | None, n_layers: int) -> dict:
    slices = s.slices or default_slices(n_layers)
    bad = [sl.layers for sl in slices if sl.layers[1] > n_layers]
    if bad:
        raise RaypurifyError(f"passthrough slices {[list(b) for b in bad]} reach past the model's {n_layers} layers")
    path = {"suspicious": suspicious, "conflict": conflict}
    return {"merge_method": "passthrough", "dtype": "float32",
            "slices": [{"sources": [{"model": path[sl.source], "layer_range": list(sl.layers)}]} for sl in slices]}


MERGES: Registry[MergeMethod] = Registry("merge method", {
    "linear": MergeMethod("(1 - t) * suspicious + t * conflict (the paper's default)", _linear),
    "slerp": MergeMethod("spherical interpolation at t, tensor by tensor", _slerp),
    "ties": MergeMethod("TIES: trim task vectors to `density`, elect signs, disjoint mean (base: theta_0 "
                        "if given, else the suspicious model)", _ties),
    "passthrough": MergeMethod("layer slices taken whole from either model (`slices`)", _passthrough),
})


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------


class LayerSlice(Strict):
    """A run of decoder layers taken whole from one model (passthrough)."""

    source: Literal["suspicious", "conflict"] = Field(description="which model the layers come from")
    layers: tuple[int, int] = Field(description="[start, end): layer indices, end exclusive")

    @field_validator("layers")
    @classmethod
    def _ordered(cls, v):
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layers {list(v)} must satisfy 0 <= start < end")
        return v


class MergeSettings(Strict):
    """How the conflict model is merged into the suspicious model (full models)."""

    method: str = Field("linear", description="a MERGES name: linear, slerp, ties, passthrough")
    t: float = Field(0.5, ge=0, le=1, description="share of the conflict model (linear, slerp; the TIES weight)")
    density: float = Field(0.5, gt=0, le=1, description="fraction of each task vector kept (ties)")
    lam: float = Field(1.0, gt=0, description="scale of the merged task vector (ties; the paper's lambda)")
    slices: list[LayerSlice] | None = Field(
        None, description="passthrough layer slices in output order (default: the first half of the layers "
                          "from the conflict model, the rest from the suspicious one)")

    @field_validator("method")
    @classmethod
    def _known(cls, v):
        if v not in list(MERGES):
            raise ValueError(f"unknown merge method {v!r}; valid choices: {', '.join(MERGES)}")
        return v


AdapterCombination = Literal["cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties"]


class ConflictConfig(Strict):
    """The information-conflict defense (internal conflict; evidence is applied at inference).

    Defaults follow the paper where it gives them (linear merge; about 10 % of
    the clean data, here 200 of the 2,000-sample clean pool) and ordinary
    finetuning rates of this bench otherwise (the recovery finetune's budget).
    """

    merge: MergeSettings = MergeSettings()
    mergekit_config: str | None = Field(
        None, description="a plain mergekit YAML used instead of `merge`; ${suspicious}, ${conflict} and ${base} "
                          "in it are replaced by the absolute model paths")
    base: str | None = Field(
        None, description="the pre-trained model the suspicious one was finetuned from (the paper's theta_0): "
                          "the conflict LoRA is trained on it and TIES uses it as its base. Default: none, the "
                          "conflict LoRA is trained on the suspicious model itself (no clean reference model)")
    n_samples: int = Field(200, ge=1, description="clean samples for the conflict LoRA (paper: about 10 %)")
    epochs: int = Field(5, ge=1, le=100)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0, le=1e-2, description="LoRA learning rate (an ordinary one)")
    lora_r: int = Field(16, ge=1, le=1024, description="rank of the conflict LoRA")
    lora_alpha: int = Field(32, ge=1)
    adapter_combination: AdapterCombination = Field(
        "cat", description="adapter-only threat model: peft add_weighted_adapter combination. `cat` is the exact "
                           "weighted sum of the two low-rank updates (the paper's linear merge on adapters); "
                           "`linear` is peft's cheaper approximation; ties/dare_* sparsify A and B separately")
    weights: tuple[float, float] | None = Field(
        None, description="adapter weights (suspicious, conflict); default (1 - merge.t, merge.t)")
    seed: int = 0
    workers: Workers = Workers(num_workers=1)

    @model_validator(mode="after")
    def _slices_only_for_passthrough(self):
        if self.merge.slices is not None and self.merge.method != "passthrough":
            raise ValueError("merge.slices is only used by merge.method passthrough")
        if self.workers.num_workers % self.workers.group_size:
            raise ValueError(f"workers.group_size {self.workers.group_size} must divide "
                             f"workers.num_workers {self.workers.num_workers}")
        return self

    def min_clean(self) -> int:
        return self.n_samples

    def steps(self) -> int:
        return max(1, -(-self.n_samples * self.epochs // self.batch_size))

    def adapter_weights(self) -> tuple[float, float]:
        return self.weights if self.weights is not None else (1 - self.merge.t, self.merge.t)


class CombinedConfig(Strict):
    """The conflict merge followed by immunization (the ``combined`` sweep; ``tune_spaces/combined.yaml``).

    Order: merge first, then suppress the signature and recover. Two reasons.
    (1) The recovery finetune comes last, so it repairs the utility both
    steps cost, and a trial still reports once per recovery epoch (ASHA stops
    it the same way as an immunization trial). (2) Both expensive pieces are
    trained once, on the models before any trial touches them: the variants
    (hence the signature) on the suspicious model, the conflict LoRA on each
    model (suspicious and every canary). Merging first applies the LoRA to
    the model it was trained on, exactly as ``purify --defense conflict`` does;
    what is approximated is the signature, computed on the suspicious model
    but applied to its merge, which differs from it only by the trial's share
    of a low-rank clean-data update. The other order would apply the LoRA to
    a model with rho of its channels re-drawn and then recovered, a larger
    gap. The chosen trial is reproduced by ``raypurify purify --defense
    conflict`` and then ``--defense immunize`` on its output, with the two
    sections of ``best.yaml``.
    """

    conflict: ConflictConfig = ConflictConfig()
    immunize: ImmunizeConfig = ImmunizeConfig()

    def min_clean(self) -> int:
        return max(self.conflict.min_clean(), self.immunize.min_clean())


def substitute(template: str, paths: dict[str, str | None]) -> str:
    """Fills ``${suspicious}``, ``${conflict}``, ``${base}`` in a mergekit YAML text."""
    for key, value in paths.items():
        if value is not None:
            template = template.replace("${" + key + "}", value)
    return template


# Fields of config.json that two models must share to be merged tensor by tensor.
SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "vocab_size", "num_hidden_layers")


def check_compatible(a: dict, b: dict, name_a: str, name_b: str, layers_may_differ: bool = False) -> None:
    """Refuses to merge models whose weights do not line up.

    Args:
        a, b: The two ``config.json`` mappings.
        name_a, name_b: How the user knows the two models (their paths).
        layers_may_differ: Passthrough stacks layers, so depth may differ.

    Raises:
        RaypurifyError: Different architectures or shapes, naming both models.
    """
    if a.get("model_type") != b.get("model_type"):
        raise RaypurifyError(f"cannot merge models of different architectures: {name_a!r} is "
                             f"{a.get('model_type')!r}, {name_b!r} is {b.get('model_type')!r}")
    keys = [k for k in SHAPE_KEYS if not (layers_may_differ and k == "num_hidden_layers")]
    diff = [f"{k} {a.get(k)} vs {b.get(k)}" for k in keys if a.get(k) != b.get(k)]
    if diff:
        raise RaypurifyError(f"cannot merge {name_a!r} and {name_b!r}: their shapes differ ({'; '.join(diff)})")
