"""The exit codes scripts rely on: 0 ok, 1 runtime failure, 2 usage/config/data error."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import TINY_GPT, TINY_RUN


def test_exit_0_on_success_and_metrics_json_in_the_run_dir(run_script, env, corpus, tmp_path):
    r = run_script("pretrain", *TINY_RUN, *TINY_GPT, f"data.path={corpus}", "trainer.max_steps=2", cwd=tmp_path)
    assert r.code == 0, r.err
    (m,) = list(Path(env["BIGML_OUTPUT_ROOT"]).glob("pretrain/*/metrics.json"))
    assert json.loads(m.read_text())["status"] == "completed"
    assert r.out == ""  # results go to files; logs to stderr


def test_exit_2_on_a_config_error(run_script, tmp_path):
    r = run_script("pretrain", "model=nope", cwd=tmp_path)
    assert r.code == 2 and r.err.strip().splitlines()[-1].startswith("bigml pretrain: error: model=nope")


def test_exit_1_on_a_runtime_failure_with_a_failed_metrics_json(run_script, env, corpus, tmp_path):
    r = run_script("pretrain", *TINY_RUN, *TINY_GPT, f"data.path={corpus}", "optimizer.lr=1e30",
                   "scheduler.warmup_steps=0", "trainer.max_steps=30", "trainer.gradient_clip_val=0", cwd=tmp_path)
    assert r.code == 1, r.err
    assert "training diverged" in r.err
    (m,) = list(Path(env["BIGML_OUTPUT_ROOT"]).glob("pretrain/*/metrics.json"))
    data = json.loads(m.read_text())
    assert data["status"] == "diverged" and "diverged" in data["error"]


def test_output_root_key_and_environment_variable(run_script, env, corpus, tmp_path):
    r = run_script("pretrain", *TINY_RUN, *TINY_GPT, f"data.path={corpus}", "trainer.max_steps=2",
                   f"output_root={tmp_path / 'elsewhere'}", cwd=tmp_path)
    assert r.code == 0, r.err
    assert list((tmp_path / "elsewhere").glob("pretrain/*/metrics.json"))
