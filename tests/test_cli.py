"""The command line itself: help, config composition, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bigml.commands import COMMANDS


def test_help_lists_commands(run_script, tmp_path):
    r = run_script("--help", cwd=tmp_path)
    assert r.code == 0
    for name in COMMANDS:
        assert name in r.out


def test_no_command_is_a_usage_error(run_script, tmp_path):
    r = run_script(cwd=tmp_path)
    assert r.code == 2
    assert "usage: bigml <command>" in r.err


def test_unknown_command_suggests_the_right_one(cli):
    r = cli("pretrian")
    assert r.code == 2
    assert "did you mean pretrain" in r.err
    assert "Traceback" not in r.err


def test_python_dash_m_works(env, tmp_path):
    p = subprocess.run([sys.executable, "-m", "bigml", "--version"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert p.returncode == 0 and p.stdout.startswith("bigml ")


def test_command_help_shows_its_groups_presets_and_documented_keys(cli):
    r = cli("pretrain", "--help")
    assert r.code == 0 and "cli is powered by Hydra" not in r.out
    groups = {line.split()[0]: line for line in r.out.split("keys (key=value)")[0].splitlines()[3:] if line.startswith("  ")}
    for group in ("model", "data", "optimizer", "scheduler", "trainer", "logger", "tokenizer", "callbacks", "debug",
                  "experiment"):
        assert group in groups, group
    assert "gpt-tiny*" in groups["model"] and "llama-tiny" in groups["model"]  # presets, the default starred
    assert "tweets" not in groups["data"]  # labeled data is not a pretrain corpus
    for unused in ("method", "task", "arch"):  # groups pretrain does not use, and the internal one
        assert unused not in groups, unused
    # keys with the comment from their YAML file
    assert any(line.startswith("  trainer.max_steps=300") and "optimizer steps" in line for line in r.out.splitlines())
    r = cli("finetune", "--help")
    assert "method" in r.out and "full*, lora" in r.out and "quantize" not in r.out.split("keys (key=value)")[0]


@pytest.mark.parametrize("command, args, needle", [
    ("pretrain", ["data=tweets"], "data=tweets holds labeled data, which bigml pretrain does not read"),
    ("finetune", ["method=quantize"], "'quantize' is not a finetune method; choose one of full, lora"),
    ("pretrain", ["method=lora"], "this command has no method group"),
])
def test_a_group_the_command_does_not_use_fails_at_once(cli, command, args, needle, tmp_path):
    r = cli(command, *args, f"hydra.run.dir={tmp_path / 'r'}")
    assert r.code == 2 and needle in r.err and "Traceback" not in r.err
    assert not (tmp_path / "r").exists()


def test_every_command_has_its_config_and_back():
    from bigml.help import conf_dir

    configs = {p.stem for p in conf_dir().glob("*.yaml")} - {"common"}
    assert configs == set(COMMANDS)


@pytest.mark.parametrize("line, expected, unexpected", [
    ("bigml pre", ["pretrain"], ["finetune"]),
    ("bigml pretrain mod", ["model="], ["method="]),
    ("bigml pretrain model=gp", ["gpt-mini", "gpt-small", "gpt-tiny"], ["bert-tiny"]),
    ("bigml pretrain trainer.max_s", ["trainer.max_steps="], []),
    ("bigml pretrain trainer.compile=", ["true", "false"], []),
    ("bigml finetune task=sft sft.pa", ["sft.packing="], []),
    ("bigml finetune method=", ["full", "lora"], ["quantize"]),
    ("bigml completion ", ["bash", "zsh"], []),
])
def test_shell_completion_candidates(run_script, tmp_path, line, expected, unexpected):
    r = run_script("__complete", line, cwd=tmp_path)
    got = r.out.split()
    assert r.code == 0 and set(expected) <= set(got) and not set(unexpected) & set(got), got


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_script_works_in_the_shell(run_script, env, tmp_path, shell):
    import shutil

    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed here (apt-get install {shell})")
    script = run_script("completion", shell, cwd=tmp_path).out
    (tmp_path / "c.sh").write_text(script)
    from conftest import BIGML_SCRIPT

    path = f"{Path(BIGML_SCRIPT).parent}:{env['PATH']}"
    probe = ('source ./c.sh; COMP_LINE="bigml pretrain model=gp"; COMP_POINT=${#COMP_LINE}; _bigml_complete; '
             'echo "${COMPREPLY[@]}"')
    p = subprocess.run([shell, "-c", probe], cwd=tmp_path, env={**env, "PATH": path}, capture_output=True, text=True)
    assert p.stdout.split() == ["gpt-mini", "gpt-small", "gpt-tiny"], (p.stdout, p.stderr)
    # Hydra's own flag gives the same script
    assert run_script("pretrain", "-sc", f"install={shell}", cwd=tmp_path).out == script


def test_cfg_job_prints_the_composed_config(cli):
    r = cli("pretrain", "model=bert-mini", "optimizer.lr=3e-4", "--cfg", "job")
    assert r.code == 0
    assert "name: bert-mini" in r.out
    assert "lr: 0.0003" in r.out
    assert "num_layers: 4" in r.out


def test_friendly_and_transformers_names_both_override(cli):
    r = cli("pretrain", "model=gpt-tiny", "model.num_layers=5", "--cfg", "job", "--resolve")
    assert "n_layer: 5" in r.out
    r = cli("pretrain", "model=gpt-tiny", "model.n_layer=7", "--cfg", "job", "--resolve")
    assert "n_layer: 7" in r.out


@pytest.mark.parametrize("args, expected", [
    (["model=bert-smal"], "model=bert-smal: no such model preset (did you mean bert-small?)"),
    (["trainer=gpux"], "trainer=gpux: no such trainer preset"),
    (["trainer.max_step=3"], "trainer.max_step: unknown key (did you mean trainer.max_steps?)"),
    (["trainer.max_steps=abc"], "trainer.max_steps: 'abc' is not an integer"),
    (["optimizer.lr=fast"], "optimizer.lr: 'fast' is not a number"),
    (["trainer.compile=maybe"], "trainer.compile: 'maybe' is not a boolean"),
    (["model.foo=1", "--cfg", "job"], "model.foo: unknown key"),
    (["data.path=/no/such/corpus"], "data.path=/no/such/corpus: no such file or directory"),
    (["data.block_size=4096", "data.path=/tmp"], "data.block_size: 4096 exceeds the model's 512 positions"),
    (["trainer.precision=fp8"], "trainer.precision: unknown precision 'fp8'"),
    (["tokenizer.kind=sentencepiece"], "tokenizer.kind: unknown kind 'sentencepiece'"),
])
def test_bad_config_is_one_line_and_exit_2(cli, corpus, args, expected):
    if not any(a.startswith("data.path") for a in args):
        args = [f"data.path={corpus}", *args]
    r = cli("pretrain", *args)
    assert r.code == 2, r.err
    assert expected in r.err
    assert "Traceback" not in r.err
    errors = [line for line in r.err.splitlines() if "error:" in line]
    assert len(errors) == 1


def test_bad_config_leaves_no_run_directory(cli, env, tmp_path):
    r = cli("pretrain", "data.path=/no/such/corpus")
    assert r.code == 2
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.rglob("*.json"))
    assert not runs.exists() or not [p for p in (runs / "pretrain").glob("*")] if runs.exists() else True


def test_debug_shows_the_traceback(cli, monkeypatch):
    monkeypatch.setenv("BIGML_DEBUG", "1")
    r = cli("pretrain", "data.path=/no/such/corpus")
    assert r.code == 2
    assert "Traceback" in r.err
