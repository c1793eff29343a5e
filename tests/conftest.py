"""Shared fixtures: one pico zoo and one backdoored pico model per session.

Building them once keeps the suite fast; the pico models are real HF
directories trained by the same code as the bench models.
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    from raypurify.zoo import build_zoo

    root = tmp_path_factory.mktemp("zoo")
    build_zoo(root, archs=("llama", "neox"), sizes=("pico",))
    return root


@pytest.fixture(scope="session")
def heldout(zoo):
    from raypurify.io import load_examples

    return load_examples(zoo / "heldout.json")


from raypurify.zoo import PICO_ATTACK  # noqa: E402,F401 - the tests' implant budget


@pytest.fixture(scope="session")
def poisoned_pico(zoo, tmp_path_factory):
    from raypurify.config import AttackConfig
    from raypurify.implant import implant
    from raypurify.io import load_examples

    out = tmp_path_factory.mktemp("attacked") / "badnets-sentiment"
    cfg = AttackConfig(attack="badnets", behavior="sentiment", mode="full", **PICO_ATTACK)
    implant(zoo / "llama-pico", cfg, load_examples(zoo / "train.json"), out, twin=True)
    return out


@pytest.fixture(scope="session")
def local_ray():
    """One in-process Ray for the whole session (ray.init costs seconds and 0.5 GB)."""
    import tempfile

    import ray

    # A short temp dir: Ray's socket paths must stay under 107 characters.
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="rp", dir="/tmp"),
             log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def poisoned_pico_lora(zoo, tmp_path_factory):
    """A backdoored LoRA adapter (VPI sentiment) on llama-pico: the adapter-only threat model."""
    from raypurify.config import AttackConfig
    from raypurify.implant import implant
    from raypurify.io import load_examples

    out = tmp_path_factory.mktemp("attacked") / "vpi-sentiment-lora"
    cfg = AttackConfig(attack="vpi", behavior="sentiment", mode="lora", **PICO_ATTACK)
    implant(zoo / "llama-pico", cfg, load_examples(zoo / "train.json"), out)
    return out
