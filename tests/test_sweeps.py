"""Multirun sweeps: grid, Optuna, failing jobs, and the summary they write."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from conftest import TINY_GPT, TINY_RUN

ARGS = [*TINY_RUN, *TINY_GPT, "trainer.max_steps=4", "trainer.val_check_interval=2"]


def _summary(env) -> tuple[Path, dict]:
    (sweep,) = list(Path(env["BIGML_OUTPUT_ROOT"]).glob("pretrain-sweep/*"))
    return sweep, json.loads((sweep / "summary.json").read_text())


def test_grid_sweep_writes_a_sorted_summary(cli, env, corpus):
    r = cli("pretrain", "-m", *ARGS, f"data.path={corpus}", "optimizer.lr=1e-3,5e-3")
    assert r.code == 0, r.err
    sweep, s = _summary(env)
    assert s["jobs"] == 2 and s["failed"] == 0 and s["metric"] == "val_loss"
    losses = [row["val_loss"] for row in s["results"]]
    assert losses == sorted(losses)
    assert {row["params"] for row in s["results"]} == {"optimizer.lr=0.001", "optimizer.lr=0.005"}
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [r["status"] for r in rows] == ["completed", "completed"]
    for job in ("0", "1"):
        assert json.loads((sweep / job / "metrics.json").read_text())["status"] == "completed"
    assert "sorted by val_loss" in r.err


def test_a_failing_job_is_recorded_and_the_sweep_finishes(cli, env, corpus):
    r = cli("pretrain", "-m", *ARGS, f"data.path={corpus}", "data.block_size=4096,32")
    assert r.code == 1
    assert "job 0 failed: data.block_size: 4096 exceeds" in r.err
    assert "1 of 2 sweep jobs failed" in r.err
    _, s = _summary(env)
    by_status = {row["status"]: row for row in s["results"]}
    assert by_status["completed"]["params"] == "data.block_size=32"
    assert "exceeds the model's" in by_status["failed"]["error"]


def test_fail_fast_stops_at_the_first_failure(cli, env, corpus):
    r = cli("pretrain", "-m", *ARGS, f"data.path={corpus}", "sweep.fail_fast=true", "data.block_size=4096,32")
    assert r.code == 1
    _, s = _summary(env)
    assert s["failed"] == 2 and all(row["status"] != "completed" for row in s["results"])


def test_a_bad_value_anywhere_in_a_grid_fails_before_any_job_runs(cli, env, corpus):
    r = cli("pretrain", "-m", *ARGS, f"data.path={corpus}", "model=gpt-tiny,gpt-tinny")
    assert r.code == 2 and "model=gpt-tinny: no such model preset" in r.err
    assert not list(Path(env["BIGML_OUTPUT_ROOT"]).glob("pretrain-sweep/*/0/metrics.json"))


def test_optuna_search_runs_three_trials(cli, env, corpus):
    r = cli("pretrain", *ARGS, f"data.path={corpus}", "hparams_search=optuna", "hydra.sweeper.n_trials=3")
    assert r.code == 0, r.err
    sweep, s = _summary(env)
    assert s["jobs"] == 3 and s["failed"] == 0
    assert (sweep / "optimization_results.yaml").exists()
    # TINY_RUN fixes optimizer.lr on the command line, so the sampler varies weight_decay only
    decays = {o for row in s["results"] for o in row["params"].split() if o.startswith("optimizer.weight_decay=")}
    assert len(decays) == 3


def test_joblib_launcher_runs_jobs_in_parallel_processes(run_script, env, corpus, tmp_path):
    r = run_script("pretrain", "-m", *ARGS, f"data.path={corpus}", "launcher=joblib", "optimizer.lr=1e-3,2e-3", cwd=tmp_path)
    assert r.code == 0, r.err
    _, s = _summary(env)
    assert s["jobs"] == 2 and s["failed"] == 0
