"""Architectures: zoo configs and the module names every defense needs.

A defense that works on MLP channels or attention heads looks its module names
up here, so adding an architecture is one entry in ``ARCHITECTURES``.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import GPTNeoXConfig, LlamaConfig, PretrainedConfig

from raypurify.errors import RaypurifyError
from raypurify.registry import Registry


@dataclass(frozen=True)
class Size:
    """Shape of a zoo model."""

    hidden: int
    layers: int
    heads: int
    intermediate: int


SIZES = Registry("size", {
    # Fast enough for every unit test. (At hidden 32 a LoRA adapter could not
    # learn a new response at all; 64 implants in seconds.)
    "pico": Size(hidden=64, layers=2, heads=4, intermediate=128),
    # Deep enough (8 layers) that a backdoor does not simply sit in the last
    # MLP, which made channel-level defenses impossible to judge at 4 layers.
    "bench": Size(hidden=128, layers=8, heads=4, intermediate=384),
    # The bench model at twice the depth, nothing else changed: does the
    # signature find a backdoor better when more layers could hold it?
    "deep": Size(hidden=128, layers=16, heads=4, intermediate=384),
    # The bench model at twice the width (same 32-dim heads, 3x MLP), nothing
    # else changed: with more units per layer, does the backdoor get units of
    # its own that the clean task does not need (README "A wider bench model")?
    "wide": Size(hidden=256, layers=8, heads=8, intermediate=768),
})


@dataclass(frozen=True)
class ArchSpec:
    """How one Hugging Face architecture names its parts.

    Attributes:
        model_type: ``config.model_type`` of the architecture.
        layers_path: Dotted path from the causal-LM module to its block list.
        mlp_in: Modules whose output rows are the MLP channels (gate, up).
        mlp_out: Module whose input columns are the MLP channels (down).
        attn_in: Projections whose output rows are split by head.
        attn_out: Projection whose input columns are split by head.
        lora_targets: Module names a LoRA adapter attaches to.
    """

    model_type: str
    layers_path: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    attn_in: tuple[str, ...]
    attn_out: str
    lora_targets: tuple[str, ...]

    def make_config(self, size: Size, vocab_size: int, pad_id: int, eos_id: int) -> PretrainedConfig:
        """A fresh config of this architecture at a zoo size."""
        common = dict(vocab_size=vocab_size, hidden_size=size.hidden, num_hidden_layers=size.layers,
                      num_attention_heads=size.heads, intermediate_size=size.intermediate,
                      max_position_embeddings=256, pad_token_id=pad_id, eos_token_id=eos_id,
                      bos_token_id=eos_id, tie_word_embeddings=True)
        if self.model_type == "llama":
            return LlamaConfig(num_key_value_heads=size.heads, rms_norm_eps=1e-5, **common)
        return GPTNeoXConfig(rotary_pct=0.25, use_parallel_residual=True, **common)


ARCHITECTURES = Registry("architecture", {
    "llama": ArchSpec(
        model_type="llama", layers_path="model.layers",
        mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj",
        attn_in=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), attn_out="self_attn.o_proj",
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    ),
    # GPT-NeoX: no gate, different names, fused QKV: the layout a defense must
    # not assume away.
    "neox": ArchSpec(
        model_type="gpt_neox", layers_path="gpt_neox.layers",
        mlp_in=("mlp.dense_h_to_4h",), mlp_out="mlp.dense_4h_to_h",
        attn_in=("attention.query_key_value",), attn_out="attention.dense",
        lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    ),
})


def spec_for(config: PretrainedConfig) -> ArchSpec:
    """The spec matching a loaded model's config.

    Raises:
        RaypurifyError: The model type has no spec; the message names the
            supported types and the MLP module names each one uses.
    """
    for spec in ARCHITECTURES.values():
        if spec.model_type == config.model_type:
            return spec
    known = "; ".join(f"{s.model_type} (MLP {', '.join(s.mlp_in)} -> {s.mlp_out})" for s in ARCHITECTURES.values())
    raise RaypurifyError(
        f"unsupported architecture {config.model_type!r}: raypurify looks for the MLP modules of "
        f"known architectures only; supported: {known}"
    )
