"""Merges on disk: mergekit for full models, peft weighted adapters for LoRA.

The settings and the math are in ``raypurify.conflict`` (pure); this module
reads model directories, checks them, calls the libraries and writes standard
directories. No Ray here: ``raypurify merge`` and the conflict defense both
call it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

from raypurify.conflict import MERGES, MergeSettings, check_compatible, substitute
from raypurify.errors import RaypurifyError
from raypurify.io import attach_adapter, check_model_dir

# A model name that is not a local directory must fail at once, not wait on a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def model_config(path: str | Path) -> dict:
    """``config.json`` of a checked model directory."""
    return json.loads((check_model_dir(path) / "config.json").read_text())


def _mergekit_config(data: dict, source: str):
    """Validates a mergekit configuration and checks every model is a local directory."""
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    try:
        cfg = MergeConfiguration.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:5])
        raise RaypurifyError(f"{source} is not a valid mergekit configuration: {problems}") from None
    models = [str(m.model.path) for m in cfg.referenced_models()]
    for m in models:
        if not Path(m).is_absolute() or not Path(m).is_dir():
            raise RaypurifyError(f"{source} refers to {m!r}, which is not an absolute path to a local model "
                                 "directory (raypurify never downloads models)")
        check_model_dir(m)
    configs = [model_config(m) for m in models]
    layered = cfg.slices is not None
    for m, c in zip(models[1:], configs[1:]):
        check_compatible(configs[0], c, models[0], m, layers_may_differ=layered)
    return cfg


def run_mergekit(data: dict, out: Path, source: str = "merge configuration", tokenizer_from: str | None = None) -> None:
    """Runs one mergekit merge into ``out`` (an existing, empty directory).

    Args:
        data: A mergekit configuration (``merge_method``, ``models`` / ``slices``, ...).
        out: Destination; receives config.json, model.safetensors and the tokenizer.
        source: How errors name the configuration.
        tokenizer_from: Model directory whose tokenizer is saved beside the
            weights (default: mergekit's choice, the base or first model).

    Raises:
        RaypurifyError: Invalid configuration, a non-local model, or models
            that cannot be merged (different architectures or shapes).
    """
    from mergekit.merge import MergeOptions, run_merge

    cfg = _mergekit_config(data, source)
    run_merge(cfg, str(out), MergeOptions(copy_tokenizer=tokenizer_from is None, write_model_card=False,
                                          quiet=True, random_seed=0))
    if tokenizer_from is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(out)


def merge_models(settings: MergeSettings, suspicious: str, conflict: str, out: Path, base: str | None = None,
                 mergekit_yaml: str | None = None) -> dict:
    """Merges the conflict model into the suspicious model (full threat model).

    Args:
        settings: Method and its parameters (ignored when ``mergekit_yaml`` is given).
        suspicious: The suspicious model directory.
        conflict: The conflict model directory (same architecture).
        out: Existing empty destination directory.
        base: The pre-trained model (theta_0), if the defender has it.
        mergekit_yaml: A plain mergekit YAML whose ``${suspicious}``,
            ``${conflict}``, ``${base}`` are filled with the absolute paths.

    Returns:
        ``{"mergekit": <the configuration that ran>}``.
    """
    import yaml

    paths = {"suspicious": str(Path(suspicious).absolute()), "conflict": str(Path(conflict).absolute()),
             "base": str(Path(base).absolute()) if base else None}
    a, b = model_config(paths["suspicious"]), model_config(paths["conflict"])
    if mergekit_yaml is not None:
        p = Path(mergekit_yaml)
        if not p.is_file():
            raise RaypurifyError(f"mergekit config {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(substitute(p.read_text(), paths))
        except yaml.YAMLError as e:
            raise RaypurifyError(f"mergekit config {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise RaypurifyError(f"mergekit config {str(p)!r} must hold a mapping")
        source = f"mergekit config {str(p)!r}"
    else:
        check_compatible(a, b, paths["suspicious"], paths["conflict"])
        if paths["base"]:
            check_compatible(a, model_config(paths["base"]), paths["suspicious"], paths["base"])
        data = MERGES[settings.method].build(settings, paths["suspicious"], paths["conflict"], paths["base"],
                                             int(a.get("num_hidden_layers", 0)))
        source = f"merge method {settings.method!r}"
    run_mergekit(data, out, source, tokenizer_from=paths["suspicious"])
    return {"mergekit": data}


def merge_lora_into(model_dir: str, adapter: str, out: Path, scale: float = 1.0) -> None:
    """Writes ``model + scale * adapter`` as a plain HF model directory (with tokenizer)."""
    from raypurify.io import load_model

    model, tok = load_model(model_dir)
    model = scaled_adapter(model, adapter, scale)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def scaled_adapter(model, adapter: str, scale: float):
    """Merges a PEFT adapter into ``model`` at ``scale`` times its trained strength.

    ``scale`` = t gives theta + t * delta, which equals the linear merge at t
    of theta with the conflict model theta + delta.

    Returns:
        The plain model with the update merged in.
    """
    from peft.tuners.lora import LoraLayer

    peft_model = attach_adapter(model, adapter)
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            module.scale_layer(scale)
    return peft_model.merge_and_unload()


def combine_adapters(base: str, suspicious: str, conflict: str, out: Path, combination: str,
                     weights: Sequence[float], density: float, seed: int = 0) -> dict:
    """Combines the suspicious and the conflict adapter with peft (adapter-only threat model).

    Args:
        base: The base model both adapters were trained on.
        suspicious: The suspicious PEFT adapter directory.
        conflict: The conflict PEFT adapter directory.
        out: Existing empty destination; receives a standard PEFT adapter
            directory (adapter_config.json, adapter_model.safetensors).
        combination: A peft ``add_weighted_adapter`` combination type.
        weights: ``(suspicious, conflict)`` weights.
        density: Fraction kept by ties / dare combinations.
        seed: Seeds DARE's random drop, so a combination can be repeated.

    Returns:
        ``{"combination", "weights", "rank"}``.
    """
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import save_file

    from raypurify.io import load_model

    for adapter in (suspicious, conflict):
        # attach_adapter checks shapes against a bare base and names a misfit.
        attach_adapter(load_model(base)[0], adapter)
    peft_model = PeftModel.from_pretrained(load_model(base)[0], suspicious, adapter_name="suspicious")
    peft_model.load_adapter(conflict, adapter_name="conflict")
    kwargs = {"density": density} if combination not in ("cat", "linear", "svd") else {}
    torch.manual_seed(seed)
    try:
        peft_model.add_weighted_adapter(["suspicious", "conflict"], list(weights), "combined",
                                        combination_type=combination, **kwargs)
    except ValueError as e:
        raise RaypurifyError(f"peft cannot combine {suspicious!r} and {conflict!r} with {combination!r}: {e}") from None
    state = get_peft_model_state_dict(peft_model, adapter_name="combined")
    save_file({k: v.detach().float().contiguous() for k, v in state.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    config = peft_model.peft_config["combined"]
    config.save_pretrained(str(out))
    return {"combination": combination, "weights": list(weights), "rank": int(config.r)}


def copy_model_files(src: Path, dst: Path) -> None:
    """Copies a finished model or adapter directory's files into ``dst``."""
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)
