"""The model zoo: corpus, tokenizer and clean instruction-tuned models.

``build_zoo`` writes, under one directory:
  - ``train.json``: the instruction data the zoo models learned from (also the
    attacker's clean pool);
  - ``clean_pool.json``: clean data a defender may use;
  - ``heldout.json``: held-out evaluation prompts with reference answers;
  - ``<arch>-<size>/``: standard HF model directories with the tokenizer
    (whose ``chat_template`` is the training template) and ``raypurify.json``
    (how it was trained and its measured clean accuracy).
A model whose recorded settings match is reused, so a second call takes
seconds.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM

from raypurify.arch import ARCHITECTURES, SIZES
from raypurify.data.corpus import build_splits
from raypurify.data.template import format_prompt, train_tokenizer
from raypurify.evaluate import clean_accuracy
from raypurify.errors import RaypurifyError
from raypurify.io import MARKER, load_examples, output_dir, save_examples
from raypurify.progress import log
from raypurify.train import BENCH_THREADS, TrainSettings, finetune, pinned_threads

CORPUS_SEED = 0
DATA_FILES = ("train.json", "clean_pool.json", "heldout.json")

# Per size: the zoo's training budget (measured to reach >= 85 % held-out CDA
# at bench size; pico only needs to be a working model for unit tests).
TRAINING = {
    "pico": TrainSettings(steps=300, batch_size=32, lr=3e-3, warmup=20, weight_decay=0.01, seed=0),
    "bench": TrainSettings(steps=800, batch_size=64, lr=3e-3, warmup=50, weight_decay=0.01, seed=0),
    # Twice the bench's steps: at 800 the 16-layer model stopped at loss 0.28
    # and held-out CDA 0.486; at 1600, loss 0.067 and CDA 0.824 (627 s).
    "deep": TrainSettings(steps=1600, batch_size=64, lr=3e-3, warmup=50, weight_decay=0.01, seed=0),
    # The bench's budget: loss 0.051, held-out CDA 0.809 (EPYC build, 531 s).
    "wide": TrainSettings(steps=800, batch_size=64, lr=3e-3, warmup=50, weight_decay=0.01, seed=0),
}


def model_name(arch: str, size: str) -> str:
    return f"{arch}-{size}"


# TrainSettings fields added after zoos were cached, left out of the key at
# their default so that a new option does not invalidate every cached model.
_LATER_DEFAULTS = {"optimizer": "adamw"}


def _key(arch: str, size: str) -> str:
    train = {k: v for k, v in asdict(TRAINING[size]).items() if _LATER_DEFAULTS.get(k, object()) != v}
    spec = {"arch": arch, "size": asdict(SIZES[size]), "train": train,
            "corpus_seed": CORPUS_SEED, "torch": torch.__version__.split("+")[0]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def cpu() -> dict:
    """The processor and the vector kernels torch used: part of a zoo model's provenance.

    Why: pinning the thread count makes a build repeatable on one kind of
    CPU, not across kinds. The same key built ``llama-deep`` at held-out CDA
    0.824 on the machine of the README's deep figures and at 0.899 on an AMD
    EPYC with AVX512 kernels (README, "The same bench on another kind of CPU").
    """
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
             if line.startswith("model name")] if info.is_file() else []
    return {"cpu": names[0] if names else platform.processor(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _write_json_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    write(tmp)
    tmp.replace(path)


def build_zoo(out: str | Path, archs: Sequence[str] = ("llama", "neox"),
              sizes: Sequence[str] = ("pico", "bench"), evaluate_models: bool = True) -> dict:
    """Builds (or reuses) the zoo under ``out``.

    Args:
        out: Zoo directory; created if missing. A directory of the user's that
            raypurify did not write is refused.
        archs: Architecture names (``ARCHITECTURES``).
        sizes: Size names (``SIZES``).
        evaluate_models: Measure held-out CDA of new models (all but pico).

    Returns:
        The manifest: per model its directory, cache key, seconds and CDA.
    """
    for a in archs:
        ARCHITECTURES[a]
    for s in sizes:
        SIZES[s]
    root = Path(out).absolute()
    if root.exists() and any(root.iterdir()) and not (root / MARKER).is_file():
        raise RaypurifyError(f"zoo directory {str(root)!r} is not empty and was not written by raypurify; "
                             "give a new or empty directory")
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("written by raypurify\n")
    manifest_path = root / "zoo.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"models": {}}

    splits = build_splits(seed=CORPUS_SEED)
    for name in DATA_FILES:
        target = root / name
        if not target.is_file():
            _write_json_atomic(target, lambda p, n=name: save_examples(splits[n.removesuffix(".json")], p))
    tokenizer = train_tokenizer(format_prompt(e.instruction, e.input) + e.output for e in splits["train"])

    for size in sizes:
        for arch in archs:
            name = model_name(arch, size)
            key = _key(arch, size)
            entry = manifest["models"].get(name, {})
            if entry.get("key") == key and (root / name / "model.safetensors").is_file():
                log(f"zoo: {name} cached ({root / name})")
                continue
            log(f"zoo: training {name} ({TRAINING[size].steps} steps)")
            t0 = time.time()
            torch.manual_seed(TRAINING[size].seed)
            config = ARCHITECTURES[arch].make_config(SIZES[size], len(tokenizer), tokenizer.pad_token_id,
                                                     tokenizer.eos_token_id)
            model = AutoModelForCausalLM.from_config(config)
            with pinned_threads():
                losses = finetune(model, tokenizer, splits["train"], TRAINING[size], desc=f"zoo {name}")
            entry = {"key": key, "dir": name, "seconds": round(time.time() - t0, 1), "final_loss": losses[-1],
                     "params": sum(p.numel() for p in model.parameters()), "threads": BENCH_THREADS, **cpu()}
            if evaluate_models and size != "pico":
                entry["cda"] = clean_accuracy(model, tokenizer, load_examples(root / "heldout.json"))
                log(f"zoo: {name} held-out CDA {entry['cda']:.3f}")
            with output_dir(root / name, overwrite=True) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
                (tmp / "raypurify.json").write_text(json.dumps(
                    {"kind": "zoo", "arch": arch, "size": size, "train": asdict(TRAINING[size]), **entry}, indent=1))
            manifest["models"][name] = entry
            # The manifest is written after each model, so an interrupted build
            # keeps what it finished.
            _write_json_atomic(manifest_path, lambda p: p.write_text(json.dumps(manifest, indent=1)))
    return manifest


# An attack budget that implants a backdoor into a pico model in seconds (the
# smoke tests' and the test suite's).
PICO_ATTACK = {"n_clean": 300, "n_poison": 100, "steps": 120, "lr": 3e-3}


def smoke_inputs(work: str | Path) -> tuple[Path, Path]:
    """A pico zoo and a BadNets-backdoored pico model under ``work`` (cached).

    The inputs of every job's ``--smoke-test``: a real suspicious model in
    seconds. Returns ``(suspicious model dir, clean pool file)``.
    """
    from raypurify.config import AttackConfig
    from raypurify.implant import implant

    work = Path(work)
    build_zoo(work / "zoo", archs=("llama",), sizes=("pico",))
    suspicious = work / "suspicious"
    if not (suspicious / "attack.json").is_file():
        cfg = AttackConfig(attack="badnets", behavior="sentiment", **PICO_ATTACK)
        implant(work / "zoo" / "llama-pico", cfg, load_examples(work / "zoo" / "train.json"), suspicious,
                overwrite=True)
    return suspicious, work / "zoo" / "clean_pool.json"
