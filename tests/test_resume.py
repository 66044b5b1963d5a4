"""Resume: SIGKILL mid-run, then resume=auto continues from the last checkpoint, exactly."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import BIGML_SCRIPT, TINY_GPT, TINY_RUN, kill_when

ARGS = [*TINY_RUN, *TINY_GPT, "trainer.max_steps=60", "checkpoint.every_n_steps=10", "trainer.val_check_interval=30"]


def test_sigkill_then_resume_auto_matches_an_uninterrupted_run(run_script, env, corpus, tmp_path):
    reference = run_script("pretrain", *ARGS, f"data.path={corpus}", f"hydra.run.dir={tmp_path / 'ref'}")
    assert reference.code == 0, reference.err
    ref = json.loads((tmp_path / "ref" / "metrics.json").read_text())

    root = Path(env["BIGML_OUTPUT_ROOT"])
    proc = subprocess.Popen([BIGML_SCRIPT, "pretrain", *ARGS, f"data.path={corpus}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, root, "pretrain/*/checkpoints/step-000020.ckpt")
    (run_dir,) = list(root.glob("pretrain/*"))
    assert not (run_dir / "metrics.json").exists()  # a killed run does not look finished

    resumed = run_script("pretrain", *ARGS, f"data.path={corpus}", "resume=auto")
    assert resumed.code == 0, resumed.err
    assert f"resuming from {run_dir}" in resumed.err
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "completed" and m["step"] == 60
    assert m["tokens_seen"] == ref["tokens_seen"]
    assert m["val_loss"] == pytest.approx(ref["val_loss"], abs=1e-4)
    assert m["train_loss"] == pytest.approx(ref["train_loss"], abs=1e-4)
    assert list(root.glob("pretrain/*")) == [run_dir]  # resumed in place, no second run directory


def test_resume_auto_without_anything_to_resume_starts_fresh(cli, corpus, env):
    r = cli("pretrain", *TINY_RUN, *TINY_GPT, f"data.path={corpus}", "trainer.max_steps=4", "resume=auto")
    assert r.code == 0, r.err
    assert "starting a new run" in r.err


def test_resume_from_a_directory_without_checkpoints(cli, corpus, tmp_path):
    (tmp_path / "nothing").mkdir()
    r = cli("pretrain", *TINY_RUN, *TINY_GPT, f"data.path={corpus}", f"resume={tmp_path / 'nothing'}")
    assert r.code == 2 and "no readable checkpoint" in r.err


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_over(cli, corpus, tmp_path, monkeypatch):
    """SIGKILL in the middle of the first checkpoint write leaves a run directory with no checkpoint:
    resuming it trains from step 0 there (nothing else to lose), to the same end as a fresh run."""
    import sys

    run = tmp_path / "killed"
    args = [*TINY_RUN, *TINY_GPT, f"data.path={corpus}", "trainer.precision=32-true"]
    env = {**os.environ, "BIGML_FAULT": "kill:.ckpt:1", "CI": "1"}
    p = subprocess.run([sys.executable, "-m", "bigml", "pretrain", *args, f"hydra.run.dir={run}"], env=env,
                       capture_output=True, text=True)
    assert p.returncode == -9, p.stderr[-2000:]
    assert not list((run / "checkpoints").glob("*.ckpt"))
    r = cli("pretrain", *args, f"resume={run}")
    assert r.code == 0, r.err
    assert "starts again from step 0" in r.err
    ref = cli("pretrain", *args, f"hydra.run.dir={tmp_path / 'ref'}")
    assert ref.code == 0
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (run, tmp_path / "ref"))
    assert got["status"] == "completed" and got["step"] == want["step"]
    assert got["val_loss"] == pytest.approx(want["val_loss"], abs=1e-5)


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    from bigml.training.checkpoints import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, target)

    def crash(obj, f, *a, **k):  # a crash half-way through serializing the next checkpoint
        f.write(b"partial")
        raise RuntimeError("killed")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(RuntimeError):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=False)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.sha256"]  # no temp files left behind
    from bigml.atomic import verify_file

    assert verify_file(target)  # the checksum file still vouches for the intact previous version


def test_a_truncated_checkpoint_is_skipped(tmp_path):
    from bigml.training.checkpoints import pick_checkpoint

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    torch.save({"step": 10}, ckpts / "step-000010.ckpt")
    (ckpts / "last.ckpt").write_bytes(b"\x80\x02truncated")
    assert pick_checkpoint(tmp_path) == ckpts / "step-000010.ckpt"
