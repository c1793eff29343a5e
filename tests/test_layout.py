"""Project-level checks: the pure code stays free of Ray; the cluster config is valid and pinned."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_only_the_orchestration_layer_imports_ray():
    offenders = []
    for path in (ROOT / "raypurify").rglob("*.py"):
        if "distributed" in path.relative_to(ROOT / "raypurify").parts:
            continue
        if re.search(r"^\s*(import ray|from ray)\b", path.read_text(), re.M):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"Ray imported outside raypurify/distributed: {offenders}"


def test_cluster_yaml_passes_rays_schema_and_uses_the_pins():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    setup = " ".join(config["setup_commands"])
    assert "constraints.txt" in setup
    pins = [line for line in (ROOT / "scripts/constraints.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][0-9A-Za-z.]*", p) for p in pins)
    for pkg in ("torch", "ray", "transformers", "peft", "deepspeed"):
        assert any(p.startswith(pkg + "==") for p in pins), pkg


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci/run").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/test.sh" in ci


def test_documented_immunize_config_is_the_default():
    from raypurify.config import ImmunizeConfig, build, load_yaml

    assert build(ImmunizeConfig, load_yaml(ROOT / "configs/immunize.yaml")) == ImmunizeConfig()


def test_every_shipped_config_and_search_space_validates():
    """A YAML the README tells users to run must not fail on its own schema."""
    from raypurify.config import (AttackConfig, AttackSpace, CompareConfig, ImmunizeConfig, build, load_space,
                                  load_yaml)

    for path in sorted((ROOT / "tune_spaces").glob("*.yaml")):
        if path.name == "attack.yaml":  # the attack-budget search (jobs/tune_attack.py), not a defense's
            build(AttackSpace, load_yaml(path), source=str(path))
        else:
            load_space(path)
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        data = load_yaml(path)
        if path.name.startswith("attack-"):  # overrides applied to every cell's implant
            build(AttackConfig, {"attack": "badnets", "behavior": "sentiment", **data}, source=str(path))
        else:
            build(CompareConfig if path.name == "compare.yaml" else ImmunizeConfig, data, source=str(path))
