"""The command line itself: help, config composition, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

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


def test_command_help_shows_groups_and_keys(cli):
    r = cli("pretrain", "--help")
    assert r.code == 0
    for group in ("model", "data", "optimizer", "scheduler", "trainer", "logger", "tokenizer"):
        assert f"{group}:" in r.out, group
    assert "bert-tiny" in r.out and "llama-tiny" in r.out  # the presets of the model group
    assert "max_steps" in r.out  # the composed config


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
